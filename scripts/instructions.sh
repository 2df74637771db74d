#!/usr/bin/env bash
# Instructions per request of each case of the profiling harness, counted by callgrind
# (repeatable whatever else the machine does): the difference between two runs of different
# lengths, divided by the difference in requests, so set-up cancels out.
# Usage: scripts/instructions.sh [tenants] [cases...]
set -euo pipefail
cd "$(dirname "$0")/.."
tenants=${1:-1}; shift || true
cases=${*:-bare tower_governor tollgate tower_governor_headers tollgate_headers tollgate_defaults}
bin=$(cargo bench --bench profile --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("executable") and m["target"]["name"]=="profile"][-1])')
count() { valgrind --tool=callgrind --callgrind-out-file=/dev/null "$bin" "$1" "$tenants" "$2" 2>&1 | sed -n 's/.*Collected : //p'; }
for c in $cases; do
  a=$(count "$c" 20000); b=$(count "$c" 120000)
  echo "$c $tenants: $(( (b - a) / 100000 )) instructions/request"
done
