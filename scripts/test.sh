#!/usr/bin/env bash
# The whole test suite, as CI runs it, with every cargo feature: format, lints (warnings
# denied), unit, behaviour and doc tests, the docs, and a smoke run of the quickstart over real
# HTTP; the default build and the build without default features are checked too, and the
# request path's instructions against its budget (valgrind, installed where it is missing).
# Needs only the Rust toolchain (cargo, rustfmt, clippy), curl and python3 (with venv and pip):
# the servers the tests run against (moto's DynamoDB server in a venv, PostgreSQL with
# PgBouncer, a Redis server and a Redis Cluster) are started on free loopback ports by
# scripts/test-env.sh, installed from PyPI and Debian's packages where missing, and stopped at
# the end. The Stripe tests start their own Stripe stand-in (tests/common/stripe.rs) on a free
# loopback port and talk to it with the real async-stripe client.
# The dashboard's browser test installs Debian's chromium and chromium-driver when missing, and
# Selenium in a venv (.venv/browser) (scripts/dashboard-browser.sh).
#
# One build serves each profile and feature set: clippy, the test binaries (all features),
# the benchmarks run once and the docs share theirs; the test binaries that use the servers run
# beside the ones that do not, and beside the steps after them that only build (until the
# smoke test, which needs the machine). Long stress runs are scripts/stress.sh's, not this.
set -euo pipefail
cd "$(dirname "$0")/.."

# Each step prints its duration when the next begins, and the run ends (passed or failed)
# with every step's duration and the total: what "CI stays within 40 minutes cold" is read from.
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

# shellcheck source=scripts/test-env.sh
source scripts/test-env.sh
background_pid=""
store_log=""
store_started=""
store_time() { # the durations' line of the store tests in the background
  step_times+=("$(printf '%5ds  %s' $((SECONDS - store_started)) "(tests/store, in the background: $1)")")
}
store_failures() { # the failed store tests, and each panic as it was printed (a test's
  # `... FAILED` may share its line with another test's output: --nocapture)
  grep "FAILED" "$store_log" 2>/dev/null | grep -v "^test result" || true
  grep -v -E "^ +([0-9]+: |at )" "$store_log" 2>/dev/null | grep -A 6 "panicked at" || true
  sed -n '/^failures:$/,$p' "$store_log" 2>/dev/null || true
}
finish() {
  local status=$?
  end_step
  if [ -n "$background_pid" ]; then
    store_time "stopped when the run failed"
    # A failure before the store tests were awaited: what they said so far.
    kill "$background_pid" 2>/dev/null || true
    echo "the store tests (tests/store, in the background) were stopped; their failures so far:"
    store_failures
  fi
  test_env_stop
  printf '\n== durations (seconds)\n'
  printf '%s\n' "${step_times[@]}"
  printf '%5ds  total (%s)\n' $((SECONDS - run_start)) "$([ "$status" = 0 ] && echo passed || echo "FAILED: $status")"
  return "$status"
}
trap finish EXIT

# A one-off build gains nothing from incremental state, and it costs gigabytes of disk.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
target="${CARGO_TARGET_DIR:-target}"

step "servers: moto, PostgreSQL with PgBouncer, Redis and a Redis Cluster (scripts/test-env.sh)"
test_env_start

step "format"
cargo fmt --all -- --check

step "clippy (warnings denied)"
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings

step "rustls everywhere: no OpenSSL in the tree"
if cargo tree --workspace --all-features --locked -i openssl-sys >/dev/null 2>&1; then
  cargo tree --workspace --all-features --locked -i openssl-sys
  echo "openssl-sys is in the dependency tree"; exit 1
fi

step "docs as docs.rs builds them (--cfg docsrs, warnings denied), on the checks clippy made"
# As docs.rs builds them (nightly's `doc_cfg` under `--cfg docsrs`, which the crates' metadata
# asks for), on the pinned stable: a bare machine cannot install nightly. The docs.rs break of
# 2026-11-23 passed a plain `cargo doc`, which this build covers (the same items and links,
# with the feature badges). RUSTC_BOOTSTRAP is rustdoc's alone (scripts/rustdoc-docsrs.sh):
# the dependencies are the ones clippy checked.
RUSTDOC="$PWD/scripts/rustdoc-docsrs.sh" RUSTDOCFLAGS="--cfg docsrs -D warnings" \
  cargo doc --workspace --locked --all-features --no-deps

# Fails on a warning in what a `cargo check` printed (the workspace's own files: the root
# crate's and the integrations').
no_warnings() { # what: cargo check args…
  local what=$1 out
  shift
  out=$(cargo check --locked --message-format short "$@" 2>&1) || { echo "$out"; echo "$what does not build"; exit 1; }
  if grep -E "^(src|benches|examples|tests|integrations)/.*(warning|error)" <<<"$out"; then
    echo "warnings in $what"; exit 1
  fi
}

step "the default build, and each feature of the root crate alone, warnings denied"
# The workspace with its default features; then every feature of the root crate on its own,
# and none (as cargo hack check --each-feature): a feature that only compiles, or only
# compiles without warnings, beside another is caught here. The loop needs nothing installed.
no_warnings "the workspace with its default features" --workspace
# The benchmarks as `cargo bench` builds them, with the default features (the test build below
# has all of them).
no_warnings "the benchmarks with the default features" --workspace --benches
features=$(cargo metadata --no-deps --format-version 1 --locked \
  | python3 -c 'import json,sys; print(" ".join(sorted(f for p in json.load(sys.stdin)["packages"] if p["name"]=="tollgate" for f in p["features"] if f != "default")))')
for feature in "" $features; do
  no_warnings "the root crate with only: ${feature:-no features}" -p tollgate --no-default-features \
    ${feature:+--features "$feature"}
done

step "unit and behaviour tests (the store tests beside the rest, and beside the steps that only build)"
# One build of every test binary (the benchmarks' among them, for their run below); then the
# store tests (tests/store: the servers' own) run from their binary in the background (cargo
# would hold the build directory while they run), and every other test target in the
# foreground, through cargo.
builds=$(mktemp)
cargo test --workspace --locked --all-features --lib --bins --tests --examples --benches --no-run \
  --message-format=json-render-diagnostics >"$builds"
store_bin=$(python3 -c '
import json, sys
for line in open(sys.argv[1]):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "store" \
            and "test" in m["target"]["kind"]:
        print(m["executable"])' "$builds")
[ -n "$store_bin" ] || { echo "the store tests' binary was not built"; exit 1; }
store_log=$(mktemp)
# A moto server of their own: moto answers one request at a time, and the other binaries'
# DynamoDB tests would queue behind theirs (PostgreSQL and Redis serve both at once).
test_env_moto
# --nocapture: a test's panic is in the log when it happens, so a run stopped by another
# step's failure still shows why a store test failed (libtest prints captured output last).
TOLLGATE_DYNAMODB_ENDPOINT="$test_env_moto_endpoint" "$store_bin" --nocapture >"$store_log" 2>&1 &
background_pid=$!
store_started=$SECONDS
# Every other test target of the workspace, by name (a new one runs without a change here), in
# one invocation with the build's packages and features: nothing is built again. The audit
# (tests/audit) runs after the store tests: its seeds keep both cores busy for a minute, and
# the store tests that count a fleet's rate on a clock driven by real steps would feel it.
others=$(cargo metadata --no-deps --format-version 1 --locked | python3 -c '
import json, sys
print(" ".join(sorted({"--test " + t["name"] for p in json.load(sys.stdin)["packages"]
                       for t in p["targets"] if "test" in t["kind"] and t["name"] not in ("store", "audit")})))')
# shellcheck disable=SC2086
cargo test --workspace --locked --all-features --no-fail-fast --lib --bins --examples $others

step "benchmarks run once (the test build's)"
cargo test --workspace --locked --all-features --benches -- --test 2>&1 | tail -n 3

step "doc tests"
cargo test --workspace --locked --all-features --doc

step "without default features (no SQLite): builds, and names the feature a [store] needs"
cargo test --workspace --locked --no-default-features --test config

step "loom: the reference count of src/tenant/handle.rs, model-checked (its own cfg and target directory)"
RUSTFLAGS="--cfg tollgate_loom" CARGO_TARGET_DIR="$target/loom" \
  cargo test --locked -p tollgate --no-default-features --lib tenant::handle::loom_tests

step "the request path within its instruction budget, and the budget's self-test (callgrind)"
scripts/instruction-budget.sh --self-test

step "the store tests' end (tests/store, run in the background since the test build)"
if ! wait "$background_pid"; then
  background_pid=""
  store_time "failed"
  grep -E "^test |^running" "$store_log" || true
  store_failures
  echo "the store tests failed"; exit 1
fi
background_pid=""
store_time "from its start to this wait; its own time is in its result line"
grep -E "^test result|^running" "$store_log"

step "the audit: seeds on every store, and each invariant against a planted defect (tests/audit)"
cargo test --workspace --locked --all-features --test audit

step "quickstart smoke test"
scripts/smoke-quickstart.sh

step "the operator dashboard in a real browser (headless Chromium, Selenium)"
scripts/dashboard-browser.sh

step "disk used by the build"
du -sh "$target" 2>/dev/null || true
