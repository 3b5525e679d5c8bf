"""Schatten power maps: ``U = A diag(s) B^T  ->  A diag(s^p) B^T`` (HTMuon's spectral map).

``A diag(s^p) B^T`` is the steepest-descent direction for the Schatten-q norm with
``q = 1 + 1/p``: it maximises ``<U, D>`` over ``||D||_{S_q} <= 1`` up to a positive scale
(Hölder's inequality on singular values). ``p = 0`` gives the polar factor (Muon) and ``p = 1``
gives ``U`` itself. Three ways to compute it, as in the HTMuon reference code
(TDCSZ327/HTmuon):

* :func:`schatten_power_svd`: exact, one fp32 SVD.
* :func:`schatten_power_ns`: the reference "NS" variant ``NS5(U) @ (U^T U + ridge I)^(p/2)``
  with the fractional power from ``k`` repeated coupled Newton–Schulz square roots, so ``p`` is
  effectively rounded to ``2^(1-k)`` with ``k = round(log_0.5(p) + 1)``.
* :func:`schatten_power_stream`: one warm-started subspace-iteration step per call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from whiten.linalg.eigen import qr_orthonormal, svd_thin
from whiten.linalg.newton_schulz import _power_of_two_scale as _power_of_two
from whiten.linalg.newton_schulz import newton_schulz


def _work_dtype(U: Tensor) -> torch.dtype:
    return torch.float64 if U.dtype == torch.float64 else torch.float32


def schatten_power_svd(U: Tensor, power: float) -> Tensor:
    """Exact ``A diag(s^p) B^T`` via a thin SVD (batched; fp32 or fp64)."""
    work = U.to(_work_dtype(U))
    A, s, Bh = svd_thin(work)
    if power == 0.0:
        return A @ Bh
    return (A * s.clamp(min=0).pow(power).unsqueeze(-2)) @ Bh


def coupled_newton_schulz_sqrt(A: Tensor, steps: int = 5, *, inverse: bool = True) -> tuple[Tensor, Tensor | None]:
    """Square root and inverse square root of SPD ``A`` by the coupled Newton–Schulz iteration.

    ``Y_0 = A / ||A||_F, Z_0 = I;  T = (3I - Z Y) / 2;  Y <- Y T;  Z <- T Z``. ``Y`` converges to
    ``(A/||A||_F)^(1/2)`` and ``Z`` to its inverse; both are rescaled back by ``||A||_F^(±1/2)``.
    With ``inverse=False`` only the root is returned (``(root, None)``) and the last ``T Z``
    product is skipped. The products with ``Z_0 = I`` are never formed (they are exact copies),
    so ``steps`` iterations cost ``3 steps - 2`` matrix products (``3 steps - 3`` without the
    inverse) and give bit-identical results.
    """
    norm = torch.linalg.matrix_norm(A, keepdim=True).clamp(min=1e-30)
    Y = A / norm
    Z: Tensor | None = None  # None stands for the identity
    for k in range(steps):
        ZY = Y if Z is None else Z @ Y
        T = ZY * -0.5  # == 0.5 * (3 I - Z Y) exactly: scaling by 0.5 is exact
        T.diagonal(dim1=-2, dim2=-1).add_(1.5)
        Y_next = Y @ T
        if Z is None:
            Z = T
        elif inverse or k < steps - 1:
            Z = T @ Z
        Y = Y_next
    if not inverse:
        return Y * norm.sqrt(), None
    if Z is None:  # steps == 0
        Z = torch.eye(A.size(-1), dtype=A.dtype, device=A.device).expand_as(A).clone()
    return Y * norm.sqrt(), Z / norm.sqrt()


def ns_power_rounds(power: float) -> int:
    """Number ``k`` of repeated square roots the reference uses for power ``p``: ``round(log_0.5(p) + 1)``."""
    if power <= 0:
        raise ValueError(f"the NS power map needs power > 0, got {power}")
    return max(1, round(math.log(power, 0.5) + 1))


def schatten_power_ns(
    U: Tensor,
    power: float,
    *,
    ns_steps: int = 5,
    ns_coefficients: str | Sequence[float] | Sequence[Sequence[float]] = "keller",
    sqrt_steps: int = 5,
    ridge: float = 1e-6,
    ns_dtype: torch.dtype | None = None,
    eps: float = 1e-7,
    method: str = "auto",
) -> Tensor:
    """The HTMuon reference's NS variant: ``NS(U) @ R``, ``R ~ (U^T U + ridge I)^(p/2)``.

    Procedure of the reference (TDCSZ327/HTmuon, ``gram_root_1_16_via_newtonschulz``), in fp32
    (fp64 for fp64 input)::

        S = U^T U + ridge I
        repeat k = round(log_0.5(p) + 1) times:
            S = coupled_NS_sqrt(S, sqrt_steps);  S = (S + S^T) / 2 + ridge I
        O = NS(U) @ S

    Each round takes a square root of the Gram, so the effective exponent is ``2^-k`` per Gram,
    i.e. ``p_eff = 2^(1-k)`` (``p = 0.125 -> k = 4``, exact). Singular values below
    ``sqrt(ridge)`` are floored near ``ridge^(p/2)``. We form the Gram on the smaller side
    (``U U^T`` and a left product when ``m < n``): ``NS(U)`` is ``U`` times a polynomial in
    ``U^T U``, so both sides give the same matrix function (the ridge acts on the same
    eigenvalues ``s_i^2``) at lower cost. ``ns_dtype`` is the dtype of the Newton–Schulz factor
    (default: the work dtype; ``torch.bfloat16`` is the reference's ``zeropower`` precision); the
    product with ``S`` is formed in the work dtype. ``eps`` and ``method`` are passed to
    :func:`whiten.linalg.newton_schulz` (normaliser floor; where the polynomial is evaluated).
    """
    work = U.to(_work_dtype(U))
    wide = work.size(-2) < work.size(-1)
    # The Gram matrix of a ~1e10 fp32 gradient overflows its Frobenius norm (then 0 * inf = NaN). Write
    # U = c V with ||V||_F ~ 1 (c a power of two, exact) and carry the scale separately: with root_k = t_k R_k,
    # t_0 = c^2, each round sqrt(t_k R_k) + ridge I = sqrt(t_k) (sqrt(R_k) + ridge / sqrt(t_k) I).
    # scale down only: for a tiny U the ridge dominates anyway, and ridge / t must stay in range
    unit = _power_of_two(work).double().clamp(max=1.0)  # 1 / c
    normalized = work * unit.to(work.dtype)
    gram = normalized @ normalized.mT if wide else normalized.mT @ normalized
    eye = torch.eye(gram.size(-1), dtype=gram.dtype, device=gram.device)
    t = unit.reciprocal().square()  # fp64: c^2 may exceed fp32 range
    root = gram + (ridge / t).to(gram.dtype) * eye
    for _ in range(ns_power_rounds(power)):
        root, _ = coupled_newton_schulz_sqrt(root, sqrt_steps, inverse=False)
        t = t.sqrt()
        root = 0.5 * (root + root.mT) + (ridge / t).to(gram.dtype) * eye
    ns_dtype = work.dtype if ns_dtype is None or work.dtype == torch.float64 else ns_dtype
    ortho = newton_schulz(work, ns_steps, ns_coefficients, compute_dtype=ns_dtype, eps=eps, method=method)
    ortho = ortho.to(work.dtype)
    root = root * t.to(work.dtype)
    return root @ ortho if wide else ortho @ root


def schatten_power_stream(U: Tensor, V_prev: Tensor, power: float) -> tuple[Tensor, Tensor]:
    """One warm-started subspace-iteration step of the HTMuon "stream" variant.

    ``V, _ = qr(U^T (U V_prev));  GV = U V;  A = GV / ||GV||_col;  s = clamp(colsum(A * GV), 0);
    O = A diag(s^p) V^T``. ``V_prev`` is ``n x k`` with orthonormal columns (``k = min(m, n)``);
    returns ``(O, V)`` so the caller can keep ``V`` for the next step. Converges to the exact map
    when ``U`` changes slowly relative to its spectral gaps.
    """
    work = U.to(_work_dtype(U))
    # U^T U V squares the scale of U (overflow for |U| ~ 1e19 in fp32): iterate on U times a power of two
    # (exact, and Q of a QR is invariant to a positive scale); the column norms are taken scaled alike
    unit = _power_of_two(work)
    scaled = work * unit
    V = qr_orthonormal(scaled.mT @ (scaled @ V_prev.to(work.dtype)))
    GV = work @ V
    col_norm = torch.linalg.vector_norm(GV * unit, dim=-2, keepdim=True) / unit
    A = GV / col_norm.clamp(min=1e-30)
    s = (A * GV).sum(-2).clamp(min=0)
    O = (A * s.pow(power).unsqueeze(-2)) @ V.mT
    return O, V


STREAM_STARTS = ("svd", "identity")


def initial_stream_basis(U: Tensor, start: str = "svd") -> Tensor:
    """The stream variant's first basis ``V`` (``n x min(m, n)``, orthonormal columns, batched like ``U``).

    ``"svd"``: the right singular vectors of ``U`` (the first step is then the exact map). ``"identity"``:
    the first ``min(m, n)`` columns of the ``n x n`` identity, the start of the HTMuon reference
    (TDCSZ327/HTmuon); its first steps approximate the map less well until the iteration converges.
    """
    work = U.to(_work_dtype(U))
    if start == "identity":
        n, k = work.shape[-1], min(work.shape[-2], work.shape[-1])
        eye = torch.eye(n, k, dtype=work.dtype, device=work.device)
        return eye.expand(*work.shape[:-2], n, k).clone()
    if start != "svd":
        raise ValueError(f"start={start!r} is not valid; use one of {STREAM_STARTS}")
    _, _, Vh = svd_thin(work)
    return Vh.mT
