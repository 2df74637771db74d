#!/usr/bin/env bash
# The audit's soak (tests/audit): seeds of random operations and faults on one store, each
# checked against the ledger, on the servers of scripts/test-env.sh. A failing seed is shrunk
# and printed with the line that runs it again.
#
#   scripts/audit.sh [--store memory|sqlite|postgres|pgbouncer|dynamodb|redis] [--seeds N]
#                    [--seed FIRST] [--ops N] [--shrink SECONDS]
#   scripts/audit.sh --ci
#       the fixed seeds of tests/audit/main.rs on every store (about a minute), as CI runs
#       them with the rest of the suite.
#
# Defaults: memory, 100 seeds from 1, 160 operations each, a minute of shrinking.
set -euo pipefail
cd "$(dirname "$0")/.."

store=memory seeds=100 seed=1 ops=160 shrink=60
if [ "${1:-}" = --ci ]; then
  exec scripts/test-env.sh env TOLLGATE_REQUIRE_SERVERS=1 \
    cargo test --locked --all-features --test audit -- --include-ignored --skip soak
fi
while [ $# -gt 0 ]; do
  case $1 in
  --store) store=${2:?}; shift 2 ;;
  --seeds) seeds=${2:?}; shift 2 ;;
  --seed) seed=${2:?}; shift 2 ;;
  --ops) ops=${2:?}; shift 2 ;;
  --shrink) shrink=${2:?}; shift 2 ;;
  *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
exec scripts/test-env.sh env AUDIT_STORE="$store" AUDIT_SEEDS="$seeds" AUDIT_SEED="$seed" AUDIT_OPS="$ops" \
  AUDIT_SHRINK_SECS="$shrink" TOLLGATE_REQUIRE_SERVERS=1 \
  cargo test --locked --all-features --test audit -- --include-ignored --exact soak --nocapture
