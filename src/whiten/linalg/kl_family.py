"""KL-Shampoo factor families: N-D Kronecker statistics, the spike-and-flat family, rank selection.

Pure tensor functions (no optimizer state) shared by :class:`whiten.KLShampoo`, :class:`whiten.KLSOAP`,
:class:`whiten.ProKLShampoo` and the spectra diagnostics.

* :func:`kl_tensor_statistics`: KL-Shampoo's one-sample factor and eigenvalue targets for a tensor of
  any order with one factor per dimension (3-D stacked experts), each dimension whitened by all the
  others and normalised by ``numel / d_k`` (arXiv 2509.03378; yorkerlin/KL-Methods). A dimension
  whose basis is ``None`` is not preconditioned (identity factor, unit eigenvalues).
* :func:`ema_eigenvalues`: the reference's EMA eigenvalue step with its clamp.
* :func:`spike_flat_statistics`: the restricted-side statistics of Pro-KLShampoo (``docs/pro_kl_shampoo.md``),
  where the right factor is ``S_R = U diag(Lam) U^T + sigma (I - U U^T)``.

The KL gap of the spike-and-flat family and the rank rule built on it are in :mod:`whiten.linalg.spectrum`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from whiten.linalg.kronecker import clamp_eigenvalues


# -- N-D KL-Shampoo statistics -----------------------------------------------------------------
def rotate(X: Tensor, Q: Tensor, dim: int, *, back: bool = False) -> Tensor:
    """Mode product: contract dimension ``dim`` of ``X`` with basis ``Q`` (``d x d``).

    ``back=False`` maps into the eigenbasis (``Q^T`` along ``dim``: for a matrix, ``dim=0`` is ``Q^T X`` and
    ``dim=1`` is ``X Q``); ``back=True`` maps back (``Q X`` / ``X Q^T``).
    """
    if X.ndim == 2:
        if dim == 0:
            return (Q @ X) if back else (Q.mT @ X)
        return (X @ Q.mT) if back else (X @ Q)
    # tensordot has no autocast rule: a bf16 X (an earlier mode product under matmul_dtype="bfloat16")
    # takes the basis in its dtype, as the matrix products above do under autocast
    out = torch.tensordot(X, Q.to(X.dtype), dims=([dim], [1 if back else 0]))
    return out.movedim(-1, dim)


def _along(v: Tensor, dim: int, ndim: int) -> Tensor:
    """Reshape the vector ``v`` to broadcast along dimension ``dim`` of an ``ndim``-tensor."""
    shape = [1] * ndim
    shape[dim] = v.numel()
    return v.view(shape)


def rotate_matrix(X: Tensor, Q_L: Tensor | None, Q_R: Tensor | None, *, back: bool = False) -> Tensor:
    """The eigenbasis rotation of a matrix, batched over leading dims: ``Q_L^T X Q_R`` (``back``: ``Q_L X Q_R^T``).

    The one kernel behind SOAP's rotations and :func:`rotate_all` of a matrix; a missing basis is the
    identity (an unpreconditioned side). The left product comes first in both directions.
    """
    if Q_L is not None:
        X = (Q_L @ X) if back else (Q_L.mT @ X)
    if Q_R is not None:
        X = (X @ Q_R.mT) if back else (X @ Q_R)
    return X


def rotate_all(X: Tensor, bases: Sequence[Tensor | None], *, back: bool = False) -> Tensor:
    """Apply :func:`rotate` along every dimension that has a basis (``None`` = identity).

    Two bases mean a matrix, batched over any leading dims of ``X`` (:func:`rotate_matrix`); otherwise one
    basis per dimension of ``X``.
    """
    if len(bases) == 2:
        return rotate_matrix(X, bases[0], bases[1], back=back)
    for dim, Q in enumerate(bases):
        if Q is not None:
            X = rotate(X, Q, dim, back=back)
    return X


@dataclass
class KLStatistics:
    """One-sample KL-Shampoo targets: ``factors[k]`` (``d_k x d_k`` or ``None``) and ``eigenvalues[k]``."""

    factors: list[Tensor | None]
    eigenvalues: list[Tensor | None]


def kl_tensor_statistics(
    G: Tensor, bases: Sequence[Tensor | None], eigenvalues: Sequence[Tensor | None]
) -> KLStatistics:
    """KL-Shampoo's one-sample targets for a tensor ``G`` with one Kronecker factor per dimension.

    With ``S = S_1 (x) ... (x) S_K`` and ``S_j^{-1} = Q_j diag(1/lam_j) Q_j^T`` (OLD bases and eigenvalues
    for every dimension, Jacobi order), the targets are::

        factor_k = (d_k / numel) * unfold_k(G x_{j != k} S_j^{-1/2}) unfold_k(...)^T
        lam_k    = mean over j != k of  E^2 / prod_{j != k} lam_j,     E = G x_all Q_j^T

    For a matrix this is ``((1/n) G S_R^{-1} G^T, (1/m) G^T S_L^{-1} G)`` and ``mean_j(E_ij^2/lamR_j)`` etc.
    (:func:`whiten.linalg.kl_factor_targets`, :func:`whiten.linalg.kl_eigenvalue_targets`). A dimension with
    ``bases[k] is None`` has the identity factor: it is not rotated, its eigenvalues are 1 and no target is
    returned for it.

    Products of rotations are shared: every partial rotation is computed once (memoised), and the full
    rotation ``E`` extends the cheapest cached partial one.
    """
    nd = G.ndim
    numel = G.numel()
    active = [k for k in range(nd) if bases[k] is not None]
    cache: dict[frozenset[int], Tensor] = {frozenset(): G}

    def rotated(dims: frozenset[int]) -> Tensor:
        if dims in cache:
            return cache[dims]
        # extend the cached partial rotation whose missing dimension is the smallest (cheapest mode product)
        options = [d for d in dims if (dims - {d}) in cache] or list(dims)
        last = min(options, key=lambda d: G.shape[d])
        out = rotate(rotated(dims - {last}), bases[last], last)  # type: ignore[arg-type]
        cache[dims] = out
        return out

    inv_roots = [None if lam is None else lam.rsqrt() for lam in eigenvalues]
    factors: list[Tensor | None] = [None] * nd
    for k in active:
        W = rotated(frozenset(j for j in active if j != k))
        for j in active:
            if j != k:
                W = W * _along(inv_roots[j], j, nd)  # type: ignore[arg-type]
        Wk = W.movedim(k, 0).reshape(G.shape[k], -1)
        factors[k] = (Wk @ Wk.mT) * (G.shape[k] / numel)
    E2 = rotated(frozenset(active)).square()
    targets: list[Tensor | None] = [None] * nd
    for k in active:
        X = E2
        for j in active:
            if j != k:
                X = X / _along(eigenvalues[j], j, nd)  # type: ignore[arg-type]
        other = [j for j in range(nd) if j != k]
        targets[k] = X.mean(dim=other)
    return KLStatistics(factors, targets)


def ema_eigenvalues(lam: Tensor, target: Tensor, beta: float, dim: int) -> Tensor:
    """KL-Shampoo's eigenvalue EMA ``lam <- clamp(beta lam + (1 - beta) target)`` (reference semantics).

    The reference stores ``lam^{-1/2}`` and maps NaN/Inf to 0 (no gain); here that state is ``lam = +inf``,
    which the next EMA reads as 0 (the reference reads ``1/0^2 = inf`` through ``nan_to_num`` as 0), so a
    direction whose eigenvalue overflowed restarts from the new target instead of staying dead.
    """
    prev = lam.masked_fill(lam.isinf(), 0.0)
    return clamp_eigenvalues(prev.lerp(target.to(lam.dtype), 1.0 - beta), dim)


# -- the spike-and-flat family (Pro-KLShampoo) --------------------------------------------------
def effective_flat_value(Lam: Tensor, sigma: Tensor, rank: int, n: int) -> Tensor:
    """KL-optimal flat value for the first ``rank`` of ``R`` tracked directions.

    When ``R`` directions are tracked (eigenvalue estimates ``Lam``) and ``sigma`` is the mean eigenvalue
    over the other ``n - R`` directions, the family with only the first ``rank`` directions has flat value
    ``tr(P_perp C) / (n - rank) = ((n - R) sigma + sum(Lam[rank:])) / (n - rank)`` (``docs/pro_kl_shampoo.md``).
    """
    R = Lam.shape[-1]
    if rank == R:
        return sigma
    return ((n - R) * sigma + Lam[..., rank:].sum(-1)) / (n - rank)


@dataclass
class SpikeFlatStatistics:
    """One-sample targets of Pro-KLShampoo (see :func:`spike_flat_statistics`)."""

    left: Tensor  # m x m, target of S_L
    lam_left: Tensor  # m, target of diag(Q_L^T S_L Q_L)
    Lam: Tensor  # R, target of diag(U^T C U)
    sigma: Tensor  # scalar, target of tr(P_perp C) / (n - R) over the complement of all R tracked directions
    sketch: Tensor  # n x R, target of C U


def spike_flat_statistics(
    G: Tensor, Q_L: Tensor, lam_L: Tensor, U: Tensor, Lam: Tensor, sigma: Tensor, rank: int
) -> SpikeFlatStatistics:
    """Targets of KL-Shampoo's fixed point when ``S_R`` is restricted to the spike-and-flat family.

    ``G`` is ``m x n`` (or a batch ``b x m x n``, every other argument with the same leading dim, ``sigma``
    then of shape ``(b,)``); ``U`` (``n x R``, orthonormal) holds ``R`` tracked directions with eigenvalue
    estimates ``Lam``; the preconditioner uses the first ``rank <= R`` of them and the flat value
    ``sigma_eff`` of :func:`effective_flat_value`, i.e. ``S_R^{-1} = U_r Lam_r^{-1} U_r^T + sigma_eff^{-1}
    (I - U_r U_r^T)``. With ``S_L^{-1} = Q_L diag(1/lam_L) Q_L^T`` and ``C = (1/m) G^T S_L^{-1} G``
    (``docs/pro_kl_shampoo.md``, all from the OLD values)::

        left     = (1/n) [ GU_r Lam_r^{-1} GU_r^T + sigma_eff^{-1} (G G^T - GU_r GU_r^T) ]
        lam_left = diag(Q_L^T left Q_L)
        Lam      = diag(U^T C U),   sigma = tr((I - U U^T) C) / (n - R),   sketch = C U

    No ``n x n`` matrix is formed: the work is ``O(m^2 n + m n R + m^3)``.
    """
    m, n = G.shape[-2], G.shape[-1]
    R = U.shape[-1]
    sigma_eff = effective_flat_value(Lam, sigma, rank, n).unsqueeze(-1)  # broadcasts per matrix of a batch
    GU = G @ U  # m x R
    GU_r = GU[..., :rank]
    Ggram = G @ G.mT  # m x m
    in_span = (GU_r / Lam[..., :rank].unsqueeze(-2)) @ GU_r.mT
    left = (in_span + (Ggram - GU_r @ GU_r.mT) / sigma_eff.unsqueeze(-1)) / n
    # diag(Q_L^T G G^T Q_L) = row energies of Q_L^T G, from the m x m Gram (m^3 instead of m^2 n)
    row_energy = ((Ggram @ Q_L) * Q_L).sum(-2)
    DqU = Q_L.mT @ GU  # m x R: gradient in (left eigenbasis, tracked directions)
    DqU_r2 = DqU[..., :rank].square()
    lam_left = ((DqU_r2 / Lam[..., :rank].unsqueeze(-2)).sum(-1) + (row_energy - DqU_r2.sum(-1)) / sigma_eff) / n
    # left-whitened gradient H = diag(lam_L^{-1/2}) Q_L^T G; only H U and ||H||_F^2 are needed
    HU = DqU * lam_L.rsqrt().unsqueeze(-1)
    Lam_target = HU.square().sum(-2) / m
    H_energy = (row_energy / lam_L).sum(-1)
    sigma_target = (H_energy - HU.square().sum((-2, -1))) / (m * (n - R))
    # C U = (1/m) G^T Q_L diag(1/lam_L) Q_L^T G U
    sketch = G.mT @ (Q_L @ (DqU / lam_L.unsqueeze(-1))) / m
    return SpikeFlatStatistics(left, lam_left, Lam_target, sigma_target, sketch)
