r"""SOAP, SOAP-KL and REKLS: Adam in the eigenbasis of Kronecker factors (Emerging-Optimizers semantics).

A drop-in for NVIDIA Emerging-Optimizers 0.3.0 ``SOAP`` / ``REKLS`` (same constructor names and
defaults, the same step on the QR path), with the peer's known defects fixed (see ``docs/soap.md``). On
the eigh path (``use_eigh``, REKLS) the default step is that of the peer's v0.2.0 and v0.4.0, which leave
``exp_avg_sq`` unpermuted; ``eigh_sort_exp_avg_sq=True`` reproduces v0.3.0/v0.3.1, which permute it by
the old basis's Rayleigh-quotient order before the eigh (``docs/soap.md`` has the release table). Per matrix
parameter ``W`` (``m x n``; conv weights flattened to ``(out, in*kh*kw)``), with ``t`` 1-based::

    bs = shampoo_beta, or 1 - (1 - bs) / (1 - bs^t) with correct_shampoo_beta_bias (default: correct_bias)
    # (1) Kronecker factors (under fp32_matmul_prec), Rayleigh eigenvalues from the OLD factors and basis
    plain: L <- lerp(L, G G^T, 1 - bs);   R <- lerp(R, G^T G, 1 - bs)
    KL:    lamL = max(diag(Q_L^T L Q_L), eps),  lamR = max(diag(Q_R^T R Q_R), eps)
           L <- lerp(L, (1/n) G Q_R diag(1/lamR) Q_R^T G^T, 1 - bs)
           R <- lerp(R, (1/m) G^T Q_L diag(1/lamL) Q_L^T G, 1 - bs)
    # (2) eigenbasis refresh (under qr_fp32_matmul_prec) on steps t = 1, 1 + T, 1 + 2T, ...
    M = Q_L exp_avg Q_R^T                                   # first moment back to the parameter basis
    Q = eigh_desc(K)                                        # first step, or use_eigh (exp_avg_sq
                                                            # first permuted as below if eigh_sort_exp_avg_sq)
      = qr(K Q_sorted).Q, power_iter_steps times          # else; Q_sorted = old Q by descending
                                                            # diag(Q^T K Q), exp_avg_sq permuted alike
    exp_avg = Q_L^T M Q_R                                   # exp_avg_sq is permuted, never rotated
    # (3) weight decay: decoupled W *= 1 - lr wd | independent W *= 1 - wd | l2: G' uses G + wd W (a copy)
    # (4) Adam in the eigenbasis
    G' = Q_L^T G Q_R;  exp_avg <- lerp(exp_avg, G', 1 - b1);  exp_avg_sq <- lerp(exp_avg_sq, G'^2, 1 - b2)
    mhat = b1 exp_avg / (1 - b1^(t+1)) + (1 - b1) G' / (1 - b1^t)   if nesterov   else exp_avg / (1 - b1^t)
    U = Q_L [mhat / (sqrt(exp_avg_sq / (1 - b2^t)) + eps)] Q_R^T      (no bias terms if not correct_bias)
    U *= min(1, max_update_rms / (rms(U) + 1e-7))           if max_update_rms > 0
    W <- W - lr U

Sources: Vyas et al., "SOAP: Improving and Stabilizing Shampoo using Adam" (arXiv 2409.11321);
Lin et al., KL-Shampoo (arXiv 2509.03378; the KL factor statistics); NVIDIA Emerging-Optimizers
0.3.0 (``SOAP(use_kl_shampoo=...)``, ``REKLS``: the step order and options reproduced here).

Deliberate differences from the peer: a safe KL initialisation (``kl_init="safe"``, below),
every switch in the param groups (so it survives ``state_dict``), non-matrix parameters routed
to a built-in AdamW instead of refused, ``fp32_matmul_prec="highest"`` by default, a copy of the
gradient for ``l2`` decay (the peer adds ``wd W`` to ``p.grad`` in place), and two extra options,
``precondition_frequency`` and ``max_precond_dim``.

KL initialisation. The peer starts from ``L = R = 0`` and identity bases, so the first KL
target is whitened by ``1 / eps = 1e8``; every later target is ~``1e-16`` of it and the basis of
the longer side stays frozen for hundreds of steps. With ``kl_init="safe"`` the first step's
targets are instead the trace-preserving shrunk Gram matrices::

    L_1 target = (1 - a) G G^T / n + a mu I,   R_1 target = (1 - a) G^T G / m + a mu I,   mu = ||G||_F^2 / (m n)

(``a = kl_init_shrinkage``, default 0.5; ``mu`` is the mean eigenvalue of both Grams; the
eigenvectors are those of the Grams). ``a = 0`` gives the bare Gram ``S_R = I`` answer, but one
gradient has rank ``min(m, n)``, so the Gram of the longer side has ``|m - n|`` zero
eigenvalues that the eps clamp turns into ``1e8`` gains one step later: the same freeze again
(measured; see ``docs/soap.md``). ``kl_init="peer"`` reproduces the peer exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, Unpack

import torch
from torch import Tensor

from whiten.linalg import (
    MATMUL_DTYPES,
    NONE_FLOPS,
    PRECISIONS,
    FlopCount,
    effective_matmul_dtype,
    eigh_descending,
    eigh_flops,
    full_precision,
    gram,
    gram_flops,
    kl_factor_targets,
    matmul_flops,
    matmul_precision,
    matmuls_in,
    orthogonal_iteration_flops,
    rayleigh_quotients,
    rotate_matrix,
    rotation_flops,
    sort_basis,
    sorted_orthogonal_iteration,
    stacking_helps,
)
from whiten.optim import _options as opt
from whiten.optim._adamw import decay_and_update_
from whiten.optim._options import CommonOptions, constructor_options
from whiten.optim._stacking import stack as _stack
from whiten.optim._stacking import store as _store
from whiten.optim.base import WhitenOptimizer, as_matrix, stat_dtype

WEIGHT_DECAY_METHODS = ("decoupled", "independent", "l2")
KL_INITS = ("safe", "peer")


def _as_pair(value: Any) -> Any:
    """A list or tuple of betas as a tuple; anything else (a string, a number) unchanged, for validation to refuse
    as one value (``tuple("0.9,0.95")`` would be checked character by character)."""
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _add_to_diagonal(A: Tensor, value: Tensor) -> Tensor:
    """``A + value I`` for a batch of square matrices and a per-matrix ``value`` of shape ``(B,)``."""
    A.diagonal(dim1=-2, dim2=-1).add_(value.unsqueeze(-1))
    return A


class SOAP(WhitenOptimizer):
    r"""SOAP: ShampoO with Adam in the Preconditioner's eigenbasis; SOAP-KL with ``use_kl_shampoo``.

    .. math::
        L_t = \mathrm{lerp}(L_{t-1}, G G^\top, 1-\beta_s),\quad R_t = \mathrm{lerp}(R_{t-1}, G^\top G, 1-\beta_s),\\
        G' = Q_L^\top G Q_R,\quad W_t = W_{t-1} - \eta\, Q_L \frac{\hat m(G')}{\sqrt{\hat v(G')} + \epsilon} Q_R^\top

    with ``Q_L, Q_R`` eigenbases of ``L, R`` (full ``eigh`` or warm-started QR) and Adam's moments
    kept in that basis. Arguments with the names of Emerging-Optimizers 0.3.0 have its meaning
    and default; the full step is in the module docstring and ``docs/soap.md``.

    Args:
        lr: learning rate (required, as in the peer).
        betas: Adam ``(b1, b2)`` in the eigenbasis.
        shampoo_beta: EMA coefficient of the Kronecker factors (weights the OLD value).
        eps: Adam epsilon; also the floor of the KL Rayleigh eigenvalues (as the peer).
        weight_decay: decay coefficient, applied as ``weight_decay_method`` says.
        weight_decay_method: ``"decoupled"`` (``W *= 1 - lr wd``), ``"independent"`` (``W *= 1 - wd``)
            or ``"l2"`` (``wd W`` added to a copy of the gradient before the eigenbasis projection;
            the factors see the raw gradient).
        nesterov: Nesterov momentum in the inner Adam.
        correct_bias: Adam bias correction (and, by default, the factor EMA's).
        fp32_matmul_prec: matmul precision of the factor update and the projections when they run in fp32
            (``matmul_dtype="float32"``; TF32 on CUDA for ``"high"``); bf16 products are not affected.
        use_eigh: refresh the basis by full ``eigh`` every time (else warm-started QR).
        qr_fp32_matmul_prec: matmul precision of the basis refresh and the momentum rotation.
        power_iter_steps: QR power iterations per refresh.
        max_update_rms: clip the update's RMS to this (0 = off).
        use_kl_shampoo: KL-Shampoo factor statistics (SOAP-KL, Emerging-Optimizers' ``use_kl_shampoo``; not
            :class:`whiten.KLSOAP`, see ``docs/soap.md``).
        correct_shampoo_beta_bias: bias-correct the factor EMA; ``None`` follows ``correct_bias``.
        precondition_frequency: refresh the eigenbasis on steps ``t = 1, 1 + T, 1 + 2T, ...``
            (1 = every step, the peer's behaviour); the factors are updated every step.
        max_precond_dim: a side longer than this is not preconditioned (identity basis, no factor or
            basis stored for it).
        matmul_dtype: ``"float32"`` (default) or ``"bfloat16"``: the dtype of the plain factor statistics and of
            the rotations into and out of the eigenbasis (~2x faster on GPT-2 shapes); the refresh (QR / eigh and
            its products), SOAP-KL's Rayleigh quotients and whitened statistics and all state stay fp32 (fp64
            for fp64 parameters). Why fp32 stays the default: ``docs/precision.md``.
        kl_init: ``"safe"`` (default: shrunk Gram seed on the first KL step) or ``"peer"`` (``L = R = 0``
            and the ``1/eps`` first term, reproducing the peer's frozen basis).
        kl_init_shrinkage: weight ``a`` of the trace-matched identity in the safe seed.
        eigh_sort_exp_avg_sq: on an eigh refresh (``use_eigh``, REKLS), first permute ``exp_avg_sq`` by the
            descending Rayleigh quotients ``diag(Q_old^T K Q_old)`` of the old basis under the updated factor,
            as Emerging-Optimizers v0.3.0 and v0.3.1 do (default ``False``: untouched, as v0.2.0 and v0.4.0).
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: the built-in AdamW for parameters
            with fewer than 2 dims (or groups with ``use_matrix=False``); ``None`` means the SOAP
            value (``lr``, ``betas``, ``eps``); ``adamw_weight_decay`` defaults to 0 (no decay of
            gains and biases).
        maximize: maximise the objective.
        nonfinite: ``"skip"`` or ``"raise"`` on a NaN/Inf gradient (see :class:`WhitenOptimizer`).

    State per matrix parameter (fp32, fp64 for fp64 parameters): ``step`` (int, completed steps),
    ``exp_avg`` and ``exp_avg_sq`` (``m x n``, in the eigenbasis), ``L``/``Q_L`` (``m x m``) and
    ``R``/``Q_R`` (``n x n``), the latter two pairs absent on a side longer than ``max_precond_dim``.
    """

    option_checks: ClassVar[dict[str, opt.Check]] = {
        "matmul_dtype": opt.choice(*MATMUL_DTYPES),
        "betas": opt.beta_pair,
        "shampoo_beta": opt.unit_interval,
        "eps": opt.positive,
        "weight_decay_method": opt.choice(*WEIGHT_DECAY_METHODS),
        "nesterov": opt.boolean,
        "correct_bias": opt.boolean,
        "fp32_matmul_prec": opt.choice(*PRECISIONS),
        "use_eigh": opt.boolean,
        "qr_fp32_matmul_prec": opt.choice(*PRECISIONS),
        "power_iter_steps": opt.positive_int,
        "max_update_rms": opt.nonneg,
        "use_kl_shampoo": opt.boolean,
        "correct_shampoo_beta_bias": opt.optional(opt.boolean),
        "precondition_frequency": opt.positive_int,
        "max_precond_dim": opt.positive_int,
        "kl_init": opt.choice(*KL_INITS),
        "kl_init_shrinkage": opt.closed_unit_interval,
        "eigh_sort_exp_avg_sq": opt.boolean,
    }

    adamw_inherits: ClassVar[dict[str, str]] = {"adamw_betas": "betas", "adamw_eps": "eps"}

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        *,
        betas: tuple[float, float] = (0.9, 0.95),
        shampoo_beta: float = 0.95,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        weight_decay_method: str = "decoupled",
        nesterov: bool = False,
        correct_bias: bool = True,
        fp32_matmul_prec: str = "highest",
        use_eigh: bool = False,
        qr_fp32_matmul_prec: str = "highest",
        power_iter_steps: int = 1,
        max_update_rms: float = 0.0,
        use_kl_shampoo: bool = False,
        correct_shampoo_beta_bias: bool | None = None,
        precondition_frequency: int = 1,
        max_precond_dim: int = 8192,
        kl_init: str = "safe",
        kl_init_shrinkage: float = 0.5,
        eigh_sort_exp_avg_sq: bool = False,
        matmul_dtype: str = "float32",
        **common: Unpack[CommonOptions],
    ) -> None:
        options = constructor_options(locals())
        super().__init__(params, {**options, "betas": _as_pair(betas)})

    # -- cost -----------------------------------------------------------------------------------
    def matrix_flops(self, shape: Sequence[int], group: Mapping[str, Any]) -> FlopCount:
        """One step of an ``m x n`` matrix after the first, refreshes amortised over ``precondition_frequency``.

        Every step: the factor targets (plain: two Grams; KL: the Rayleigh quotients ``L Q_L``, ``R Q_R``,
        ``G Q_R``, ``Q_L^T G`` and two whitened Grams), ``G`` into the eigenbasis and the update out of it.
        A refresh: the first moment out and back in, and per side one ``eigh`` (``use_eigh``) or
        ``power_iter_steps`` orthogonal-iteration steps. A side over ``max_precond_dim`` costs nothing.
        """
        m, n = int(shape[0]), math.prod(int(s) for s in shape[1:])
        left, right = m <= group["max_precond_dim"], n <= group["max_precond_dim"]
        if not group["use_kl_shampoo"]:
            stats = (gram_flops(m, n) if left else NONE_FLOPS) + (gram_flops(n, m) if right else NONE_FLOPS)
        elif left and right:
            stats = (
                matmul_flops(m, m, m)
                + matmul_flops(n, n, n)
                + rotation_flops(m, n)
                + gram_flops(m, n)
                + gram_flops(n, m)
            )
        else:  # the other side's target is the normalised Gram
            stats = gram_flops(m, n) if left else (gram_flops(n, m) if right else NONE_FLOPS)
        rotate = rotation_flops(m, n, left, right)

        def refresh_side(d: int) -> FlopCount:
            return eigh_flops(d) if group["use_eigh"] else orthogonal_iteration_flops(d, group["power_iter_steps"])

        refresh = 2 * rotate + (refresh_side(m) if left else NONE_FLOPS) + (refresh_side(n) if right else NONE_FLOPS)
        if not (left or right):
            refresh = NONE_FLOPS
        return stats + 2 * rotate + refresh / group["precondition_frequency"]

    # -- state ----------------------------------------------------------------------------------
    def _init_state(self, param: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        m, n = as_matrix(param).shape
        dtype, device = stat_dtype(param), param.device
        state["step"] = 0
        state["exp_avg"] = torch.zeros(m, n, dtype=dtype, device=device)
        state["exp_avg_sq"] = torch.zeros(m, n, dtype=dtype, device=device)
        if m <= group["max_precond_dim"]:
            state["L"] = torch.zeros(m, m, dtype=dtype, device=device)
            state["Q_L"] = torch.eye(m, dtype=dtype, device=device)
        if n <= group["max_precond_dim"]:
            state["R"] = torch.zeros(n, n, dtype=dtype, device=device)
            state["Q_R"] = torch.eye(n, dtype=dtype, device=device)

    # -- stepping -------------------------------------------------------------------------------
    def needs_exact_counts(self, group: Mapping[str, Any], params: Sequence[Tensor]) -> bool:
        """A refresh on its schedule may be due (``precondition_frequency > 1``); the bias corrections take the
        skips still pending on the device into account themselves (:meth:`pending_lag`)."""
        every = group["precondition_frequency"]
        return every > 1 and any(self.state[p]["step"] % every == 0 for p in params)

    def _matrix_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        # one batched pass per (shape, dtype, device, step count, preconditioned sides) where stacking pays
        # (whiten.linalg.stacking_helps, the policy of map_batched: small matrices on CPU); else one pass per matrix
        buckets: dict[tuple, list[int]] = {}
        for index, p in enumerate(params):
            state = self.state[p]
            if "exp_avg" not in state:
                self._init_state(p, state, group)
            key = (
                tuple(state["exp_avg"].shape),
                state["exp_avg"].dtype,
                p.device,
                state["step"],
                "L" in state,
                "R" in state,
                None if stacking_helps(p.device, state["exp_avg"].shape) else index,
            )
            buckets.setdefault(key, []).append(index)
        # the states are looked up here and passed in: under torch.compile, _bucket_step is a frame of its own
        # (graph breaks), and dynamo (torch 2.13) reused its code across parameters when it looked up
        # self.state[p] itself, stepping one matrix twice and the other not at all
        for indices in buckets.values():
            self._bucket_step(
                group,
                [params[i] for i in indices],
                [grads[i] for i in indices],
                [self.state[params[i]] for i in indices],
            )

    def _bucket_step(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]]
    ) -> None:
        """One SOAP step for same-shape parameters at the same step count, batched."""
        dtype = states[0]["exp_avg"].dtype
        t = states[0]["step"] + 1
        beta1, beta2 = group["betas"]
        eps = group["eps"]
        correct_bias = group["correct_bias"]
        # skips decided on the device that the int counters do not show yet: the bias corrections of those
        # parameters are taken at their committed count, on the device (the others keep the host's values)
        lag = self.pending_lag(params)

        def at_step(factor: Callable[[Any], Any]) -> Any:
            """``factor(t)``: a Python float, or where a skip is pending a ``(B, 1, 1)`` tensor of ``factor``
            at each parameter's committed count (equal to the float where none was skipped)."""
            value = factor(t)
            if lag is None:
                return value
            return torch.where(lag == 0, value, factor(t - lag)).to(dtype).view(-1, 1, 1)

        def stacked(key: str) -> Tensor | None:
            return _stack([s[key] for s in states]) if key in states[0] else None

        # never modified in place: for one fp32 parameter this is a view of p.grad
        G = _stack([as_matrix(g).to(dtype) for g in grads])
        L, R, Q_L, Q_R = stacked("L"), stacked("R"), stacked("Q_L"), stacked("Q_R")
        exp_avg, exp_avg_sq = _stack([s["exp_avg"] for s in states]), _stack([s["exp_avg_sq"] for s in states])

        # (1) Kronecker factors, statistics from the raw gradient and the OLD factors and bases
        shampoo_beta = group["shampoo_beta"]
        correct_factor_bias = group["correct_shampoo_beta_bias"]
        if correct_factor_bias is None:
            correct_factor_bias = correct_bias
        factor_weight: Any = 1.0 - shampoo_beta  # of the factor EMAs: L <- lerp(L, target, weight)
        if correct_factor_bias:
            beta = shampoo_beta
            factor_weight = at_step(lambda s: 1.0 - (1.0 - (1.0 - beta) / (1.0 - beta**s)))
        # hot products in matmul_dtype (bf16 operands: fp32_matmul_prec does not apply to them); results enter
        # the fp32 (fp64) state in its dtype; the refresh below always runs in fp32 (docs/precision.md)
        hot = effective_matmul_dtype(group["matmul_dtype"], G.shape, G.device)
        with matmul_precision(group["fp32_matmul_prec"]), matmuls_in(hot, G.device):
            left, right = self._factor_targets(group, G, L, R, Q_L, Q_R, first=t == 1)
        if L is not None and left is not None:
            L.lerp_(left.to(L.dtype), factor_weight)
        if R is not None and right is not None:
            R.lerp_(right.to(R.dtype), factor_weight)

        # (2) eigenbasis refresh, first moment rotated along, second moment only permuted
        if (t - 1) % group["precondition_frequency"] == 0 and (L is not None or R is not None):
            with matmul_precision(group["qr_fp32_matmul_prec"]), full_precision(G.device):
                moment = rotate_matrix(exp_avg, Q_L, Q_R, back=True) if t > 1 else None  # exp_avg is 0 on step 1
                full = t == 1 or group["use_eigh"]
                # Emerging-Optimizers v0.3.0/v0.3.1 also permute exp_avg_sq on the eigh path, by the old basis's
                # Rayleigh quotients under the updated factor (v0.2.0 and v0.4.0 do not; nor do we by default)
                sort_on_eigh = full and t > 1 and group["eigh_sort_exp_avg_sq"]
                steps = group["power_iter_steps"]
                if L is not None:
                    if full or Q_L is None:
                        if sort_on_eigh and Q_L is not None:
                            exp_avg_sq = exp_avg_sq.take_along_dim(sort_basis(L, Q_L)[1].unsqueeze(-1), dim=-2)
                        Q_L = eigh_descending(L)[1]
                    else:
                        Q_L, order = sorted_orthogonal_iteration(L, Q_L, steps)  # one L Q_L for both
                        exp_avg_sq = exp_avg_sq.take_along_dim(order.unsqueeze(-1), dim=-2)
                if R is not None:
                    if full or Q_R is None:
                        if sort_on_eigh and Q_R is not None:
                            exp_avg_sq = exp_avg_sq.take_along_dim(sort_basis(R, Q_R)[1].unsqueeze(-2), dim=-1)
                        Q_R = eigh_descending(R)[1]
                    else:
                        Q_R, order = sorted_orthogonal_iteration(R, Q_R, steps)
                        exp_avg_sq = exp_avg_sq.take_along_dim(order.unsqueeze(-2), dim=-1)
                if moment is not None:
                    exp_avg = rotate_matrix(moment, Q_L, Q_R)

        # (3) l2 decay enters the Adam gradient only (a copy; the factors saw the raw gradient)
        weight_decay, method = group["weight_decay"], group["weight_decay_method"]
        G_adam = G
        if method == "l2" and weight_decay != 0.0:
            G_adam = G + weight_decay * _stack([as_matrix(p).to(dtype) for p in params])

        # (4) Adam in the eigenbasis
        with matmul_precision(group["fp32_matmul_prec"]), matmuls_in(hot, G.device):
            G_rot = rotate_matrix(G_adam, Q_L, Q_R).to(dtype)
        exp_avg.lerp_(G_rot, 1.0 - beta1)
        exp_avg_sq.lerp_(G_rot.square(), 1.0 - beta2)
        bias1 = at_step(lambda s: 1.0 - beta1**s) if correct_bias else 1.0
        bias2 = at_step(lambda s: 1.0 - beta2**s) if correct_bias else 1.0
        if group["nesterov"]:
            next_scale = at_step(lambda s: beta1 / (1.0 - beta1 ** (s + 1))) if correct_bias else beta1
            grad_scale = at_step(lambda s: (1.0 - beta1) / (1.0 - beta1**s)) if correct_bias else 1.0 - beta1
            momentum = exp_avg * next_scale + G_rot * grad_scale
        else:
            momentum = exp_avg / bias1
        direction = momentum / (exp_avg_sq / bias2).sqrt_().add_(eps)
        with matmul_precision(group["fp32_matmul_prec"]), matmuls_in(hot, G.device):
            update = rotate_matrix(direction, Q_L, Q_R, back=True)
        max_rms = group["max_update_rms"]
        if max_rms > 0:
            rms = update.square().mean(dim=(-2, -1), keepdim=True).sqrt_()
            update = update * (max_rms / (rms + 1e-7)).clamp_(max=1.0)

        lr = group["lr"]
        if method == "decoupled":
            decay = 1.0 - lr * weight_decay
        elif method == "independent":
            decay = 1.0 - weight_decay
        else:
            decay = 1.0
        for p, U in zip(params, update, strict=True):
            decay_and_update_(p, U.view(p.shape), alpha=-lr, decay=decay)

        for key, value in (
            ("L", L),
            ("R", R),
            ("Q_L", Q_L),
            ("Q_R", Q_R),
            ("exp_avg", exp_avg),
            ("exp_avg_sq", exp_avg_sq),
        ):
            if value is not None:
                _store(states, key, value)
        for state in states:
            state["step"] = t

    @staticmethod
    def _factor_targets(
        group: dict[str, Any],
        G: Tensor,
        L: Tensor | None,
        R: Tensor | None,
        Q_L: Tensor | None,
        Q_R: Tensor | None,
        *,
        first: bool,
    ) -> tuple[Tensor | None, Tensor | None]:
        """One-sample targets of the factor EMAs (``None`` for an unpreconditioned side)."""
        m, n = G.shape[-2], G.shape[-1]
        if not group["use_kl_shampoo"]:
            return (gram(G) if L is not None else None, gram(G.mT) if R is not None else None)
        if first and group["kl_init"] == "safe":
            # trace-preserving shrinkage of the Grams (S = I on the other side) towards mu I
            shrink = group["kl_init_shrinkage"]
            mu = G.square().sum(dim=(-2, -1)) / (m * n)
            left = _add_to_diagonal(gram(G) * ((1.0 - shrink) / n), shrink * mu) if L is not None else None
            right = _add_to_diagonal(gram(G.mT) * ((1.0 - shrink) / m), shrink * mu) if R is not None else None
            return left, right
        eps = group["eps"]
        if L is not None and R is not None and Q_L is not None and Q_R is not None:
            # the Rayleigh quotients of the accumulated factors stay fp32 whatever matmul_dtype: their error is
            # relative to the largest eigenvalue, and a bf16 (or TF32) one turns the smallest negative after a
            # spike (clamped to eps, the next target is whitened by 1/eps: the basis jumps; docs/precision.md)
            with full_precision(G.device):
                lam_L = rayleigh_quotients(L, Q_L).clamp_min(eps)
                lam_R = rayleigh_quotients(R, Q_R).clamp_min(eps)
                return kl_factor_targets(G, Q_L, lam_L, Q_R, lam_R)
        # an unpreconditioned side has S = I, so the other side's target is the normalised Gram
        return (gram(G) / n if L is not None else None, gram(G.mT) / m if R is not None else None)


class REKLS(SOAP):
    """REKLS ("realtime eigen KL-SOAP" in Emerging-Optimizers; here SOAP-KL with ``eigh``): :class:`SOAP` with
    ``use_eigh=True, use_kl_shampoo=True``.

    The factors take the KL-Shampoo statistics and the eigenbasis is recomputed by a full
    ``eigh`` after every factor update (so it includes the current gradient). The options of
    Emerging-Optimizers' ``REKLS`` (keyword-only after ``lr``); every other :class:`SOAP` option
    (``fp32_matmul_prec``, ``kl_init``, ``precondition_frequency``, ``adamw_*``, ...) is accepted.
    """

    fixed_options: ClassVar[tuple[str, ...]] = ("use_eigh", "use_kl_shampoo")

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float, **options: Any) -> None:
        fixed = sorted(set(self.fixed_options) & options.keys())
        if fixed:
            raise TypeError(f"REKLS fixes use_eigh=True and use_kl_shampoo=True; do not pass {fixed} (use SOAP)")
        super().__init__(params, lr, use_eigh=True, use_kl_shampoo=True, **options)
