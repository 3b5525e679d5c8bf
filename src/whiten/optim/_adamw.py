"""The one AdamW kernel, used for every parameter that a matrix method does not handle.

Decoupled weight decay (Loshchilov & Hutter, 2019), as ``torch.optim.AdamW``::

    m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
    W <- W (1 - lr wd) - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def add_scaled_(target: Tensor, update: Tensor, scale: float | Tensor) -> None:
    """``target += scale * update`` in place, correct under ``torch.compile`` too.

    Eager it is ``target.add_(update, alpha=scale)`` (one pass; bit-identical to ``torch.optim``'s
    updates); a tensor ``scale`` (a tensor ``lr``) is applied by a ``mul``, as ``alpha`` must be a number.
    Inductor (torch 2.13, CPU) drops ``alpha`` from that pattern when ``update`` comes from a matmul, so a
    compiled step would move by ``update`` instead of ``scale * update``; while compiling, the
    scale is applied by a separate ``mul``, which inductor fuses into the same kernel.
    """
    if isinstance(scale, Tensor) or torch.compiler.is_compiling():  # alpha must be a Python number
        target.add_(update.mul(scale))
    else:
        target.add_(update, alpha=scale)


def decay_and_update_(
    param: Tensor, update: Tensor, *, alpha: float | Tensor, decay: float | Tensor, decay_first: bool = True
) -> None:
    """The one decay-and-update kernel: ``W <- decay W + alpha U`` (``decay_first=False``: ``decay (W + alpha U)``).

    ``update`` may be in a wider dtype than ``param`` (fp32 statistics for a bf16 weight): the
    arithmetic then happens in the wide dtype and the result is rounded once. A narrower
    ``update`` (a bf16 Newton–Schulz output for an fp32 weight) is added in ``param``'s dtype
    without a separate cast. A ``decay`` of exactly 1 skips the multiplication.
    """
    target = param if torch.promote_types(param.dtype, update.dtype) == param.dtype else param.to(update.dtype)
    decays = isinstance(decay, Tensor) or decay != 1.0  # a tensor decay (tensor lr): no host sync to compare
    if decay_first and decays:
        target.mul_(decay)
    add_scaled_(target, update, alpha)
    if not decay_first and decays:
        target.mul_(decay)
    if target is not param:
        param.copy_(target)


def apply_update_(
    param: Tensor,
    update: Tensor,
    lr: float | Tensor,
    weight_decay: float,
    *,
    decay_first: bool = True,
    update_scale: float = 1.0,
) -> None:
    """``W <- W (1 - lr wd) - lr s U``, ``s = update_scale`` (``decay_first=False``: ``(W - lr s U)(1 - lr wd)``).

    Decoupled weight decay through :func:`decay_and_update_`. ``update_scale`` folds a scalar factor
    (Muon's shape factor) into the ``add_`` instead of a pass over ``update``.
    """
    # no decay pass when weight_decay is 0, also for a tensor lr (whose product would always be a tensor)
    decay = 1.0 if weight_decay == 0.0 else 1.0 - lr * weight_decay
    decay_and_update_(param, update, alpha=-lr * update_scale, decay=decay, decay_first=decay_first)


def select_(keep: Tensor, target: Tensor, old: Tensor) -> None:
    """``target <- where(keep, target, old)`` in place (``keep`` a 0-d bool tensor): no value is read back.

    A contiguous ``target`` takes the result directly (``out=``); a strided view gets it by ``copy_`` (dynamo
    refuses a non-contiguous ``out=``).
    """
    if target.is_contiguous():
        torch.where(keep, target, old, out=target)
    else:
        target.copy_(torch.where(keep, target, old))


def step_count(state: dict, param: Tensor) -> Tensor:
    """``state["step"]`` as a 0-d fp32 tensor on ``param``'s device (as ``torch.optim``'s fused AdamW keeps it), so
    that the count advances, and skips, on the device; an int from an older checkpoint is converted once."""
    step = state["step"]
    if not isinstance(step, Tensor) or step.device != param.device or step.dtype != torch.float32:
        step = state["step"] = torch.as_tensor(step, dtype=torch.float32).to(param.device, copy=True)
    return step


def _init_moments(param: Tensor, state: dict, dtype: torch.dtype, memory_format: torch.memory_format) -> None:
    state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
    state["exp_avg"] = torch.zeros_like(param, dtype=dtype, memory_format=memory_format)
    state["exp_avg_sq"] = torch.zeros_like(param, dtype=dtype, memory_format=memory_format)


def adamw_step_(
    param: Tensor,
    grad: Tensor,
    state: dict,
    *,
    lr: float | Tensor,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    stat_dtype: torch.dtype,
    ok: Tensor | None = None,
) -> None:
    """One AdamW step for ``param``; state keys ``exp_avg``, ``exp_avg_sq``, ``step`` (a 0-d tensor).

    ``ok`` (a 0-d bool tensor): commit the step only where it holds, on the device (the parameter, moments and
    count keep their values otherwise, bit for bit); nothing is read back.
    """
    if "exp_avg" not in state:
        _init_moments(param, state, stat_dtype, torch.preserve_format)
    beta1, beta2 = betas
    step = step_count(state, param)
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    saved = None if ok is None else (param.detach().clone(), exp_avg.clone(), exp_avg_sq.clone())
    step.add_(1.0 if ok is None else ok)
    # the bias corrections from the count on the device, in fp64 (as from a Python int before)
    t = step.to(torch.float64 if step.device.type in ("cpu", "cuda") else torch.float32)
    g = grad.to(stat_dtype)
    exp_avg.lerp_(g, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    bias1 = 1.0 - beta1**t
    bias2 = 1.0 - beta2**t
    denom = (exp_avg_sq / bias2).sqrt_().add_(eps)
    apply_update_(param, (exp_avg / denom).div_(bias1), lr, weight_decay)
    if ok is not None and saved is not None:
        for new, old in zip((param.detach(), exp_avg, exp_avg_sq), saved, strict=True):
            select_(ok, new, old)


def _fusable(param: Tensor, grad: Tensor, stat_dtype: torch.dtype) -> bool:
    """Whether ``torch._fused_adamw_`` can step ``param``: plain dense contiguous tensors, stats in its dtype.

    Never while ``torch.compile`` traces the step: the direct ``torch._fused_adamw_`` call fails in
    functionalization (``BackendCompilerFailed``), and the eager formula compiles to fused kernels anyway.
    """
    return (
        not torch.compiler.is_compiling()
        and type(param) in (Tensor, torch.nn.Parameter)  # not a DTensor or other subclass
        and type(grad) is Tensor
        and param.device.type in ("cpu", "cuda")
        and param.dtype == stat_dtype == grad.dtype
        and param.is_contiguous()
        and grad.is_contiguous()
        and grad.shape == param.shape
    )


def adamw_foreach_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[dict],
    *,
    lr: float | Tensor,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    stat_dtype: Callable[[Tensor], torch.dtype],
    ok: Tensor | None = None,
) -> None:
    """:func:`adamw_step_` for a list of parameters, with the same state keys and the same math.

    Parameters whose weight, gradient and statistics share one dtype (fp32 or fp64 weights) are
    stepped by PyTorch's fused AdamW kernel: it reads and writes each tensor once instead of the ~10
    passes of the eager formula (``docs/performance.md``). Its arithmetic is ``W (1 - lr wd) - (lr / b1) m /
    (sqrt(v) / sqrt(b2) + eps)``, equal to the eager ``m / b1 / (sqrt(v / b2) + eps)`` up to rounding. Other
    parameters (bf16 weights with fp32 statistics, sharded tensors) take :func:`adamw_step_`.

    ``ok`` (a bool vector over ``params``, on the device): step only the parameters where it holds, deciding
    nothing on the host. Without it every parameter steps, one fused call per (device, dtype); with it one
    fused call per parameter, whose ``found_inf`` (the flag ``torch.amp``'s gradient scaler uses) makes the
    kernel leave a skipped parameter and its moments untouched, and its count advances by ``ok``.
    """
    # found_inf of the fused kernel: 1.0 = leave this parameter alone; the count advances by 1 - found_inf
    advance = None if ok is None else ok.to(torch.float32)
    skip = None if advance is None else 1.0 - advance
    buckets: dict[tuple, tuple[list[Tensor], ...]] = {}
    masked: tuple[list[Tensor], ...] = ([], [], [], [], [], [], [])
    for index, (param, grad, state) in enumerate(zip(params, grads, states, strict=True)):
        dtype = stat_dtype(param)
        mask = None if ok is None else ok[index]
        if not _fusable(param, grad, dtype):
            adamw_step_(
                param, grad, state, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, stat_dtype=dtype, ok=mask
            )
            continue
        if "exp_avg" not in state:
            _init_moments(param, state, dtype, torch.contiguous_format)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        if not (exp_avg.is_contiguous() and exp_avg_sq.is_contiguous() and exp_avg.dtype == dtype == exp_avg_sq.dtype):
            adamw_step_(
                param, grad, state, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, stat_dtype=dtype, ok=mask
            )
            continue
        tensors = (param, grad, exp_avg, exp_avg_sq, step_count(state, param))
        if advance is not None and skip is not None:
            for store, tensor in zip(masked, (*tensors, advance[index], skip[index]), strict=True):
                store.append(tensor)
            continue
        bucket = buckets.setdefault((param.device, param.dtype), ([], [], [], [], []))
        for store, tensor in zip(bucket, tensors, strict=True):
            store.append(tensor)
    for ps, gs, ms, vs, steps in buckets.values():
        torch._foreach_add_(steps, 1.0)
        _fused_adamw(ps, gs, ms, vs, steps, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    ps, gs, ms, vs, steps, advances, skips = masked
    if ps:
        torch._foreach_add_(steps, advances)
        for p, g, m, v, step, found_inf in zip(ps, gs, ms, vs, steps, skips, strict=True):
            _fused_adamw(
                [p], [g], [m], [v], [step], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, found_inf=found_inf
            )


def _fused_adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float | Tensor,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    found_inf: Tensor | None = None,
) -> None:
    """``torch._fused_adamw_`` on one device; ``found_inf`` (0-d fp32 on that device): 1.0 leaves them untouched."""
    torch._fused_adamw_(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        [],
        steps,
        lr=lr.to(params[0].device) if isinstance(lr, Tensor) else lr,
        beta1=betas[0],
        beta2=betas[1],
        weight_decay=weight_decay,
        eps=eps,
        amsgrad=False,
        maximize=False,
        found_inf=found_inf,
    )
