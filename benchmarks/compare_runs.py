#!/usr/bin/env python
"""Before/after table from ``step_bench.json`` files (one "before" run, one or more "after" runs).

    python benchmarks/compare_runs.py results/step-bench-before/step_bench.json \\
        results/step-bench-after/step_bench.json results/step-bench-kron/step_bench.json > table.md

Rows are matched by (configuration, method); ratios are recomputed over the merged "after" rows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_bench import _fmt_peak, _fmt_ratio, add_ratios


def _drop_before_columns(line: str) -> str:
    cells = line.split(" | ")
    return " | ".join([cells[0], cells[2], *cells[4:]])


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}" if seconds < 0.1 else f"{seconds * 1e3:.0f}"


def load(path: str) -> dict[str, Any]:
    with open(path) as fh:
        return json.load(fh)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("before", help="step_bench.json of the run before the changes ('-' for none)")
    ap.add_argument("after", nargs="+", help="step_bench.json of runs after the changes (later files win)")
    args = ap.parse_args(argv)
    before = {} if args.before == "-" else {(r["config"], r["method"]): r for r in load(args.before)["results"]}
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    metas = []
    for path in args.after:
        data = load(path)
        metas.append(data["meta"])
        for row in data["results"]:
            merged[(row["config"], row["method"])] = row
    # row order: the method table's order (the script lists methods in the same order in every run)
    from step_bench import method_table

    rank = {m.label: i for i, m in enumerate(method_table([32, 64, 128, 256], 10))}
    by_config: dict[str, list[dict[str, Any]]] = {}
    for (config, _), row in merged.items():
        by_config.setdefault(config, []).append(row)
    for rows in by_config.values():
        rows.sort(key=lambda r: rank.get(r["method"], len(rank)))
    out = []
    for meta in metas:
        rate = meta["matmul_rate"]
        out.append(
            f"- {meta['command']}: {meta['device']}, threads {meta['threads']}, clock {meta['clock']}, "
            f"matmul fp32 {rate['float32'] / 1e9:.0f} / bf16 {rate['bfloat16'] / 1e9:.0f} GFLOP/s"
        )
    out.append("")
    for config, rows in by_config.items():
        add_ratios(rows)
        header = [
            "| method | before ms | after ms (IQR) | speed-up | state MiB | GFLOP/s | % of peak | vs reference "
            "| vs fastest peer |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        if not before:
            header = [
                "| method | ms (IQR) | state MiB | GFLOP/s | % of peak | vs reference | vs fastest peer |",
                "|---|---|---|---|---|---|---|",
            ]
        out += [f"### {config}", "", *header]
        for r in rows:
            if r["status"] != "ok":
                out.append(f"| {r['method']} | | {r['status'][:60]} | | | | | | |")
                continue
            old = before.get((config, r["method"]))
            old_ms = f"{old['median_s'] * 1e3:.1f}" if old and old["status"] == "ok" else ""
            speedup = f"{old['median_s'] / r['median_s']:.2f}x" if old_ms else ""
            line = (
                f"| {r['method']} | {old_ms} | {r['median_s'] * 1e3:.1f} ({_ms(r['q1_s'])}–{_ms(r['q3_s'])})"
                f" | {speedup} | {r['state_bytes'] / 2**20:.1f} | {r['flop_rate'] / 1e9:.1f} | {_fmt_peak(r)} | "
                f"{_fmt_ratio(r['ratio_to_reference'], r['reference'])} | "
                f"{_fmt_ratio(r['ratio_to_fastest_peer'], r['fastest_peer'])} |"
            )
            out.append(line if before else _drop_before_columns(line))
        out.append("")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
