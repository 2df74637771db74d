#!/usr/bin/env python3
"""Reads criterion's estimates of the hot_path benchmark and prints the table of
docs/performance.md: median ns per request, and each middleware's added cost over `bare`
measured in the same run, as a ratio against tower_governor's."""
import json, os, sys

root = sys.argv[1] if len(sys.argv) > 1 else "target/criterion"
cases = ["bare", "tower_governor", "tollgate_no_headers", "tower_governor_headers", "tollgate"]
for group in ["one_thread", "two_threads"]:
    gdir = os.path.join(root, group)
    if not os.path.isdir(gdir):
        continue
    counts = sorted({int(n) for c in cases if os.path.isdir(os.path.join(gdir, c)) for n in os.listdir(os.path.join(gdir, c)) if n.isdigit()})
    print(f"\n{group} (median ns per request; in brackets, added over bare)\n")
    print("| tenants | " + " | ".join(cases) + " | tollgate_no_headers ÷ tower_governor (added) | tollgate ÷ tower_governor_headers (added) |")
    print("|---" * (len(cases) + 3) + "|")
    for n in counts:
        med = {}
        for c in cases:
            path = os.path.join(gdir, c, str(n), "new", "estimates.json")
            if os.path.exists(path):
                med[c] = json.load(open(path))["median"]["point_estimate"]
        if "bare" not in med:
            continue
        added = {c: med[c] - med["bare"] for c in med}
        cells = [f"{med[c]:.0f}" + ("" if c == "bare" else f" (+{added[c]:.0f})") if c in med else "—" for c in cases]
        def ratio(a, b):
            return f"{added[a] / added[b]:.2f}" if a in added and b in added and added[b] > 0 else "—"
        print(f"| {n:,} | " + " | ".join(cells) + f" | {ratio('tollgate_no_headers', 'tower_governor')} | {ratio('tollgate', 'tower_governor_headers')} |")
