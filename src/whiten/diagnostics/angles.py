"""Principal angles between eigenbases for the diagnostics: checked ``n x k`` bases, float64 on CPU.

The kernel is :func:`whiten.linalg.principal_angles` (accurate for small and large angles: each angle
from the better conditioned of its sine and cosine, Björck & Golub 1973; Knyazev & Argentati 2002).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from whiten.linalg import principal_angles


def _orthonormal(X: Tensor, name: str) -> Tensor:
    if X.ndim == 1:
        X = X.unsqueeze(-1)
    if X.ndim != 2 or X.shape[1] > X.shape[0] or X.shape[1] == 0:
        raise ValueError(f"{name} must be an n x k basis with 1 <= k <= n, got shape {tuple(X.shape)}")
    Q, _ = torch.linalg.qr(X.detach().to(dtype=torch.float64, device="cpu"))
    return Q


def subspace_angles(A: Tensor, B: Tensor) -> Tensor:
    """Principal angles (radians, ascending, float64) between ``span(A)`` and ``span(B)``.

    ``A`` is ``n x p``, ``B`` is ``n x q`` with ``p <= q``; ``p`` angles are returned.
    """
    Qa, Qb = _orthonormal(A, "A"), _orthonormal(B, "B")
    if Qa.shape[0] != Qb.shape[0]:
        raise ValueError(f"A and B must live in the same space, got {Qa.shape[0]} and {Qb.shape[0]} rows")
    if Qa.shape[1] > Qb.shape[1]:
        raise ValueError(f"A has more columns ({Qa.shape[1]}) than B ({Qb.shape[1]}); swap the arguments")
    return principal_angles(Qa, Qb)


def largest_angle_deg(Q: Tensor, Q_ref: Tensor, k: int) -> float:
    """Largest principal angle (degrees) between the top-``k`` columns of ``Q`` and of ``Q_ref``.

    ``k = 1`` is the acute angle between the leading vectors (the "top-1" number of docs/diagnostics/spike.md).
    """
    if not isinstance(k, int) or k < 1 or k > min(Q.shape[-1], Q_ref.shape[-1]):
        raise ValueError(f"k must be an integer in [1, {min(Q.shape[-1], Q_ref.shape[-1])}], got {k!r}")
    return math.degrees(float(subspace_angles(Q[:, :k], Q_ref[:, :k])[-1]))


def angle_trajectory_deg(trajectory: Tensor, reference: Tensor, k: int) -> list[float]:
    """``largest_angle_deg(trajectory[i], reference, k)`` for every step ``i`` of a ``(T, n, c)`` stack."""
    return [largest_angle_deg(Q, reference, k) for Q in trajectory]
