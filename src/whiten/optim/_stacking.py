"""Per-parameter state stepped as one batch: same-shape matrices of a group stacked for a stage.

The state stays per parameter (``optimizer.state[p]``, the ``state_dict`` format and every checkpoint
unchanged); a batched step stacks the entries it reads once, runs each stage as one batched call and
writes the results back into the parameters' own tensors. Which matrices are stacked is decided by
:func:`whiten.linalg.stack_groups` (policy :func:`whiten.linalg.stacking_helps`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor


def stack(tensors: Sequence[Tensor]) -> Tensor:
    """Batch same-shape tensors; a single one becomes a view (no copy), so in-place ops reach it."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(list(tensors))


def store(states: Sequence[dict[str, Any]], key: str, batched: Tensor) -> None:
    """Write a batched result back into the per-parameter state ``states[i][key]``.

    A single state takes the tensor itself (a view of a fresh or in-place-updated batch: no copy); several
    are copied into their own tensors with one multi-tensor copy, so no state entry aliases a batch.
    """
    if len(states) == 1:
        states[0][key] = batched[0]
        return
    torch._foreach_copy_([state[key] for state in states], list(batched.unbind(0)))


def stack_states(states: Sequence[Mapping[str, Any]], keys: Iterable[str]) -> dict[str, Any]:
    """The entries ``keys`` of ``states`` stacked along a new leading dimension, one tensor per key."""
    return {key: stack([state[key] for state in states]) for key in keys}


def store_states(states: Sequence[dict[str, Any]], stacked: Mapping[str, Any], keys: Iterable[str]) -> None:
    """:func:`store` of every entry ``keys`` of ``stacked``."""
    for key in keys:
        store(states, key, stacked[key])
