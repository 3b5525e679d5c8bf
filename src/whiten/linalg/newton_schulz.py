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
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from whiten.linalg.eigen import eigh_descending, svd_thin

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
    and Gram) The Gram iteration always runs in fp32 or fp64 (in bf16 it diverges on
    rank-deficient input) and is re-anchored every :data:`GRAM_SEGMENT` steps, so it is stable for any ``steps``.
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
        if X.element_size() < 4:
            # the Gram iteration is not self-correcting in bf16 (a rank-1 X diverged from 5 steps): run it in
            # fp32, where it is stable, and round the result once
            return newton_schulz(G, steps, coefficients, compute_dtype=torch.float32, eps=eps, method=method).to(
                compute_dtype
            )
        if evaluation == "spectral":
            K, _ = newton_schulz_spectral_factor(X, steps, coefficients, eps=eps)
            X = K @ X
        else:  # the Gram iteration, re-anchored on the explicit iterate every GRAM_SEGMENT steps (one segment
            # up to GRAM_SEGMENT steps: the products of newton_schulz_left_factor, K applied to X once)
            scale = _power_of_two_scale(X)
            X = X * scale
            P = X @ X.mT
            inv_scale = _inverse_norm(P, schedule.norm_scale, eps * scale)
            X = X * inv_scale
            for start in range(0, schedule.steps, GRAM_SEGMENT):
                P0 = P * inv_scale.square() if start == 0 else X @ X.mT
                X = _gram_polynomial(P0, schedule.coefficients[start : start + GRAM_SEGMENT]) @ X
        return X.mT if transposed else X
    norm = torch.linalg.matrix_norm(X, keepdim=True) if X.ndim > 2 else X.norm()
    if X.dtype != torch.float64:
        # ||X||_F overflows in fp32/bf16 once sum(X^2) > 3.4e38 although X is finite: take it from fp64 then
        wide = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=X.ndim > 2, dtype=torch.float64)
        norm = torch.where(norm.isinf(), wide.to(X.dtype), norm)
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


#: the Gram iteration re-forms its Gram matrix from the explicit iterate every this many steps (see
#: :func:`newton_schulz_left_factor`); 5 is the default step count, so default runs are unaffected
GRAM_SEGMENT = 5


def _power_of_two_scale(X: Tensor) -> Tensor:
    """``2^-e`` with ``||X||_F = f 2^e``, ``f`` in ``[0.5, 1)`` (1 for a zero ``X``), shaped ``(..., 1, 1)``.

    Multiplying by a power of two is exact, so ``X * scale`` has norm in ``[0.5, 1)`` and the same digits:
    its Gram matrix can neither overflow nor underflow, and results scale back exactly.
    """
    norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True, dtype=torch.float64)
    _, exponent = torch.frexp(norm)
    limit = math.frexp(torch.finfo(X.dtype).max)[1] - 2  # the scale itself stays a normal number of X's dtype
    return torch.ldexp(torch.ones_like(norm), (-exponent).clamp(-limit, limit)).to(X.dtype)


def _inverse_norm(P: Tensor, norm_scale: float, eps: Tensor | float) -> Tensor:
    """``1 / max(norm_scale sqrt(tr P), eps)`` shaped ``(..., 1, 1)`` (``tr P = ||X||_F^2`` for ``P = X X^T``)."""
    sq_norm = P.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
    denominator = sq_norm.sqrt() * norm_scale
    if isinstance(eps, Tensor):
        return 1.0 / torch.maximum(denominator, eps)
    return 1.0 / denominator.clamp(min=eps)


def _gram_polynomial(P0: Tensor, coefficients: Sequence[Coefficients]) -> Tensor:
    """``Z`` with ``X_K = Z X_0`` after the steps ``coefficients``, from ``P0 = X_0 X_0^T`` alone (see below)."""
    eye = torch.eye(P0.size(-1), dtype=P0.dtype, device=P0.device).expand_as(P0)
    Z = None
    Pk = P0
    last = len(coefficients) - 1
    for k, (a, b, c) in enumerate(coefficients):
        poly = a * eye + b * Pk + c * (Pk @ Pk)
        Z = poly if Z is None else poly @ Z
        if k < last:
            Pk = Z @ P0 @ Z.mT
    assert Z is not None
    return Z


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
    single ``m x m x n`` product that applies it. ``P_k`` is recomputed from ``Z_k`` each step; on the
    Gram's null space ``Z_k`` grows like ``a^k`` (``P_k`` stays 0 there), so rounding in ``Z_k P_0 Z_k^T``
    is amplified like ``a^(2k)`` and the iteration diverges from about 10 steps (a rank-1 ``X`` gave NaN).
    Every :data:`GRAM_SEGMENT` steps the Gram matrix is therefore re-formed from the explicit iterate
    ``X_k = K_k X`` (one more ``m x m x n`` product each time), which is self-correcting like the direct
    iteration; at ``steps <= GRAM_SEGMENT`` nothing changes. ``K`` itself still grows like ``a^k`` on the
    null space of ``X`` (where it multiplies zeros): for many steps prefer :func:`newton_schulz` with
    ``method="gram"``, which applies each segment to ``X`` instead. ``X`` is scaled by a power of two
    (exact) before ``P`` is formed, so ``P`` cannot overflow for finite ``X``. Batched over leading dimensions.
    """
    if X.ndim < 2 or X.size(-2) > X.size(-1):
        raise ValueError(f"newton_schulz_left_factor needs a wide matrix (..., m, n) with m <= n, got {tuple(X.shape)}")
    schedule = ns_schedule(coefficients, steps)
    scale = _power_of_two_scale(X)
    Xs = X * scale
    P = Xs @ Xs.mT
    inv_scale = _inverse_norm(P, schedule.norm_scale, eps * scale)
    K: Tensor | None = None
    for start in range(0, schedule.steps, GRAM_SEGMENT):
        if K is None:
            P0 = P * inv_scale.square()
        else:
            Xk = K @ Xs  # the iterate, formed explicitly: its Gram matrix carries no accumulated rounding
            P0 = Xk @ Xk.mT
        Z = _gram_polynomial(P0, schedule.coefficients[start : start + GRAM_SEGMENT])
        K = Z * inv_scale if K is None else Z @ K
    assert K is not None
    return K * scale, P / scale.square()


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
    scale = _power_of_two_scale(X)  # exact: P cannot overflow for finite X
    Xs = X * scale
    P = Xs @ Xs.mT
    lam, V = eigh_descending(P)
    lam = lam.double().clamp(min=0.0)
    nu = (lam.sum(-1, keepdim=True).sqrt() * schedule.norm_scale).clamp(min=eps * scale.double()[..., 0])
    # Eigenvalues below eigh's resolution (eps * lam_max) are rounding noise: their x_k would start at 0 and
    # q at prod_k a_k / nu (~3.44^k), which multiplies the rounding left in V^T X (NaN/overflow at ~20+
    # steps on a rank-deficient X). Evaluating them at the resolution floor keeps q x bounded by the
    # polynomial's range; resolved eigenvalues are untouched.
    floor = lam.amax(-1, keepdim=True) * torch.finfo(X.dtype).eps
    x = lam.clamp(min=floor).sqrt() / nu
    gain = torch.ones_like(x)
    for a, b, c in schedule.coefficients:
        x2 = x * x
        f = a + x2 * (b + c * x2)
        gain = gain * f
        x = x * f
    q = torch.where(floor > 0, gain / nu, 0.0).to(X.dtype)  # a zero X gives K = 0
    return (V * (q * scale[..., 0]).unsqueeze(-2)) @ V.mT, P / scale.square()


def polar_svd(G: Tensor) -> Tensor:
    """Exact polar factor ``A B^T`` of ``G = A diag(s) B^T`` via a thin SVD (batched).

    Computed in fp32 or better (fp64 stays fp64); this is the reference that the Newton–Schulz
    path approximates.
    """
    work = G if G.dtype == torch.float64 else G.float()
    A, _, Bh = svd_thin(work)
    return A @ Bh
