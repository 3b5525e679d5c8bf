"""Cost model of a matrix step and the assignment of matrices to owner ranks (see ``docs/distributed.md``)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


# -- cost model and assignment ----------------------------------------------------------------------
def _eigh_flops(d: int) -> float:
    # symmetric eigendecomposition with vectors: ~9 d^3 (tridiagonalisation + QR iterations)
    return 9.0 * d**3


def _qr_refresh_flops(d: int) -> float:
    # one warm-started orthogonal-iteration step: K Q (2 d^3) then Householder QR (4/3 d^3)
    return 2.0 * d**3 + 4.0 / 3.0 * d**3


def _ns_flops(m: int, n: int, steps: int, method: str = "direct", low_precision: bool = False) -> float:
    """Newton–Schulz cost by how the polynomial is evaluated (``whiten.linalg.newton_schulz``'s ``method``)."""
    a, b = min(m, n), max(m, n)
    if method == "auto":
        method = "gram" if not low_precision and b >= 1.5 * a else "direct"
    if method == "gram":  # P = X X^T, 5 short-side products per step on P, then K X
        return 4.0 * a * a * b + 8.0 * steps * a**3
    if method == "spectral":  # P = X X^T, eigh of P, V diag(q) V^T, then K X
        return 4.0 * a * a * b + _eigh_flops(a) + 2.0 * a**3
    # per iteration on the short side: A = X X^T (2 a^2 b), B = bA + cA^2 (2 a^3), B X (2 a^2 b)
    return steps * (4.0 * a * a * b + 2.0 * a**3)


def _family(optimizer: Any) -> str:
    names = [cls.__name__ for cls in type(optimizer).__mro__]
    for family in ("ProKLShampoo", "KLShampoo", "KLSOAP", "KLFactored", "SOAP", "HTMuon", "Muon"):
        if family in names:
            # KL-SOAP keeps KL-Shampoo's factors and refreshes (Adam in the eigenbasis costs the same rotations)
            return "KLShampoo" if family in ("KLSOAP", "KLFactored") else family
    return names[0]


def matrix_flops(optimizer: Any, shape: Sequence[int], group: Mapping[str, Any]) -> float:
    """Estimated flops of one matrix step of ``optimizer`` for an ``m x n`` matrix (amortised).

    The model counts matmuls (``2 m n k``), eigendecompositions (``9 d^3``) and QR refreshes
    (``2 d^3 + 4/3 d^3``) divided by their refresh interval; elementwise work is ignored. An
    optimizer class may override it by defining ``matrix_flops(shape, group)``. Only relative
    values matter: they drive :func:`assign_owners`.
    """
    custom = getattr(optimizer, "matrix_flops", None)
    if callable(custom):
        return float(custom(shape, group))
    m = int(shape[0])
    n = math.prod(int(s) for s in shape[1:])
    family = _family(optimizer)
    kron = 2.0 * (m * m * n + m * n * n)  # one two-sided product Q_L^T X Q_R, or G G^T plus G^T G
    interval = max(1, int(group.get("precondition_frequency", 1) or 1))
    if family in ("Muon", "HTMuon"):
        ns = _ns_flops(
            m,
            n,
            int(group.get("ns_steps", 5)),
            str(group.get("ns_method", "direct")),
            low_precision=group.get("ns_dtype") == "bfloat16",
        )
        power = float(group.get("power", 0.0) or 0.0)
        if power == 0.0:
            return ns
        a, b = min(m, n), max(m, n)
        kind = group.get("spectral_map", "svd")
        if kind == "svd":
            ht = 4.0 * b * a * a + 22.0 * a**3
        elif kind == "stream":
            ht = 4.0 * m * n * a + 4.0 * b * a * a
        else:  # NS polar factor times k coupled NS square roots of the Gram matrix
            k = max(1, round(math.log(power, 0.5) + 1))
            ht = ns + k * int(group.get("ns_steps", 5)) * 4.0 * a**3
        every = int(group.get("interval", 1))
        return ns * (1.0 - 1.0 / every) + ht / every
    if family == "SOAP":
        eig = _eigh_flops if group.get("use_eigh") else _qr_refresh_flops
        refresh = eig(m) + eig(n)
        # factor statistics (x2 for KL's whitened products), rotate G in, rotate the update out
        stats = 2.0 * kron if group.get("use_kl_shampoo") else kron
        return stats + 2.0 * kron + refresh / interval
    if family == "KLShampoo":
        # whitened factor statistics, G rotated for the eigenvalue EMAs, momentum rotated in and out
        return 2.0 * kron + 3.0 * kron + (_qr_refresh_flops(m) + _qr_refresh_flops(n)) / interval
    if family == "ProKLShampoo":
        r = int(group.get("rank", min(m, n)) or min(m, n))
        a, b = min(m, n), max(m, n)
        left = 2.0 * a * a * b  # products with the full left factor / basis (short side)
        ns = _ns_flops(a, b, int(group.get("ns_steps", 5)), str(group.get("ns_method", "spectral")))
        return 4.0 * left + 8.0 * a * b * r + ns + (_qr_refresh_flops(a) + 4.0 * b * r * r) / interval
    # unknown method: a Kronecker-factored default (statistics, two rotations, QR refresh)
    return 3.0 * kron + (_qr_refresh_flops(m) + _qr_refresh_flops(n)) / interval


def assign_owners(costs: Sequence[float], world_size: int) -> list[int]:
    """Greedy longest-processing-time assignment: largest cost first onto the least-loaded rank.

    Ties go to the lower index / lower rank, so every rank computes the same answer. The makespan
    is at most ``4/3`` of the optimum (Graham, 1969).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    loads = [0.0] * world_size
    owners = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-float(costs[i]), i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[index] = rank
        loads[rank] += float(costs[index])
    return owners
