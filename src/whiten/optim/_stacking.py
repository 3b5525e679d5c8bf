"""Per-parameter state stepped as one batch: same-shape matrices of a group stacked for a stage.

The state stays per parameter (``optimizer.state[p]``; the ``state_dict`` format and every checkpoint are
unchanged): a batched step stacks the entries it reads, runs each stage as one batched call, and stores
the results back as views of the new batch, one per parameter. The next step finds those views lying
in order in one batch and takes the batch itself instead of stacking again, so that in the steady state
a stacked step neither stacks nor copies its state (an in-place update of the batch, such as a factor's
EMA, is the update of every parameter's entry). A view keeps its whole batch alive; ``state_dict()``
hands out compact copies (:func:`compact_state`). Which matrices are stacked is decided by
:func:`whiten.linalg.stack_groups` (policy :func:`whiten.linalg.stacking_helps`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor


def _common_batch(tensors: Sequence[Tensor]) -> Tensor | None:
    """The batch whose slices ``0, 1, ...`` are exactly ``tensors`` (views stored by :func:`store`), or ``None``."""
    if torch.compiler.is_compiling():  # views are an eager-mode shortcut; a compiled step stacks
        return None
    batch = tensors[0]._base
    # only a contiguous batch: the one layout a stacked copy has too, so that the products (and their rounding)
    # do not depend on whether this step found its batch or stacked it (a resumed checkpoint stacks it)
    if (
        batch is None
        or not batch.is_contiguous()
        or batch.ndim != tensors[0].ndim + 1
        or batch.shape[0] != len(tensors)
    ):
        return None
    if batch.shape[1:] != tensors[0].shape or batch.stride()[1:] != tensors[0].stride():
        return None
    offset, step = batch.storage_offset(), batch.stride(0)
    for slot, tensor in enumerate(tensors):
        if tensor._base is not batch or tensor.storage_offset() != offset + slot * step:
            return None
    return batch


def stack(tensors: Sequence[Tensor]) -> Tensor:
    """Batch same-shape tensors: the batch they are views of (no copy) when :func:`store` put them there,
    a view for a single one (so that in-place ops reach it), else a stacked copy."""
    if len(tensors) == 1:
        return tensors[0].unsqueeze(0)
    batch = _common_batch(tensors)
    return batch if batch is not None else torch.stack(list(tensors))


def store(states: Sequence[dict[str, Any]], key: str, batched: Tensor) -> None:
    """Store a batched result into the per-parameter state ``states[i][key]``, as views of ``batched``.

    Nothing is copied: an entry that already is the view of ``batched`` (a batch updated in place) stays,
    any other is replaced by its view.
    """
    if len(states) == 1:
        states[0][key] = batched[0]
        return
    current = [state.get(key) for state in states]
    if all(isinstance(t, Tensor) for t in current) and _common_batch(current) is batched:  # type: ignore[arg-type]
        return
    for state, view in zip(states, batched.unbind(0), strict=True):
        state[key] = view


def stack_states(states: Sequence[Mapping[str, Any]], keys: Iterable[str]) -> dict[str, Any]:
    """The entries ``keys`` of ``states`` stacked along a new leading dimension, one tensor per key."""
    return {key: stack([state[key] for state in states]) for key in keys}


def store_states(states: Sequence[dict[str, Any]], stacked: Mapping[str, Any], keys: Iterable[str]) -> None:
    """:func:`store` of every entry ``keys`` of ``stacked``."""
    for key in keys:
        store(states, key, stacked[key])


def compact_state(state: Mapping[Any, Mapping[str, Any]]) -> dict[Any, dict[str, Any]]:
    """``state`` (a ``state_dict()``'s per-parameter entries) with every view of a stacked batch replaced by a
    compact copy, so that saving one parameter's state does not save its whole batch; other values as they are."""
    return {
        key: {
            name: value.clone() if isinstance(value, Tensor) and value._base is not None else value
            for name, value in entry.items()
        }
        for key, entry in state.items()
    }
