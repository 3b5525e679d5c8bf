"""Who holds which matrix: modes, process groups, shard layouts, owners, traffic accounting, finiteness."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor

try:  # DTensor is part of every torch >= 2.4 build that has torch.distributed
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.placement_types import Placement
except ImportError:  # pragma: no cover - builds without distributed support
    DTensor = Shard = None  # type: ignore[assignment,misc]

from whiten.optim.base import is_sharded, local_finite
from whiten.optim.distributed.cost import assign_owners, matrix_flops


# -- communication accounting ----------------------------------------------------------------------
@dataclass
class CommStats:
    """Bytes this rank sent and received in the optimizer's own collectives (not DDP/FSDP's)."""

    sent: int = 0
    received: int = 0
    calls: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, sent: int, received: int) -> None:
        self.sent += sent
        self.received += received
        self.calls += 1
        self.by_kind[kind] = self.by_kind.get(kind, 0) + sent + received

    def reset(self) -> None:
        self.sent = self.received = self.calls = 0
        self.by_kind.clear()


def comm_stats(optimizer: Any) -> CommStats:
    """The optimizer's :class:`CommStats` (created on first use)."""
    stats = getattr(optimizer, "_comm_stats", None)
    if stats is None:
        stats = CommStats()
        optimizer._comm_stats = stats
    return stats


# -- helpers on parameters -----------------------------------------------------------------------
def mesh_of(t: Tensor) -> DeviceMesh:
    """The device mesh of a DTensor."""
    return cast(DTensor, t).device_mesh


def placements_of(t: Tensor) -> tuple[Placement, ...]:
    """The placements of a DTensor."""
    return tuple(cast(DTensor, t).placements)


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor of a DTensor, gathered from every rank (collective)."""
    return cast(DTensor, t).full_tensor()


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def process_group_of(optimizer: Any, params: Sequence[Tensor]) -> Any:
    """The group that splits the work: the device mesh's group for DTensors, else the optimizer's."""
    meshes: list[DeviceMesh] = []
    for p in params:  # per-module fully_shard calls build equal but distinct DeviceMesh objects
        if is_sharded(p) and all(mesh_of(p) != m for m in meshes):
            meshes.append(mesh_of(p))
    if len(meshes) > 1:
        raise ValueError("distributed_mode='split' needs all sharded parameters of a group on one device mesh")
    if meshes:
        mesh = meshes[0]
        if mesh.ndim != 1:
            raise ValueError(
                f"distributed_mode='split' supports 1-D device meshes (FSDP2), got a {mesh.ndim}-D mesh; "
                "use distributed_mode='replicate' for HSDP / 2-D meshes"
            )
        return mesh.get_group()
    return getattr(optimizer, "process_group", None) or dist.group.WORLD


def _shard_bounds(p: Tensor, world: int) -> tuple[int, list[tuple[int, int]]]:
    """``(dim, [(start, length) per rank])`` of a ``Shard(dim)`` DTensor (``torch.chunk`` layout)."""
    placements = placements_of(p)
    if len(placements) != 1 or not isinstance(placements[0], Shard):
        raise ValueError(
            f"distributed_mode='split' needs parameters sharded as (Shard(dim),) (FSDP2), got {placements}; "
            "use distributed_mode='replicate'"
        )
    dim = placements[0].dim
    size = p.shape[dim]
    chunk = -(-size // world) if size else 0
    bounds = []
    for r in range(world):
        start = min(r * chunk, size)
        bounds.append((start, min(chunk, size - start)))
    return dim, bounds


@contextmanager
def _state_moved_to(state: dict, params: Sequence[Tensor], proxies: Sequence[Tensor]) -> Iterator[None]:
    """Key each parameter's optimizer state by its full-size proxy for the duration of the block."""
    for p, q in zip(params, proxies, strict=True):
        if p in state:
            state[q] = state.pop(p)
    try:
        yield
    finally:
        for p, q in zip(params, proxies, strict=True):
            if q in state:
                state[p] = state.pop(q)


# -- ownership ---------------------------------------------------------------------------------------
def _is_split(group: Mapping[str, Any]) -> bool:
    return group.get("distributed_mode") == "split" and bool(group.get("use_matrix"))


@dataclass
class OwnerCache:
    """The owner assignment and what it was computed from: the world size, each split-mode group (the
    group dict and its ``params`` list, by identity) and every parameter with its shape at the time."""

    world: int
    groups: list[tuple[Mapping[str, Any], list[Tensor]]]
    params: list[tuple[Tensor, torch.Size]]
    owners: dict[int, int]

    def holds(self, optimizer: Any, world: int) -> bool:
        """Whether the assignment still applies: no allocation, identity and shape comparisons only."""
        if world != self.world:
            return False
        groups = iter(self.groups)
        for g in optimizer.param_groups:
            if _is_split(g):
                held_group = next(groups, None)
                if held_group is None or held_group[0] is not g or held_group[1] is not g["params"]:
                    return False
        if next(groups, None) is not None:
            return False
        params = iter(self.params)
        for _, plist in self.groups:
            for p in plist:
                held = next(params, None)
                if held is None or held[0] is not p or held[1] != p.shape:
                    return False
        return next(params, None) is None


def owners_of(optimizer: Any, group: Mapping[str, Any]) -> dict[int, int] | None:
    """``{id(param): owner rank}`` for a split-mode matrix group, or ``None`` when not splitting.

    The assignment balances estimated flops over all split-mode matrix groups of the optimizer
    together; it depends only on shapes and options, so every rank computes the same one. It is
    cached (:class:`OwnerCache`) and recomputed when the world size, the split-mode groups, their
    parameters or a parameter's shape change (a changed option of a group, which changes a cost but
    not what is split, keeps the assignment until then).
    """
    if not _is_split(group) or not _initialized():
        return None
    pg = process_group_of(optimizer, group["params"])
    world = dist.get_world_size(pg)
    if world == 1:
        return None
    cache: OwnerCache | None = getattr(optimizer, "_owner_cache", None)
    if cache is None or not cache.holds(optimizer, world):
        split_groups = [g for g in optimizer.param_groups if _is_split(g)]
        entries = [(p, g) for g in split_groups for p in g["params"]]
        costs = [matrix_flops(optimizer, tuple(p.shape), g) for p, g in entries]
        owners = assign_owners(costs, world)
        cache = OwnerCache(
            world,
            [(g, g["params"]) for g in split_groups],
            [(p, p.shape) for p, _ in entries],
            {id(p): r for (p, _), r in zip(entries, owners, strict=True)},
        )
        optimizer._owner_cache = cache
    return cache.owners


def holds_state(optimizer: Any, group: Mapping[str, Any], param: Tensor) -> bool:
    """Whether this rank keeps the matrix state of ``param`` (False for another owner's matrix).

    Under FSDP2 a phased group's elementwise state (:func:`elementwise_keys`) is on every rank anyway.
    """
    owners = owners_of(optimizer, group)
    if owners is None:
        return True
    return owners[id(param)] == dist.get_rank(process_group_of(optimizer, group["params"]))


def finite_flags(grads: Sequence[Tensor]) -> list[bool]:
    """Finite check of every gradient (``isfinite``, no norm) with one reduction; for DTensors the verdict is global."""
    if not grads:
        return []
    finite = local_finite(grads)
    device = finite.device
    sharded = [is_sharded(g) for g in grads]
    if any(sharded):
        # a NaN on one shard must skip the parameter on every rank
        bad = (~finite).to(torch.float64) * torch.tensor(sharded, dtype=torch.float64, device=device)
        meshes: list[Any] = []
        for g in grads:  # equal meshes (one per fully_shard call) need one reduction
            if is_sharded(g) and all(mesh_of(g) != m for m in meshes):
                meshes.append(mesh_of(g))
        for mesh in meshes:
            for dim in range(mesh.ndim):
                dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=mesh.get_group(dim))
        return [bool(ok) and not b for ok, b in zip(finite.tolist(), bad.tolist(), strict=True)]
    return finite.tolist()
