#!/usr/bin/env python
"""Per-step time and optimizer-state bytes of the Kronecker-factored optimizers on GPT-2-small shapes.

Methods: SOAP (if ``whiten.SOAP`` is importable; ``precondition_frequency=10`` like the others),
KL-Shampoo and Pro-KLShampoo at ranks 32, 64, 128, 256. For each matrix shape (fp32, one parameter)
and method the optimizer takes its initialisation step and one warm-up step, then ``--periods``
windows of ``T = precondition_frequency`` consecutive steps are timed one step at a time. Every window
holds exactly one eigenbasis refresh, so the window mean is the step time with the refresh amortised;
the reported ``step_ms`` is the median of the window means (with one window: that mean). The median
single step (``typical_ms``, a step without refresh) and the slowest step (``refresh_ms``) are reported too.
``state_bytes`` counts every tensor in the optimizer state (momentum included).

Writes ``kron_step.json`` and ``kron_step.md`` to ``--out`` and prints the table. Ratios are against
KL-Shampoo on the same shape; the stated targets are Pro-KLShampoo at r = 128 <= 0.6x the step time and
<= 0.35x the state bytes of KL-Shampoo. Timings on a shared machine are noisy (note the load average
printed with the results); compare ratios measured in the same run.

Usage::

    python benchmarks/kron_step.py --out results/kron-step              # ~4 min on 2 busy CPU cores
    python benchmarks/kron_step.py --out /tmp/k --shapes 768x768 --ranks 64 --periods 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from whiten import KLShampoo, ProKLShampoo

GPT2_SHAPES = ("768x768", "768x2304", "768x3072", "3072x768")
RANKS = (32, 64, 128, 256)
FREQUENCY = 10


def soap_factory() -> Callable[[list[torch.Tensor]], torch.optim.Optimizer] | None:
    try:
        from whiten import SOAP  # type: ignore[attr-defined]
    except ImportError:
        return None
    return lambda params: SOAP(params, lr=1e-4, precondition_frequency=FREQUENCY)


def methods(ranks: list[int]) -> dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer] | None]:
    out: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer] | None] = {"SOAP": soap_factory()}
    out["KLShampoo"] = lambda params: KLShampoo(params, precondition_frequency=FREQUENCY)
    for r in ranks:
        out[f"ProKLShampoo r={r}"] = lambda params, r=r: ProKLShampoo(params, rank=r, precondition_frequency=FREQUENCY)
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_method(make: Callable, shape: tuple[int, int], periods: int, device: torch.device) -> dict[str, Any]:
    gen = torch.Generator(device=device).manual_seed(0)
    param = torch.nn.Parameter(0.02 * torch.randn(shape, generator=gen, device=device))
    grads = [torch.randn(shape, generator=gen, device=device) for _ in range(2)]
    opt = make([param])
    for i in range(2):  # initialisation step (no update) and one warm-up step
        param.grad = grads[i % 2]
        opt.step()
    times = []
    for i in range(periods * FREQUENCY):
        param.grad = grads[i % 2]
        sync(device)
        start = time.perf_counter()
        opt.step()
        sync(device)
        times.append(time.perf_counter() - start)
    windows = [statistics.fmean(times[k : k + FREQUENCY]) for k in range(0, len(times), FREQUENCY)]
    state_bytes = sum(
        v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)
    )
    return {
        "step_ms": 1e3 * statistics.median(windows),
        "typical_ms": 1e3 * statistics.median(times),
        "refresh_ms": 1e3 * max(times),
        "state_bytes": state_bytes,
        "steps_timed": len(times),
    }


def render(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"# Kronecker optimizer step benchmark ({meta['device']}, fp32, {meta['threads']} threads)",
        "",
        f"T = {FREQUENCY}; step = median over {meta['periods']} window(s) of {FREQUENCY} steps (refresh amortised); "
        f"load average at start {meta['loadavg']}. Ratios vs KL-Shampoo on the same shape.",
        "",
        "| shape | method | step ms | typical ms | refresh ms | state MiB | time / KL | bytes / KL |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results:
        if row.get("unavailable"):
            lines.append(f"| {row['shape']} | {row['method']} | n/a | | | | | |")
            continue
        lines.append(
            f"| {row['shape']} | {row['method']} | {row['step_ms']:.1f} | {row['typical_ms']:.1f} | "
            f"{row['refresh_ms']:.1f} | {row['state_bytes'] / 2**20:.2f} | {row['time_vs_kl']:.2f} | "
            f"{row['bytes_vs_kl']:.3f} |"
        )
    targets = [r for r in results if r["method"] == "ProKLShampoo r=128" and not r.get("unavailable")]
    if targets:
        lines += ["", "Targets for Pro-KLShampoo r=128 (time <= 0.60x, bytes <= 0.35x of KL-Shampoo):", ""]
        for r in targets:
            ok_t = "met" if r["time_vs_kl"] <= 0.6 else "NOT met"
            ok_b = "met" if r["bytes_vs_kl"] <= 0.35 else "NOT met"
            lines.append(
                f"- {r['shape']}: time {r['time_vs_kl']:.2f}x ({ok_t}), bytes {r['bytes_vs_kl']:.3f}x ({ok_b})"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="directory for kron_step.json and kron_step.md")
    parser.add_argument("--shapes", default=",".join(GPT2_SHAPES), help="comma-separated MxN shapes")
    parser.add_argument("--ranks", default=",".join(map(str, RANKS)), help="Pro-KLShampoo ranks")
    parser.add_argument("--periods", type=int, default=1, help="timed windows of T steps per method")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.periods < 1:
        raise SystemExit("--periods must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",") if s]
    ranks = [int(r) for r in args.ranks.split(",") if r]
    meta = {
        "device": str(device) if device.type != "cpu" else f"cpu ({platform.processor() or platform.machine()})",
        "threads": torch.get_num_threads(),
        "periods": args.periods,
        "loadavg": " ".join(f"{v:.1f}" for v in os.getloadavg()),
        "torch": torch.__version__,
        "precondition_frequency": FREQUENCY,
    }
    results: list[dict[str, Any]] = []
    start = time.perf_counter()
    for shape in shapes:
        rows = []
        for name, make in methods(ranks).items():
            row: dict[str, Any] = {"shape": f"{shape[0]}x{shape[1]}", "method": name}
            if make is None:
                row["unavailable"] = True
            else:
                row.update(time_method(make, shape, args.periods, device))
            rows.append(row)
            print(f"{row['shape']:>9} {name:<20} " + (
                "unavailable" if make is None else f"{row['step_ms']:9.1f} ms  {row['state_bytes'] / 2**20:8.2f} MiB"
            ), flush=True)  # fmt: skip
        kl = next(r for r in rows if r["method"] == "KLShampoo")
        for row in rows:
            if not row.get("unavailable"):
                row["time_vs_kl"] = row["step_ms"] / kl["step_ms"]
                row["bytes_vs_kl"] = row["state_bytes"] / kl["state_bytes"]
        results += rows
    meta["wall_s"] = round(time.perf_counter() - start, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kron_step.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    table = render(results, meta)
    (args.out / "kron_step.md").write_text(table)
    print()
    print(table)
    print(f"wall time {meta['wall_s']} s; wrote {args.out / 'kron_step.json'} and {args.out / 'kron_step.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
