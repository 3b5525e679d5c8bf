"""Shared by tests/test_distributed.py (single process) and tests/_dist_worker.py (each rank).

A tiny float64 MLP whose matrices have different shapes (so the cost-balanced assignment gives
every rank work) and an odd row count (so FSDP2 shards are uneven), a fixed batch that the ranks
split in equal halves, and the optimizers under test with small but non-trivial settings.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from whiten.optim import KLSOAP, REKLS, SOAP, HTMuon, KLShampoo, Muon, ProKLShampoo

STEPS = 20
HALF = 10
BATCH = 32


class Net(nn.Module):
    """Square matrices only (7x7, 5x5, 12x12) and a batch larger than any dimension.

    Both Kronecker factors of every gradient are then full rank, and the gradients have no
    exactly-zero singular value (HTMuon's ``s^p`` has an unbounded derivative at 0). (A non-square gradient has a
    rank-deficient factor, whose null-space eigenbasis is fixed by rounding noise; methods that
    are not rotation invariant in that subspace, like SOAP's Adam in the eigenbasis, then amplify
    1e-16 reduction-order differences to O(1), and no distributed run could match a reference.)
    """

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(7, 7)  # 7 rows: uneven FSDP shards 4 / 3 on two ranks
        self.b = nn.Linear(5, 5, bias=False)
        self.norm = nn.LayerNorm(12)
        self.c = nn.Linear(12, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the LayerNorm acts on the input: after it, a vector sums to 0, so a matrix fed by the whole
        # normalised vector would get a gradient with an exactly-zero singular value (see above)
        x = self.norm(x)
        h = torch.cat([torch.tanh(self.a(x[:, :7])), torch.tanh(self.b(x[:, 7:]))], dim=1)
        return self.c(h)


def make_model() -> Net:
    torch.manual_seed(0)
    return Net().to(torch.float64)


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 12, dtype=torch.float64, generator=gen)
    y = torch.randn(BATCH, 12, dtype=torch.float64, generator=gen)
    return x, y


#: optimizer name -> (class, options) of the runs; every exported optimizer class (tests/test_distributed.py)
SETTINGS: dict[str, tuple[type, dict[str, Any]]] = {
    "Muon": (Muon, dict(lr=0.02, weight_decay=0.1, adamw_lr=0.01)),
    "HTMuon": (HTMuon, dict(lr=0.05, power=0.125, spectral_map="svd", adamw_lr=0.01)),
    "SOAP": (SOAP, dict(lr=0.01, precondition_frequency=2, adamw_lr=0.01)),
    "REKLS": (REKLS, dict(lr=0.003, adamw_lr=0.01)),
    "KLShampoo": (KLShampoo, dict(lr=0.01, precondition_frequency=3)),
    "KLSOAP": (KLSOAP, dict(lr=0.01, precondition_frequency=3)),
    "ProKLShampoo": (ProKLShampoo, dict(lr=0.01, rank=2, precondition_frequency=3)),
}
FACTORIES: dict[str, Callable[[Any], Any]] = {
    name: (lambda params, cls=cls, kwargs=kwargs: cls(params, **kwargs)) for name, (cls, kwargs) in SETTINGS.items()
}
OPTIMIZERS = sorted(FACTORIES)


def make_optimizer(name: str, model: nn.Module, mode: str = "replicate") -> Any:
    optimizer = FACTORIES[name](model.parameters())
    optimizer.set_distributed_mode(mode)
    return optimizer


def train(
    model: nn.Module,
    optimizer: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    micro_batches: int = 1,
) -> list[float]:
    """``steps`` steps of mean-squared error; ``reduce`` averages the logged loss over ranks.

    ``micro_batches=k`` accumulates the mean gradients of ``k`` equal slices, each scaled by
    ``1/k``: for ``k = 2`` in float64 these are the same floating-point sums that a 2-rank DDP
    all-reduce or FSDP reduce-scatter forms, so a single-process run reproduces the distributed
    gradients bit for bit (eigenbasis methods such as SOAP amplify last-bit differences).
    """
    losses = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64)
        for xs, ys in zip(x.chunk(micro_batches), y.chunk(micro_batches), strict=True):
            loss = torch.nn.functional.mse_loss(model(xs), ys) / micro_batches
            loss.backward()
            total += loss.detach()
        optimizer.step()
        losses.append(float(reduce(total) if reduce is not None else total))
    return losses


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameter values by name, gathered to full tensors (DTensor) and without wrapper prefixes."""
    out = {}
    for name, p in model.named_parameters():
        value = p.detach()
        if hasattr(value, "full_tensor"):
            value = value.full_tensor()
        out[name.removeprefix("module.")] = value.clone()
    return out


def reference(name: str, steps: int = STEPS, micro_batches: int = 2) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Single-process run on the whole batch (as ``micro_batches`` accumulated slices)."""
    model = make_model()
    optimizer = make_optimizer(name, model)
    x, y = make_data()
    losses = train(model, optimizer, x, y, steps, micro_batches=micro_batches)
    return losses, full_params(model)


def layout_problem() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Two matrices with odd column counts (uneven column shards) and fixed gradients."""
    gen = torch.Generator().manual_seed(2)
    weights = [torch.randn(shape, dtype=torch.float64, generator=gen) for shape in ((7, 5), (6, 9))]
    grads = [torch.randn(w.shape, dtype=torch.float64, generator=gen) for w in weights]
    return weights, grads


def make_layout_optimizer(params: list[torch.Tensor], mode: str = "replicate") -> Any:
    from whiten.optim import Muon

    optimizer = Muon(params, lr=0.02, weight_decay=0.1)
    optimizer.set_distributed_mode(mode)
    return optimizer
