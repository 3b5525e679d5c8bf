"""Newton–Schulz orthogonalization and the exact polar factor.

For ``G = A diag(s) B^T`` (thin SVD) the polar factor is ``polar(G) = A B^T``. Newton–Schulz
approximates it with odd matrix polynomials that act on the singular values only:

    X_0 = G / max(c * ||G||_F, eps)                  (so every singular value is <= 1)
    X_{k+1} = a_k X_k + (b_k A_k + c_k A_k^2) X_k,   A_k = X_k X_k^T

The iteration works on the wide orientation (rows <= cols) so that ``A_k`` is the smaller Gram
matrix. Coefficient sets:

* ``"keller"``: Keller Jordan's quintic ``(3.4445, -4.7750, 2.0315)`` for every step; it pushes
  singular values into roughly [0.7, 1.2] rather than exactly to 1 (KellerJordan/Muon).
* ``"polar_express"``: the per-step minimax schedule of Amsel et al. (2025), "The Polar Express",
  with the safety factor 1.01 applied to the normalisation and to the first seven tuples
  (``a / 1.01, b / 1.01^3, c / 1.01^5``), then ``(1.875, -1.25, 0.375)`` for every further step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from whiten.linalg.eigen import eigh_descending

Coefficients = tuple[float, float, float]

KELLER_QUINTIC: Coefficients = (3.4445, -4.7750, 2.0315)

_POLAR_EXPRESS_RAW: tuple[Coefficients, ...] = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
)
_POLAR_EXPRESS_SAFETY = 1.01
POLAR_EXPRESS: tuple[Coefficients, ...] = tuple(
    (a / _POLAR_EXPRESS_SAFETY, b / _POLAR_EXPRESS_SAFETY**3, c / _POLAR_EXPRESS_SAFETY**5)
    for a, b, c in _POLAR_EXPRESS_RAW
)
POLAR_EXPRESS_TAIL: Coefficients = (1.875, -1.25, 0.375)


@dataclass(frozen=True)
class NSSchedule:
    """A resolved Newton–Schulz schedule: one coefficient tuple per step and the norm scale."""

    coefficients: tuple[Coefficients, ...]
    norm_scale: float

    @property
    def steps(self) -> int:
        return len(self.coefficients)


NS_COEFFICIENT_SETS = ("keller", "polar_express")


def ns_schedule(coefficients: str | Sequence[float] | Sequence[Sequence[float]], steps: int) -> NSSchedule:
    """Resolve a coefficient-set name or explicit tuple(s) into a per-step schedule.

    ``coefficients`` is a name from :data:`NS_COEFFICIENT_SETS`, a single ``(a, b, c)`` used for
    every step (``torch.optim.Muon``'s ``ns_coefficients``), or a sequence of per-step tuples
    (the last one repeats when ``steps`` is longer).
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1 or steps >= 100:
        raise ValueError(f"ns_steps must be an integer in [1, 99], got {steps!r}")
    if isinstance(coefficients, str):
        if coefficients == "keller":
            return NSSchedule((KELLER_QUINTIC,) * steps, 1.0)
        if coefficients == "polar_express":
            head = POLAR_EXPRESS[:steps]
            tail = (POLAR_EXPRESS_TAIL,) * max(0, steps - len(POLAR_EXPRESS))
            return NSSchedule(head + tail, _POLAR_EXPRESS_SAFETY)
        raise ValueError(
            f"ns_coefficients={coefficients!r} is not a known set; use one of {NS_COEFFICIENT_SETS} "
            "or an explicit (a, b, c) tuple"
        )
    seq: list[Any] = list(coefficients)
    if len(seq) == 3 and all(isinstance(v, (int, float)) for v in seq):
        return NSSchedule((tuple(float(v) for v in seq),) * steps, 1.0)  # type: ignore[arg-type]
    if seq and all(isinstance(t, Sequence) and len(t) == 3 for t in seq):
        tuples = [tuple(float(v) for v in t) for t in seq]
        tuples += [tuples[-1]] * max(0, steps - len(tuples))
        return NSSchedule(tuple(tuples[:steps]), 1.0)  # type: ignore[arg-type]
    raise ValueError(
        f"ns_coefficients must be a set name, an (a, b, c) tuple or a list of such tuples, got {coefficients!r}"
    )


NS_METHODS = ("direct", "gram", "spectral", "auto")


def prefers_gram(shape: Sequence[int], compute_dtype: torch.dtype) -> bool:
    """``method="auto"``: iterate on the Gram matrix when the matrix is rectangular enough and fp32/fp64.

    For ``s x l`` (``s <= l``) the direct iteration costs ``steps (4 s^2 l + 2 s^3)`` matmul FLOPs
    and the Gram one ``4 s^2 l + 8 steps s^3``: at 5 steps it is cheaper from ``l >= 1.5 s``
    (timings in ``docs/performance.md``). In fp32 it is also closer to the exact polynomial
    (relative error vs fp64 ~2e-6 against ~1e-4 for the direct iteration on 768 x 3072 Gaussian
    inputs; ~8e-5 for inputs with condition number 1e8). In bf16 it is ~3x less accurate than the
    direct iteration, so ``auto`` keeps bf16 direct.
    """
    short, long = sorted((shape[-2], shape[-1]))
    return compute_dtype in (torch.float32, torch.float64) and long >= 1.5 * short


def ns_evaluation(method: str, shape: Sequence[int], compute_dtype: torch.dtype) -> str:
    """How :func:`newton_schulz` evaluates its polynomial for ``method`` on a matrix of ``shape``.

    The one place of the rule: ``"direct"``, ``"gram"`` and ``"spectral"`` are themselves; ``"auto"`` is
    ``"gram"`` where :func:`prefers_gram` says so, else ``"direct"``. Cost models and callers that
    apply the Gram factors themselves (Pro-KLShampoo) use it too.
    """
    if method not in NS_METHODS:
        raise ValueError(f"newton_schulz method={method!r} is not valid; use one of {NS_METHODS}")
    if method == "auto":
        return "gram" if prefers_gram(shape, compute_dtype) else "direct"
    return method


def newton_schulz(
    G: Tensor,
    steps: int = 5,
    coefficients: str | Sequence[float] | Sequence[Sequence[float]] = "keller",
    *,
    compute_dtype: torch.dtype = torch.float32,
    eps: float = 1e-7,
    method: str = "direct",
) -> Tensor:
    """Approximate ``polar(G)`` for ``G`` of shape ``(..., m, n)`` (batched over leading dims).

    Returns a tensor of ``G``'s shape in ``compute_dtype``. ``eps`` floors the normaliser
    ``max(scale * ||G||_F, eps)`` (as ``torch.optim.Muon`` does), so a zero input gives zero.
    ``compute_dtype=torch.bfloat16`` reproduces the low-precision iteration of KellerJordan/Muon
    and ``torch.optim.Muon``; fp32 (default) is the accurate path. ``method``: ``"direct"``
    (iterate on ``X``), ``"gram"`` (the same polynomial run on the small Gram matrix,
    :func:`newton_schulz_left_factor`, then one product with ``X``), ``"spectral"`` (the same polynomial
    evaluated on the eigenvalues of the small Gram matrix, :func:`newton_schulz_spectral_factor`; fp32/fp64
    only, since ``eigh`` has no bf16 kernel) or ``"auto"`` (:func:`prefers_gram` chooses between direct
    and Gram).
    """
    if G.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix (..., m, n), got shape {tuple(G.shape)}")
    evaluation = ns_evaluation(method, G.shape, compute_dtype)
    schedule = ns_schedule(coefficients, steps)
    X = G.to(compute_dtype)
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    if evaluation == "spectral" and compute_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"newton_schulz method='spectral' needs fp32 or fp64, got compute_dtype={compute_dtype}")
    if evaluation != "direct":
        factor = newton_schulz_spectral_factor if evaluation == "spectral" else newton_schulz_left_factor
        K, _ = factor(X, steps, coefficients, eps=eps)
        X = K @ X
        return X.mT if transposed else X
    norm = torch.linalg.matrix_norm(X, keepdim=True) if X.ndim > 2 else X.norm()
    X = X / (norm * schedule.norm_scale).clamp(min=eps)
    for a, b, c in schedule.coefficients:
        A = X @ X.mT
        B = torch.addmm(A, A, A, beta=b, alpha=c) if A.ndim == 2 else torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.addmm(X, B, X, beta=a) if X.ndim == 2 else torch.baddbmm(X, B, X, beta=a)
    return X.mT if transposed else X


@functools.cache
def compiled_newton_schulz() -> Callable[..., Tensor]:
    """:func:`newton_schulz` through ``torch.compile`` (``dynamic=False``), built once per process.

    The opt-in behind Muon / HTMuon ``compile_ns=True``. Each new shape, dtype or option set compiles
    once on first use (seconds to minutes on CPU; measured in ``docs/performance.md``), so it pays only
    for long runs; the arithmetic is the same polynomial, fused differently (rounding may differ).
    Needs a working ``torch.compile`` backend (a C++ compiler on CPU, Triton on CUDA).
    """
    return torch.compile(newton_schulz, dynamic=False)


def newton_schulz_left_factor(
    X: Tensor,
    steps: int = 5,
    coefficients: str | Sequence[float] | Sequence[Sequence[float]] = "keller",
    *,
    eps: float = 1e-7,
) -> tuple[Tensor, Tensor]:
    """The same iteration as :func:`newton_schulz`, run on the Gram matrix of a wide ``X`` (``m <= n``).

    Every iterate is ``X_k = Z_k X_0`` with ``Z_k`` a polynomial in ``P_0 = X_0 X_0^T`` (``m x m``), so
    the iteration can be carried out on ``Z`` alone::

        P = X X^T;  X_0 = X / (scale ||X||_F);  Z_0 = I
        Z_{k+1} = (a I + b P_k + c P_k^2) Z_k,   P_k = Z_k P_0 Z_k^T   (the Gram matrix of X_k)

    Returns ``(K, P)`` with ``newton_schulz(X) == K @ X`` (up to round-off) and ``P = X X^T``. The cost is
    one ``m x m x n`` product for ``P`` plus ``~4 m^3`` per step, instead of ``~2 m^2 n + m^3`` per step:
    cheaper whenever ``n > 1.5 m``, and the caller can fold ``K`` into other left factors before the
    single ``m x m x n`` product that applies it. ``P_k`` is recomputed from ``Z_k`` each step, so the
    iteration stays self-correcting like the direct one. Batched over leading dimensions.
    """
    if X.ndim < 2 or X.size(-2) > X.size(-1):
        raise ValueError(f"newton_schulz_left_factor needs a wide matrix (..., m, n) with m <= n, got {tuple(X.shape)}")
    schedule = ns_schedule(coefficients, steps)
    P = X @ X.mT
    sq_norm = P.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]  # ||X||_F^2 = tr(P)
    inv_scale = 1.0 / (sq_norm.sqrt() * schedule.norm_scale).clamp(min=eps)
    P0 = P * inv_scale.square()
    eye = torch.eye(X.size(-2), dtype=X.dtype, device=X.device).expand_as(P)
    Z = None
    Pk = P0
    last = len(schedule.coefficients) - 1
    for k, (a, b, c) in enumerate(schedule.coefficients):
        poly = a * eye + b * Pk + c * (Pk @ Pk)
        Z = poly if Z is None else poly @ Z
        if k < last:
            Pk = Z @ P0 @ Z.mT
    assert Z is not None
    return Z * inv_scale, P


def newton_schulz_spectral_factor(
    X: Tensor,
    steps: int = 5,
    coefficients: str | Sequence[float] | Sequence[Sequence[float]] = "keller",
    *,
    eps: float = 1e-7,
) -> tuple[Tensor, Tensor]:
    """``(K, P)`` with ``K @ X`` the Newton–Schulz output of a wide ``X`` (``m <= n``) and ``P = X X^T``.

    Newton–Schulz (:func:`whiten.linalg.newton_schulz`) computes ``X_0 = X / nu``,
    ``nu = max(scale ||X||_F, eps)``, then ``X_{k+1} = (a_k I + b_k A_k + c_k A_k^2) X_k`` with
    ``A_k = X_k X_k^T``. Every iterate is a polynomial in ``P`` times ``X``, so with ``P = V diag(lam) V^T``
    each singular value ``s = sqrt(lam)`` follows the scalar recursion
    ``x_0 = s / nu,  x_{k+1} = x_k f_k(x_k),  f_k(x) = a_k + b_k x^2 + c_k x^4`` and::

        NS(X) = V diag(q) V^T X,     q = (1 / nu) prod_k f_k(x_k)      (= x_K / s for s > 0)

    This is the same polynomial as the matrix iteration (it agrees with it to round-off in float64;
    ``tests/test_pro_kl_shampoo.py``), evaluated with one ``m x m x n`` product, one ``eigh`` of ``P``
    and one ``m^3`` product instead of ``5 (2 m^2 n + m^3)`` multiply-adds (timings in
    ``docs/performance.md``). A zero singular value gets
    ``q = prod_k a_k / nu``, which multiplies nothing (``V^T X`` vanishes there). The scalar recursion
    runs in float64; ``eigh`` uses :func:`whiten.linalg.eigh_descending` (fp64 / jitter fallback).
    Batched over leading dimensions.
    """
    if X.ndim < 2 or X.size(-2) > X.size(-1):
        raise ValueError(
            f"newton_schulz_spectral_factor needs a wide matrix (..., m, n) with m <= n, got {tuple(X.shape)}"
        )
    schedule = ns_schedule(coefficients, steps)
    P = X @ X.mT
    lam, V = eigh_descending(P)
    lam = lam.double().clamp(min=0.0)
    nu = (lam.sum(-1, keepdim=True).sqrt() * schedule.norm_scale).clamp(min=eps)  # ||X||_F = sqrt(tr P)
    x = lam.sqrt() / nu
    gain = torch.ones_like(x)
    for a, b, c in schedule.coefficients:
        x2 = x * x
        f = a + x2 * (b + c * x2)
        gain = gain * f
        x = x * f
    q = (gain / nu).to(X.dtype)
    return (V * q.unsqueeze(-2)) @ V.mT, P


def polar_svd(G: Tensor) -> Tensor:
    """Exact polar factor ``A B^T`` of ``G = A diag(s) B^T`` via a thin SVD (batched).

    Computed in fp32 or better (fp64 stays fp64); this is the reference that the Newton–Schulz
    path approximates.
    """
    work = G if G.dtype == torch.float64 else G.float()
    A, _, Bh = torch.linalg.svd(work, full_matrices=False)
    return A @ Bh
