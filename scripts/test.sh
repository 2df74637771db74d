#!/usr/bin/env bash
# The whole test suite, as CI runs it, with every cargo feature: format, lints (warnings
# denied), unit, behaviour and doc tests, the docs, and a smoke run of the quickstart over real
# HTTP; the default build and the build without default features are checked too, and the
# request path's instructions against its budget (valgrind, installed where it is missing).
# Needs only the Rust toolchain (cargo, rustfmt, clippy), curl and python3 (with venv and pip):
# it installs moto's DynamoDB server in a venv (.venv/moto), starts it on a free loopback port
# for the DynamoDB tests, and stops it at the end; it starts a throwaway PostgreSQL cluster
# (scripts/postgres-server.sh, which installs PostgreSQL from Debian's packages if it is
# missing) for the PostgreSQL tests, and removes it at the end; and a throwaway Redis server
# and a Redis Cluster of three masters (scripts/redis-server.sh, Debian's package) for the Redis
# tests. The Stripe tests start their own Stripe stand-in (tests/common/stripe.rs) on a free
# loopback port and talk to it with the real async-stripe client.
# The dashboard's browser test installs Debian's chromium and chromium-driver when missing, and
# Selenium in a venv (.venv/browser) (scripts/dashboard-browser.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

# Each step prints its duration when the next begins, and the run ends with every step's
# duration and the total (what "CI stays within 40 minutes cold" is read from).
run_start=$SECONDS
step_name=""
step_start=$SECONDS
step_times=()
end_step() {
  if [ -n "$step_name" ]; then
    local took=$((SECONDS - step_start))
    step_times+=("$(printf '%5ds  %s' "$took" "$step_name")")
    printf -- '-- %s: %ds\n' "$step_name" "$took"
  fi
  step_name=""
}
step() {
  end_step
  step_name="$*"
  step_start=$SECONDS
  printf '\n== %s\n' "$*"
}

# A one-off build gains nothing from incremental state, and it costs gigabytes of disk.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

step "local DynamoDB server (moto, in a venv)"
venv="${TOLLGATE_MOTO_VENV:-$PWD/.venv/moto}"
# The alerts tests verify deliveries with the official Standard Webhooks library, and their
# bodies against docs/alerts.schema.json, in the same venv (scripts/alert-receiver.py).
if ! "$venv/bin/python" -c 'import moto, flask, standardwebhooks, jsonschema' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'moto[dynamodb]==5.2.5' flask flask-cors \
    'standardwebhooks==1.1.0' 'jsonschema==4.25.1'
fi
moto_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
moto_log=$(mktemp)
"$venv/bin/python" scripts/moto-server.py 127.0.0.1 "$moto_port" >"$moto_log" 2>&1 &
moto_pid=$!
trap 'kill $moto_pid 2>/dev/null || true; rm -f "$moto_log"' EXIT
for _ in $(seq 100); do
  curl -s -o /dev/null "http://127.0.0.1:$moto_port/moto-api/" && break
  kill -0 $moto_pid 2>/dev/null || { cat "$moto_log"; echo "the DynamoDB server did not start"; exit 1; }
  sleep 0.2
done
curl -s -o /dev/null "http://127.0.0.1:$moto_port/moto-api/" || { cat "$moto_log"; echo "the DynamoDB server did not answer"; exit 1; }
export TOLLGATE_DYNAMODB_ENDPOINT="http://127.0.0.1:$moto_port"
# The servers are there: a test that finds none fails instead of skipping.
export TOLLGATE_REQUIRE_SERVERS=1
# Tests that stop and resume a server start one of their own with this Python.
export TOLLGATE_MOTO_PYTHON="$venv/bin/python"
# The standard AWS environment, for a local server.
export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1
echo "moto on $TOLLGATE_DYNAMODB_ENDPOINT"

step "local PostgreSQL server (a throwaway cluster, as an unprivileged user when run as root)"
pg_dir=$(mktemp -d -u "${TMPDIR:-/tmp}/tollgate-pg.XXXXXX")
trap 'kill $moto_pid 2>/dev/null || true; rm -f "$moto_log"; scripts/postgres-server.sh stop "$pg_dir"' EXIT
# Through a variable: `eval "$(…)"` would swallow the script's failure.
pg_env=$(scripts/postgres-server.sh start "$pg_dir")
eval "$pg_env"
echo "PostgreSQL on $TOLLGATE_POSTGRES_URL"
# PgBouncer in transaction mode in front of it (as RDS Proxy and most managed pools run).
bouncer_dir="$pg_dir-bouncer"
# Tests that restart or pause a server start clusters of their own under this run's prefix
# (tests/common/postgres.rs) and remove them when done; a test binary killed midway leaves its
# clusters, stopped here (only this run's: another run on the machine keeps its own).
export TOLLGATE_POSTGRES_OWN_PREFIX="$pg_dir-own"
stop_postgres() {
  scripts/pgbouncer.sh stop "$bouncer_dir" || true
  scripts/postgres-server.sh stop "$pg_dir" || true
  for own in "$TOLLGATE_POSTGRES_OWN_PREFIX"-*; do
    if [ -d "$own" ]; then scripts/postgres-server.sh stop "$own" || true; fi
  done
  return 0
}
trap 'kill $moto_pid 2>/dev/null || true; rm -f "$moto_log"; stop_postgres' EXIT
bouncer_env=$(scripts/pgbouncer.sh start "$bouncer_dir" "$TOLLGATE_POSTGRES_PORT")
eval "$bouncer_env"
echo "PgBouncer (transaction mode) on $TOLLGATE_PGBOUNCER_URL"

step "local Redis server and Redis Cluster (Debian's redis-server, the append-only file on)"
redis_dir=$(mktemp -d -u "${TMPDIR:-/tmp}/tollgate-redis.XXXXXX")
cluster_dir=$(mktemp -d -u "${TMPDIR:-/tmp}/tollgate-redis-cluster.XXXXXX")
trap 'kill $moto_pid 2>/dev/null || true; rm -f "$moto_log"; stop_postgres; scripts/redis-server.sh stop "$redis_dir" || true; scripts/redis-server.sh stop "$cluster_dir" || true' EXIT
redis_env=$(scripts/redis-server.sh start "$redis_dir")
eval "$redis_env"
echo "Redis on $TOLLGATE_REDIS_URL"
cluster_env=$(scripts/redis-server.sh start-cluster "$cluster_dir")
eval "$cluster_env"
echo "Redis Cluster (three masters) at $TOLLGATE_REDIS_CLUSTER_URL"

step "format"
cargo fmt --all -- --check

step "clippy (warnings denied)"
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings

step "rustls everywhere: no OpenSSL in the tree"
if cargo tree --workspace --all-features --locked -i openssl-sys >/dev/null 2>&1; then
  cargo tree --workspace --all-features --locked -i openssl-sys
  echo "openssl-sys is in the dependency tree"; exit 1
fi

step "the default build compiles alone"
cargo check --workspace --locked

step "each feature of the root crate alone, warnings denied (as cargo hack check --each-feature)"
# Every feature on its own, and none: a feature that only compiles, or only compiles without
# warnings, beside another is caught here. The loop needs nothing installed.
features=$(cargo metadata --no-deps --format-version 1 --locked \
  | python3 -c 'import json,sys; print(" ".join(sorted(f for p in json.load(sys.stdin)["packages"] if p["name"]=="tollgate" for f in p["features"] if f != "default")))')
for feature in "" $features; do
  out=$(cargo check -p tollgate --locked --no-default-features ${feature:+--features "$feature"} --message-format short 2>&1) \
    || { echo "$out"; echo "the root crate does not build with only: ${feature:-no features}"; exit 1; }
  if grep -E "^(src|benches|examples)/.*(warning|error)" <<<"$out"; then
    echo "warnings with only: ${feature:-no features}"; exit 1
  fi
done

step "unit and behaviour tests"
cargo test --workspace --locked --all-features --lib --bins --tests --examples

step "loom: the reference count of src/tenant/handle.rs, model-checked (its own cfg and target directory)"
RUSTFLAGS="--cfg tollgate_loom" CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}/loom" \
  cargo test --locked -p tollgate --no-default-features --lib tenant::handle::loom_tests

step "without default features (no SQLite): builds, and names the feature a [store] needs"
cargo test --workspace --locked --no-default-features --test config

step "doc tests"
cargo test --workspace --locked --all-features --doc

step "docs (warnings denied)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --locked --all-features --no-deps

# As docs.rs builds them (nightly's `doc_cfg` under `--cfg docsrs`, which the crates' metadata
# asks for), on the pinned stable: a bare machine cannot install nightly. The docs.rs break of
# 2026-11-23 passed the step above.
step "docs as docs.rs builds them (--cfg docsrs, warnings denied)"
RUSTC_BOOTSTRAP=1 RUSTDOCFLAGS="--cfg docsrs -D warnings" cargo doc --workspace --locked --all-features --no-deps

step "benchmarks compile and run once"
cargo test --workspace --locked --benches -- --test 2>&1 | tail -n 3

step "the request path within its instruction budget (callgrind; scripts/instructions.budget)"
scripts/instruction-budget.sh

step "quickstart smoke test"
scripts/smoke-quickstart.sh

step "the operator dashboard in a real browser (headless Chromium, Selenium)"
scripts/dashboard-browser.sh

step "disk used by the build"
du -sh "${CARGO_TARGET_DIR:-target}" 2>/dev/null || true

end_step
printf '\n== durations (seconds)\n'
printf '%s\n' "${step_times[@]}"
printf '%5ds  total\n' $((SECONDS - run_start))
