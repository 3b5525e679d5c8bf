"""Kronecker-factor statistics shared by SOAP (KL mode), KL-Shampoo, KL-SOAP and Pro-KLShampoo.

For a gradient ``G`` (``m x n``) and a preconditioner ``S = S_L (x) S_R`` kept as eigenbases and
eigenvalues (``S^{-1} = Q diag(1/lam) Q^T``, never formed), KL-Shampoo's fixed point
(arXiv 2509.03378; SPEC §4) is ``S_L = (1/n) E[G S_R^{-1} G^T]``, ``S_R = (1/m) E[G^T S_L^{-1} G]``.
The functions here return the one-sample targets that the optimizers average with an EMA.
"""

from __future__ import annotations

from torch import Tensor


def kl_factor_targets(G: Tensor, Q_L: Tensor, lam_L: Tensor, Q_R: Tensor, lam_R: Tensor) -> tuple[Tensor, Tensor]:
    """``((1/n) G S_R^{-1} G^T, (1/m) G^T S_L^{-1} G)`` with ``S^{-1} = Q diag(1/lam) Q^T``.

    Both targets use the OLD bases and eigenvalues (Jacobi order, as the reference). ``lam``
    must be strictly positive; callers clamp it.
    """
    m, n = G.shape[-2], G.shape[-1]
    GQ = G @ Q_R  # m x n, right-rotated gradient
    left = (GQ / lam_R.unsqueeze(-2)) @ GQ.mT / n
    QG = Q_L.mT @ G  # m x n, left-rotated gradient
    right = QG.mT @ (QG / lam_L.unsqueeze(-1)) / m
    return left, right


def kl_eigenvalue_targets(E: Tensor, lam_L: Tensor, lam_R: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalue targets of KL-Shampoo's EMA eigenvalue scheme from ``E = Q_L^T G Q_R``.

    ``lamL_target_i = mean_j(E_ij^2 / lamR_j)`` and ``lamR_target_j = mean_i(E_ij^2 / lamL_i)``:
    the diagonals of the factor targets in the current (stale) eigenbasis.
    """
    E2 = E.square()
    return (E2 / lam_R.unsqueeze(-2)).mean(-1), (E2 / lam_L.unsqueeze(-1)).mean(-2)


def clamp_eigenvalues(lam: Tensor, dim: int) -> Tensor:
    """KL-Shampoo's clamp: ``lam^{-1/2} <= max(10, min(dim, 4000))``, NaN/Inf mapped to the floor.

    Returns new eigenvalues ``>= 1 / max(10, min(dim, 4000))^2`` (and finite), so the
    preconditioner gain per factor never exceeds that bound.
    """
    bound = float(max(10, min(dim, 4000)))
    floor = 1.0 / bound**2
    finite = lam.isfinite() & (lam > 0)
    return lam.where(finite, lam.new_full((), floor)).clamp(min=floor)
