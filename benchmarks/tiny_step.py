#!/usr/bin/env python
"""Optimizer ms per step on the tiny default preset's model (gpt-tiny, batch 16 x 64), process CPU time.

Every optimizer is built as ``whiten bench`` builds it (:func:`whiten.bench.optimizers.build_optimizer`)
and all of them are stepped round-robin in one process, so that load bursts hit all of them; the
median over the timed steps is reported. Extra rows: ``NAME='{"option": value}'``.

Usage::

    python benchmarks/tiny_step.py results/tiny-step.json muon='{"matmul_dtype": "float32"}'
"""

from __future__ import annotations

import json
import sys
import time

import torch

from whiten.bench.models import build_model, model_config
from whiten.bench.optimizers import build_optimizer
from whiten.optim.registry import get

DEFAULT_ROWS = ("adamw", "muon", "kl-shampoo", "pro-kls-r16")
WARMUP, TIMED = 12, 30


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    out, extra = argv[0], argv[1:]
    variants: list[tuple[str, dict]] = [(name, {}) for name in DEFAULT_ROWS]
    for item in extra:
        name, _, options = item.partition("=")
        variants.append((name, json.loads(options)))
    cfg = model_config("gpt-tiny", vocab_size=256, ctx=64)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 64), generator=gen)
    y = torch.randint(0, 256, (16, 64), generator=gen)
    runs = []
    for name, options in variants:
        model = build_model(cfg, seed=0, device=torch.device("cpu"))
        spec = get(name)
        opt = build_optimizer(spec, model, lr=spec.default_lr, weight_decay=0.0, embed_lr=1e-2, extra_options=options)
        runs.append((f"{name} {options}" if options else name, model, opt, []))
    for k in range(WARMUP + TIMED):
        for _, model, opt, times in runs:
            _, loss = model(x, y)
            loss.backward()
            t0 = time.process_time()
            opt.step()
            t1 = time.process_time()
            opt.zero_grad(set_to_none=True)
            if k >= WARMUP:
                times.append(t1 - t0)
    result = {}
    for label, _, _, times in runs:
        median_ms = 1e3 * sorted(times)[len(times) // 2]
        result[label] = {"median_ms": median_ms, "mean_ms": 1e3 * sum(times) / len(times)}
        print(f"{label:44s} {median_ms:7.2f} ms")
    with open(out, "w") as fh:
        json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
