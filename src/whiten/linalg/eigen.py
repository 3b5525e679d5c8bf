"""Symmetric eigendecomposition, warm-started orthogonal iteration and subspace angles.

These are the kernels the Kronecker-factored optimizers (SOAP, KL-Shampoo, Pro-KLShampoo) use
to keep an eigenbasis of each factor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def with_fallbacks(
    decompose: Callable[[Tensor], tuple[Tensor, ...]],
    A: Tensor,
    *,
    jitter: float = 1e-7,
    max_jitter_tries: int = 4,
) -> tuple[Tensor, ...]:
    """``decompose(A)``, retried when LAPACK / cuSOLVER reports a failure (``torch.linalg.LinAlgError``).

    The fallbacks of every decomposition here (``eigh``, ``qr``, ``svd``): first ``A`` in fp64, then
    ``A + shift I`` (a rectangular identity for non-square ``A``) in fp64 with ``shift = jitter * 10^k *
    (mean |diag A| + 1e-30)``, ``k = 0 .. max_jitter_tries - 1``. The factors come back in ``A``'s dtype.
    When every try fails the last ``LinAlgError`` propagates: the optimizers then leave the parameter as it
    was and count the step in ``state["fault_skips"]`` (``docs/shared_behaviour.md``).
    """
    try:
        return decompose(A)
    except torch.linalg.LinAlgError:
        work = A.double()
        scale = work.diagonal(dim1=-2, dim2=-1).abs().mean(-1, keepdim=True).unsqueeze(-1) + 1e-30
        eye = torch.eye(A.size(-2), A.size(-1), dtype=work.dtype, device=work.device)
        for attempt in range(max_jitter_tries + 1):
            try:
                shift = 0.0 if attempt == 0 else jitter * 10 ** (attempt - 1)
                out = decompose(work + shift * scale * eye if shift else work)
                return tuple(t.to(A.dtype) for t in out)
            except torch.linalg.LinAlgError:
                if attempt == max_jitter_tries:
                    raise
    raise AssertionError("unreachable")


def qr_orthonormal(A: Tensor) -> Tensor:
    """The ``Q`` of a reduced QR of ``A`` (batched), with the fallbacks of :func:`with_fallbacks`."""
    return with_fallbacks(lambda X: (torch.linalg.qr(X)[0],), A)[0]


def svd_thin(A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``(U, S, Vh)`` of ``A`` (batched), with the fallbacks of :func:`with_fallbacks`."""
    U, S, Vh = with_fallbacks(lambda X: tuple(torch.linalg.svd(X, full_matrices=False)), A)
    return U, S, Vh


def eigh_descending(A: Tensor, *, jitter: float = 1e-7, max_jitter_tries: int = 4) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending) and eigenvectors (columns, same order) of symmetric ``A`` (batched).

    ``torch.linalg.eigh`` occasionally fails to converge on ill-conditioned fp32 input. Then the
    decomposition is retried in fp64, and if that fails too, with a diagonal jitter of
    ``jitter * (mean |diag A| + 1e-30)`` growing 10x per try (:func:`with_fallbacks`). Results come
    back in ``A``'s dtype. The input is symmetrised first so that round-off asymmetry never matters.
    """
    if A.size(-1) != A.size(-2):
        raise ValueError(f"eigh_descending needs square matrices, got shape {tuple(A.shape)}")
    sym = 0.5 * (A + A.mT)
    vals, vecs = with_fallbacks(
        lambda X: tuple(torch.linalg.eigh(X)), sym, jitter=jitter, max_jitter_tries=max_jitter_tries
    )
    return vals.flip(-1), vecs.flip(-1)


def rayleigh_quotients(A: Tensor, Q: Tensor) -> Tensor:
    """``diag(Q^T A Q)`` without forming the full product (batched)."""
    return ((A @ Q) * Q).sum(-2)


def sort_basis(A: Tensor, Q: Tensor) -> tuple[Tensor, Tensor]:
    """Reorder the columns of ``Q`` by descending Rayleigh quotient under ``A``.

    Returns the permuted basis and the permutation (so companion state can be permuted alike).
    """
    order = torch.argsort(rayleigh_quotients(A, Q), dim=-1, descending=True)
    return torch.take_along_dim(Q, order.unsqueeze(-2), dim=-1), order


def orthogonal_iteration(A: Tensor, Q: Tensor, steps: int = 1) -> Tensor:
    """Warm-started orthogonal (subspace) iteration: ``Q <- qr(A Q).Q`` repeated ``steps`` times.

    Starting from the previous eigenbasis, one step is usually enough to track a slowly moving
    factor (SOAP, KL-Shampoo). Works on ``n x k`` bases (``k <= n``) and batches.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    for _ in range(steps):
        Q = qr_orthonormal(A @ Q)
    return Q


def sorted_orthogonal_iteration(A: Tensor, Q: Tensor, steps: int = 1) -> tuple[Tensor, Tensor]:
    """:func:`sort_basis` then :func:`orthogonal_iteration`, sharing the product ``A Q``.

    Permuting the columns of ``Q`` permutes those of ``A Q``, so the Rayleigh quotients and the
    first power step need one ``A Q`` instead of two (``2 n^3`` FLOPs saved per call on an
    ``n x n`` factor: ~7% of a SOAP step on GPT-2's 768 x 3072 at refresh period 10). Returns the
    new basis and the permutation applied to the old one (to permute companion state alike).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    AQ = A @ Q
    order = torch.argsort((AQ * Q).sum(-2), dim=-1, descending=True)
    Q_next = qr_orthonormal(torch.take_along_dim(AQ, order.unsqueeze(-2), dim=-1))
    if steps > 1:
        Q_next = orthogonal_iteration(A, Q_next, steps - 1)
    return Q_next, order


def principal_angles(A: Tensor, B: Tensor) -> Tensor:
    """Principal angles (radians, ascending) between the column spans of ``A`` and ``B``, accurate for
    small and large angles; ``min(p, q)`` angles for ``n x p`` and ``n x q`` bases (batched).

    Both are orthonormalised first (QR), so any full-column-rank bases are accepted. ``cos theta_i`` are
    the singular values of ``A^T B``, ``sin theta_i`` those of ``(I - B B^T) A``; each angle comes from the
    better conditioned of the two (sine below 45 degrees, cosine above): ``arccos`` alone cannot resolve
    angles below ``~sqrt(2 eps)`` (Björck & Golub 1973; Knyazev & Argentati 2002). Computed in the inputs'
    dtype (fp32 or wider). The largest angle is the usual "how far did the subspace move" number.
    """
    if A.shape[-1] > B.shape[-1]:
        A, B = B, A
    dtype = torch.promote_types(torch.promote_types(A.dtype, B.dtype), torch.float32)
    Qa, _ = torch.linalg.qr(A.to(dtype))
    Qb, _ = torch.linalg.qr(B.to(dtype))
    cos = torch.linalg.svdvals(Qa.mT @ Qb).clamp(0.0, 1.0)  # descending: smallest angle first
    sin = torch.linalg.svdvals(Qa - Qb @ (Qb.mT @ Qa)).clamp(0.0, 1.0).flip(-1)  # paired with cos
    return torch.where(cos * cos >= 0.5, torch.arcsin(sin), torch.arccos(cos))
