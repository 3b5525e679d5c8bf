"""FLOP counts of the kernels, the building blocks of each optimizer's declared step cost.

A :class:`FlopCount` keeps matrix products (``2 m k n`` for ``(m x k) @ (k x n)``, exactly what
``torch.utils.flop_counter`` counts) apart from the LAPACK work (``eigh``, QR, SVD), which is
estimated by textbook operation counts (Golub & Van Loan, *Matrix Computations*, 4th ed., Fig. 8.6.1
and §5.2): the owner assignment of ``whiten.optim.distributed`` balances the total, while
``benchmarks/step_bench.py`` divides only the matmul part by the time to get an achieved rate.
Elementwise passes are not counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from whiten.linalg.gram import GRAM_BLOCK_ROWS
from whiten.linalg.newton_schulz import GRAM_SEGMENT, ns_evaluation


@dataclass(frozen=True)
class FlopCount:
    """Floating-point operations of one step: ``matmul`` (matrix products) and ``lapack`` (estimated)."""

    matmul: float = 0.0
    lapack: float = 0.0

    @property
    def total(self) -> float:
        return self.matmul + self.lapack

    def __add__(self, other: FlopCount) -> FlopCount:
        return FlopCount(self.matmul + other.matmul, self.lapack + other.lapack)

    def __mul__(self, factor: float) -> FlopCount:
        return FlopCount(self.matmul * factor, self.lapack * factor)

    __rmul__ = __mul__

    def __truediv__(self, divisor: float) -> FlopCount:
        return self * (1.0 / divisor)


#: no work (a side without a basis, an identity factor)
NONE_FLOPS = FlopCount()


def matmul_flops(m: int, k: int, n: int) -> FlopCount:
    """``(m x k) @ (k x n)``: ``2 m k n``."""
    return FlopCount(matmul=2.0 * m * k * n)


def gram_flops(d: int, k: int, *, block_rows: int = GRAM_BLOCK_ROWS) -> FlopCount:
    """:func:`whiten.linalg.gram` of a ``d x k`` matrix: the upper block triangle of ``X X^T`` it computes."""
    blocks = d // block_rows
    if blocks < 2:
        return matmul_flops(d, k, d)
    edges = [round(i * d / blocks) for i in range(blocks + 1)]
    sizes = [edges[i + 1] - edges[i] for i in range(blocks)]
    return FlopCount(matmul=sum(2.0 * sizes[i] * k * sizes[j] for i in range(blocks) for j in range(i, blocks)))


def eigh_flops(d: int) -> FlopCount:
    """Symmetric eigendecomposition with vectors of a ``d x d`` matrix: ~``9 d^3``."""
    return FlopCount(lapack=9.0 * d**3)


def qr_flops(rows: int, cols: int) -> FlopCount:
    """Householder QR of a ``rows x cols`` matrix (``rows >= cols``), ``Q`` formed: ~``4 (rows cols^2 - cols^3/3)``."""
    return FlopCount(lapack=4.0 * (rows * cols**2 - cols**3 / 3.0))


def orthogonal_iteration_flops(d: int, steps: int = 1) -> FlopCount:
    """:func:`whiten.linalg.orthogonal_iteration` (or the sorted variant) on a ``d x d`` factor: ``A Q``, QR a step."""
    return steps * (matmul_flops(d, d, d) + qr_flops(d, d))


def rotation_flops(m: int, n: int, left: bool = True, right: bool = True) -> FlopCount:
    """``Q_L^T X Q_R`` (or back) of an ``m x n`` matrix; a side without a basis costs nothing."""
    return (matmul_flops(m, m, n) if left else NONE_FLOPS) + (matmul_flops(m, n, n) if right else NONE_FLOPS)


def svd_flops(m: int, n: int) -> FlopCount:
    """Thin SVD with both factors of an ``m x n`` matrix (R-SVD): ~``4 l s^2 + 22 s^3``, ``s <= l``."""
    s, l = sorted((m, n))
    return FlopCount(lapack=4.0 * l * s * s + 22.0 * s**3)


def newton_schulz_flops(
    shape: Sequence[int],
    steps: int,
    method: str = "direct",
    compute_dtype: torch.dtype = torch.float32,
    *,
    apply_factor: bool = True,
) -> FlopCount:
    """:func:`whiten.linalg.newton_schulz` on an ``m x n`` matrix, by how it evaluates the polynomial.

    On the wide orientation ``s x l``: direct, per step ``A = X X^T``, ``A A`` and ``B X``; Gram, in
    segments of :data:`whiten.linalg.GRAM_SEGMENT` steps, each ``P_0`` (``X X^T``), per step ``P_k^2``,
    ``poly Z`` (not on a segment's first step, ``Z_0 = I``) and ``P_k = Z P_0 Z^T`` (not after its last):
    ``4 k - 3`` products of ``s x s`` for a segment of ``k`` steps; :func:`whiten.linalg.newton_schulz`
    applies each segment's ``Z`` to ``X`` (``s x s x l``), :func:`whiten.linalg.newton_schulz_left_factor`
    (``apply_factor=False``) forms the iterate ``K X`` before every later segment and accumulates
    ``K = Z K``; spectral (:func:`whiten.linalg.newton_schulz_spectral_factor`), ``P``, one ``eigh``,
    ``V diag(q) V^T`` and ``K X``. ``apply_factor=False``: the factor ``K`` alone (a caller that folds ``K``
    into other left factors before one product with ``X``: Pro-KLShampoo).
    """
    s, l = sorted((int(shape[-2]), int(shape[-1])))
    evaluation = ns_evaluation(method, (s, l), compute_dtype)
    apply = matmul_flops(s, s, l) if apply_factor else NONE_FLOPS
    if evaluation == "gram":
        segments = -(-steps // GRAM_SEGMENT)
        polynomials = (4 * steps - 3 * segments) * matmul_flops(s, s, s)
        if apply_factor:  # every segment: its P_0 from the iterate, then Z X
            return segments * (matmul_flops(s, l, s) + matmul_flops(s, s, l)) + polynomials
        # the factor: P once, then per later segment the iterate K X, its Gram and Z K
        later = segments - 1
        return (
            matmul_flops(s, l, s)
            + polynomials
            + later * (matmul_flops(s, s, l) + matmul_flops(s, l, s) + matmul_flops(s, s, s))
        )
    if evaluation == "spectral":
        return matmul_flops(s, l, s) + eigh_flops(s) + matmul_flops(s, s, s) + apply
    return steps * (matmul_flops(s, l, s) + matmul_flops(s, s, s) + matmul_flops(s, s, l))
