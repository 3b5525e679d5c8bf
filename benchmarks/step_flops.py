"""Analytic matmul FLOP counts of one optimizer step, per ``m x n`` matrix parameter.

These are the optimizers' own declarations (``matrix_flops(shape, group)`` next to each method's math,
built from :mod:`whiten.linalg.flops`), so the benchmark and the owner assignment of
``whiten.optim.distributed`` share one FLOP model; ``tests/test_flops.py`` checks every declaration
against the products ``torch.utils.flop_counter`` counts in a real step. Only matrix products are
reported here (``2 m n k`` for an ``(m x k) @ (k x n)`` product): LAPACK work (QR, eigh, SVD) and
elementwise passes are not, so a method dominated by those shows a low achieved FLOP rate by
construction. Peers at matched settings are charged the same count. Refreshes that run every ``T``
steps are amortised (divided by ``T``).
"""

from __future__ import annotations

from typing import Any

import torch

from whiten.linalg import newton_schulz_flops, prefers_gram
from whiten.optim import SOAP, HTMuon, KLShampoo, Muon, ProKLShampoo, registry


def _declared(cls: type, m: int, n: int, **options: Any) -> float:
    """The matmul FLOPs ``cls`` declares for one step of an ``m x n`` matrix with ``options``."""
    optimizer = cls([torch.zeros(1, 1, requires_grad=True)], **options)
    return optimizer.matrix_flops((m, n), optimizer.param_groups[0]).matmul


def registered(name: str, m: int, n: int, **options: Any) -> float:
    """The matmul FLOPs the optimizer of registry ``name`` declares for one ``m x n`` step with ``options``."""
    spec = registry.get(name)
    optimizer = spec.build([torch.zeros(1, 1, requires_grad=True)], **{"lr": spec.default_lr, **options})
    return optimizer.matrix_flops((m, n), optimizer.param_groups[0]).matmul


def newton_schulz(m: int, n: int, steps: int = 5, *, gram: bool = False) -> float:
    """Quintic NS, direct or on the Gram matrix (:func:`whiten.linalg.newton_schulz_flops`)."""
    return newton_schulz_flops((m, n), steps, "gram" if gram else "direct").matmul


def uses_gram(m: int, n: int) -> bool:
    """``whiten``'s ``ns_method="auto"`` rule in fp32 (:func:`whiten.linalg.prefers_gram`)."""
    return prefers_gram((m, n), torch.float32)


def muon(m: int, n: int, steps: int = 5) -> float:
    """Direct Newton–Schulz Muon (KellerJordan/Muon, ``torch.optim.Muon``, ours with ``ns_method="direct"``)."""
    return _declared(Muon, m, n, ns_steps=steps, ns_method="direct")


def muon_auto(m: int, n: int, steps: int = 5) -> float:
    """Our fp32 Muon with ``ns_method="auto"``."""
    return _declared(Muon, m, n, ns_steps=steps, matmul_dtype="float32")


def htmuon_svd(m: int, n: int) -> float:
    """Exact SVD (LAPACK, not counted) then ``(A s^p) @ B^T``."""
    return _declared(HTMuon, m, n, lr=1.0, spectral_map="svd")


def htmuon_ns(m: int, n: int, power: float = 0.125, ns_steps: int = 5, sqrt_steps: int = 5) -> float:
    """Gram, ``k`` coupled NS square roots, NS5 (Gram path when rectangular), then ``root @ NS``."""
    if sqrt_steps != 5:
        raise ValueError(f"HTMuon's NS variant runs 5 square-root iterations, got sqrt_steps={sqrt_steps}")
    return _declared(HTMuon, m, n, lr=1.0, spectral_map="ns", power=power, ns_steps=ns_steps)


def htmuon_stream(m: int, n: int) -> float:
    """``U^T (U V)``, ``G V = U V``, ``O = A s^p V^T`` with ``V`` of width ``min(m, n)``; QR not counted."""
    return _declared(HTMuon, m, n, lr=1.0, spectral_map="stream")


def soap(m: int, n: int, period: int = 10) -> float:
    """SOAP (plain factors, QR refresh every ``period`` steps)."""
    return _declared(SOAP, m, n, lr=1.0, precondition_frequency=period)


def kl_shampoo(m: int, n: int, period: int = 10) -> float:
    """KL-Shampoo (refresh every ``period`` steps)."""
    return _declared(KLShampoo, m, n, precondition_frequency=period)


def pro_kl_shampoo(
    m: int, n: int, rank: int, period: int = 10, ns_steps: int = 5, ns_method: str = "spectral"
) -> float:
    """Pro-KLShampoo at ``rank`` (its ``eigh`` for ``ns_method="spectral"`` is LAPACK, not counted)."""
    return _declared(
        ProKLShampoo, m, n, rank=rank, precondition_frequency=period, ns_steps=ns_steps, ns_method=ns_method
    )


def adamw(m: int, n: int) -> float:
    return 0.0
