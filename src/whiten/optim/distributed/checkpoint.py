"""Checkpoints through ``torch.distributed.checkpoint`` (DCP), loadable into either mode and any world size."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch

from whiten.optim.base import local_tensor
from whiten.optim.distributed.ownership import holds_state, is_sharded
from whiten.optim.distributed.steps import elementwise_keys


# -- checkpointing through DCP ----------------------------------------------------------------------
@contextmanager
def _no_init_step(optimizer: Any) -> Iterator[None]:
    """Keep ``get/set_optimizer_state_dict`` from running their zero-gradient "init" step.

    torch's ``_init_optim_state`` calls ``optimizer.step()`` when the optimizer has no state and
    no gradients. In split mode a rank that owns nothing has no state, so it would run a step
    (with collectives) alone and hang; and the step would also advance counters. It does nothing
    when some parameter has a gradient, so one zero gradient is put in place for the call.
    """
    params = [p for g in optimizer.param_groups for p in g["params"]]
    planted = None
    if params and all(p.grad is None for p in params):
        planted = params[0]
        planted.grad = torch.zeros_like(planted)
    try:
        yield
    finally:
        if planted is not None:
            planted.grad = None


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer: Any) -> None:
    """Save model and optimizer with DCP (collective: call on every rank).

    Uses ``get_state_dict``: DTensor entries are saved shard-wise, plain tensors once (DCP
    de-duplicates replicated entries), and each split-mode matrix state only by its owner.
    Plain numbers in the state (step counters) are stored by DCP as pickled bytes.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    with _no_init_step(optimizer):
        model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.fspath(path))


def _matrix_params_needed(optimizer: Any) -> set[int]:
    """ids of the parameters whose state this rank must hold (all but other owners' matrices)."""
    needed = set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not group.get("use_matrix") or holds_state(optimizer, group, p):
                needed.add(id(p))
    return needed


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer: Any) -> None:
    """Load a checkpoint written by :func:`save_checkpoint` (collective: call on every rank).

    The optimizer template is built from the checkpoint's metadata, so every state entry that
    was saved is restored (also entries an optimizer creates only on later steps), for exactly
    the parameters this rank holds state for in its current mode. World size and mode may
    differ from the saving run: matrix states are whole tensors, AdamW states are resharded.
    Every other option of the param groups comes from the checkpoint; ``distributed_mode`` stays
    what this optimizer had (the layout of this run, not a hyperparameter of the saved one).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    path = os.fspath(path)
    model_sd = get_model_state_dict(model)
    with _no_init_step(optimizer):
        optim_sd = get_optimizer_state_dict(model, optimizer)
    metadata = dcp.FileSystemReader(path).read_metadata()
    # parameter names as DCP writes them (wrapper prefixes such as DDP's "module." removed), in group order
    named = {
        fqn: p
        for saved, group in zip(cast(list, optim_sd["param_groups"]), optimizer.param_groups, strict=True)
        for fqn, p in zip(saved["params"], group["params"], strict=True)
    }
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    needed = _matrix_params_needed(optimizer)
    state: dict[str, dict[str, Any]] = {}
    for flat_key, obj_path in metadata.planner_data.items():
        if len(obj_path) != 4 or obj_path[0] != "optim" or obj_path[1] != "state":
            continue
        _, _, fqn, key = obj_path
        param = named.get(fqn)
        if param is None:
            continue
        # a phased group's elementwise state of a sharded matrix (momentum, counter) lives on every rank
        group = group_of[id(param)]
        spread = is_sharded(param) and bool(group.get("use_matrix")) and key in elementwise_keys(optimizer, group)
        if id(param) not in needed and not spread:
            continue
        md = metadata.state_dict_metadata[flat_key]
        if isinstance(md, TensorStorageMetadata):
            dtype = md.properties.dtype
            elementwise_tensor = spread or not group_of[id(param)].get("use_matrix")
            if is_sharded(param) and elementwise_tensor and tuple(md.size) == tuple(param.shape):
                # AdamW state, a phased group's momentum: a DTensor like the param (DCP reshards it)
                value: Any = torch.empty_like(param.detach(), dtype=dtype)
            else:
                device = local_tensor(param).device if is_sharded(param) else param.device
                value = torch.empty(tuple(md.size), dtype=dtype, device=device)
        else:
            value = 0  # plain Python value (step counter): DCP replaces it with the saved object
        state.setdefault(fqn, {})[key] = value
    optim_sd["state"] = cast(Any, state)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    set_model_state_dict(model, model_sd)
    # the state was loaded for this run's distributed_mode, which WhitenOptimizer.load_state_dict keeps
    # (else a split-mode load of a replicate-mode checkpoint would step every matrix on every rank with
    # state only on the owners)
    with _no_init_step(optimizer):
        # strict=False: in split mode the matrices owned by other ranks have no state here
        set_optimizer_state_dict(model, optimizer, optim_sd, options=StateDictOptions(strict=False))
