"""Run a matrix kernel once per distinct shape instead of once per matrix."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TypeVar, cast

import torch
from torch import Tensor

#: what a batched kernel returns: one tensor, or a tuple of tensors (each with the batch dimension)
Result = TypeVar("Result", Tensor, tuple[Tensor, ...])


#: on CPU, matrices of at most this many entries are stacked (a 256 x 256 or 128 x 512 matrix)
CPU_STACK_MAX_NUMEL = 1 << 16


def stacking_helps(device: torch.device, shape: Sequence[int] | None = None) -> bool:
    """Whether stacking same-shape matrices of ``shape`` into one batched call pays off on ``device``.

    On accelerators one batched call replaces many small kernel launches. On CPU it pays for small
    matrices only, whose steps are bound by the per-call overhead (one dtype conversion and one batched
    product instead of one per matrix: Muon on the tiny preset's 64 x 64 / 64 x 256 matrices 26 -> 10 ms
    per step in bf16, docs/precision.md); for large ones ``bmm`` is slower than ``mm`` and the stacking
    copy comes on top (``docs/performance.md``). The one batching policy: :func:`map_batched` and SOAP's
    buckets use it.
    """
    if device.type != "cpu":
        return True
    return shape is not None and math.prod(shape[-2:]) <= CPU_STACK_MAX_NUMEL


def map_batched(
    fn: Callable[[Tensor], Result],
    matrices: Sequence[Tensor],
    *,
    stack: bool | None = None,
    dtype: torch.dtype | None = None,
) -> list[Result]:
    """Apply ``fn`` (which must accept a leading batch dimension) to every matrix.

    With ``stack=True``, matrices of the same shape, dtype and device are stacked and processed in
    one call, which turns a Python loop of small matmuls into a few batched ones; ``stack=None``
    (default) stacks where :func:`stacking_helps` says so (not on CPU) and ``stack=False`` calls
    ``fn`` once per matrix. ``dtype``: the dtype of the stacked batch, so that a kernel computing
    in a narrower dtype (bf16 Newton–Schulz) gets its input cast during the stacking copy instead
    of in a second pass; unstacked matrices are passed unchanged. Output order follows input. A kernel
    returning a tuple of tensors (a factor and a Gram matrix) gets a tuple per matrix back.
    """
    out: list[Result | None] = [None] * len(matrices)
    buckets: dict[tuple[tuple[int, ...], torch.dtype, torch.device], list[int]] = {}
    for index, mat in enumerate(matrices):
        do_stack = stacking_helps(mat.device, mat.shape) if stack is None else stack
        if not do_stack:
            out[index] = fn(mat)
            continue
        buckets.setdefault((tuple(mat.shape), mat.dtype, mat.device), []).append(index)
    for key, indices in buckets.items():
        batch_shape: tuple[int, ...] = key[0]
        mat_dtype, device = key[1], key[2]
        if len(indices) == 1:
            out[indices[0]] = fn(matrices[indices[0]])
            continue
        batch = torch.empty((len(indices), *batch_shape), dtype=dtype or mat_dtype, device=device)
        for slot, index in enumerate(indices):
            batch[slot].copy_(matrices[index])  # one pass: stack and cast
        result = fn(batch)
        for slot, index in enumerate(indices):
            if isinstance(result, tuple):
                out[index] = cast(Result, tuple(part[slot] for part in result))
            else:
                out[index] = result[slot]
    return out  # type: ignore[return-value]
