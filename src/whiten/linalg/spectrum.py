"""Spike-and-flat statistics of a Kronecker factor's spectrum (Pro-KLShampoo's adaptive-rank rule).

Pro-KLShampoo (arXiv 2605.06316; ``docs/pro_kl_shampoo.md``) restricts one KL-Shampoo factor ``C`` (``d x d``, the
factor of the side being restricted; ``k`` is the OTHER dimension of the ``m x n`` parameter) to
``U Lam U^T + sigma (I - U U^T)`` with ``U`` the top-``r`` eigenvectors. With the other factor
fixed, the KL-optimal ``sigma`` is the tail's arithmetic mean and the excess KL over the full
factor is (derived in ``docs/pro_kl_shampoo.md``)::

    gap(r) = KL( N(0, S_other (x) C) || N(0, S_other (x) C_r) )
           = k (d - r) / 2 * log( AM(lam_{r+1..d}) / GM(lam_{r+1..d}) )

because ``tr(C_r^{-1} C) = d`` (the tail is replaced by its mean) and the log-determinants differ by
``(d - r) log(AM / GM)``; the other factor contributes the multiplicity ``k``. The gap is zero
exactly when the tail is flat and is non-increasing in ``r`` (the rank-``r`` family is contained in
the rank-``r+1`` one). All functions take eigenvalues in any order and compute in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: eigenvalues below ``EIG_FLOOR * max(lam)`` are raised to it before taking logs (round-off can
#: make a PSD factor's smallest eigenvalues zero or slightly negative)
EIG_FLOOR = 1e-12


def _prepare(eigenvalues: Tensor) -> Tensor:
    if not isinstance(eigenvalues, Tensor):
        eigenvalues = torch.as_tensor(eigenvalues)
    if eigenvalues.ndim != 1 or eigenvalues.numel() == 0:
        raise ValueError(f"eigenvalues must be a non-empty 1-D tensor, got shape {tuple(eigenvalues.shape)}")
    lam = eigenvalues.detach().to(dtype=torch.float64, device="cpu")
    if not torch.isfinite(lam).all():
        raise ValueError("eigenvalues contain NaN or Inf; the factor is corrupt")
    lam = torch.sort(lam, descending=True).values
    top = float(lam[0])
    if top <= 0:
        raise ValueError(f"the largest eigenvalue must be > 0, got {top:g}; an all-zero factor has no spectrum")
    return lam.clamp(min=EIG_FLOOR * top)


def _check_rank(rank: int, d: int) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank <= d:
        raise ValueError(f"rank must be an integer in [0, {d}] (the factor's dimension), got {rank!r}")


def tail_log_am_gm_all(eigenvalues: Tensor) -> Tensor:
    """``log(AM/GM)`` of the tail ``lam_{r+1..d}`` for every ``r = 0..d`` (``d + 1`` values, last is 0)."""
    lam = _prepare(eigenvalues)
    d = lam.numel()
    # suffix sums: tail_sum[r] = sum_{j >= r} lam_j (0-based), so the tail after keeping r values
    tail_sum = torch.flip(torch.cumsum(torch.flip(lam, (0,)), 0), (0,))
    tail_log = torch.flip(torch.cumsum(torch.flip(lam.log(), (0,)), 0), (0,))
    count = torch.arange(d, 0, -1, dtype=torch.float64)
    log_ratio = torch.log(tail_sum / count) - tail_log / count
    # AM >= GM; tiny negatives are round-off
    return torch.cat([log_ratio.clamp(min=0.0), lam.new_zeros(1)])


def tail_am_gm_ratio(eigenvalues: Tensor, rank: int) -> float:
    """Arithmetic over geometric mean of the eigenvalues left after the top ``rank`` (1 = flat tail)."""
    d = eigenvalues.shape[-1] if isinstance(eigenvalues, Tensor) else len(eigenvalues)
    _check_rank(rank, d)
    return float(torch.exp(tail_log_am_gm_all(eigenvalues)[rank]))


def kl_gap_all(eigenvalues: Tensor, other_dim: int) -> Tensor:
    """The KL gap ``k (d - r)/2 log(AM/GM)`` of restricting to rank ``r``, for every ``r = 0..d``."""
    if not isinstance(other_dim, int) or isinstance(other_dim, bool) or other_dim < 1:
        raise ValueError(f"other_dim must be an integer >= 1 (the parameter's other dimension), got {other_dim!r}")
    log_ratio = tail_log_am_gm_all(eigenvalues)
    d = log_ratio.numel() - 1
    tail_count = torch.arange(d, -1, -1, dtype=torch.float64)
    return other_dim * tail_count / 2 * log_ratio


def kl_gap(eigenvalues: Tensor, rank: int, other_dim: int) -> float:
    """Excess KL (nats) of the spike-and-flat restriction at ``rank`` over the full factor (module doc)."""
    d = eigenvalues.shape[-1] if isinstance(eigenvalues, Tensor) else len(eigenvalues)
    _check_rank(rank, d)
    return float(kl_gap_all(eigenvalues, other_dim)[rank])


def energy_captured(eigenvalues: Tensor, rank: int) -> float:
    """Fraction of the trace in the top ``rank`` eigenvalues."""
    lam = _prepare(eigenvalues)
    _check_rank(rank, lam.numel())
    return float(lam[:rank].sum() / lam.sum())


def choose_rank(eigenvalues: Tensor, tol: float, other_dim: int = 1, *, per_entry: bool = False) -> int:
    """Smallest ``r`` whose KL gap is ``<= tol`` nats (``d`` if none smaller qualifies).

    With ``per_entry=True`` the gap is divided by ``k d`` (the number of matrix entries), so one
    tolerance means the same across layer shapes. ``other_dim=1`` gives the gap per sample column.
    """
    if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not tol >= 0:
        raise ValueError(f"tol must be a number >= 0 (nats), got {tol!r}")
    gaps = kl_gap_all(eigenvalues, other_dim)
    d = gaps.numel() - 1
    if per_entry:
        gaps = gaps / (other_dim * d)
    ok = torch.nonzero(gaps <= tol)
    return int(ok[0]) if ok.numel() else d
