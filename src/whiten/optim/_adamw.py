"""The one AdamW kernel, used for every parameter that a matrix method does not handle.

Decoupled weight decay (Loshchilov & Hutter, 2019), as ``torch.optim.AdamW``::

    m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
    W <- W (1 - lr wd) - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
"""

from __future__ import annotations

import torch
from torch import Tensor


def apply_update_(param: Tensor, update: Tensor, lr: float, weight_decay: float, *, decay_first: bool = True) -> None:
    """``W <- W (1 - lr wd) - lr U`` (or ``(W - lr U)(1 - lr wd)`` with ``decay_first=False``).

    ``update`` may be in a wider dtype than ``param`` (fp32 statistics for a bf16 weight): the
    arithmetic then happens in the wide dtype and the result is rounded once.
    """
    if param.dtype == update.dtype:
        if decay_first and weight_decay != 0.0:
            param.mul_(1.0 - lr * weight_decay)
        param.add_(update, alpha=-lr)
        if not decay_first and weight_decay != 0.0:
            param.mul_(1.0 - lr * weight_decay)
        return
    wide = param.to(update.dtype)
    if decay_first and weight_decay != 0.0:
        wide.mul_(1.0 - lr * weight_decay)
    wide.add_(update, alpha=-lr)
    if not decay_first and weight_decay != 0.0:
        wide.mul_(1.0 - lr * weight_decay)
    param.copy_(wide)


def adamw_step_(
    param: Tensor,
    grad: Tensor,
    state: dict,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    stat_dtype: torch.dtype,
) -> None:
    """One AdamW step for ``param``; state keys ``exp_avg``, ``exp_avg_sq``, ``step``."""
    if "exp_avg" not in state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(param, dtype=stat_dtype, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, dtype=stat_dtype, memory_format=torch.preserve_format)
    beta1, beta2 = betas
    state["step"] += 1
    step = state["step"]
    g = grad.to(stat_dtype)
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    exp_avg.lerp_(g, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    bias1 = 1.0 - beta1**step
    bias2 = 1.0 - beta2**step
    denom = (exp_avg_sq / bias2).sqrt_().add_(eps)
    apply_update_(param, (exp_avg / denom).div_(bias1), lr, weight_decay)
