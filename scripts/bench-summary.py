#!/usr/bin/env python3
"""Criterion's summary of the last bench run, as Markdown tables.

Reads target/criterion/**/new/{benchmark,estimates}.json (written by
`cargo bench`) and prints, per group, each case's median with criterion's
95% confidence interval and the time per element. docs/performance.md
carries this output for the run its tables come from.

Usage: python3 scripts/bench-summary.py [target/criterion]
"""

import json
import sys
from collections import defaultdict
from pathlib import Path


def fmt_time(ns: float) -> str:
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.3g} {unit}"
    return f"{ns:.3g} ns"


def main() -> int:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "target/criterion")
    groups = defaultdict(list)
    for bench in sorted(root.glob("**/new/benchmark.json")):
        meta = json.loads(bench.read_text())
        est = json.loads((bench.parent / "estimates.json").read_text())["median"]
        elements = (meta.get("throughput") or {}).get("Elements")
        groups[meta["group_id"]].append((meta, est, elements))
    if not groups:
        print(f"no criterion results under {root}", file=sys.stderr)
        return 1
    for group, rows in groups.items():
        print(f"\n`{group}`\n")
        print("| case | runtime | median | 95% interval | per element |")
        print("|---|---|---|---|---|")
        for meta, est, elements in rows:
            ci = est["confidence_interval"]
            per = fmt_time(est["point_estimate"] / elements) if elements else ""
            print(
                f"| {meta['function_id']} | {meta.get('value_str') or ''} "
                f"| {fmt_time(est['point_estimate'])} "
                f"| {fmt_time(ci['lower_bound'])} – {fmt_time(ci['upper_bound'])} "
                f"| {per} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
