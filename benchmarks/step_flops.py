"""Analytic matmul FLOP counts of one optimizer step, per ``m x n`` matrix parameter.

Only matrix products are counted (``2 m n k`` for an ``(m x k) @ (k x n)`` product); LAPACK work
(QR, eigh, SVD) and elementwise passes are not, so a method dominated by those shows a low
achieved FLOP rate by construction. The counts follow the algorithms in ``SPEC.md`` (§1-§5),
not any particular implementation; peers at matched settings are charged the same count.
Refreshes that run every ``T`` steps are amortised (divided by ``T``).
"""

from __future__ import annotations

import math


def _mm(m: int, k: int, n: int) -> float:
    return 2.0 * m * k * n


def newton_schulz(m: int, n: int, steps: int = 5, *, gram: bool = False) -> float:
    """Quintic NS on the wide orientation ``s x l``.

    Direct: ``A = X X^T``, ``A A``, ``(bA + cA^2) X`` per step. Gram (``whiten.linalg.newton_schulz_left_factor``):
    ``P = X X^T`` once, per step ``P_k^2``, ``poly @ Z`` (not on the first step, ``Z_0 = I``) and
    ``P_k = Z P_0 Z^T`` (two products, not after the last step), then one ``K @ X``.
    """
    s, l = min(m, n), max(m, n)
    if gram:
        return _mm(s, l, s) + (4 * steps - 3) * _mm(s, s, s) + _mm(s, s, l)
    return steps * (_mm(s, l, s) + _mm(s, s, s) + _mm(s, s, l))


def uses_gram(m: int, n: int) -> bool:
    """``whiten``'s ``ns_method="auto"`` (fp32) and Pro-KLShampoo's rule: long side >= 1.5x the short side."""
    return max(m, n) >= 1.5 * min(m, n)


def muon(m: int, n: int, steps: int = 5) -> float:
    return newton_schulz(m, n, steps)


def muon_auto(m: int, n: int, steps: int = 5) -> float:
    """Our fp32 Muon with ``ns_method="auto"``."""
    return newton_schulz(m, n, steps, gram=uses_gram(m, n))


def htmuon_svd(m: int, n: int) -> float:
    """Exact SVD (LAPACK, not counted) then ``(A s^p) @ B^T``."""
    k = min(m, n)
    return _mm(m, k, n)


def htmuon_ns(m: int, n: int, power: float = 0.125, ns_steps: int = 5, sqrt_steps: int = 5) -> float:
    """Gram, ``k`` coupled NS square roots, NS5 (Gram path when rectangular), then ``root @ NS``."""
    s, l = min(m, n), max(m, n)
    rounds = max(1, round(math.log(power, 0.5) + 1))
    # whiten skips the products with Z_0 = I and the unused last inverse update: 3 k - 3 products per root
    sqrt = rounds * (3 * sqrt_steps - 3) * _mm(s, s, s)
    return _mm(s, l, s) + sqrt + newton_schulz(m, n, ns_steps, gram=uses_gram(m, n)) + _mm(s, s, l)


def htmuon_stream(m: int, n: int) -> float:
    """``U^T (U V)``, ``G V = U V``, ``O = A s^p V^T`` with ``V`` of width ``min(m, n)``; QR not counted."""
    k = min(m, n)
    return _mm(m, n, k) + _mm(n, m, k) + _mm(m, n, k) + _mm(m, k, n)


def soap(m: int, n: int, period: int = 10) -> float:
    """SOAP (plain factors, QR refresh): Grams, rotate in and out; refresh rotates the moment and iterates."""
    per_step = (
        _mm(m, n, m)
        + _mm(n, m, n)  # L, R statistics
        + _mm(m, m, n)
        + _mm(m, n, n)  # G' = Q_L^T G Q_R
        + _mm(m, m, n)
        + _mm(m, n, n)  # U = Q_L X Q_R^T
    )
    refresh = (
        2 * (_mm(m, m, n) + _mm(m, n, n))  # exp_avg out of and back into the basis
        + _mm(m, m, m)
        + _mm(n, n, n)  # K Q for the Rayleigh reordering
        + _mm(m, m, m)
        + _mm(n, n, n)  # power step K Q before QR
    )
    return per_step + refresh / period


def kl_shampoo(m: int, n: int, period: int = 10) -> float:
    """KL-Shampoo (§4): precondition (4 products), KL statistics (5 products); refresh ``K Q`` before QR."""
    precondition = 2 * (_mm(m, m, n) + _mm(m, n, n))
    statistics = (
        _mm(m, n, n)
        + _mm(m, n, m)  # G Q_R, then (G Q_R) diag (G Q_R)^T
        + _mm(m, m, n)
        + _mm(n, m, n)  # Q_L^T G, then (Q_L^T G)^T diag (Q_L^T G)
        + _mm(m, n, n)  # E = (Q_L^T G) Q_R
    )
    refresh = _mm(m, m, m) + _mm(n, n, n)
    return precondition + statistics + refresh / period


def pro_kl_shampoo(
    m: int, n: int, rank: int, period: int = 10, ns_steps: int = 5, ns_method: str = "spectral"
) -> float:
    """Pro-KLShampoo (§5) as ``whiten`` evaluates it; restricted side ``l = max(m, n)``, full side ``s``.

    Direction: ``A = Q_L^T M``, ``B = A U``, ``X = A - B U^T``, then the NS factor ``K`` of ``X`` and
    ``Q_L [sub U^T + c K X]`` with one ``s x s x l`` product. ``ns_method="spectral"`` (default): ``K`` from
    ``P = X X^T`` and ``V diag(q) V^T`` (its ``eigh`` is LAPACK, not counted); ``"auto"``: ``K`` by the
    Gram iteration when ``l >= 1.5 s``, otherwise direct NS and ``Q_L [sub U^T + c O]``.
    Statistics (``spike_flat_statistics``): ``G U``, ``G G^T``, the
    in-span Gram, ``(G G^T) Q_L``, ``Q_L^T (G U)`` and the sketch ``G^T Q_L (...)``. Refresh: ``L Q_L``
    (the QR of the ``l x r`` sketch is LAPACK, not counted).
    """
    s, l = min(m, n), max(m, n)
    r = min(rank, l)
    factored = ns_method == "spectral" or uses_gram(s, l)
    direction = _mm(s, s, l) + _mm(s, l, r) + _mm(s, r, l)  # A, B, X
    if factored:
        if ns_method == "spectral":
            direction += _mm(s, l, s) + _mm(s, s, s)  # P = X X^T, K = V diag(q) V^T
        else:
            direction += newton_schulz(s, l, ns_steps, gram=True) - _mm(s, s, l)  # K only; K X is fused below
        direction += _mm(s, s, r) + _mm(s, r, l) + _mm(s, s, s) + _mm(s, s, l)  # (Q_L sub) U^T, Q_L K, (.) X
    else:
        direction += newton_schulz(s, l, ns_steps) + _mm(s, r, l) + _mm(s, s, l)  # O, sub U^T, Q_L coords
    statistics = (
        _mm(s, l, r)
        + _mm(s, l, s)  # G U, G G^T
        + 2 * _mm(s, r, s)  # in-span Gram and GU GU^T
        + _mm(s, s, s)  # (G G^T) Q_L
        + _mm(s, s, r)  # Q_L^T (G U)
        + _mm(s, s, r)
        + _mm(l, s, r)  # sketch
    )
    refresh = _mm(s, s, s)
    return direction + statistics + refresh / period


def adamw(m: int, n: int) -> float:
    return 0.0
