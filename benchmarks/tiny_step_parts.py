#!/usr/bin/env python
"""Where a tiny-preset optimizer step goes: process time per part of ``step()``, or kernel calls per part.

The model and the optimizers are built as ``benchmarks/tiny_step.py`` builds them (gpt-tiny, batch 16 x 64,
as ``whiten bench`` builds them). Parts: the map phase (the matrix math), the direction and apply phases,
the AdamW half, the non-finite-gradient check (``WhitenOptimizer._gather``) and the all-or-nothing
transaction's state copy (``StepTransaction._save``) and finiteness check (``finite_state_flags``).
``--count`` instead counts the kernel calls of one step, each attributed to its innermost ``whiten`` frame
(math, gradient check, transaction). Numbers in ``docs/performance.md`` ("Small matrices").

Usage::

    python benchmarks/tiny_step_parts.py muon kl-shampoo pro-kls-r16 [--steps 60] [--count]
"""

from __future__ import annotations

import argparse
import collections
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import whiten.optim._transaction as transaction
from whiten.bench.models import build_model, model_config
from whiten.bench.optimizers import build_optimizer
from whiten.optim.base import PhasedOptimizer, WhitenOptimizer
from whiten.optim.registry import get

WARMUP = 10


_active: collections.Counter[str] = collections.Counter()


def timed(totals: dict[str, float], name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` adding its process time to ``totals[name]`` (the outermost call only: an override calling its
    parent's phase, as Pro-KLShampoo's map calls KL-Shampoo's, is counted once)."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _active[name] += 1
        start = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            _active[name] -= 1
            if not _active[name]:
                totals[name] += time.process_time() - start

    return wrapper


def instrument(totals: dict[str, float]) -> None:
    """Time the parts of a step (every optimizer class shares these methods through its bases)."""
    for name in ("_direction_phase", "_map_phase", "_apply_phase"):
        for cls in _phased_classes():
            if name in vars(cls):
                setattr(cls, name, timed(totals, name, vars(cls)[name]))
    for name in ("step", "_gather", "_adamw_step"):
        setattr(WhitenOptimizer, name, timed(totals, name, vars(WhitenOptimizer)[name]))
    transaction.StepTransaction._save = timed(totals, "_save", transaction.StepTransaction._save)  # type: ignore[method-assign]
    transaction.finite_state_flags = timed(totals, "finite_state_flags", transaction.finite_state_flags)


def _phased_classes() -> list[type]:
    classes, todo = [], [PhasedOptimizer]
    while todo:
        cls = todo.pop()
        classes.append(cls)
        todo.extend(cls.__subclasses__())
    return classes


class CallCounter(TorchDispatchMode):
    """Counts kernel calls by the part of the step they run in: the gradient check (``_gather``), the
    transaction's copy and check (``_save``, ``finite_state_flags``), or the optimizer's math."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        names = {f.name for f in traceback.extract_stack(limit=24) if "/whiten/" in f.filename}
        if "_gather" in names:
            part = "gradient check"
        elif names & {"_save", "finite_state_flags"}:
            part = "transaction"
        else:
            part = "math"
        self.counts[part] += 1
        return func(*args, **(kwargs or {}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("optimizers", nargs="+")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--count", action="store_true", help="count kernel calls of one step instead of timing")
    args = parser.parse_args()
    torch.set_num_threads(1)
    totals: dict[str, float] = collections.defaultdict(float)
    if not args.count:
        instrument(totals)
    cfg = model_config("gpt-tiny", vocab_size=256, ctx=64)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 64), generator=gen)
    y = torch.randint(0, 256, (16, 64), generator=gen)
    for name in args.optimizers:
        model = build_model(cfg, seed=0, device=torch.device("cpu"))
        spec = get(name)
        opt = build_optimizer(spec, model, lr=spec.default_lr, weight_decay=0.0, embed_lr=1e-2)
        steps = 3 if args.count else args.steps  # counted: the 13th step (no eigenbasis refresh at period 10)
        for k in range(WARMUP + steps):
            if k == WARMUP:
                totals.clear()
            _, loss = model(x, y)
            loss.backward()
            if args.count and k == WARMUP + 2:
                counter = CallCounter()
                with counter:
                    opt.step()
                print(f"{name:14s} kernel calls {sum(counter.counts.values()):5d}  {dict(counter.counts)}")
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
        if args.count:
            continue
        for part, seconds in sorted(totals.items(), key=lambda item: -item[1]):
            print(f"{name:14s} {part:20s} {1e3 * seconds / steps:7.2f} ms/step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
