"""Run a matrix kernel once per distinct shape instead of once per matrix."""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
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
    copy comes on top (``docs/performance.md``). The one batching policy: :func:`stack_groups` (and
    through it :func:`map_batched` and KL-Shampoo's and Pro-KLShampoo's stacked stages) and SOAP's
    buckets use it.
    """
    if device.type != "cpu":
        return True
    return shape is not None and math.prod(shape[-2:]) <= CPU_STACK_MAX_NUMEL


def stack_groups(
    tensors: Sequence[Tensor], keys: Sequence[Hashable] | None = None, *, stack: bool | None = None
) -> list[list[int]]:
    """Partition the indices of ``tensors`` into the batches that one batched call per stage serves.

    Matrices (or batches of matrices, ``(b, m, n)``) of the same matrix shape ``(m, n)``, dtype and device
    (and the same ``keys[i]``, when given: whatever else a batch must share, such as a step count or the
    preconditioned sides) form one batch where stacking pays (``stack=None``:
    :func:`stacking_helps`; ``stack=True``: always; ``False``: never); every other tensor is a batch of its
    own. Batches come in the order of their first member, members in input order.
    """
    batches: dict[Hashable, list[int]] = {}
    for index, tensor in enumerate(tensors):
        do_stack = stacking_helps(tensor.device, tensor.shape) if stack is None else stack
        key = (tuple(tensor.shape[-2:]), tensor.dtype, tensor.device, None if keys is None else keys[index])
        batches.setdefault(key if do_stack else ("single", index), []).append(index)
    return list(batches.values())


def map_batched(
    fn: Callable[[Tensor], Result],
    matrices: Sequence[Tensor],
    *,
    stack: bool | None = None,
    dtype: torch.dtype | None = None,
    transposable: bool = False,
) -> list[Result]:
    """Apply ``fn`` (which must accept a leading batch dimension) to every matrix.

    ``matrices``: matrices ``(m, n)`` or batches of them ``(b, m, n)`` (a batch is one entry and gets a
    batch back). With ``stack=True``, entries of the same matrix shape, dtype and device are
    concatenated along the batch dimension and processed in one call, which turns a Python loop of
    small matmuls into a few batched ones; ``stack=None`` (default) stacks where :func:`stacking_helps`
    says so and ``stack=False`` calls ``fn`` once per entry. ``dtype``: the dtype of the stacked batch, so
    that a kernel computing in a narrower dtype (bf16 Newton–Schulz) gets its input cast during the
    stacking copy instead of in a second pass; unstacked entries are passed unchanged. Output order
    follows input. A kernel returning a tuple of tensors (a factor and a Gram matrix) gets a tuple per
    entry back. ``transposable``: ``fn`` commutes with transposition (``fn(X^T) = fn(X)^T``, Newton–Schulz),
    so a tall matrix joins the batch of its transposes (a 256 x 64 matrix with the 64 x 256 ones) and gets
    the transpose of its result back (a view).
    """
    if any(mat.ndim not in (2, 3) for mat in matrices):
        raise ValueError(
            f"map_batched takes matrices or batches of them, got shapes {[tuple(m.shape) for m in matrices]}"
        )
    tall = [transposable and mat.shape[-2] > mat.shape[-1] for mat in matrices]
    if any(tall):
        wide = [mat.mT if flip else mat for mat, flip in zip(matrices, tall, strict=True)]
        results = map_batched(fn, wide, stack=stack, dtype=dtype)
        return [_transposed(r) if flip else r for r, flip in zip(results, tall, strict=True)]
    out: list[Result | None] = [None] * len(matrices)
    for indices in stack_groups(matrices, stack=stack):
        if len(indices) == 1:
            out[indices[0]] = fn(matrices[indices[0]])
            continue
        first: Tensor = matrices[indices[0]]
        # where each entry lies in the batch: a matrix at one index, a batch of b matrices as a slice
        slots = []
        start = 0
        for index in indices:
            size = matrices[index].shape[0] if matrices[index].ndim == 3 else None
            slots.append(slice(start, start + size) if size is not None else start)
            start += 1 if size is None else size
        batch = torch.empty((start, *first.shape[-2:]), dtype=dtype or first.dtype, device=first.device)
        for index, slot in zip(indices, slots, strict=True):
            batch[slot].copy_(matrices[index])  # one pass: stack and cast
        result = fn(batch)
        for index, slot in zip(indices, slots, strict=True):
            out[index] = cast(Result, tuple(t[slot] for t in result)) if isinstance(result, tuple) else result[slot]
    return out  # type: ignore[return-value]


def _transposed(result: Result) -> Result:
    if isinstance(result, tuple):
        return cast(Result, tuple(part.mT for part in result))
    return result.mT


def batched_addmm(C: Tensor, A: Tensor, B: Tensor, *, beta: float = 1.0, alpha: float = 1.0) -> Tensor:
    """``beta C + alpha A @ B`` for matrices or batches of them: ``torch.addmm`` for 2-D operands (the
    per-matrix path, unchanged), ``torch.baddbmm`` for 3-D ones (a stacked batch)."""
    if A.ndim == 2:
        return torch.addmm(C, A, B, beta=beta, alpha=alpha)
    return torch.baddbmm(C, A, B, beta=beta, alpha=alpha)
