"""How the benchmark builds an optimizer of :mod:`whiten.optim.registry` for a model.

Every optimizer sees the same split (:func:`whiten.split_parameters`): hidden matrices get the
named method at its own lr and the weight decay; embeddings, output head, gains and biases get
AdamW with betas ``(0.9, 0.95)``, lr ``embed_lr`` and no decay. For the matrix methods that AdamW
is their built-in one (:func:`whiten.param_groups`); the ``adamw`` baseline is
``torch.optim.AdamW`` with the same two groups. So only the optimizer of the hidden matrices
differs between runs, and the lr being compared (and swept) is that of the hidden matrices.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from whiten.optim.groups import param_groups, split_parameters
from whiten.optim.registry import OptimizerSpec

ADAMW_BETAS = (0.9, 0.95)
_ADAMW_EPS = 1e-8
# constructor options the benchmark sets itself, and how a user sets them instead of --option
SET_BY_BENCH = {
    "lr": "--lr NAME=VALUE",
    "weight_decay": "--weight-decay",
    "adamw_lr": "--embed-lr",
    "adamw_weight_decay": "the bench (0: no decay on embeddings, head, gains and biases)",
    "adamw_betas": "the bench (AdamW betas (0.9, 0.95) for every optimizer)",
}
_SET_BY_BENCH_ADAMW = {
    "lr": "--lr NAME=VALUE",
    "weight_decay": "--weight-decay",
    "betas": "the bench (AdamW betas (0.9, 0.95) for every optimizer)",
}


def check_bench_options(spec: OptimizerSpec, options: Mapping[str, Any]) -> None:
    """``ValueError`` for an ``--option`` the benchmark cannot pass to ``spec`` (see the registry)."""
    spec.check_options(options, SET_BY_BENCH if spec.is_matrix_method else _SET_BY_BENCH_ADAMW)


def build_optimizer(
    spec: OptimizerSpec,
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    embed_lr: float,
    extra_options: Mapping[str, Any] | None = None,
) -> torch.optim.Optimizer:
    """Construct the optimizer for ``model``; ``embed_lr`` is the lr of the AdamW half."""
    options = dict(extra_options or {})
    if not spec.is_matrix_method:
        # the same split as the matrix methods: only the optimizer of the hidden matrices differs
        matrix, rest = split_parameters(model, embeddings_and_head="adamw")
        groups = [
            {"params": [p for _, p in matrix], "lr": lr, "weight_decay": weight_decay},
            {"params": [p for _, p in rest], "lr": embed_lr, "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        return spec.build(groups, lr=lr, betas=ADAMW_BETAS, **{"eps": _ADAMW_EPS, **options})
    groups = param_groups(model, embeddings_and_head="adamw", adamw_options={"lr": embed_lr, "weight_decay": 0.0})
    return spec.build(groups, lr=lr, weight_decay=weight_decay, adamw_betas=ADAMW_BETAS, **options)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Exact bytes of every tensor held in optimizer state (``state_bytes()`` where provided)."""
    method: Callable[[], int] | None = getattr(optimizer, "state_bytes", None)
    if callable(method):
        return int(method())
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, Tensor):
                total += value.numel() * value.element_size()
    return total
