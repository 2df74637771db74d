#!/usr/bin/env bash
# Interleaved runs of the profiling harness: the median ns per request of each case over
# several rounds (a quick check between criterion runs on a noisy machine).
# Usage: [THREADS=2] scripts/compare.sh TENANTS ROUNDS [cases...]
set -euo pipefail
cd "$(dirname "$0")/.."
tenants=$1; rounds=$2; shift 2
cases=${*:-bare tower_governor tollgate tower_governor_headers tollgate_headers}
bin=$(cargo bench --bench profile --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("executable") and m["target"]["name"]=="profile"][-1])')
iters=$(( tenants >= 1000000 ? 3000000 : 3000000 ))
for r in $(seq "$rounds"); do
  for c in $cases; do "$bin" "$c" "$tenants" "$iters" "${THREADS:-1}"; done
done | python3 -c '
import sys, statistics, collections
d = collections.defaultdict(list)
for line in sys.stdin:
    name, rest = line.split(":")
    d[name].append(float(rest.split()[0]))
base = statistics.median(d[next(iter(d))])
for k, v in d.items():
    m = statistics.median(v)
    print(f"{k:45s} {m:8.1f} ns  (+{m - base:.0f})")'
