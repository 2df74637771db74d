#!/usr/bin/env bash
# Starts the quickstart on a free loopback port, checks what the README promises with curl,
# stops it with SIGTERM, as containers and systemd do, and checks that it flushed. Bounded: every wait has a limit.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --locked --example quickstart
cargo build --locked -p tollgate-cli
cli="$(cd "${CARGO_TARGET_DIR:-target}" && pwd)/debug/tollgate"
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
bin="$(cd "${CARGO_TARGET_DIR:-target}" && pwd)/debug/examples/quickstart"
# The quickstart keeps its state in tollgate.db in the working directory: run it in $work.
start() { # log file
  (cd "$work" && PORT=$port TOLLGATE_CONFIG="$OLDPWD/examples/quickstart.toml" \
    TOLLGATE_USAGE_FILE="$work/usage.jsonl" RUST_LOG=warn exec "$bin") >"$1" 2>&1 &
  pid=$!
  ready=no
  for _ in $(seq 100); do
    if curl -s -o /dev/null "$base/"; then ready=yes; break; fi
    kill -0 $pid 2>/dev/null || break
    sleep 0.1
  done
  if [ "$ready" != yes ]; then
    echo "the quickstart did not start:"; cat "$1"
    echo "0 passed, 1 failed"
    exit 1
  fi
}
base="http://127.0.0.1:$port"
pid=
pid_a=
pid_b=
trap 'kill $pid $pid_a $pid_b 2>/dev/null || true; rm -rf "$work"' EXIT
start "$work/out.log"

passed=0
failed=0
check() { # name expected actual
  if [ "$2" = "$3" ]; then passed=$((passed + 1)); else failed=$((failed + 1)); echo "FAIL $1: expected $2, got $3"; fi
}
code() { curl -s -o /dev/null -w '%{http_code}' "$@"; }
free=(-H 'x-api-key: tg_test_free_acme')

check "says where billing goes" yes \
  "$(grep -q 'billing: closed windows written to .*usage.jsonl (no \[stripe\] section)' "$work/out.log" && echo yes || echo no)"
check "generate (cost 5)" 200 "$(code -X POST "$base/v1/generate" "${free[@]}")"
check "items" 200 "$(code "$base/v1/items" "${free[@]}")"
check "no key" 401 "$(code "$base/v1/items")"
check "unknown key" 401 "$(code "$base/v1/items" -H 'x-api-key: nope')"
check "bad key" 400 "$(code "$base/v1/items" -H 'x-api-key: a b')"
check "policy header" '"rate";q=10;w=5, "requests-day";q=20;w=86400' \
  "$(curl -s -D - -o /dev/null "$base/v1/items" "${free[@]}" | tr -d '\r' | sed -n 's/^ratelimit-policy: //p')"
# The tenant's own routes. Its usage, outside the layer, charges nothing: polled 20 times, the
# quota below still lets 13 more pass.
usage=$(curl -s -D "$work/usage.head" "$base/v1/usage" "${free[@]}")
check "usage route" 200 "$(code "$base/v1/usage" "${free[@]}")"
check "usage is the tenant's own" '"tenant":"acme"' "$(grep -o '"tenant":"acme"' <<<"$usage")"
check "usage remaining, as the next request's header will say it (+1)" '"remaining":13' \
  "$(grep -o '"meter":"requests","mode":"hard","period":"day","remaining":[0-9]*' <<<"$usage" | grep -o '"remaining":[0-9]*')"
check "usage cache header" "private, max-age=1" "$(tr -d '\r' < "$work/usage.head" | sed -n 's/^cache-control: //p')"
etag=$(tr -d '\r' < "$work/usage.head" | sed -n 's/^etag: //p')
check "usage not modified" 304 "$(code "$base/v1/usage" "${free[@]}" -H "if-none-match: $etag")"
check "usage without key" 401 "$(code "$base/v1/usage")"
check "usage POST" 405 "$(code -X POST "$base/v1/usage" "${free[@]}")"
for _ in $(seq 17); do code "$base/v1/usage" "${free[@]}" > /dev/null; done
check "spend cap route (no cap on free)" 403 "$(code "$base/v1/spend/cap" "${free[@]}")"
check "alert endpoint route (none registered)" 404 "$(code "$base/v1/alerts/endpoint" "${free[@]}")"
check "metrics" yes "$(grep -q '^tollgate_usage_view_refreshes_total' <<<"$(curl -s "$base/metrics")" && echo yes || echo no)"

# 5 + 1 + 1 units spent, and one by each of the two routes behind the layer (the usage route
# none): 11 more pass, then the daily quota of 20 is spent.
statuses=""
for _ in $(seq 14); do
  statuses+="$(code "$base/v1/items" "${free[@]}") "
  sleep 0.5
done
check "quota" "200 200 200 200 200 200 200 200 200 200 200 429 429 429 " "$statuses"
check "problem type" "application/problem+json" \
  "$(curl -s -o /dev/null -w '%{content_type}' "$base/v1/items" "${free[@]}")"
check "pro tenant" 200 "$(code "$base/v1/items" -H 'x-api-key: tg_test_pro_globex')"

# The metered plan: its tenant reads its spend cap, lowers it to $0.10, and completions that
# hold 50 tokens ($0.05) and bill 40 ($0.04) pass until the next hold would pass the cap.
metered=(-H 'x-api-key: tg_test_metered_umbrella')
check "spend cap: the plan's" '"limit":"1"' "$(curl -s "$base/v1/spend/cap" "${metered[@]}" | grep -o '"limit":"[0-9.]*"')"
check "spend cap: above the plan's maximum" 422 \
  "$(code -X PUT "$base/v1/spend/cap" "${metered[@]}" -H 'content-type: application/json' -d '{"limit": "6.00", "mode": "hard"}')"
check "spend cap: lowered" 200 \
  "$(code -X PUT "$base/v1/spend/cap" "${metered[@]}" -H 'content-type: application/json' -d '{"limit": "0.10", "mode": "hard"}')"
check "spend cap: two completions, then the cap" "200 200 402 " \
  "$(for _ in 1 2 3; do printf '%s ' "$(code -X POST "$base/v1/complete" "${metered[@]}" -H 'x-max-tokens: 50')"; done)"
check "recharge route (not the tenant's to set)" 403 "$(code "$base/v1/credits/recharge" "${metered[@]}")"

# A reload keeps the counters: the free tenant's daily quota stays spent.
kill -HUP $pid
for _ in $(seq 50); do grep -q '^reloaded' "$work/out.log" && break; sleep 0.1; done
check "reload" "reloaded" "$(grep -o '^reloaded' "$work/out.log" | head -1)"
check "quota kept across reload" 429 "$(code "$base/v1/items" "${free[@]}")"

kill -TERM $pid
for _ in $(seq 100); do kill -0 $pid 2>/dev/null || break; sleep 0.1; done
check "graceful stop (21 + 6 request units, 120 + 80 tokens)" "stopped: flushed 227 units" "$(grep -o 'stopped: flushed [0-9]* units' "$work/out.log" || true)"
check "money apart from units (80 tokens at \$0.001)" "0.08 usd spent" "$(grep -o '[0-9.]* usd spent' "$work/out.log" || true)"
check "state kept in tollgate.db" yes "$([ -s "$work/tollgate.db" ] && echo yes || echo no)"
# Stopped, the node gave its leases back: the store's counters hold exactly what was used
# (acme: 5 + 1 + 1 + 13 requests, 120 tokens; globex: 1 request).
counters() { # tenant meter period: the units its counter holds, read with the CLI
  (cd "$work" && "$cli" --config "$OLDPWD/examples/quickstart.toml" quota show "$1") |
    awk -v m="$2" -v p="$3" '$1 == m && $2 == p { print ($NF == "-") ? $(NF-1) : $NF }'
}
check "acme's requests counter equals its usage" 20 "$(counters acme requests day)"
check "acme's tokens counter equals its usage" 120 "$(counters acme tokens month@1)"
check "globex's requests counter equals its usage" 1 "$(counters globex requests day)"

# A restart on the same file: the daily quota is still spent, and the headers say so.
start "$work/out2.log"
check "quota kept across restart" 429 "$(code "$base/v1/items" "${free[@]}")"
check "remaining after restart" '"requests-day";r=0' \
  "$(curl -s -D - -o /dev/null "$base/v1/items" "${free[@]}" | tr -d '\r' | sed -n 's/^ratelimit: .*\("requests-day";r=[0-9]*\).*/\1/p')"
check "pro tenant after restart" 200 "$(code "$base/v1/items" -H 'x-api-key: tg_test_pro_globex')"
check "a slow generation (1 request, 120 tokens)" 200 \
  "$(code -X POST "$base/v1/generate/slow" -H 'x-api-key: tg_test_pro_globex')"
# A prepaid balance: nothing granted, nothing served; a grant with the CLI (on the running
# node's file) is spent by completions that hold their `x-max-tokens` first, and the one the
# balance cannot cover is refused before any work, so it never goes below zero.
prepaid=(-H 'x-api-key: tg_test_prepaid_initech')
check "prepaid: no balance yet" 402 "$(code -X POST "$base/v1/complete" "${prepaid[@]}" -H 'x-max-tokens: 50')"
(cd "$work" && "$cli" --config "$OLDPWD/examples/quickstart.toml" credits grant initech tokens 100 --id pi_smoke) >/dev/null
# The refusal above is trusted for the rest of its second; the store is asked again after it.
sleep 1.1
check "prepaid: a bad estimate" 400 "$(code -X POST "$base/v1/complete" "${prepaid[@]}" -H 'x-max-tokens: lots')"
check "prepaid: holds 50, bills 40" 200 "$(code -X POST "$base/v1/complete" "${prepaid[@]}" -H 'x-max-tokens: 50')"
check "prepaid: holds 50 of the 60 left, bills 40" 200 "$(code -X POST "$base/v1/complete" "${prepaid[@]}" -H 'x-max-tokens: 50')"
check "prepaid: 20 left cannot hold 50" 402 "$(code -X POST "$base/v1/complete" "${prepaid[@]}" -H 'x-max-tokens: 50')"
check "prepaid: the balance in the headers" '"tokens-prepaid";r=20' \
  "$(curl -s -D - -o /dev/null -X POST "$base/v1/complete" "${prepaid[@]}" -H 'x-max-tokens: 50' | tr -d '\r' | sed -n 's/^ratelimit: .*\("tokens-prepaid";r=[0-9]*\).*/\1/p')"
kill -TERM $pid
for _ in $(seq 100); do kill -0 $pid 2>/dev/null || break; sleep 0.1; done
check "second stop (2 + 2 request units, 80 + 120 tokens)" "stopped: flushed 204 units" "$(grep -o 'stopped: flushed [0-9]* units' "$work/out2.log" || true)"
check "prepaid: the balance's counter holds exactly what was recorded (80 of 100)" "80 100" \
  "$(cd "$work" && "$cli" --config "$OLDPWD/examples/quickstart.toml" quota show initech | awk '$1 == "tokens" && $2 == "prepaid" { print $(NF-1), $NF }')"

# README, "Try it": the dashboard over the quickstart's file, on loopback without a token.
dash_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
(cd "$work" && exec "$cli" --config "$OLDPWD/examples/quickstart.toml" dashboard --listen "127.0.0.1:$dash_port") >"$work/dashboard.log" 2>&1 &
dash_pid=$!
for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$dash_port/" && break; sleep 0.1; done
check "README: the dashboard lists the quickstart's tenants" yes \
  "$(grep -q 'href="/tenants/initech"' <<<"$(curl -s "http://127.0.0.1:$dash_port/tenants")" && echo yes || echo no)"
check "README: the dashboard shows initech's balance (20 left of 100)" yes \
  "$(grep -q 'tokens 20 left of 100' <<<"$(curl -s "http://127.0.0.1:$dash_port/tenants")" && echo yes || echo no)"
kill -TERM $dash_pid 2>/dev/null || true
for _ in $(seq 100); do kill -0 $dash_pid 2>/dev/null || break; sleep 0.1; done
check "the dashboard stops on SIGTERM" stopped "$(kill -0 $dash_pid 2>/dev/null && echo running || echo stopped)"

# On a store a fleet shares (DynamoDB, PostgreSQL; when the test script runs a local server):
# quickstart processes on one table or schema share the free tenant's daily quota of 20. Node A
# spends 6 and stops (its lease goes back, its usage is flushed to the store); node B then gets
# exactly the other 14; a third process finds the quota spent.
shared_quota() { # label env...: the three nodes on the store the env names
  local label=$1
  shift
  node() { # name: starts a quickstart on the store in $work/$label-name, sets $url and $pid
    local p dir="$work/$label-$1"
    p=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    mkdir -p "$dir"
    (cd "$dir" && exec env "${store_env[@]}" PORT=$p TOLLGATE_CONFIG="$OLDPWD/examples/quickstart.toml" \
      TOLLGATE_USAGE_FILE="$dir/usage.jsonl" RUST_LOG=warn "$bin") >"$dir/out.log" 2>&1 &
    pid=$!
    url="http://127.0.0.1:$p"
    for _ in $(seq 150); do curl -s -o /dev/null "$url/" && return; kill -0 $pid 2>/dev/null || break; sleep 0.1; done
    echo "the quickstart on $label did not start:"; cat "$dir/out.log"
  }
  stop() { # name: stops $pid, prints the units it flushed
    kill -TERM $pid
    for _ in $(seq 150); do kill -0 $pid 2>/dev/null || break; sleep 0.1; done
    grep -o 'stopped: flushed [0-9]* units' "$work/$label-$1/out.log" | grep -o '[0-9]*' || echo none
  }
  store_env=("$@")
  node a
  check "$label: node A generate (cost 5)" 200 "$(code -X POST "$url/v1/generate" "${free[@]}")"
  check "$label: node A items" 200 "$(code "$url/v1/items" "${free[@]}")"
  check "$label: node A flushes 6 request units + 120 tokens" 126 "$(stop a)"
  node b
  statuses=""
  for _ in $(seq 15); do
    statuses+="$(code "$url/v1/items" "${free[@]}") "
    sleep 0.5
  done
  check "$label: node B gets exactly the other 14 of the shared quota" \
    "200 200 200 200 200 200 200 200 200 200 200 200 200 200 429 " "$statuses"
  check "$label: node B flushes 14" 14 "$(stop b)"
  node c
  check "$label: a third node finds the quota spent" 429 "$(code "$url/v1/items" "${free[@]}")"
  check "$label: the pro tenant is not" 200 "$(code "$url/v1/items" -H 'x-api-key: tg_test_pro_globex')"
  check "$label: node C flushes 1" 1 "$(stop c)"
}
# One build serves the three stores (and, without Stripe support, the refusal below).
cargo build --locked --example quickstart --features dynamodb,postgres,redis
if [ -n "${TOLLGATE_DYNAMODB_ENDPOINT:-}" ]; then
  shared_quota dynamodb TOLLGATE_STORE=dynamodb TOLLGATE_DYNAMODB_TABLE="smoke-$$" \
    AWS_ENDPOINT_URL_DYNAMODB="$TOLLGATE_DYNAMODB_ENDPOINT"
fi
# PostgreSQL: the README's three commands, on the test script's server (schema `tollgate`,
# created by node A at start); the usage each node flushed is read back with psql.
if [ -n "${TOLLGATE_POSTGRES_URL:-}" ]; then
  psql -q "$TOLLGATE_POSTGRES_URL" -c 'SET client_min_messages = warning' -c 'DROP SCHEMA IF EXISTS tollgate CASCADE' >/dev/null
  shared_quota postgres TOLLGATE_STORE=postgres DATABASE_URL="$TOLLGATE_POSTGRES_URL"
  check "postgres: usage read with psql (126 + 14 + 1 request units and tokens)" 141 \
    "$(psql -qtA "$TOLLGATE_POSTGRES_URL" -c 'SELECT sum(quantity) FROM tollgate.usage')"
fi

# Redis: the README's three commands, on the test script's server: the quotas on Redis (keys
# under `tollgate:`, cleared first), each node's usage in the SQLite file of its own directory.
if [ -n "${TOLLGATE_REDIS_URL:-}" ]; then
  redis-cli -u "$TOLLGATE_REDIS_URL" --scan --pattern 'tollgate:*' | xargs -r redis-cli -u "$TOLLGATE_REDIS_URL" del >/dev/null
  shared_quota redis TOLLGATE_STORE=redis REDIS_URL="$TOLLGATE_REDIS_URL"
  check "redis: the free tenant's quota is one hash on Redis" hash \
    "$(redis-cli -u "$TOLLGATE_REDIS_URL" type 'tollgate:1:{acme}:quota')"
fi

# With [stripe], never a file and Stripe both: a build without Stripe support refuses to start;
# with it, closed windows go to Stripe when the key is set, and nowhere (said) when it is not.
# The prepaid plan's auto-recharge is on in this one (its commented lines, as the file says).
sed 's/^#recharge# //' examples/quickstart.toml >"$work/stripe.toml"
printf '\n[stripe]\napi_base = "http://127.0.0.1:9"\n' >>"$work/stripe.toml"
check "[stripe]: the prepaid plan recharges, off until the tenant turns it on" \
  "recharge of \`tokens\` for \`initech\`: off (not_turned_on)" \
  "$(cd "$work" && "$cli" --config "$work/stripe.toml" credits recharge initech show | head -1)"
refused=$(cd "$work" && PORT=$port TOLLGATE_CONFIG="$work/stripe.toml" timeout 20 "$bin" 2>&1; echo "exit $?")
# Here-strings, not `… | grep -q`, throughout: under pipefail, grep leaving at its first match
# can end the writer with SIGPIPE and fail the pipeline (seen once in a cold run here).
check "[stripe] without Stripe support: refused" yes \
  "$(grep -q 'features stripe' <<<"$refused" && grep -q 'exit 2' <<<"$refused" && echo yes || echo no)"
# One build with Stripe support serves the [stripe] checks and OpenTelemetry's below.
cargo build --locked --example quickstart --features stripe,otel
says() { # env...: starts the Stripe build with [stripe], prints its billing line, stops it
  (cd "$work" && env "$@" PORT=$port TOLLGATE_CONFIG="$work/stripe.toml" RUST_LOG=warn "$bin") >"$work/stripe.log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do grep -q 'billing:' "$work/stripe.log" && break; sleep 0.1; done
  kill -TERM $pid 2>/dev/null || true
  for _ in $(seq 100); do kill -0 $pid 2>/dev/null || break; sleep 0.1; done
  grep 'billing:' "$work/stripe.log" | head -1 | sed 's/^ *//'
}
check "[stripe] with the key: Stripe" "billing: closed windows exported to Stripe Billing Meters at http://127.0.0.1:9/" \
  "$(says STRIPE_SECRET_KEY=sk_test_smoke)"
check "[stripe] without the key: nothing, said" yes \
  "$(grep -q 'this process exports nothing' <<<"$(says -u STRIPE_SECRET_KEY)" && echo yes || echo no)"

# The whole Stripe path: with a webhook secret, POST /stripe/webhook is mounted (a forged
# signature gets 400) and the worker reconciles.
(cd "$work" && env STRIPE_SECRET_KEY=sk_test_smoke STRIPE_WEBHOOK_SECRET=whsec_smoke PORT=$port \
  TOLLGATE_CONFIG="$work/stripe.toml" RUST_LOG=warn "$bin") >"$work/webhook.log" 2>&1 &
pid=$!
for _ in $(seq 100); do curl -s -o /dev/null "$base/" && break; sleep 0.1; done
check "[stripe] webhooks: mounted, said" yes \
  "$(grep -q 'webhooks: POST /stripe/webhook' "$work/webhook.log" && grep -q 'reconcile: what Stripe holds' "$work/webhook.log" && echo yes || echo no)"
check "[stripe] webhooks: a forged signature gets 400" 400 \
  "$(code -X POST "$base/stripe/webhook" -H 'stripe-signature: t=1,v1=00' -d '{}')"
kill -TERM $pid 2>/dev/null || true
for _ in $(seq 100); do kill -0 $pid 2>/dev/null || break; sleep 0.1; done

# OpenTelemetry (the same build): with OTEL_EXPORTER_OTLP_ENDPOINT set, as the quickstart's
# comment says, a request's admission reaches an OTLP receiver (scripts/otlp-receiver.py: the
# official OTLP protobuf definitions decode what arrives) as a span under the request's
# traceparent, and tollgate's counters as metrics, sent at the latest when it stops.
if [ -z "${TOLLGATE_MOTO_PYTHON:-}" ]; then
  [ -z "${CI:-}" ] || { echo "CI is set but TOLLGATE_MOTO_PYTHON is not (scripts/test.sh sets it)"; exit 1; }
  echo "SKIPPED: OpenTelemetry's smoke check (TOLLGATE_MOTO_PYTHON, a Python with opentelemetry-proto, is not set)"
else
  "$TOLLGATE_MOTO_PYTHON" scripts/otlp-receiver.py 0 >"$work/otlp.out" 2>&1 &
  otlp_pid=$!
  for _ in $(seq 100); do grep -q '^ready ' "$work/otlp.out" && break; sleep 0.1; done
  otlp="http://127.0.0.1:$(sed -n 's/^ready //p' "$work/otlp.out")"
  (cd "$work" && env OTEL_EXPORTER_OTLP_ENDPOINT="$otlp" PORT=$port RUST_LOG=warn "$bin") >"$work/otel.log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do curl -s -o /dev/null "$base/" && break; sleep 0.1; done
  check "otel: said at start" yes "$(grep -q "OpenTelemetry: spans and metrics to $otlp" "$work/otel.log" && echo yes || echo no)"
  code "$base/v1/items" "${free[@]}" -H 'traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01' >/dev/null
  kill -TERM $pid 2>/dev/null || true
  for _ in $(seq 100); do kill -0 $pid 2>/dev/null || break; sleep 0.1; done
  check "otel: the admission, a span under the request's traceparent, its tenant named" yes "$(curl -s "$otlp/spans" | python3 -c '
import json, sys
spans = json.load(sys.stdin)
print("yes" if any(s["trace_id"] == "0af7651916cd43dd8448eb211c80319c" and s["parent_span_id"] == "b7ad6b7169203331"
                   and s["attributes"].get("tollgate.tenant") == "acme" and s["service"] == "tollgate-quickstart"
                   for s in spans) else spans)')"
  check "otel: the counters, as metrics" yes "$(curl -s "$otlp/metrics" | python3 -c '
import json, sys
print("yes" if any(p["name"] == "tollgate.tracked_tenants" for p in json.load(sys.stdin)) else "no")')"
  kill $otlp_pid 2>/dev/null || true
fi

# The AI example (tollgate-axum's ai_stream), as its comment says: a balance of 300 tokens
# streams 120 and `done`, 120 and `done`, the 60 left and `stopped`, then 402. One build, with
# PostgreSQL support, serves this and the two nodes on PostgreSQL below.
cargo build --locked -p tollgate-axum --example ai_stream --features tollgate/postgres
ai="$(cd "${CARGO_TARGET_DIR:-target}" && pwd)/debug/examples/ai_stream"
ai_node() { # log [env...]: starts ai_stream on a free port, sets $ai_url and $pid
  local log=$1 p
  shift
  p=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  (cd "$work" && exec env "$@" PORT=$p RUST_LOG=warn "$ai") >"$log" 2>&1 &
  pid=$!
  ai_url="http://127.0.0.1:$p"
  for _ in $(seq 150); do grep -q listening "$log" && return; kill -0 $pid 2>/dev/null || break; sleep 0.1; done
  echo "ai_stream did not start:"; cat "$log"
}
completion() { # url: one completion of 120 tokens: "<last event> <tokens>", or the status
  local out status
  out=$(curl -sN -w '\n%{http_code}' "$1/v1/completions" -H 'x-api-key: tg_prepaid_acme' \
    -H 'content-type: application/json' -d '{"prompt": "tell me a story", "max_tokens": 120}')
  status=$(tail -1 <<<"$out")
  [ "$status" = 200 ] || { echo "$status"; return; }
  echo "$(grep -o '^event: [a-z]*' <<<"$out" | tail -1 | cut -d' ' -f2) $(grep -c '^data: [^{]' <<<"$out")"
}
ai_node "$work/ai.log"
session=""
for _ in 1 2 3 4; do session+="$(completion "$ai_url"), "; done
check "ai_stream: the session its comment describes" "done 120, done 120, stopped 60, 402, " "$session"
kill -TERM $pid 2>/dev/null || true
for _ in $(seq 100); do kill -0 $pid 2>/dev/null || break; sleep 0.1; done
# TOLLGATE_CONFIG and PORT: two processes on one PostgreSQL schema stream from one balance,
# granted once; A and B alternate.
if [ -n "${TOLLGATE_POSTGRES_URL:-}" ]; then
  psql -q "$TOLLGATE_POSTGRES_URL" -c 'SET client_min_messages = warning' -c 'DROP SCHEMA IF EXISTS ai_smoke CASCADE' >/dev/null
  python3 - "$work/ai.toml" <<'PY'
import re, sys
source = open("integrations/axum/examples/ai_stream.rs").read()
config = re.search(r'CONFIG: &str = r#"(.*?)"#;', source, re.S).group(1)
assert '[store]\nkind = "memory"' in config, "ai_stream's CONFIG changed: update the smoke script"
config = config.replace('[store]\nkind = "memory"', '[store]\nkind = "postgres"\nschema = "ai_smoke"')
open(sys.argv[1], "w").write(config)
PY
  ai_node "$work/ai-a.log" TOLLGATE_CONFIG="$work/ai.toml" DATABASE_URL="$TOLLGATE_POSTGRES_URL"
  pid_a=$pid url_a=$ai_url
  ai_node "$work/ai-b.log" TOLLGATE_CONFIG="$work/ai.toml" DATABASE_URL="$TOLLGATE_POSTGRES_URL"
  pid_b=$pid url_b=$ai_url
  session="$(completion "$url_a"), $(completion "$url_b"), $(completion "$url_a"), $(completion "$url_b")"
  check "ai_stream: two nodes on PostgreSQL share one balance, granted once" "done 120, done 120, stopped 60, 402" "$session"
  kill -TERM $pid_a $pid_b 2>/dev/null || true
  for _ in $(seq 100); do kill -0 $pid_a 2>/dev/null || kill -0 $pid_b 2>/dev/null || break; sleep 0.1; done
fi

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
