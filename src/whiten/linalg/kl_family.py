"""KL-Shampoo factor families: N-D Kronecker statistics, the spike-and-flat family, rank selection.

Pure tensor functions (no optimizer state) shared by :class:`whiten.KLShampoo`, :class:`whiten.KLSOAP`,
:class:`whiten.ProKLShampoo` and the spectra diagnostics.

* :func:`kl_tensor_statistics`: KL-Shampoo's one-sample factor and eigenvalue targets for a tensor of
  any order with one factor per dimension (3-D stacked experts), each dimension whitened by all the
  others and normalised by ``numel / d_k`` (arXiv 2509.03378; yorkerlin/KL-Methods). A dimension
  whose basis is ``None`` is not preconditioned (identity factor, unit eigenvalues).
* :func:`ema_eigenvalues`: the reference's EMA eigenvalue step with its clamp.
* :func:`spike_flat_statistics`: the restricted-side statistics of Pro-KLShampoo (SPEC §5, facts 2-3),
  where the right factor is ``S_R = U diag(Lam) U^T + sigma (I - U U^T)``.
* :func:`tail_am_gm_ratio`, :func:`kl_gap`, :func:`choose_rank`: how much KL divergence the
  spike-and-flat family loses against a full factor with eigenvalues ``eigs`` (SPEC §5 fact 2), and the
  adaptive-rank rule built on it.
"""

from __future__ import annotations

import math
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
    out = torch.tensordot(X, Q, dims=([dim], [1 if back else 0]))
    return out.movedim(-1, dim)


def _along(v: Tensor, dim: int, ndim: int) -> Tensor:
    """Reshape the vector ``v`` to broadcast along dimension ``dim`` of an ``ndim``-tensor."""
    shape = [1] * ndim
    shape[dim] = v.numel()
    return v.view(shape)


def rotate_all(X: Tensor, bases: Sequence[Tensor | None], *, back: bool = False) -> Tensor:
    """Apply :func:`rotate` along every dimension that has a basis (``None`` = identity)."""
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
    ``tr(P_perp C) / (n - rank) = ((n - R) sigma + sum(Lam[rank:])) / (n - rank)`` (SPEC §5 fact 2).
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

    ``G`` is ``m x n``; ``U`` (``n x R``, orthonormal) holds ``R`` tracked directions with eigenvalue
    estimates ``Lam``; the preconditioner uses the first ``rank <= R`` of them and the flat value
    ``sigma_eff`` of :func:`effective_flat_value`, i.e. ``S_R^{-1} = U_r Lam_r^{-1} U_r^T + sigma_eff^{-1}
    (I - U_r U_r^T)``. With ``S_L^{-1} = Q_L diag(1/lam_L) Q_L^T`` and ``C = (1/m) G^T S_L^{-1} G``
    (SPEC §5 facts 2-3, all from the OLD values)::

        left     = (1/n) [ GU_r Lam_r^{-1} GU_r^T + sigma_eff^{-1} (G G^T - GU_r GU_r^T) ]
        lam_left = diag(Q_L^T left Q_L)
        Lam      = diag(U^T C U),   sigma = tr((I - U U^T) C) / (n - R),   sketch = C U

    No ``n x n`` matrix is formed: the work is ``O(m^2 n + m n R + m^3)``.
    """
    m, n = G.shape[-2], G.shape[-1]
    R = U.shape[-1]
    sigma_eff = effective_flat_value(Lam, sigma, rank, n)
    GU = G @ U  # m x R
    GU_r = GU[..., :rank]
    Ggram = G @ G.mT  # m x m
    in_span = (GU_r / Lam[..., :rank].unsqueeze(-2)) @ GU_r.mT
    left = (in_span + (Ggram - GU_r @ GU_r.mT) / sigma_eff) / n
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


# -- rank selection -----------------------------------------------------------------------------
def _tail_logs(eigs: Tensor, floor: float) -> tuple[Tensor, Tensor]:
    """Eigenvalues sorted descending and clamped below at ``floor * max``, in float64."""
    if eigs.ndim != 1 or eigs.numel() == 0:
        raise ValueError(f"eigs must be a non-empty 1-D tensor of eigenvalues, got shape {tuple(eigs.shape)}")
    e = eigs.detach().to(torch.float64)
    if not bool(torch.isfinite(e).all()):
        raise ValueError("eigs contains NaN or Inf; pass finite eigenvalue estimates")
    e = e.sort(descending=True).values
    top = float(e[0])
    if top <= 0:
        raise ValueError(f"eigs must have a positive largest value, got {top}")
    return e, e.clamp(min=floor * top)


def _check_rank(r: int, n: int) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or not 0 <= r < n:
        raise ValueError(f"r must be an integer in [0, {n - 1}] (at least one tail eigenvalue), got {r!r}")


def tail_log_am_gm(eigs: Tensor, *, floor: float = 1e-12) -> Tensor:
    """``log(AM/GM)`` of the ``n - r`` smallest eigenvalues for every ``r = 0 .. n-1`` (float64, length n).

    Computed from suffix sums of the sorted eigenvalues and their logs, so all ranks cost ``O(n log n)``.
    Eigenvalues below ``floor * max(eigs)`` are clamped there (round-off can make tiny ones <= 0).
    """
    _, e = _tail_logs(eigs, floor)
    n = e.numel()
    count = torch.arange(n, 0, -1, dtype=torch.float64)  # n - r
    mean = e.flip(0).cumsum(0).flip(0) / count
    mean_log = e.log().flip(0).cumsum(0).flip(0) / count
    return (mean.log() - mean_log).clamp(min=0.0)


def tail_am_gm_ratio(eigs: Tensor, r: int, *, floor: float = 1e-12) -> float:
    """Arithmetic over geometric mean of the ``n - r`` smallest of ``eigs`` (``>= 1``; 1 iff the tail is flat)."""
    _check_rank(r, eigs.numel())
    return math.exp(float(tail_log_am_gm(eigs, floor=floor)[r]))


def kl_gap(eigs: Tensor, r: int, m: int, *, floor: float = 1e-12) -> float:
    """Excess KL of the best spike-and-flat factor of rank ``r`` over the full factor (SPEC §5 fact 2).

    For a right factor with eigenvalues ``eigs`` (``n`` of them) paired with an ``m``-row left factor,
    ``KL(N(0, S_L (x) C) || N(0, S_L (x) S_r)) = m (n - r) / 2 * log(AM/GM of the n - r smallest eigs)``
    (nats) when ``S_r`` keeps the top-r eigenpairs and replaces the rest by their mean.
    """
    _check_rank(r, eigs.numel())
    if not isinstance(m, int) or m < 1:
        raise ValueError(f"m must be a positive integer (rows of the other side), got {m!r}")
    n = eigs.numel()
    return 0.5 * m * (n - r) * float(tail_log_am_gm(eigs, floor=floor)[r])


def choose_rank(
    eigs: Tensor, m: int, tolerance: float, max_rank: int, *, min_rank: int = 1, floor: float = 1e-12
) -> int:
    """Adaptive rank: the smallest ``r`` in ``[min_rank, max_rank]`` with ``kl_gap(eigs, r, m) <= tolerance * m``.

    ``tolerance`` is the KL gap allowed per row of the other side (nats): for isolated spikes of size
    ``s_k`` times the flat level, ``kl_gap / m ~= 1/2 sum_{missed k} (s_k - 1 - log s_k)`` independently of
    ``n``, so the default 0.5 keeps every spike of ratio above ~2.7 and no flat-tail direction. Returns
    ``max_rank`` (capped at ``n - 1``) when no rank in range meets the tolerance.
    """
    n = eigs.numel()
    if not isinstance(max_rank, int) or max_rank < 1:
        raise ValueError(f"max_rank must be a positive integer, got {max_rank!r}")
    if not isinstance(min_rank, int) or min_rank < 0 or min_rank > max_rank:
        raise ValueError(f"min_rank must be an integer in [0, max_rank={max_rank}], got {min_rank!r}")
    if not (isinstance(tolerance, (int, float)) and tolerance >= 0 and math.isfinite(tolerance)):
        raise ValueError(f"tolerance must be a finite number >= 0 (nats per row), got {tolerance!r}")
    if not isinstance(m, int) or m < 1:
        raise ValueError(f"m must be a positive integer (rows of the other side), got {m!r}")
    hi = min(max_rank, n - 1)
    lo = min(min_rank, hi)
    log_ratio = tail_log_am_gm(eigs, floor=floor)
    count = torch.arange(n, 0, -1, dtype=torch.float64)
    gap_per_row = 0.5 * count * log_ratio
    ok = (gap_per_row[lo : hi + 1] <= tolerance).nonzero()
    return lo + int(ok[0]) if ok.numel() else hi
