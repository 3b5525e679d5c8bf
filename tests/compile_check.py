"""``torch.compile(optimizer.step)`` equals the eager step, for every optimizer (issue 14, items 1-2).

Run as a script for the full inductor check (``make compile-check``: every optimizer, 20 steps, relative
1e-4); ``tests/test_compile.py`` runs the same comparison with a non-inductor backend in ``make test``.
The model has 1-D parameters (biases, a gain), so the AdamW half is compiled too.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

import whiten

#: every optimizer and map: (name, factory of the optimizer from the model's parameters)
OPTIMIZERS: dict[str, Callable[[list], torch.optim.Optimizer]] = {
    "muon": lambda p: whiten.Muon(p, lr=0.02),
    "htmuon-svd": lambda p: whiten.HTMuon(p, lr=0.02, spectral_map="svd"),
    "htmuon-ns": lambda p: whiten.HTMuon(p, lr=0.02, spectral_map="ns"),
    "htmuon-stream": lambda p: whiten.HTMuon(p, lr=0.02, spectral_map="stream"),
    "soap": lambda p: whiten.SOAP(p, lr=3e-3),
    "soap-eigh": lambda p: whiten.SOAP(p, lr=3e-3, use_eigh=True),
    "rekls": lambda p: whiten.REKLS(p, lr=3e-3),
    "klsoap": lambda p: whiten.KLSOAP(p, lr=3e-3),
    "kl-shampoo": lambda p: whiten.KLShampoo(p, lr=3e-3),
    "pro-kls-r2": lambda p: whiten.ProKLShampoo(p, lr=3e-3, rank=2),
    "pro-kls-r64": lambda p: whiten.ProKLShampoo(p, lr=3e-3, rank=64),
}


#: float64: the SOAP family's sorted basis refresh and eps-sized second moments amplify fp32 rounding
#: differences (the compiled AdamW half is not the fused kernel) by ~100x a step on a tiny model, while a
#: wrong step (the dropped ``alpha`` of issue 14) is off by O(1) in any dtype
DTYPE = torch.float64


class TinyNet(nn.Module):
    """Two linear layers with biases and a LayerNorm gain: matrices and 1-D parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(torch.tanh(self.fc1(x))))


def trajectory(name: str, steps: int, backend: str | None, dtype: torch.dtype = DTYPE) -> torch.Tensor:
    """Parameters after ``steps`` steps, the step compiled with ``backend`` (``None``: eager)."""
    torch.manual_seed(0)
    model = TinyNet().to(dtype)
    optimizer = OPTIMIZERS[name](list(model.parameters()))
    step = optimizer.step if backend is None else torch.compile(optimizer.step, backend=backend)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = (torch.randn(32, 8, generator=gen, dtype=dtype) for _ in range(2))
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def relative_difference(name: str, steps: int, backend: str) -> float:
    """``||compiled - eager|| / ||eager||`` of the parameters after ``steps`` steps."""
    torch._dynamo.reset()
    eager = trajectory(name, steps, None)
    compiled = trajectory(name, steps, backend)
    return float((compiled - eager).norm() / eager.norm())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--only", nargs="*", choices=sorted(OPTIMIZERS), help="a subset (default: all)")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, backend {args.backend}, {args.steps} steps, tolerance {args.tolerance:g}")
    failed = []
    for name in args.only or OPTIMIZERS:
        start = time.perf_counter()
        diff = relative_difference(name, args.steps, args.backend)
        ok = diff <= args.tolerance
        failed += [] if ok else [name]
        print(
            f"{name:24s} rel diff {diff:.2e}  {'ok' if ok else 'FAIL'}  ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    print("all equal" if not failed else f"FAILED: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
