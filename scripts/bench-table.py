#!/usr/bin/env python3
"""Reads criterion's estimates of the hot_path benchmark and prints the tables of
docs/performance.md: median ns per request, and in brackets each middleware's added cost
over `bare` measured in the same run. "ratio" is tollgate's added cost divided by
tower_governor's (no headers on either side); "ratio, headers" is tollgate_headers' divided by
tower_governor_headers'. The budget is met where both are at most 1.

With several criterion folders (several whole runs), each cell is the median over the runs
of that run's value, and the ratios are medians of the per-run ratios: shared machines are
noisy, and a ratio is only meaningful within one run.

Run with: python3 scripts/bench-table.py [target/criterion ...]"""
import json, os, statistics, sys

roots = sys.argv[1:] or ["target/criterion"]
cases = ["bare", "tower_governor", "tollgate", "tower_governor_headers", "tollgate_headers",
         "tollgate_defaults"]


def load(root, group, case, n):
    path = os.path.join(root, group, case, str(n), "new", "estimates.json")
    if os.path.exists(path):
        return json.load(open(path))["median"]["point_estimate"]
    return None


for group in ["one_thread", "two_threads"]:
    counts = set()
    for root in roots:
        d = os.path.join(root, group, "bare")
        if os.path.isdir(d):
            counts |= {int(n) for n in os.listdir(d) if n.isdigit()}
    if not counts:
        continue
    print(f"\n{group}: median ns per request (added over bare); {len(roots)} run(s)\n")
    print("| tenants | " + " | ".join(cases) + " | ratio | ratio, headers |")
    print("|---" * (len(cases) + 3) + "|")
    for n in sorted(counts):
        per_run = []
        for root in roots:
            m = {c: load(root, group, c, n) for c in cases}
            if m["bare"] is not None:
                per_run.append(m)
        cells = []
        for c in cases:
            vals = [r[c] for r in per_run if r[c] is not None]
            added = [r[c] - r["bare"] for r in per_run if r[c] is not None]
            if not vals:
                cells.append("—")
            elif c == "bare":
                cells.append(f"{statistics.median(vals):.0f}")
            else:
                cells.append(f"{statistics.median(vals):.0f} (+{statistics.median(added):.0f})")

        def ratio(a, b):
            rs = [(r[a] - r["bare"]) / (r[b] - r["bare"]) for r in per_run
                  if r[a] is not None and r[b] is not None and r[b] > r["bare"]]
            return f"{statistics.median(rs):.2f}" if rs else "—"

        print(f"| {n:,} | " + " | ".join(cells) + f" | {ratio('tollgate', 'tower_governor')} | "
              f"{ratio('tollgate_headers', 'tower_governor_headers')} |")
