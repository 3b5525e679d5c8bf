"""Pro-KLShampoo: KL-Shampoo with one factor restricted to the spike-and-flat family (arXiv 2605.06316).

The paper's full text is not available; this is a reconstruction from its abstract and KL-Shampoo's
fixed point (``docs/pro_kl_shampoo.md`` has the derivation and every open choice).
Orient ``W`` (``m x n``) so that the restricted side has ``n`` columns (``project_side``). The right
factor is ``S_R = U diag(Lam) U^T + sigma (I - U U^T)`` with ``U`` an ``n x r`` tracked orthonormal
subspace; the left factor is a full KL-Shampoo factor. Per step::

    M <- lerp(M, G, 1 - b1);  A = Q_L^T M;  B = A U
    sub = B / (sqrt(lamL (x) Lam) + eps)                     # two-sided KL whitening on span(U)
    X   = diag(lamL^{-1/2}) (A - B U^T)  ("left_whitened_orth")   or   A - B U^T  ("orth")
    W  <- W - lr Q_L [ sub U^T + c NS(X) ]                    # NS(X) stays in the complement of U
    W  <- W (1 - lr wd)
    statistics of the restricted family (raw G, OLD values): L, lamL, Lam, sigma, sketch Y ~ C U
    every T steps: Q_L <- qr(L Q_L).Q;  U <- qr(Y).Q;  Y <- U diag(Lam)

``Q_L NS(X) = NS(Q_L X)``, so the left rotation is applied once to the sum. The memory is
``O(m^2 + n r)``: no ``n x n`` matrix is ever formed. When the tracked rank reaches the restricted
dimension (``rank >= n``), when a side exceeds ``max_precond_dim``, or for 3-D parameters, the
parameter is trained by the full KL-Shampoo path of :class:`whiten.KLShampoo` (same code, same state).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Unpack

import torch
from torch import Tensor

from whiten.linalg import (
    GRAM_SEGMENT,
    NS_METHODS,
    FlopCount,
    batched_addmm,
    clamp_eigenvalues,
    effective_flat_value,
    effective_matmul_dtype,
    eigh_descending,
    ema_eigenvalues,
    full_precision,
    map_batched,
    matmul_compute_dtype,
    matmul_flops,
    matmuls_in,
    newton_schulz,
    newton_schulz_flops,
    newton_schulz_left_factor,
    newton_schulz_spectral_factor,
    ns_evaluation,
    orthogonal_iteration,
    orthogonal_iteration_flops,
    prefers_gram,
    qr_flops,
    qr_orthonormal,
    spike_flat_statistics,
    stack_groups,
    stacking_helps,
)
from whiten.linalg.spectrum import choose_rank
from whiten.optim import _options as opt
from whiten.optim._options import CommonOptions, constructor_options
from whiten.optim._stacking import stack, stack_states, store_states
from whiten.optim.base import MapInput
from whiten.optim.kl_shampoo import (
    KLFactored,
    _due,
    _gradient_of,
    ema_factor_,
    factor_dtype,
    shampoo_beta,
    work_view,
)

COMPLEMENTS = ("left_whitened_orth", "orth")
COMPLEMENT_SCALES = ("sqrt_m", "kl_norm", "muon_rms")
#: the map's state of a projected matrix (what a stacked batch carries; ``step``, ``rank`` are shared by it)
PROJECTED_STATE = ("L", "Q_L", "lam_L", "U", "Lam", "sigma", "Y_sketch")


def ns_factor(X: Tensor, method: str, steps: int = 5) -> str:
    """How the complement ``X`` (``m x n``) is orthogonalized: ``"direct"`` (matrix iteration on ``X``) or, for
    a wide ``X``, ``"gram"`` (:func:`whiten.linalg.newton_schulz_left_factor`) or ``"spectral"``
    (:func:`whiten.linalg.newton_schulz_spectral_factor`), which return ``K`` with ``NS(X) = K X``.

    ``method="spectral"`` (default) uses the spectral factor whenever ``X`` is wide; ``"auto"`` the Gram
    iteration when ``n >= 1.5 m`` (:func:`whiten.linalg.prefers_gram`), else direct; ``"gram"`` the Gram
    iteration whenever ``X`` is wide. A tall ``X`` (only with a forced ``project_side``) is always direct.
    All four compute the same polynomial of ``X X^T`` times ``X``. Beyond :data:`whiten.linalg.GRAM_SEGMENT`
    steps the Gram factor ``K`` grows like ``a^steps`` on the null space of ``X``, so ``"gram"`` and ``"auto"``
    then return ``"segmented"``: :func:`whiten.linalg.newton_schulz` with ``method="gram"``, which re-anchors
    the Gram iteration on the explicit iterate and returns ``NS(X)`` itself.
    """
    wide = X.shape[-2] <= X.shape[-1]
    if method == "direct" or not wide:
        return "direct"
    evaluation = ns_evaluation(method, X.shape, X.dtype)
    if evaluation == "gram" and steps > GRAM_SEGMENT:
        return "segmented"
    return evaluation


def default_ns_method(dtype: torch.dtype, device: torch.device, shape: Sequence[int]) -> str:
    """``ns_method=None``: how the complement's Newton–Schulz is evaluated where the user did not say.

    On CPU ``"spectral"`` (one fp32 ``eigh`` of the ``m x m`` Gram; LAPACK's ``eigh`` is cheap there) for
    fp32/fp64 complements, and for bf16 ones that are wide enough for the Gram route to pay
    (:func:`whiten.linalg.prefers_gram`'s ``l >= 1.5 s``, the factor computed in fp32); a squarer bf16
    complement iterates directly in bf16. Small complements on CPU, which are stacked
    (:func:`whiten.linalg.stacking_helps`), take ``"auto"``: one ``eigh`` per matrix costs more than the
    iteration's batched products there (tiny preset: 16 x 64 x 64 direct 2.8 ms against spectral 6.4 ms,
    8 x 64 x 256 Gram 3.1 ms against 3.6 ms, ``docs/performance.md``). On accelerators ``"auto"`` (no
    ``eigh``: it is slow and synchronises with the host there). Measured in ``docs/precision.md``.
    """
    if device.type != "cpu" or stacking_helps(device, shape):
        return "auto"
    if dtype in (torch.float32, torch.float64):
        return "spectral"
    return "spectral" if prefers_gram(shape, torch.float32) else "direct"


def adaptive_rank(eigs: Tensor, m: int, tolerance: float, max_rank: int) -> int:
    """The adaptive-rank rule: the smallest ``r`` in ``[1, max_rank]`` whose KL gap per row of the other
    side, ``kl_gap(eigs, r, m) / m = (n - r)/2 log(AM/GM of the tail)``, is ``<= tolerance`` (nats).

    ``eigs`` is the estimated spectrum of the restricted factor. This is
    :func:`whiten.linalg.spectrum.choose_rank` with ``other_dim=1``, bounded to ``[1, max_rank]``.
    """
    return max(1, min(max_rank, choose_rank(eigs, tolerance, other_dim=1)))


def tracked_rank(group: dict[str, Any]) -> int:
    """Number of tracked directions ``R``: ``max_rank`` (default ``2 rank``) when adaptive, else ``rank``."""
    if not group["adaptive_rank"]:
        return group["rank"]
    return group["max_rank"] if group["max_rank"] is not None else 2 * group["rank"]


def orientation(group: dict[str, Any], shape: Sequence[int]) -> bool:
    """Whether the matrix is transposed so that the restricted side becomes the columns."""
    side = group["project_side"]
    return side == "left" or (side == "auto" and shape[0] > shape[1])


def sort_tracked(state: dict[str, Any]) -> None:
    """Order the tracked directions (columns of ``U`` and ``Y_sketch``, entries of ``Lam``) by descending ``Lam``
    (of each matrix of a stacked batch)."""
    order = torch.argsort(state["Lam"], dim=-1, descending=True)
    state["Lam"] = state["Lam"].take_along_dim(order, dim=-1)
    state["U"] = state["U"].take_along_dim(order.unsqueeze(-2), dim=-1)
    state["Y_sketch"] = state["Y_sketch"].take_along_dim(order.unsqueeze(-2), dim=-1)


@dataclass
class SpikeFlatStep:
    """The spike-and-flat step of one matrix, or of a stacked batch of same-shape matrices, between
    :meth:`ProKLShampoo._pro_direction` and ``_pro_finish``.

    ``indices``: the matrices' positions in the group's step; ``members``: their states; ``state``: the
    state the step reads and writes (``members[0]`` itself for one matrix, the members' entries stacked
    for a batch, written back by ``_pro_finish``). ``G``: the gradient in the working orientation
    (``s x l``, or ``b x s x l`` for a batch). ``sub``: the whitened subspace term
    ``B / (sqrt(lamL (x) Lam) + eps)``; ``U_r``: the active tracked directions; ``X``: the complement
    coordinates that Newton–Schulz orthogonalises; ``whitened_norm``: ``||S_L^{-1/2} M P_perp||_F`` when the
    scale needs it. Newton–Schulz fills either ``O = NS(X)`` (direct) or ``K`` and ``P = X X^T`` with
    ``NS(X) = K X`` (factored, :func:`ns_factor`).
    """

    indices: list[int]
    members: list[dict[str, Any]]
    G: Tensor
    state: dict[str, Any]
    sub: Tensor
    U_r: Tensor
    X: Tensor
    whitened_norm: Tensor | None
    O: Tensor | None = None
    K: Tensor | None = None
    P: Tensor | None = None

    def factor(self) -> tuple[Tensor, Tensor]:
        """``(K, P)`` of the factored evaluation."""
        if self.K is None or self.P is None:
            raise RuntimeError("the Newton-Schulz factor of this spike-and-flat step was not computed")
        return self.K, self.P


class ProKLShampoo(KLFactored):
    r"""Pro-KLShampoo: spike-and-flat right factor, orthogonalized complement (a reconstruction).

    .. math::
        S_R = U\Lambda U^\top + \sigma P_\perp,\quad
        \Delta W = Q_L\Big[\frac{B}{\sqrt{\lambda_L\otimes\Lambda}+\epsilon}U^\top + c\,\mathrm{NS}(X)\Big],\quad
        B = Q_L^\top M U,\ X = \lambda_L^{-1/2}\odot Q_L^\top M P_\perp

    Args (beyond :class:`whiten.KLShampoo`'s, which keep their names and defaults):
        rank: ``r``, directions of the restricted factor with their own eigenvalue. ``rank >= n`` (the
            restricted dimension) is exactly full KL-Shampoo for that parameter.
        project_side: ``"auto"`` (restrict the larger dimension, default), ``"right"`` (columns) or
            ``"left"`` (rows; the state is then kept for the transposed matrix, see the docs).
        complement: ``"left_whitened_orth"`` (Identity A: ``NS(S_L^{-1/2} M P_perp)``, default) or
            ``"orth"`` (plain Muon on ``M P_perp``).
        complement_scale: ``"sqrt_m"`` (the exact Identity A constant ``sqrt(m)``, default), ``"kl_norm"``
            (match ``||sigma^{-1/2} S_L^{-1/2} M P_perp||_F``, the spike-and-flat KL-Shampoo complement)
            or ``"muon_rms"`` (``0.2 sqrt(max(m, n))``).
        ns_steps, ns_coefficients: Newton–Schulz iteration (:func:`whiten.linalg.newton_schulz`).
        ns_method: how that polynomial is evaluated (:func:`ns_factor`): ``"spectral"`` (one ``eigh`` of the
            ``m x m`` Gram matrix), ``"auto"``, ``"gram"`` or ``"direct"``; ``None`` (default) chooses by dtype,
            device and shape (:func:`default_ns_method`).
        matmul_dtype: as :class:`whiten.KLShampoo` (``docs/precision.md``); it also sets the dtype of the
            complement's Newton–Schulz.
        adaptive_rank: choose ``r`` per layer from the tracked spectrum (:func:`adaptive_rank`)
            every ``rank_update_interval`` steps, between 1 and ``max_rank`` (default ``2 rank``), with a
            KL-gap ``rank_tolerance`` in nats per row; ``rank`` is the starting value.
    """

    option_checks: ClassVar[dict[str, opt.Check]] = {
        **KLFactored.option_checks,
        "rank": opt.positive_int,
        "project_side": opt.choice("auto", "left", "right"),
        "complement": opt.choice(*COMPLEMENTS),
        "complement_scale": opt.choice(*COMPLEMENT_SCALES),
        "ns_steps": opt.positive_int,
        "ns_coefficients": opt.ns_coefficients,
        "ns_method": opt.optional(opt.choice(*NS_METHODS)),
        "adaptive_rank": opt.boolean,
        "max_rank": opt.optional(opt.positive_int),
        "rank_tolerance": opt.nonneg,
        "rank_update_interval": opt.positive_int,
    }

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        *,
        betas: tuple[float, float] = (0.9, 0.98),
        shampoo_beta: float = -1,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        precondition_frequency: int = 10,
        init_factor: float = 0.1,
        rank: int = 128,
        project_side: str = "auto",
        complement: str = "left_whitened_orth",
        complement_scale: str = "sqrt_m",
        ns_steps: int = 5,
        ns_coefficients: str | Sequence[float] | Sequence[Sequence[float]] = "keller",
        ns_method: str | None = None,
        adaptive_rank: bool = False,
        max_rank: int | None = None,
        rank_tolerance: float = 0.5,
        rank_update_interval: int = 100,
        max_precond_dim: int = 10000,
        state_dtype: str = "float32",
        matmul_dtype: str = "bfloat16",
        **common: Unpack[CommonOptions],
    ) -> None:
        # KLFactored's constructor takes KL-Shampoo's options only: build the groups from these
        super(KLFactored, self).__init__(params, {**constructor_options(locals()), "preconditioner": "kl"})

    def _validate(self, group: Mapping[str, Any]) -> None:
        super()._validate(group)
        if group.get("preconditioner", "kl") != "kl":
            raise ValueError("ProKLShampoo supports only preconditioner='kl' (KL-SOAP has no spike-and-flat variant)")
        max_rank = group.get("max_rank")
        if group.get("adaptive_rank") and max_rank is not None and max_rank < group.get("rank", 1):
            raise ValueError(
                f"max_rank={max_rank} is below rank={group.get('rank')}; with adaptive_rank=True, rank is the "
                "starting rank and must be <= max_rank (or leave max_rank=None for 2 * rank)"
            )

    def needs_exact_counts(self, group: Mapping[str, Any], params: Sequence[Tensor]) -> bool:
        """A refresh or (``adaptive_rank``) a rank update may be due on this step."""
        if super().needs_exact_counts(group, params):
            return True
        return bool(group["adaptive_rank"]) and _due(self.state, params, group["rank_update_interval"])

    def uses_projection(self, group: dict[str, Any], shape: Sequence[int]) -> bool:
        """Whether a parameter of this (work-view) shape takes the spike-and-flat path.

        Only matrices whose restricted dimension exceeds the tracked rank and whose dimensions are all
        within ``max_precond_dim``; every other parameter is trained by full KL-Shampoo.
        """
        if len(shape) != 2:
            return False
        n = shape[0] if orientation(group, shape) else shape[1]
        return tracked_rank(group) < n and max(shape) <= group["max_precond_dim"]

    def matrix_flops(self, shape: Sequence[int], group: Mapping[str, Any]) -> FlopCount:
        """One spike-and-flat step of an ``m x n`` matrix (full KL-Shampoo's where :meth:`uses_projection` says no).

        On the working orientation ``s x l`` (``l`` restricted), rank ``r``: the direction ``A = Q_L^T M``,
        ``B = A U``, ``X = A - B U^T``; the complement's NS as :func:`ns_factor` chooses (factored: ``K`` and
        ``Q_L [sub U^T + c K X]`` with one ``s x s x l`` product; direct: ``O``, ``sub U^T`` and ``Q_L`` times
        the coordinates); the statistics of :func:`whiten.linalg.spike_flat_statistics` (``G U``, ``G G^T``,
        the in-span Grams, ``(G G^T) Q_L``, ``Q_L^T (G U)``, the sketch); a refresh: one orthogonal-iteration
        step on ``L`` and the QR of the ``l x R`` sketch.
        """
        work = tuple(int(s) for s in shape) if len(shape) in (2, 3) else (int(shape[0]), math.prod(shape[1:]))
        if not self.uses_projection(dict(group), work):
            return super().matrix_flops(shape, group)
        s, l = sorted(work)
        r = min(group["rank"], l)
        mm = matmul_flops
        direction = mm(s, s, l) + mm(s, l, r) + mm(s, r, l)  # A, B, X
        device = group["params"][0].device if group.get("params") else torch.device("cpu")
        # the dtype the complement has in the step: small matrices on CPU keep fp32 products (docs/precision.md)
        dtype = matmul_compute_dtype(effective_matmul_dtype(group["matmul_dtype"], (s, l), device), torch.float32)
        method = group["ns_method"] or default_ns_method(dtype, device, (s, l))
        kind = ns_evaluation(method, (s, l), dtype)
        if kind == "gram" and group["ns_steps"] > GRAM_SEGMENT:
            kind = "segmented"  # as ns_factor: newton_schulz(method="gram") returns NS(X) itself
        if kind in ("direct", "segmented"):
            ns = newton_schulz_flops((s, l), group["ns_steps"], "gram" if kind == "segmented" else "direct")
            direction = direction + ns + mm(s, r, l) + mm(s, s, l)
        else:
            # K alone (its K X is fused into the final product), then (Q_L sub) U^T, Q_L K and (.) X
            factor = newton_schulz_flops((s, l), group["ns_steps"], kind, apply_factor=False)
            direction = direction + factor + mm(s, s, r) + mm(s, r, l) + mm(s, s, s) + mm(s, s, l)
        statistics = mm(s, l, r) + mm(s, l, s) + 2 * mm(s, r, s) + mm(s, s, s) + 2 * mm(s, s, r) + mm(l, s, r)
        refresh = orthogonal_iteration_flops(s) + qr_flops(l, tracked_rank(dict(group)))
        return direction + statistics + refresh / group["precondition_frequency"]

    # -- stepping --------------------------------------------------------------------------------
    def _map_phase(self, group: dict[str, Any], params: list[Tensor], inputs: list[MapInput]) -> list[Tensor]:
        """Whole-matrix part (the direction and apply phases are KL-Shampoo's: ``M <- lerp(M, G, 1 - b1)``,
        ``W <- (W - lr U)(1 - lr wd)``): the spike-and-flat update from ``M`` and the statistics from ``G``,
        with Newton–Schulz batched over matrices; full KL-Shampoo for the others (:meth:`uses_projection`)."""
        if not params:
            return []
        largest = params[0].shape  # one policy for the group's batched stages (dynamo takes no max(key=...))
        for p in params[1:]:
            if math.prod(p.shape) > math.prod(largest):
                largest = p.shape
        with matmuls_in(effective_matmul_dtype(group["matmul_dtype"], largest, params[0].device), params[0].device):
            return self._pro_map(group, params, inputs)

    def _pro_map(self, group: dict[str, Any], params: list[Tensor], inputs: list[MapInput]) -> list[Tensor]:
        updates: list[Tensor | None] = [None] * len(params)
        full, projected = [], []
        for i, (p, x) in enumerate(zip(params, inputs, strict=True)):
            state = self.state[p]
            grad = _gradient_of(x)
            G = work_view(grad)
            if not ("U" in state if x.direction is not None else self.uses_projection(group, G.shape)):
                full.append(i)
                continue
            if x.direction is None:  # the initialisation step: no update, momentum not fed
                with full_precision(G.device):
                    self._pro_init(group, G, state)
                updates[i] = torch.zeros_like(grad)
                continue
            projected.append(i)
        if full:
            mapped = super()._map_phase(group, [params[i] for i in full], [inputs[i] for i in full])
            for i, update in zip(full, mapped, strict=True):
                updates[i] = update
        if projected:
            pending = self._pro_batches(group, [params[i] for i in projected], [inputs[i] for i in projected])
            for step, update in zip(pending, self._pro_updates(group, pending), strict=True):
                for member, state, one in zip(step.indices, step.members, self._unstack(step, update), strict=True):
                    i = projected[member]
                    updates[i] = (one.mT if state["transposed"] else one).reshape(params[i].shape)
        missing = [i for i, u in enumerate(updates) if u is None]
        if missing:  # every matrix is initialised, fully preconditioned or projected: never reached
            raise RuntimeError(f"Pro-KLShampoo produced no update for matrices {missing}")
        return updates  # type: ignore[return-value]

    @staticmethod
    def _unstack(step: SpikeFlatStep, update: Tensor) -> Sequence[Tensor]:
        """The update of each member of ``step`` (working orientation)."""
        return update.unbind(0) if len(step.members) > 1 else (update,)

    def _pro_batches(self, group: dict[str, Any], params: list[Tensor], inputs: list[MapInput]) -> list[SpikeFlatStep]:
        """The direction stage of the projected matrices ``params``, same-shape ones as one stacked batch.

        In the working orientation (``s x l``: a 256 x 64 matrix that restricts its rows batches with the
        64 x 256 ones), a batch shares the shape, dtype and device, the active and tracked ranks, the
        factor dtype and whether this step refreshes (:func:`whiten.linalg.stack_groups`).
        """
        states = [self.state[p] for p in params]

        def oriented(t: Tensor, state: dict[str, Any]) -> Tensor:
            return work_view(t).mT if state["transposed"] else work_view(t)

        working = [oriented(_gradient_of(x), state) for x, state in zip(inputs, states, strict=True)]
        moments = [oriented(x.direction, state) for x, state in zip(inputs, states, strict=True)]  # type: ignore[arg-type]
        frequency = group["precondition_frequency"]
        keys = [
            (state["rank"], state["U"].shape[-1], state["L"].dtype, M.dtype, state["step"] % frequency == 0)
            for state, M in zip(states, moments, strict=True)
        ]
        pending = []
        for batch in stack_groups(working, keys):
            members = [states[i] for i in batch]
            if len(batch) == 1:
                state, G, M = members[0], working[batch[0]], moments[batch[0]]
            else:
                state = stack_states(members, PROJECTED_STATE)
                for key in ("step", "rank"):  # shared by the batch (its key)
                    state[key] = members[0][key]
                G, M = stack([working[i] for i in batch]), stack([moments[i] for i in batch])
            pending.append(self._pro_direction(group, batch, members, G, M, state))
        return pending

    def _pro_updates(self, group: dict[str, Any], pending: list[SpikeFlatStep]) -> list[Tensor]:
        """Finish the spike-and-flat steps of ``pending``; returns the updates."""
        # Newton–Schulz on the complement coordinates, batched over matrices of the same shape. A wide X
        # ("gram" / "spectral") gets K with NS(X) = K X from its m x m Gram matrix (see ns_factor).
        steps, coefficients = group["ns_steps"], group["ns_coefficients"]
        kinds = [
            ns_factor(step.X, group["ns_method"] or default_ns_method(step.X.dtype, step.X.device, step.X.shape), steps)
            for step in pending
        ]
        orthogonalizers: dict[str, Callable[[Tensor], Tensor]] = {
            "direct": lambda X: newton_schulz(X, steps, coefficients, compute_dtype=X.dtype),
            "segmented": lambda X: newton_schulz(X, steps, coefficients, compute_dtype=X.dtype, method="gram"),
        }
        for kind, orthogonalize in orthogonalizers.items():
            chosen = [step for step, k in zip(pending, kinds, strict=True) if k == kind]
            for step, O in zip(chosen, map_batched(orthogonalize, [s.X for s in chosen]), strict=True):
                step.O = O
        # a factor asked for explicitly with bf16 complements runs in fp32 (its eigh has no bf16 kernel, and the
        # Gram iteration loses accuracy in bf16)
        factors: dict[str, Callable[[Tensor], tuple[Tensor, Tensor]]] = {
            "gram": lambda X: newton_schulz_left_factor(X, steps, coefficients),
            "spectral": lambda X: newton_schulz_spectral_factor(X, steps, coefficients),
        }
        for kind, factor in factors.items():
            chosen = [step for step, k in zip(pending, kinds, strict=True) if k == kind]
            if not chosen:
                continue
            with full_precision(chosen[0].X.device):
                batched = map_batched(factor, [s.X.to(s.G.dtype) for s in chosen])
            for step, (K, P) in zip(chosen, batched, strict=True):
                step.K, step.P = K, P
        return [self._pro_finish(group, step) for step in pending]

    def _pro_init(self, group: dict[str, Any], G: Tensor, state: dict[str, Any]) -> None:
        """Initialisation step (no update): full left factor as KL-Shampoo, ``U`` = top right singular vectors."""
        transposed = orientation(group, G.shape)
        Gw = G.mT if transposed else G
        m, n = Gw.shape
        R = tracked_rank(group)
        beta = shampoo_beta(group)
        init = float(group["init_factor"])
        L = (Gw @ Gw.mT) * ((1.0 - beta) / n)
        _, Q_L = eigh_descending(L)
        # top right singular vectors from the left eigenvectors: G^T q_k = s_k v_k (no SVD needed)
        k = min(R, m)
        V = Gw.mT @ Q_L[:, :k]
        if k < R:  # fewer singular vectors than tracked directions: complete with a fixed random basis
            gen = torch.Generator(device=G.device).manual_seed(0)
            V = torch.cat([V, torch.randn(n, R - k, generator=gen, device=G.device, dtype=G.dtype)], dim=1)
        U = qr_orthonormal(V)
        state["transposed"] = transposed
        state["L"] = L.to(factor_dtype(group, G.dtype))
        state["Q_L"] = Q_L
        # the clamps every later EMA applies (a tiny init_factor would start below their floors)
        state["lam_L"] = clamp_eigenvalues(torch.full((m,), init, dtype=G.dtype, device=G.device), m)
        state["U"] = U
        state["Lam"] = clamp_eigenvalues(torch.full((R,), init, dtype=G.dtype, device=G.device), n)
        state["sigma"] = clamp_eigenvalues(torch.full((), init, dtype=G.dtype, device=G.device), n)
        state["Y_sketch"] = U * state["Lam"]
        state["rank"] = min(group["rank"], R)

    def _pro_direction(
        self,
        group: dict[str, Any],
        indices: list[int],
        members: list[dict[str, Any]],
        G: Tensor,
        M: Tensor,
        state: dict[str, Any],
    ) -> SpikeFlatStep:
        """The subspace term and the complement coordinates ``X`` of the momentum ``M`` (NS is applied afterwards).

        ``G`` and ``M`` are in the working orientation, one matrix or a stacked batch (see :class:`SpikeFlatStep`).
        """
        r = state["rank"]
        U = state["U"]
        U_r = U if r == U.shape[-1] else U[..., :r]
        lam_L, Lam = state["lam_L"], state["Lam"][..., :r]
        A = state["Q_L"].mT @ M  # m x n: momentum in the left eigenbasis
        B = A @ U_r  # m x r: its coordinates on the tracked subspace
        sub = B / (lam_L.sqrt().unsqueeze(-1) * Lam.sqrt().unsqueeze(-2) + group["eps"])
        X = batched_addmm(A, B, U_r.mT, alpha=-1.0)  # A P_perp
        inv_root = lam_L.rsqrt().unsqueeze(-1)
        if group["complement"] == "left_whitened_orth":
            X.mul_(inv_root)  # diag(lamL^{-1/2}) Q_L^T M P_perp  (= Q_L^T S_L^{-1/2} M P_perp)
            whitened_norm = torch.linalg.matrix_norm(X)
        else:
            whitened_norm = torch.linalg.matrix_norm(X * inv_root) if group["complement_scale"] == "kl_norm" else None
        return SpikeFlatStep(indices, members, G, state, sub, U_r, X, whitened_norm)

    def _pro_finish(self, group: dict[str, Any], ctx: SpikeFlatStep) -> Tensor:
        """Combine the two terms, update the statistics (raw ``G``, OLD values), refresh, adapt the rank.

        Returns the update in the working orientation (a batch for a stacked step, whose new state is then
        written back into each member's tensors).
        """
        G, state = ctx.G, ctx.state
        m, n = G.shape[-2:]
        r = state["rank"]
        Q_L, lam_L, Lam, sigma = state["Q_L"], state["lam_L"], state["Lam"], state["sigma"]
        kind = group["complement_scale"]
        if kind == "sqrt_m":
            scale: Tensor | float = math.sqrt(m)
        elif kind == "muon_rms":
            scale = 0.2 * math.sqrt(max(m, n))
        else:
            if ctx.O is not None:
                ns_norm = torch.linalg.matrix_norm(ctx.O)
            else:  # ||K X||_F^2 = tr(K X X^T K^T)
                K, P = ctx.factor()
                ns_norm = ((K @ P) * K).sum((-2, -1)).clamp(min=0.0).sqrt()
            flat = effective_flat_value(Lam, sigma, r, n)
            assert ctx.whitened_norm is not None  # computed for complement_scale="kl_norm"
            scale = (flat.rsqrt() * ctx.whitened_norm / ns_norm.clamp(min=1e-30))[..., None, None]
        if ctx.O is not None:
            coords = ctx.O * scale
            coords = batched_addmm(coords, ctx.sub, ctx.U_r.mT)
            update = Q_L @ coords  # m x n in the working orientation
        else:  # Q_L [sub U^T + c K X] = (Q_L sub) U^T + (c Q_L K) X: one m x m x n product
            K, _ = ctx.factor()
            update = batched_addmm((Q_L @ ctx.sub) @ ctx.U_r.mT, Q_L @ (K * scale), ctx.X)

        beta = shampoo_beta(group)
        stats = spike_flat_statistics(G, Q_L, lam_L, state["U"], Lam, sigma, r)
        ema_factor_(state["L"], stats.left, beta)
        state["lam_L"] = ema_eigenvalues(lam_L, stats.lam_left, beta, m)
        state["Lam"] = ema_eigenvalues(Lam, stats.Lam, beta, n)
        state["sigma"] = ema_eigenvalues(sigma, stats.sigma, beta, n)
        state["Y_sketch"].lerp_(stats.sketch.to(state["Y_sketch"].dtype), 1.0 - beta)

        step = state["step"]
        if step % group["precondition_frequency"] == 0:
            with full_precision(G.device):  # the bases in fp32 (fp64): docs/precision.md
                state["Q_L"] = orthogonal_iteration(state["L"].to(G.dtype), Q_L)
                # order the tracked directions by eigenvalue, then one orthogonal-iteration step on C via the sketch
                sort_tracked(state)
                U_new = qr_orthonormal(state["Y_sketch"])
                state["U"] = U_new
                # an eigenvalue at +inf ("no gain", clamp_eigenvalues) carries no estimate: it seeds the sketch as 0,
                # as the EMA reads it (U * inf would put inf and NaN in the sketch)
                state["Y_sketch"] = U_new * state["Lam"].masked_fill(state["Lam"].isinf(), 0.0).unsqueeze(-2)
        if len(ctx.members) > 1:
            store_states(ctx.members, state, PROJECTED_STATE)
        if group["adaptive_rank"] and step % group["rank_update_interval"] == 0:
            for member in ctx.members:
                self._adapt_rank(group, member, m, n)
        return update

    @staticmethod
    def _adapt_rank(group: dict[str, Any], state: dict[str, Any], m: int, n: int) -> None:
        """The adaptive-rank rule on one matrix's tracked spectrum (:func:`adaptive_rank`)."""
        R = state["U"].shape[-1]
        sort_tracked(state)  # the active directions are the first r: make them the top r
        Lam_now = state["Lam"].masked_fill(state["Lam"].isinf(), 0.0)
        tail = state["sigma"].masked_fill(state["sigma"].isinf(), 0.0).expand(n - R)
        spectrum = torch.cat([Lam_now, tail])
        if bool((spectrum > 0).any()):  # all zero ("no gain" everywhere after zero gradients): keep the rank
            state["rank"] = adaptive_rank(spectrum, m, group["rank_tolerance"], R)
