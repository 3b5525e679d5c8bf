"""Routing of a user's parameter group into the groups a ``whiten`` optimizer steps.

A group with ``use_matrix=True`` gets the matrix method, ``use_matrix=False`` the built-in AdamW; a
group left at ``use_matrix=None`` is split by dimension (``ndim >= 2`` -> matrix), its AdamW half taking
``lr=adamw_lr``, ``weight_decay=adamw_weight_decay`` and ``betas=adamw_betas`` (under ``betas``, the key
``OneCycleLR`` / ``CyclicLR`` cycle), so that LR schedulers scale both halves alike.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import torch
from torch import Tensor

from whiten.optim import _interop
from whiten.optim._transaction import param_label


def route_group(
    param_group: dict[str, Any], defaults: Mapping[str, Any], known: Collection[str], owner: str
) -> list[dict[str, Any]]:
    """The groups ``param_group`` becomes (one, or two for a mixed ``use_matrix=None`` group).

    Checks the parameters (an ordered collection of floating, dense, real tensors, or ``(name, tensor)``
    pairs) and names them in errors when names are given; ``owner`` is the optimizer's class name.
    """
    routed: list[dict[str, Any]] = []
    param_group = _interop.translate_keller_group(param_group)
    _interop.warn_unknown_keys(param_group, known, owner)
    params = param_group["params"]
    if isinstance(params, set):
        raise TypeError("optimizer params must be an ordered collection (a list), not a set")
    params = [params] if isinstance(params, Tensor) else list(params)
    names: list[str] | None = None
    if param_group.get("param_names") is not None:  # whiten.param_groups(model) names its groups' tensors
        names = [str(name) for name in param_group["param_names"]]
        if len(names) != len(params):
            raise ValueError(f"param_names has {len(names)} names for {len(params)} parameters")
    if any(isinstance(p, tuple) for p in params):
        if not all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[1], Tensor) for p in params):
            raise TypeError(
                "optimizer params must be all tensors or all (name, tensor) pairs as model.named_parameters() gives"
            )
        names = [str(name) for name, _ in params]
        params = [p for _, p in params]
        param_group = {**param_group, "param_names": names}
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"optimizer params must be Tensors, got {type(p).__name__}")
        label = param_label(p, names[i] if names is not None else None)
        if p.is_sparse or p.layout != torch.strided:
            raise ValueError(
                f"{owner} does not support sparse parameters ({label}); "
                "use torch.optim.SparseAdam for sparse embeddings"
            )
        if p.is_complex():
            raise ValueError(
                f"{owner} does not support complex parameters ({label}); "
                "pass torch.view_as_real(p) as a real parameter instead"
            )
        if not p.is_floating_point():
            raise ValueError(f"parameters must be floating point, got {p.dtype} ({label})")
    merged = {**defaults, **param_group}
    use_matrix = merged["use_matrix"]
    if use_matrix is None:
        is_matrix = [p.ndim >= 2 for p in params]
        matrices = [p for p, ok in zip(params, is_matrix, strict=True) if ok]
        others = [p for p, ok in zip(params, is_matrix, strict=True) if not ok]

        def named(flag: bool) -> dict[str, Any]:
            if names is None:
                return {}
            return {"param_names": [n for n, ok in zip(names, is_matrix, strict=True) if ok == flag]}

        if matrices:
            routed.append({**param_group, "params": matrices, "use_matrix": True, **named(True)})
        if others:
            # a tensor lr is copied: a scheduler updates each group's lr in place
            adamw_lr = merged["adamw_lr"] if merged["adamw_lr"] is not None else _interop.tensor_lr_copy(merged["lr"])
            routed.append(
                {
                    **param_group,
                    **named(False),
                    "params": others,
                    "use_matrix": False,
                    "lr": adamw_lr,
                    "weight_decay": merged["adamw_weight_decay"],
                    "betas": tuple(merged["adamw_betas"]),
                }
            )
        if not params:
            routed.append({**param_group, "params": [], "use_matrix": True})
        return routed
    if not use_matrix:
        # an explicit AdamW group takes the AdamW options unless it sets lr / weight_decay / betas itself;
        # its betas live under "betas" (what OneCycleLR / CyclicLR cycle), like torch.optim.AdamW's
        param_group = {
            "lr": merged["adamw_lr"] if merged["adamw_lr"] is not None else merged["lr"],
            "weight_decay": merged["adamw_weight_decay"],
            "betas": tuple(merged["adamw_betas"]),
            **param_group,
        }
    else:
        for i, p in enumerate(params):
            if p.ndim < 2:
                raise ValueError(
                    f"use_matrix=True needs parameters with >= 2 dims, got "
                    f"{param_label(p, names[i] if names is not None else None)}; "
                    "put vectors and scalars in a group with use_matrix=False (AdamW) or leave use_matrix=None"
                )
    routed.append({**param_group, "params": params})
    return routed
