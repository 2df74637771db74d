#!/usr/bin/env bash
# The long runs CI leaves out of its 40 minutes (scripts/test.sh), on the same servers
# (scripts/test-env.sh):
#
#   scripts/stress.sh scale
#       the scale runs at full size (TOLLGATE_STRESS=1): 10,000 tenants × 2 meters giving their
#       leases back at shutdown on SQLite, PostgreSQL and Redis (the suite runs 2,000), each alone.
#   scripts/stress.sh repeat N TEST_TARGET FILTER
#       a test N times under `stress --cpu 2` (Debian's `stress`, installed where missing), as
#       the house asks of every new concurrency test: `scripts/stress.sh repeat 20 engine
#       money::four_engines`. Stops at the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:?scale or repeat}
shift
case $mode in
scale)
  exec scripts/test-env.sh env TOLLGATE_STRESS=1 \
    cargo test --locked --all-features --test store -- --test-threads 1 --nocapture \
    many_tenants_give_their_leases_back_at_shutdown
  ;;
repeat)
  n=${1:?how many runs}
  target=${2:?a test target (engine, store, …)}
  filter=${3:?a test name filter}
  if ! command -v stress >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq stress >&2
  fi
  # The servers once, around every run.
  if [ -z "${TOLLGATE_REQUIRE_SERVERS:-}" ]; then
    exec scripts/test-env.sh "$PWD/scripts/stress.sh" repeat "$n" "$target" "$filter"
  fi
  cargo test --locked --all-features --test "$target" --no-run
  # In a process group of its own, so that its workers stop with it.
  setsid stress --cpu 2 >/dev/null 2>&1 &
  load=$!
  log=$(mktemp)
  trap 'kill -- -$load 2>/dev/null || true; rm -f "$log"' EXIT
  for i in $(seq "$n"); do
    if ! cargo test --locked --all-features --test "$target" -- "$filter" >"$log" 2>&1; then
      cat "$log"
      echo "run $i of $n failed"
      exit 1
    fi
    if ! grep -qE '^test result: ok\. [1-9]' "$log"; then
      cat "$log"
      echo "no test of $target matches \"$filter\""
      exit 1
    fi
    echo "run $i of $n: $(grep -E '^test result' "$log" | tail -1)"
  done
  ;;
*)
  echo "usage: scripts/stress.sh scale | repeat N TEST_TARGET FILTER" >&2
  exit 2
  ;;
esac
