#!/usr/bin/env bash
# Instructions per request of each case of the profiling harness, counted by callgrind
# (repeatable whatever else the machine does): the difference between two runs of different
# lengths, divided by the difference in requests, so set-up cancels out. Every thread is
# counted: the worker's share of each request (refills, flushes) with it. With
# TOLLGATE_BENCH_NO_REFILL=1 (the request path alone: no refill, flush or revalidation in a
# run) only the thread of the harness's measured loop is counted (`--toggle-collect` on its
# `drive`), and ONE_RUN=1 then counts a single run of 200,000 requests, set-up excluded: for
# 1,000,000 tenants, whose set-up takes minutes under valgrind.
# With CACHE=1, cachegrind instead counts first-level data misses and misses of a simulated
# 1 MiB, 8-way second level (this machine's L2) per request: the memory side, just as steady.
# Usage: [CACHE=1] [ONE_RUN=1] [FEATURES=dynamodb] scripts/instructions.sh [tenants] [cases...]
# (TOLLGATE_BENCH_STORE=memory|sqlite|dynamodb|postgres picks the store of the tollgate cases;
# dynamodb needs FEATURES=dynamodb and TOLLGATE_DYNAMODB_ENDPOINT, postgres FEATURES=postgres and
# TOLLGATE_POSTGRES_URL.)
set -euo pipefail
cd "$(dirname "$0")/.."
tenants=${1:-1}; shift || true
cases=${*:-bare tower_governor tollgate tower_governor_headers tollgate_headers tollgate_defaults}
bin=$(cargo bench --bench profile ${FEATURES:+--features "$FEATURES"} --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("executable") and m["target"]["name"]=="profile"][-1])')
quiet=${TOLLGATE_BENCH_NO_REFILL:-0}
if [[ ${ONE_RUN:-0} == 1 && $quiet != 1 ]]; then
  echo "ONE_RUN=1 needs TOLLGATE_BENCH_NO_REFILL=1 (the loop alone is counted only then)" >&2
  exit 2
fi
toggle=()
[[ $quiet == 1 ]] && toggle=(--toggle-collect='*support::drive*')
count() {
  valgrind --tool=callgrind "${toggle[@]}" --callgrind-out-file=/dev/null "$bin" "$1" "$tenants" "$2" 2>&1 \
    | sed -n 's/.*Collected : //p'
}
# "D1 misses L2 misses" of one run.
misses() {
  valgrind --tool=cachegrind --cache-sim=yes --LL=1048576,8,64 --cachegrind-out-file=/dev/null \
    "$bin" "$1" "$tenants" "$2" 2>&1 | awk '/D1  misses|LLd misses/ {gsub(",", "", $4); printf "%s ", $4}'
}
for c in $cases; do
  if [[ ${CACHE:-0} == 1 ]]; then
    first=$(misses "$c" 200000); second=$(misses "$c" 1200000)
    read -r d1a l2a <<<"$first"; read -r d1b l2b <<<"$second"
    for n in "${d1a:-}" "${l2a:-}" "${d1b:-}" "${l2b:-}"; do
      [[ $n =~ ^[0-9]+$ ]] || { echo "$c $tenants: cachegrind counted nothing ('$first', '$second')" >&2; exit 1; }
    done
    echo "$c $tenants: $(( (d1b - d1a) / 10000 ))/100 D1 misses, $(( (l2b - l2a) / 10000 ))/100 L2 misses per request"
  elif [[ ${ONE_RUN:-0} == 1 ]]; then
    a=$(count "$c" 200000)
    if ! [[ $a =~ ^[0-9]+$ ]] || (( a == 0 )); then echo "$c $tenants: callgrind counted nothing ('$a')" >&2; exit 1; fi
    echo "$c $tenants: $(( a / 200000 )) instructions/request"
  else
    # The two runs side by side, one core each: the request path's instruction counts do not
    # depend on timing (with TOLLGATE_BENCH_NO_REFILL unset the worker's share is counted too,
    # and that share can, as it always could). A run that fails, or counts nothing, fails the
    # script, and the other run is stopped.
    runs=$(mktemp)
    count "$c" 20000 >"$runs.a" &
    pa=$!
    count "$c" 120000 >"$runs.b" &
    pb=$!
    trap 'kill $pa $pb 2>/dev/null || true; rm -f "$runs" "$runs.a" "$runs.b"' EXIT
    wait "$pa" || { echo "$c $tenants: the run of 20,000 requests failed" >&2; exit 1; }
    wait "$pb" || { echo "$c $tenants: the run of 120,000 requests failed" >&2; exit 1; }
    trap - EXIT
    a=$(cat "$runs.a"); b=$(cat "$runs.b")
    rm -f "$runs" "$runs.a" "$runs.b"
    if ! [[ $a =~ ^[0-9]+$ && $b =~ ^[0-9]+$ ]] || (( b <= a )); then
      echo "$c $tenants: callgrind counted nothing ('$a', '$b')" >&2
      exit 1
    fi
    echo "$c $tenants: $(( (b - a) / 100000 )) instructions/request"
  fi
done
