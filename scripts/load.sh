#!/usr/bin/env bash
# End-to-end cost of tollgate: requests per server CPU-second, hello world served bare and
# behind tollgate, over axum (the tower layer) and actix-web (the native middleware), with 1
# and 10,000 tenants. A load script, not a test: run it by hand on a quiet machine.
#
#   scripts/load.sh [SECONDS_PER_RUN] [ROUNDS]     (defaults: 5 s, 3 rounds)
#   TOLLGATE_HEADERS=none scripts/load.sh           (limits.headers: draft by default)
#   DOORS="actix" TENANTS="10000" scripts/load.sh   (a part of the table: axum and actix-web,
#                                                    1 and 10,000 tenants by default)
#
# The servers run on one core (taskset -c 0; axum on one tokio thread, actix-web with one
# worker); wrk (Debian's package, with a Lua script drawing a tenant's API key per request)
# runs on the other core, over loopback, 64 connections. Bare and tollgate alternate within
# each round, so drift on a shared machine hits both alike. The figure is requests completed
# divided by the server process's CPU time (user + system, from /proc) over the run: what a
# request costs the server, whatever the machine gives the load generator. Every request
# carries the API key header, bare or not, so both parse the same bytes.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-5}"
rounds="${2:-3}"
command -v wrk >/dev/null || { echo "needs wrk (apt-get install wrk)"; exit 1; }

cargo build --release --locked -p tollgate-axum --example load_axum
cargo build --release --locked -p tollgate-actix --example load_actix
target="${CARGO_TARGET_DIR:-target}/release/examples"
tmp=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$tmp"' EXIT

ticks=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# One run: start the server, warm it up (every tenant seen once), load it, report req/CPU-s.
run() { # door mode tenants
  local door=$1 mode=$2 tenants=$3 port=18080
  cat > "$tmp/keys.lua" <<LUA
local n = $tenants
local i = 0
request = function()
  i = i + 1
  return wrk.format("GET", "/", { ["x-api-key"] = "key-" .. ((i * 7919) % n) })
end
LUA
  taskset -c 0 "$target/load_$door" "$mode" "$tenants" "127.0.0.1:$port" > "$tmp/server.log" 2>&1 &
  local pid=$!
  for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.05; done
  taskset -c 1 wrk -t1 -c64 -d1s -s "$tmp/keys.lua" "http://127.0.0.1:$port/" > /dev/null
  local before after
  before=$(cpu_ticks $pid)
  taskset -c 1 wrk -t1 -c64 -d"${secs}s" -s "$tmp/keys.lua" "http://127.0.0.1:$port/" > "$tmp/wrk.out"
  after=$(cpu_ticks $pid)
  kill $pid; wait $pid 2>/dev/null || true
  local requests non2xx
  requests=$(awk '/requests in/ {print $1}' "$tmp/wrk.out")
  non2xx=$(awk '/Non-2xx/ {print $NF}' "$tmp/wrk.out")
  [ -z "$non2xx" ] || { echo "$door $mode $tenants: $non2xx responses were not 2xx" >&2; cat "$tmp/wrk.out" >&2; exit 1; }
  python3 -c "print(round($requests / (($after - $before) / $ticks)))"
}

echo "door tenants round bare_rps_per_cpu_s tollgate_rps_per_cpu_s ratio"
for door in ${DOORS:-axum actix}; do
  for tenants in ${TENANTS:-1 10000}; do
    for round in $(seq "$rounds"); do
      bare=$(run $door bare $tenants)
      gated=$(run $door tollgate $tenants)
      python3 -c "print('$door', $tenants, $round, $bare, $gated, round($gated / $bare, 3))" | tee -a "$tmp/rows"
    done
  done
done
echo
echo "median of the rounds (requests per server CPU-second; tollgate as a share of bare):"
python3 - "$tmp/rows" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
print("| door | tenants | bare | tollgate | tollgate / bare |")
print("|---|---|---|---|---|")
for door in ("axum", "actix"):
    for tenants in ("1", "10000"):
        rs = [r for r in rows if r[0] == door and r[1] == tenants]
        if not rs:
            continue
        bare = statistics.median(float(r[3]) for r in rs)
        gated = statistics.median(float(r[4]) for r in rs)
        ratio = statistics.median(float(r[5]) for r in rs)
        print(f"| {door} | {int(tenants):,} | {bare:,.0f} | {gated:,.0f} | {ratio:.1%} |")
PY
