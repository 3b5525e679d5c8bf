"""KL-Shampoo and KL-SOAP (Lin et al., arXiv 2509.03378; reference: yorkerlin/KL-Methods ``optim/kl_opt.py``).

KL-Shampoo fits ``S = S_L (x) S_R`` to the gradient covariance by minimising
``KL(N(0, E[g g^T]) || N(0, S))``; the fixed point is ``S_L = (1/n) E[G S_R^{-1} G^T]``,
``S_R = (1/m) E[G^T S_L^{-1} G]``. Each factor is kept as a stale eigenbasis ``Q`` (refreshed by one
warm-started QR step every ``precondition_frequency`` steps) and EMA eigenvalues ``lam``
(updated every step). Per matrix parameter ``W`` (``m x n``), following the reference step by step::

    first step (no parameter update, momentum not fed):
        L = (1-b) G G^T / n;  R = (1-b) G^T G / m;  Q_L, Q_R = eigh_desc(L), eigh_desc(R);  lam = init_factor
    every later step t = 1, 2, ...:
        M <- lerp(M, G, 1 - b1)                                       # no bias correction, no Nesterov
        U  = Q_L [ (Q_L^T M Q_R) / (sqrt(lamL (x) lamR) + eps) ] Q_R^T   # "kl"  (KL-Shampoo)
        or   Adam on Q_L^T G Q_R, momentum kept in the eigenbasis         # "adam" (KL-SOAP)
        L <- b L + (1-b)/n G Q_R diag(1/lamR) Q_R^T G^T;  R <- ... (raw G, OLD Q and lam)
        lamL <- b lamL + (1-b) mean_j(E_ij^2/lamR_j);  lamR <- ...;  E = Q_L^T G Q_R;  clamp
        if t % T == 0: Q <- qr(F Q).Q for each factor (KL-SOAP rotates its momentum to the new basis)
        W <- W - lr U;  W <- W (1 - lr wd)                             # decay after the step

3-D parameters (stacked experts) keep one factor per dimension, each whitened by the other two and
normalised by ``numel / d_k``; conv weights with >= 4 dims are flattened to ``(out, rest)``. A
dimension larger than ``max_precond_dim`` keeps the identity factor (nothing stored). See
``docs/kl_shampoo.md`` for the reference mapping and the deliberate deviations (fp32 instead of bf16).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar, Unpack

import torch
from torch import Tensor

from whiten.linalg import (
    MATMUL_DTYPES,
    NONE_FLOPS,
    FlopCount,
    clamp_eigenvalues,
    effective_matmul_dtype,
    eigh_descending,
    ema_eigenvalues,
    full_precision,
    gram_flops,
    kl_eigenvalue_targets,
    kl_factor_targets,
    kl_tensor_statistics,
    matmul_flops,
    matmuls_in,
    orthogonal_iteration,
    orthogonal_iteration_flops,
    rotate_all,
    rotation_flops,
    stack_groups,
)
from whiten.optim import _options as opt
from whiten.optim._adamw import apply_update_
from whiten.optim._options import CommonOptions, constructor_options
from whiten.optim._stacking import stack, stack_states, store_states
from whiten.optim.base import MapInput, PhasedOptimizer, as_matrix, stat_dtype

#: the map's state of a matrix with both sides preconditioned (what a stacked batch carries)
MATRIX_STATE = ("L", "R", "Q_L", "Q_R", "lam_L", "lam_R")

STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _check_shampoo_beta(name: str, value: Any) -> None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
        if value != -1:
            raise ValueError(f"{name} must be in [0, 1) or -1 (use betas[1]), got {value!r}")
        return
    opt.unit_interval(name, value)


#: ``init_factor="grad_rms"``: the initial eigenvalues from the first gradient's scale instead of a constant
GRAD_RMS = "grad_rms"


def _check_init_factor(name: str, value: Any) -> None:
    if value == GRAD_RMS:
        return
    try:
        opt.positive(name, value)
    except ValueError:
        raise ValueError(f"{name} must be a finite number > 0 or {GRAD_RMS!r}, got {value!r}") from None


def initial_eigenvalue(init_factor: float | str, G: Tensor, sides: int) -> Tensor:
    """The eigenvalue every preconditioned side starts from after the initialisation step (0-d tensor).

    A number is the reference's ``init_factor``. ``"grad_rms"`` makes the product of the ``sides`` initial
    eigenvalues equal the first gradient's mean square, ``lam = mean(G^2)^(1/sides)``: the update
    ``M / sqrt(prod lam)`` then starts at the scale it settles to (the rotations keep the mean square,
    so the KL fixed point has ``mean(E^2 / prod lam) = 1``) whatever the scale of the loss, instead of
    waiting for the EMA to forget a constant. Computed on the device, no host read.
    """
    if init_factor == GRAD_RMS:
        return G.square().mean().pow(1.0 / max(sides, 1))
    return torch.tensor(float(init_factor), dtype=G.dtype, device=G.device)


def _gradient_of(x: MapInput) -> Tensor:
    """The raw gradient of a KL-family map input (the KL direction phase always sets it)."""
    if x.gradient is None:
        raise ValueError("a KL-Shampoo map input needs the raw gradient for the factor statistics")
    return x.gradient


def work_view(t: Tensor) -> Tensor:
    """The tensor a Kronecker method works on: matrices and 3-D tensors as they are, >= 4-D flattened."""
    return t if t.ndim in (2, 3) else as_matrix(t)


def side_names(ndim: int) -> tuple[str, ...]:
    """State names of the factors: ``("L", "R")`` for matrices, ``("F0", "F1", "F2")`` for 3-D tensors."""
    return ("L", "R") if ndim == 2 else tuple(f"F{k}" for k in range(ndim))


def shampoo_beta(group: dict[str, Any]) -> float:
    """The factor EMA rate: ``shampoo_beta`` if >= 0, else ``betas[1]`` (reference convention)."""
    beta = group["shampoo_beta"]
    return float(beta) if beta >= 0 else float(group["betas"][1])


def factor_dtype(group: dict[str, Any], dtype: torch.dtype) -> torch.dtype:
    """Storage dtype of the factor matrices: ``state_dtype``, except fp64 statistics stay fp64."""
    return torch.float64 if dtype == torch.float64 else STATE_DTYPES[group["state_dtype"]]


def ema_factor_(factor: Tensor, target: Tensor, beta: float) -> None:
    """``factor <- beta factor + (1 - beta) target`` in the wider of the two dtypes, rounded once to the
    storage dtype of ``factor``: a bf16 factor (``state_dtype``) does not accumulate its EMA in bf16, and
    a bf16 target (``matmul_dtype="bfloat16"`` statistics) enters an fp32 factor in fp32."""
    if factor.dtype == target.dtype:
        factor.lerp_(target, 1.0 - beta)
    elif torch.promote_types(factor.dtype, target.dtype) == factor.dtype:
        factor.lerp_(target.to(factor.dtype), 1.0 - beta)
    else:
        factor.copy_(factor.to(target.dtype).lerp_(target, 1.0 - beta))


def _due(state: Mapping[Tensor, Mapping[str, Any]], params: Sequence[Tensor], every: int) -> bool:
    """Whether the next step of one of ``params`` (by its step counter) is a multiple of ``every``."""
    return any((state[p].get("step", 0) + 1) % every == 0 for p in params)


class KLFactored(PhasedOptimizer):
    """Shared implementation of :class:`KLShampoo` (``preconditioner="kl"``) and :class:`KLSOAP` (``"adam"``).

    State per parameter with a ``m x n`` work view: ``"L"``, ``"R"`` (factors), ``"Q_L"``, ``"Q_R"``
    (eigenbases, columns in the order of the first eigendecomposition, descending), ``"lam_L"``, ``"lam_R"``
    (EMA eigenvalues), ``"exp_avg"`` (momentum: parameter basis and shape for KL-Shampoo, eigenbasis for KL-SOAP),
    ``"exp_avg_sq"`` (KL-SOAP only, eigenbasis) and ``"step"`` (int, 0 after the initialisation step). 3-D
    parameters use ``"F0", "F1", "F2"``, ``"Q_F0"``, ..., ``"lam_F0"``, ... for dimensions 0, 1, 2. A
    dimension larger than ``max_precond_dim`` has no entries (identity factor, unit eigenvalues).
    """

    option_checks: ClassVar[dict[str, opt.Check]] = {
        "betas": opt.beta_pair,
        "shampoo_beta": _check_shampoo_beta,
        "eps": opt.nonneg,
        "precondition_frequency": opt.positive_int,
        "init_factor": _check_init_factor,
        "max_precond_dim": opt.positive_int,
        "state_dtype": opt.choice(*STATE_DTYPES),
        "preconditioner": opt.choice("kl", "adam"),
        "matmul_dtype": opt.choice(*MATMUL_DTYPES),
    }

    # The step in the three phases of PhasedOptimizer for KL-Shampoo: under FSDP2 the momentum (elementwise
    # in the parameter basis) stays sharded; the map gets the whole (M, G) of each matrix. KL-SOAP's moments
    # live in the rotated eigenbasis (not elementwise in the parameter's layout), so its groups are one
    # whole-matrix step (phased_group, _unphased_step) and take the gather path under FSDP2.
    elementwise_state: ClassVar[tuple[str, ...]] = ("exp_avg", "step")
    map_inputs: ClassVar[int] = 2  # (M, G) per matrix travel to the map
    adamw_inherits: ClassVar[dict[str, str]] = {"adamw_eps": "eps"}  # betas[1] is also the factor rate
    #: the group option ``preconditioner`` a class builds: ``"kl"`` (KL-Shampoo) or ``"adam"`` (KL-SOAP)
    preconditioner_kind: ClassVar[str] = "kl"
    #: what ``betas=None`` / ``init_factor=None`` mean for the class (KL-Shampoo and KL-SOAP differ; docs/kl_shampoo.md)
    default_betas: ClassVar[tuple[float, float]] = (0.9, 0.98)
    default_init_factor: ClassVar[float | str] = 0.1

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        *,
        betas: tuple[float, float] | None = None,
        shampoo_beta: float = -1,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        precondition_frequency: int = 10,
        init_factor: float | str | None = None,
        max_precond_dim: int = 10000,
        state_dtype: str = "float32",
        matmul_dtype: str = "bfloat16",
        **common: Unpack[CommonOptions],
    ) -> None:
        betas = self.default_betas if betas is None else betas
        init_factor = self.default_init_factor if init_factor is None else init_factor
        super().__init__(params, {**constructor_options(locals()), "preconditioner": self.preconditioner_kind})

    def _validate(self, group: Mapping[str, Any]) -> None:
        if group.get("preconditioner") == "adam" and group.get("eps", 1.0) == 0:
            raise ValueError("eps must be > 0 for KL-SOAP: Adam divides by sqrt(v) + eps, and v = 0 where G = 0")
        super()._validate(group)
        if group.get("state_dtype") == "float16":
            raise ValueError(
                "state_dtype='float16' is refused: the factor statistics leave fp16's range (max 65504) for "
                "ordinary gradients (64 x 64 gradients of ~1e3 overflow the factor at step 2, NaN parameters "
                "follow at the first refresh); use state_dtype='bfloat16' (same memory, fp32's range) or 'float32'"
            )

    @staticmethod
    def infinite_state_ok(key: str) -> bool:
        """``+inf`` eigenvalues mean "no gain" (the reference's ``nan_to_num`` of ``lam^{-1/2}``; see
        :func:`whiten.linalg.clamp_eigenvalues`): a zero gradient with ``shampoo_beta=0`` gives them."""
        return key.startswith("lam_") or key in ("Lam", "sigma")

    def _check_saved_state(self, state_dict: Mapping[str, Any]) -> None:
        """Refuse matrix state saved by another optimizer (e.g. Muon's ``momentum_buffer``) at load time,
        instead of an ``AttributeError`` at the first step: every entry needs ``exp_avg`` and ``step``, each
        stored basis ``Q_<side>`` its eigenvalues ``lam_<side>``, and KL-SOAP's ``exp_avg_sq``."""
        name = type(self).__name__
        for group in state_dict.get("param_groups", []):
            if not group.get("use_matrix", True):
                continue
            names = group.get("param_names") or [None] * len(group["params"])
            for key, label in zip(group["params"], names, strict=False):
                entry = state_dict.get("state", {}).get(key)
                if not entry:
                    continue
                keys = set(entry)
                needed = {"exp_avg", "step"}
                if group.get("preconditioner", self.defaults["preconditioner"]) == "adam":
                    needed.add("exp_avg_sq")
                needed |= {f"lam_{k[2:]}" for k in keys if k.startswith("Q_")}
                missing = sorted(needed - keys)
                if missing:
                    what = f"parameter {label!r}" if label is not None else f"parameter {key!r}"
                    raise ValueError(
                        f"{name}.load_state_dict: the state of {what} has keys {sorted(keys)} and lacks {missing}: "
                        f"it was not saved by {name} (a state dict of another optimizer cannot be loaded)"
                    )

    def phased_group(self, group: Mapping[str, Any]) -> bool:
        """Whether ``group`` runs as the three phases: KL-Shampoo (``"kl"``) yes, KL-SOAP (``"adam"``) no."""
        return group["preconditioner"] == "kl"

    def needs_exact_counts(self, group: Mapping[str, Any], params: Sequence[Tensor]) -> bool:
        """A refresh (``step % precondition_frequency == 0``) may be due on this step (``docs/reliability.md``)."""
        return _due(self.state, params, group["precondition_frequency"])

    def matrix_flops(self, shape: Sequence[int], group: Mapping[str, Any]) -> FlopCount:
        """One step of an ``m x n`` matrix after the initialisation step, refreshes amortised over ``T``.

        Every step: the direction (KL-Shampoo: ``M`` into the eigenbasis and back; KL-SOAP: ``G`` in, the
        Adam direction out), the statistics ``G Q_R``, ``Q_L^T G``, the cheaper product for ``E`` (KL-SOAP:
        the last two are products of its rotation of ``G``) and the two whitened Grams. A refresh: one
        orthogonal-iteration step per factor (KL-SOAP also rotates its momentum out and back in). Tensors
        with more than two dims are counted as their ``(m, rest)`` matrix.
        """
        m, n = int(shape[0]), math.prod(int(s) for s in shape[1:])
        left, right = m <= group["max_precond_dim"], n <= group["max_precond_dim"]
        rotate = rotation_flops(m, n, left, right)
        if left and right:
            cheaper_E = min(matmul_flops(m, m, n), matmul_flops(m, n, n), key=lambda c: c.matmul)
            stats = rotation_flops(m, n) + cheaper_E + gram_flops(m, n) + gram_flops(n, m)
            if group["preconditioner"] == "adam":  # Q_L^T G and E come with the rotation of G into the basis
                stats = matmul_flops(m, n, n) + gram_flops(m, n) + gram_flops(n, m)
        else:  # kl_tensor_statistics: the Gram of the preconditioned side and its rotation for E
            stats = NONE_FLOPS
            if left:
                stats = matmul_flops(m, n, m) + matmul_flops(m, m, n)
            if right:
                stats = matmul_flops(n, m, n) + matmul_flops(m, n, n)
        refresh = (orthogonal_iteration_flops(m) if left else NONE_FLOPS) + (
            orthogonal_iteration_flops(n) if right else NONE_FLOPS
        )
        if group["preconditioner"] == "adam":
            refresh = refresh + 2 * rotate
        return 2 * rotate + stats + refresh / group["precondition_frequency"]

    def _unphased_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        """KL-SOAP: Adam in the eigenbasis, all in one whole-matrix piece."""
        for p, g in zip(params, grads, strict=True):
            state = self.state[p]
            G = work_view(g).to(stat_dtype(p))
            if "exp_avg" not in state:
                self._kl_init(group, G, state, momentum=True)  # the reference's initialisation step: no update
                continue
            with matmuls_in(effective_matmul_dtype(group["matmul_dtype"], G.shape, G.device), G.device):
                update = self._kl_step(group, G, state)
            apply_update_(p, update.reshape(p.shape), group["lr"], group["weight_decay"], decay_first=False)

    def _direction_phase(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> list[MapInput]:
        """Elementwise: ``step += 1``, ``M <- lerp(M, G, 1 - b1)``; returns ``MapInput(M, G)`` per parameter.

        On a parameter's first step (the reference's initialisation step) it only creates ``M = 0`` and
        ``step = 0`` and returns ``MapInput(None, G)``: the momentum is not fed and the map builds the factors
        from ``G``. ``G`` is the gradient in the statistics dtype, shaped like the parameter (whole, shard or
        DTensor).
        """
        beta1 = group["betas"][0]
        inputs: list[MapInput] = []
        for p, g in zip(params, grads, strict=True):
            state = self.state[p]
            G = g.to(stat_dtype(p))
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(G, memory_format=torch.contiguous_format)
                state["step"] = 0
                inputs.append(MapInput(None, G))
                continue
            if state["exp_avg"].shape != G.shape:  # a checkpoint that kept a >= 4-D parameter's momentum flattened
                state["exp_avg"] = state["exp_avg"].reshape(G.shape)
            state["step"] += 1
            state["exp_avg"].lerp_(G, 1.0 - beta1)
            inputs.append(MapInput(state["exp_avg"], G))
        return inputs

    def _map_phase(self, group: dict[str, Any], params: list[Tensor], inputs: list[MapInput]) -> list[Tensor]:
        """Whole-matrix: factor statistics, eigenvalue EMAs and refreshes from ``G``, the update from ``M``.

        ``inputs`` are the whole ``(M, G)`` (no ``M`` on the initialisation step, which builds the factors
        and returns a zero update that :meth:`_apply_phase` skips). ``params`` only key the state.
        Returns the update direction shaped like each parameter, in the statistics dtype. Same-shape
        matrices with both sides preconditioned are stepped as one batch where
        :func:`whiten.linalg.stacking_helps` says it pays (:meth:`_stacked_kl_steps`).
        """
        updates: list[Tensor | None] = [None] * len(params)
        stackable: list[int] = []
        for i, (p, x) in enumerate(zip(params, inputs, strict=True)):
            state = self.state[p]
            grad = _gradient_of(x)
            G = work_view(grad)
            if x.direction is None:
                self._kl_init(group, G, state)
                updates[i] = torch.zeros_like(grad)
            elif G.ndim == 2 and "Q_L" in state and "Q_R" in state:
                stackable.append(i)
            else:
                with matmuls_in(effective_matmul_dtype(group["matmul_dtype"], G.shape, G.device), G.device):
                    updates[i] = self._kl_step(group, G, state, work_view(x.direction)).reshape(p.shape)
        if stackable:
            stacked = self._stacked_kl_steps(
                group,
                [work_view(_gradient_of(inputs[i])) for i in stackable],
                [work_view(inputs[i].direction) for i in stackable],  # type: ignore[arg-type]
                [self.state[params[i]] for i in stackable],
            )
            for i, update in zip(stackable, stacked, strict=True):
                updates[i] = update.reshape(params[i].shape)
        return updates  # type: ignore[return-value]

    def _stacked_kl_steps(
        self, group: dict[str, Any], grads: list[Tensor], moments: list[Tensor], states: list[dict[str, Any]]
    ) -> list[Tensor]:
        """:meth:`_kl_step` of matrices with both sides preconditioned, same-shape ones as one batch.

        A batch shares the shape, dtype and device of ``G`` and ``M``, the factor dtype and whether this step
        refreshes (:func:`whiten.linalg.stack_groups`); its state is stacked once (:mod:`whiten.optim._stacking`),
        every stage runs as one batched call, and the new state is written back into each parameter's tensors.
        The states are passed in (not looked up from ``self.state``), as SOAP's buckets, for ``torch.compile``.
        """
        frequency = group["precondition_frequency"]
        keys = [
            (state["L"].dtype, state["R"].dtype, moment.dtype, state["step"] % frequency == 0)
            for state, moment in zip(states, moments, strict=True)
        ]
        updates: list[Tensor | None] = [None] * len(grads)
        for batch in stack_groups(grads, keys):
            G = grads[batch[0]]
            with matmuls_in(effective_matmul_dtype(group["matmul_dtype"], G.shape, G.device), G.device):
                if len(batch) == 1:
                    updates[batch[0]] = self._kl_step(group, G, states[batch[0]], moments[batch[0]])
                    continue
                members = [states[i] for i in batch]
                stacked = stack_states(members, MATRIX_STATE)
                stacked["step"] = members[0]["step"]  # the refresh condition is part of the batch key
                G_batch = stack([grads[i] for i in batch])
                M_batch = stack([moments[i] for i in batch])
                update = self._kl_step(group, G_batch, stacked, M_batch, batched=True)
            store_states(members, stacked, MATRIX_STATE)
            for i, one in zip(batch, update.unbind(0), strict=True):
                updates[i] = one
        return updates  # type: ignore[return-value]

    def _apply_phase(self, group: dict[str, Any], params: list[Tensor], updates: list[Tensor]) -> None:
        """Elementwise: ``W <- (W - lr U)(1 - lr wd)`` (decay after the step); nothing on the initialisation step."""
        for p, update in zip(params, updates, strict=True):
            if self.state[p]["step"] == 0:
                continue
            apply_update_(p, update, group["lr"], group["weight_decay"], decay_first=False)

    # -- the full-factor path --------------------------------------------------------------------
    def _kl_init(self, group: dict[str, Any], G: Tensor, state: dict[str, Any], momentum: bool = False) -> None:
        """Factors from the first gradient (no update); ``momentum``: also create the moments and ``step``
        (KL-SOAP; KL-Shampoo's direction phase creates its momentum)."""
        with full_precision(G.device):  # once per parameter: the first eigenbasis in fp32 (fp64)
            self._kl_init_factors(group, G, state)
        if momentum:
            state["exp_avg"] = torch.zeros_like(G, memory_format=torch.contiguous_format)
            if group["preconditioner"] == "adam":
                state["exp_avg_sq"] = torch.zeros_like(G, memory_format=torch.contiguous_format)
            state["step"] = 0

    def _kl_init_factors(self, group: dict[str, Any], G: Tensor, state: dict[str, Any]) -> None:
        beta = shampoo_beta(group)
        fdtype = factor_dtype(group, G.dtype)
        numel = G.numel()
        sides = sum(1 for d in G.shape if d <= group["max_precond_dim"])
        for k, name in enumerate(side_names(G.ndim)):
            d = G.shape[k]
            if d > group["max_precond_dim"]:
                continue
            Gk = G.movedim(k, 0).reshape(d, -1)
            factor = (Gk @ Gk.mT) * ((1.0 - beta) * d / numel)
            _, Q = eigh_descending(factor)  # the eigenvalues are discarded, as in the reference
            state[name] = factor.to(fdtype)
            state[f"Q_{name}"] = Q
            # the clamp every later EMA applies, so that a tiny init_factor cannot start below its floor
            initial = initial_eigenvalue(group["init_factor"], G, sides).expand(d).clone()
            state[f"lam_{name}"] = clamp_eigenvalues(initial, d)

    def _kl_step(
        self,
        group: dict[str, Any],
        G: Tensor,
        state: dict[str, Any],
        M: Tensor | None = None,
        *,
        batched: bool = False,
    ) -> Tensor:
        """One KL-Shampoo / KL-SOAP step for ``G`` (work view); returns the update direction.

        KL-Shampoo passes its momentum ``M`` (work view), already fed and counted by the direction phase;
        KL-SOAP (``M=None``) counts the step and keeps its moments in the eigenbasis here. ``batched``:
        ``G``, ``M`` and the tensors of ``state`` carry a leading batch dimension of same-shape matrices
        with both sides preconditioned (KL-Shampoo, :meth:`_stacked_kl_steps`); the arithmetic is the same.
        """
        names = side_names(G.ndim - int(batched))
        dims = G.shape[-len(names) :]
        bases: list[Tensor | None] = [state.get(f"Q_{nm}") for nm in names]
        lams: list[Tensor | None] = [state.get(f"lam_{nm}") for nm in names]
        beta1, beta2 = group["betas"]
        beta = shampoo_beta(group)
        eps = group["eps"]
        if M is None:
            state["step"] += 1
        step = state["step"]

        # (1) direction from the OLD basis and eigenvalues
        QG_adam: Tensor | None = None  # KL-SOAP's Q_L^T G, reused by the statistics (2)
        if group["preconditioner"] == "kl":
            if M is None:
                raise ValueError("KL-Shampoo's _kl_step needs the momentum M from its direction phase")
            denom = None
            for k, lam in enumerate(lams):
                if lam is not None:
                    root = lam.sqrt()
                    root = root.view(*root.shape[:-1], *(-1 if j == k else 1 for j in range(len(names))))
                    denom = root if denom is None else denom * root
            D = rotate_all(M, bases)
            precond = D if denom is None else D / (denom + eps)
        else:
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            if len(bases) == 2 and bases[0] is not None and bases[1] is not None:
                QG_adam = bases[0].mT @ G  # (Q_L^T G) Q_R: both products are reused by the statistics (2)
                G_rot_wide = QG_adam @ bases[1]
            else:
                G_rot_wide = rotate_all(G, bases)
            G_rot = G_rot_wide.to(G.dtype)  # the moments are fp32 (fp64) whatever matmul_dtype
            exp_avg.lerp_(G_rot, 1.0 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(G_rot, G_rot, value=1.0 - beta2)
            precond = exp_avg / exp_avg_sq.sqrt().add_(eps)
        update = rotate_all(precond, bases, back=True)

        # (2) statistics from the RAW gradient with the OLD bases and eigenvalues (both sides, Jacobi order)
        factor_targets: Sequence[Tensor | None]
        lam_targets: Sequence[Tensor | None]
        Q_L, Q_R = bases if len(bases) == 2 else (None, None)
        lam_L, lam_R = lams if len(lams) == 2 else (None, None)
        if Q_L is not None and Q_R is not None and lam_L is not None and lam_R is not None:
            GQ = G @ Q_R
            m, n = dims
            if QG_adam is not None:  # KL-SOAP rotated G in (1) already: E = Q_L^T G Q_R is its G_rot
                QG, E = QG_adam, G_rot
            else:
                QG = Q_L.mT @ G
                E = (Q_L.mT @ GQ if m <= n else QG @ Q_R).to(G.dtype)  # the cheaper of the two products
            factor_targets = kl_factor_targets(G, Q_L, lam_L, Q_R, lam_R, rotated=(GQ, QG))
            lam_targets = kl_eigenvalue_targets(E, lam_L, lam_R)
        else:
            stats = kl_tensor_statistics(G, bases, lams)
            factor_targets, lam_targets = stats.factors, stats.eigenvalues
        for k, name in enumerate(names):
            factor_target, lam_target = factor_targets[k], lam_targets[k]
            if bases[k] is None or factor_target is None or lam_target is None:
                continue
            ema_factor_(state[name], factor_target, beta)
            state[f"lam_{name}"] = ema_eigenvalues(state[f"lam_{name}"], lam_target, beta, dims[k])

        # (3) eigenbasis refresh every T steps: one warm-started QR step, eigenvalues kept
        if step % group["precondition_frequency"] == 0:
            with full_precision(G.device):  # the eigenbasis in fp32 (fp64): docs/precision.md
                adam = group["preconditioner"] == "adam"
                momentum = rotate_all(state["exp_avg"], bases, back=True) if adam else None
                for k, name in enumerate(names):
                    if bases[k] is not None:
                        state[f"Q_{name}"] = orthogonal_iteration(state[name].to(G.dtype), state[f"Q_{name}"])
                if adam:
                    new_bases = [state.get(f"Q_{nm}") for nm in names]
                    state["exp_avg"].copy_(rotate_all(momentum, new_bases))  # type: ignore[arg-type]
        return update


class KLShampoo(KLFactored):
    r"""KL-Shampoo (Lin et al., 2025, arXiv 2509.03378), faithful to the reference ``KLOpt``.

    .. math::
        U_t = Q_L\Big[\frac{Q_L^\top M_t Q_R}{\sqrt{\lambda_L \otimes \lambda_R} + \epsilon}\Big]Q_R^\top,\qquad
        S_L = \tfrac1n \mathbb E[G S_R^{-1} G^\top],\ S_R = \tfrac1m \mathbb E[G^\top S_L^{-1} G]

    The first step of every parameter only initialises the factors (no update). Momentum is a plain
    EMA (no bias correction, no Nesterov); decoupled weight decay is applied after the step.

    Two defaults differ from the reference code's (``betas=(0.9, 0.98)``, ``init_factor=0.1``, which
    :class:`KLSOAP` keeps). The update divides by ``sqrt(lam_L (x) lam_R)``: with ``init_factor=0.1`` and a
    0.98 EMA the eigenvalues need most of a short run to fall from 0.1 to the scale of the gradients (whose
    square is ~1e-6 per entry on the benchmark's models), so the first half of a 400-step run takes ~100x too
    small steps. ``betas=(0.95, 0.95)`` is the reference docstring's documented default; ``init_factor="grad_rms"``
    starts the eigenvalues at the first gradient's scale (:func:`initial_eigenvalue`), whatever the scale of
    the loss. Measured before/after (and the reference's ``init_factor=1e-3``, as good here but divergent for
    large gradients): docs/kl_shampoo.md.

    Args:
        lr: learning rate (reference default 1e-4).
        betas: ``(b1, b2)``: momentum EMA rate and (when ``shampoo_beta < 0``) the factor EMA rate;
            ``None`` means ``(0.95, 0.95)``.
        shampoo_beta: factor and eigenvalue EMA rate; ``-1`` means ``betas[1]``.
        eps: added to ``sqrt(lamL (x) lamR)`` in the update.
        weight_decay: decoupled, ``W <- W (1 - lr wd)`` after the step.
        precondition_frequency: ``T``, steps between QR refreshes of the eigenbases.
        init_factor: initial eigenvalues after the initialisation step, a number (the reference's, 0.1 there) or
            ``"grad_rms"`` (``mean(G^2)^(1/sides)`` of the first gradient); ``None`` means ``"grad_rms"``.
        max_precond_dim: dimensions above it are not preconditioned (identity factor, nothing stored).
        state_dtype: storage dtype of the factor matrices (``"float32"`` default; ``"bfloat16"`` halves their
            memory; ``"float16"`` is refused, its range is too small for the statistics); bases, eigenvalues and
            momentum stay fp32 (fp64 for fp64 params).
        matmul_dtype: ``"bfloat16"`` (default; the reference's ``cast_dtype``) or ``"float32"``: the dtype of the
            rotations into and out of the eigenbasis and of the factor statistics; the initial ``eigh``, the QR
            refresh and all state stay fp32 (fp64 for fp64 params). ``docs/precision.md``.
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: the AdamW that trains 1-D parameters
            (and any ``use_matrix=False`` group); ``adamw_lr=None`` uses ``lr``.
        maximize: ascend instead of descend.
        nonfinite: ``"skip"`` or ``"raise"`` on a NaN/Inf gradient (see :class:`WhitenOptimizer`).
    """

    default_betas: ClassVar[tuple[float, float]] = (0.95, 0.95)
    default_init_factor: ClassVar[float | str] = GRAD_RMS


class KLSOAP(KLFactored):
    r"""KL-SOAP: KL-Shampoo's factors and eigenbases, Adam in the eigenbasis (reference ``using_klsoap=True``).

    .. math::
        G' = Q_L^\top G Q_R,\quad m \leftarrow \mathrm{lerp}(m, G', 1-\beta_1),\quad
        v \leftarrow \mathrm{lerp}(v, G'^2, 1-\beta_2),\quad U = Q_L \frac{m}{\sqrt v + \epsilon} Q_R^\top

    No bias correction (as the reference). On an eigenbasis refresh the momentum ``m`` is rotated to
    the new basis; the second moment ``v`` is not. Same arguments as :class:`KLShampoo`, with the reference
    code's defaults ``betas=(0.9, 0.98)`` and ``init_factor=0.1`` (its update does not divide by the eigenvalues).
    """

    preconditioner_kind: ClassVar[str] = "adam"
