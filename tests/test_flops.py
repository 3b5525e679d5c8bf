"""Each optimizer's declared step cost against the matrix products a step really runs.

``torch.utils.flop_counter.FlopCounterMode`` counts every ``mm``/``bmm``/``addmm`` of a step; averaged
over a window of ``T`` steps (one refresh each) it must equal the matmul part of ``matrix_flops``, so a
changed kernel or a wrong declaration fails here. The owner assignment and ``benchmarks/step_flops.py``
use the same declarations.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from whiten.linalg import gram, gram_flops, newton_schulz, newton_schulz_flops, newton_schulz_left_factor
from whiten.optim import KLSOAP, REKLS, SOAP, HTMuon, KLShampoo, Muon, ProKLShampoo
from whiten.optim.distributed import matrix_flops

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def step_flops(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """``benchmarks/step_flops.py``, importable only inside the test (sys.path and sys.modules restored)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    previous = sys.modules.pop("step_flops", None)
    try:
        yield importlib.import_module("step_flops")
    finally:
        sys.modules.pop("step_flops", None)
        if previous is not None:
            sys.modules["step_flops"] = previous


T = 3
CASES: list[Any] = [  # (class, options, steps in the window)
    (Muon, {"ns_method": "direct"}, 1),
    (Muon, {"ns_method": "gram"}, 1),
    (Muon, {}, 1),  # "auto": Gram at 1:3
    (Muon, {"ns_method": "spectral", "matmul_dtype": "float32"}, 1),
    (Muon, {"ns_method": "gram", "ns_steps": 8}, 1),  # two Gram segments (GRAM_SEGMENT = 5)
    (Muon, {"ns_dtype": "bfloat16"}, 1),  # "auto" keeps bf16 direct
    (HTMuon, {"lr": 0.01}, 1),
    (HTMuon, {"lr": 0.01, "spectral_map": "ns"}, 1),
    (HTMuon, {"lr": 0.01, "spectral_map": "stream"}, 1),
    (HTMuon, {"lr": 0.01, "interval": 2}, 2),
    (SOAP, {"lr": 0.01, "precondition_frequency": T}, T),
    (SOAP, {"lr": 0.01, "precondition_frequency": T, "use_kl_shampoo": True}, T),
    (SOAP, {"lr": 0.01, "precondition_frequency": T, "max_precond_dim": 40}, T),
    (SOAP, {"lr": 0.01, "precondition_frequency": T, "power_iter_steps": 2}, T),
    (REKLS, {"lr": 0.01}, 1),
    (KLShampoo, {"precondition_frequency": T}, T),
    (KLShampoo, {"precondition_frequency": T, "max_precond_dim": 40}, T),
    (KLSOAP, {"precondition_frequency": T}, T),
    (ProKLShampoo, {"precondition_frequency": T, "rank": 4}, T),
    (ProKLShampoo, {"precondition_frequency": T, "rank": 4, "ns_method": "gram"}, T),
    (ProKLShampoo, {"precondition_frequency": T, "rank": 4, "ns_method": "direct"}, T),
    (ProKLShampoo, {"precondition_frequency": T, "rank": 100}, T),  # rank >= n: full KL-Shampoo
    # ns_steps > 5: the Gram iteration restarts in segments and returns NS(X) itself
    (ProKLShampoo, {"precondition_frequency": T, "rank": 4, "ns_method": "gram", "ns_steps": 8}, T),
]


def _counted(optimizer: torch.optim.Optimizer, W: torch.Tensor, gen: torch.Generator) -> int:
    W.grad = torch.randn(W.shape, generator=gen)
    with FlopCounterMode(display=False) as counter:
        optimizer.step()
    return counter.get_total_flops()


def _measured(cls: type, shape: tuple[int, int], window: int, **options: Any) -> float:
    """The matmul FLOPs per step of ``cls`` on a ``shape`` matrix, counted over a window after two warm-up steps."""
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(shape, generator=gen, requires_grad=True)
    optimizer = cls([W], **options)
    for _ in range(2):  # initialisation steps and first-step special cases
        _counted(optimizer, W, gen)
    return sum(_counted(optimizer, W, gen) for _ in range(window)) / window


@pytest.mark.parametrize("shape", [(24, 72), (72, 24)])
@pytest.mark.parametrize(("cls", "options", "window"), CASES, ids=lambda c: getattr(c, "__name__", None))
def test_declared_matmuls_are_the_measured_ones(
    cls: type, options: dict[str, Any], window: int, shape: tuple[int, int]
) -> None:
    measured = _measured(cls, shape, window, **options)
    optimizer = cls([torch.zeros(shape, requires_grad=True)], **options)
    declared = optimizer.matrix_flops(shape, optimizer.param_groups[0])
    assert declared.matmul == pytest.approx(measured, rel=1e-12)
    # the owner assignment's cost: the measured products plus the estimated LAPACK work
    assert declared.lapack >= 0
    assert matrix_flops(optimizer, shape, optimizer.param_groups[0]) == pytest.approx(measured + declared.lapack)


def test_lapack_work_is_counted_for_the_owner_assignment() -> None:
    W = torch.zeros(64, 64, requires_grad=True)
    eigh_every_step = REKLS([W], lr=0.01).matrix_flops((64, 64), REKLS([W], lr=0.01).param_groups[0])
    qr_every_third = SOAP([W], lr=0.01, precondition_frequency=3)
    amortised = qr_every_third.matrix_flops((64, 64), qr_every_third.param_groups[0])
    assert eigh_every_step.lapack > 3 * amortised.lapack > 0
    muon = Muon([W])
    assert muon.matrix_flops((64, 64), muon.param_groups[0]).lapack == 0  # direct NS: products only


def test_blocked_gram_count() -> None:
    X = torch.randn(20, 7)
    with FlopCounterMode(display=False) as counter:
        gram(X, block_rows=4)
    assert gram_flops(20, 7, block_rows=4).matmul == counter.get_total_flops()
    assert gram_flops(20, 7, block_rows=4).matmul < gram_flops(20, 7, block_rows=20).matmul


@pytest.mark.parametrize("method", ["direct", "gram", "auto", "spectral"])
def test_newton_schulz_count(method: str) -> None:
    X = torch.randn(10, 31)
    with FlopCounterMode(display=False) as counter:
        newton_schulz(X, 5, method=method)
    assert newton_schulz_flops(X.shape, 5, method).matmul == counter.get_total_flops()


@pytest.mark.parametrize("steps", [1, 4, 5, 6, 9, 10, 11, 16])
def test_segmented_gram_newton_schulz_count(steps: int) -> None:
    """Beyond GRAM_SEGMENT steps the Gram iteration re-anchors on the iterate: more products than 4 steps - 3."""
    X = torch.randn(10, 31)
    with FlopCounterMode(display=False) as counter:
        newton_schulz(X, steps, method="gram")
    assert newton_schulz_flops(X.shape, steps, "gram").matmul == counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        newton_schulz_left_factor(X, steps)
    assert newton_schulz_flops(X.shape, steps, "gram", apply_factor=False).matmul == counter.get_total_flops()


@pytest.mark.parametrize(
    ("function", "arguments", "cls", "options", "window"),
    [
        ("muon", (), Muon, {"ns_method": "direct"}, 1),
        ("muon_auto", (), Muon, {"matmul_dtype": "float32"}, 1),  # the fp32 Muon: Gram path at 1:2
        ("htmuon_svd", (), HTMuon, {"lr": 1.0, "spectral_map": "svd"}, 1),
        ("htmuon_ns", (), HTMuon, {"lr": 1.0, "spectral_map": "ns"}, 1),
        ("htmuon_stream", (), HTMuon, {"lr": 1.0, "spectral_map": "stream"}, 1),
        ("soap", (T,), SOAP, {"lr": 1.0, "precondition_frequency": T}, T),
        ("kl_shampoo", (T,), KLShampoo, {"precondition_frequency": T}, T),
    ],
)
def test_step_flops_are_the_products_a_step_runs(
    step_flops: ModuleType, function: str, arguments: tuple, cls: type, options: dict[str, Any], window: int
) -> None:
    """The benchmark's FLOP model against FlopCounterMode over real steps of the optimizer it describes."""
    measured = _measured(cls, (24, 48), window, **options)
    assert getattr(step_flops, function)(24, 48, *arguments) == pytest.approx(measured, rel=1e-12)
