"""Run a matrix kernel once per distinct shape instead of once per matrix."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def map_batched(fn: Callable[[Tensor], Tensor], matrices: Sequence[Tensor]) -> list[Tensor]:
    """Apply ``fn`` (which must accept a leading batch dimension) to every matrix.

    Matrices of the same shape, dtype and device are stacked and processed in one call, which
    turns a Python loop of small matmuls into a few batched ones. Output order follows input.
    """
    buckets: dict[tuple, list[int]] = {}
    for index, mat in enumerate(matrices):
        buckets.setdefault((tuple(mat.shape), mat.dtype, mat.device), []).append(index)
    out: list[Tensor | None] = [None] * len(matrices)
    for indices in buckets.values():
        if len(indices) == 1:
            out[indices[0]] = fn(matrices[indices[0]])
            continue
        result = fn(torch.stack([matrices[i] for i in indices]))
        for slot, index in enumerate(indices):
            out[index] = result[slot]
    return out  # type: ignore[return-value]
