"""Cost model of a matrix step and the assignment of matrices to owner ranks (see ``docs/distributed.md``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from whiten.optim.base import WhitenOptimizer


def matrix_flops(optimizer: WhitenOptimizer, shape: Sequence[int], group: Mapping[str, Any]) -> float:
    """Estimated flops of one matrix step of ``optimizer`` for a matrix of ``shape`` (amortised).

    The optimizer declares it next to its math (``matrix_flops(shape, group)``, a
    :class:`whiten.linalg.FlopCount`); the assignment balances the total of matmuls and estimated LAPACK
    work. Only relative values matter: they drive :func:`assign_owners`.
    """
    return optimizer.matrix_flops(shape, group).total


def assign_owners(costs: Sequence[float], world_size: int) -> list[int]:
    """Greedy longest-processing-time assignment: largest cost first onto the least-loaded rank.

    Ties go to the lower index / lower rank, so every rank computes the same answer. The makespan
    is at most ``4/3`` of the optimum (Graham, 1969).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    loads = [0.0] * world_size
    owners = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-float(costs[i]), i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[index] = rank
        loads[rank] += float(costs[index])
    return owners
