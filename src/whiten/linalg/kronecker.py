"""Kronecker-factor statistics shared by SOAP (KL mode), KL-Shampoo, KL-SOAP and Pro-KLShampoo.

For a gradient ``G`` (``m x n``) and a preconditioner ``S = S_L (x) S_R`` kept as eigenbases and
eigenvalues (``S^{-1} = Q diag(1/lam) Q^T``, never formed), KL-Shampoo's fixed point
(arXiv 2509.03378; ``docs/kl_shampoo.md``) is ``S_L = (1/n) E[G S_R^{-1} G^T]``, ``S_R = (1/m) E[G^T S_L^{-1} G]``.
The functions here return the one-sample targets that the optimizers average with an EMA.
"""

from __future__ import annotations

from torch import Tensor

from whiten.linalg.gram import gram


def kl_factor_targets(
    G: Tensor,
    Q_L: Tensor,
    lam_L: Tensor,
    Q_R: Tensor,
    lam_R: Tensor,
    *,
    rotated: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """``((1/n) G S_R^{-1} G^T, (1/m) G^T S_L^{-1} G)`` with ``S^{-1} = Q diag(1/lam) Q^T``.

    Both targets use the OLD bases and eigenvalues (Jacobi order, as the reference). ``lam``
    must be strictly positive (``+inf`` means "no gain" and contributes 0); callers clamp it.
    ``rotated=(G Q_R, Q_L^T G)`` passes those products when the caller already has them
    (KL-Shampoo also needs them for ``E = Q_L^T G Q_R``), so they are not computed twice.
    """
    m, n = G.shape[-2], G.shape[-1]
    GQ, QG = rotated if rotated is not None else (G @ Q_R, Q_L.mT @ G)  # right- and left-rotated gradient
    # both targets are Grams, G Q_R diag(1/lam_R) Q_R^T G^T = H H^T with H = G Q_R diag(lam_R^-1/2)
    left = gram(GQ * lam_R.rsqrt().unsqueeze(-2)) / n
    right = gram((QG * lam_L.rsqrt().unsqueeze(-1)).mT) / m
    return left, right


def kl_eigenvalue_targets(E: Tensor, lam_L: Tensor, lam_R: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalue targets of KL-Shampoo's EMA eigenvalue scheme from ``E = Q_L^T G Q_R``.

    ``lamL_target_i = mean_j(E_ij^2 / lamR_j)`` and ``lamR_target_j = mean_i(E_ij^2 / lamL_i)``:
    the diagonals of the factor targets in the current (stale) eigenbasis.
    """
    E2 = E.square()
    return (E2 / lam_R.unsqueeze(-2)).mean(-1), (E2 / lam_L.unsqueeze(-1)).mean(-2)


def clamp_eigenvalues(lam: Tensor, dim: int) -> Tensor:
    """KL-Shampoo's clamp: ``lam^{-1/2} <= max(10, min(dim, 4000))``, invalid values get no gain.

    Returns new eigenvalues ``>= 1 / max(10, min(dim, 4000))^2``, so the preconditioner gain
    per factor never exceeds that bound. As the reference (``1/sqrt(lam)`` passed through
    ``nan_to_num(nan=0, posinf=0)``), an eigenvalue that is NaN, ``<= 0`` or ``+inf`` gets gain
    ``lam^{-1/2} = 0``, stored here as ``lam = +inf``; an EMA reads it back as 0 (see
    :func:`whiten.linalg.kl_family.ema_eigenvalues`). Mapping such values to the floor instead
    would give an overflowed (huge) eigenvalue the LARGEST gain.
    """
    bound = float(max(10, min(dim, 4000)))
    floor = 1.0 / bound**2
    valid = lam.isfinite() & (lam > 0)
    return lam.clamp(min=floor).where(valid, lam.new_full((), float("inf")))
