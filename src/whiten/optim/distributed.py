"""Scale-out of every ``whiten`` optimizer over ``torch.distributed`` (SPEC §10).

The mechanism is generic: it only needs the contract of :class:`whiten.optim.WhitenOptimizer`
subclasses (``_matrix_step(group, params, grads)`` updates full matrices in place and keeps
per-parameter state in ``self.state[p]``). It is called by ``WhitenOptimizer.step`` for every
matrix group; the AdamW fallback never comes here (it is elementwise, so it runs unchanged on
replicated tensors and on FSDP2 shards, its state being DTensors shaped like the shards).

Two modes, chosen per parameter group by the option ``distributed_mode``:

``"replicate"`` (default)
    DDP: every rank holds the same all-reduced gradient and runs the same step; nothing is
    communicated. FSDP2 (DTensor parameters): each matrix's parameter and gradient are
    all-gathered, every rank runs the step on the full matrix (full-size state on every rank),
    and keeps its own shard of the result.

``"split"`` (opt-in)
    Each matrix is owned by one rank of the process group (DDP) or of the parameter's device
    mesh (FSDP2), chosen by :func:`assign_owners` from the estimated flops of the method for that
    shape (greedy, largest first, onto the least-loaded rank). Only the owner runs the matrix
    step and holds the state of that matrix; the result is sent back:
    DDP: the owner sends the new parameter value to every rank (one ``all_to_all`` per dtype).
    FSDP2: every rank sends its shard of the parameter and of the gradient to the owner (one
    ``all_to_all``), the owner assembles the whole matrix, steps, and sends each rank its shard
    of the new value (a second ``all_to_all``), as Dion and Distributed Shampoo do.

Optimizers that split their matrix step into phases (:func:`is_phased`: Muon, HTMuon, KL-Shampoo,
Pro-KLShampoo) take a leaner FSDP2 path: the momentum stays sharded (a DTensor like the parameter,
updated on each rank's shard), only what the map needs is moved to where it runs (all ranks in
replicate mode, the owner in split mode): the direction ``U`` for Muon/HTMuon, the momentum and
the raw gradient ``(M, G)`` for the KL methods; only the update ``O`` comes back (split), and each
rank applies its shard of ``O`` to its shard of the parameter; the parameter itself does not
travel. For the other methods (SOAP, REKLS, KL-SOAP: first moment in the rotated eigenbasis) the
matrix state (momentum, factors, bases) is full-size on the owner (split) or on every rank
(replicate); the AdamW state is sharded for all.
Checkpoints go through DCP (:func:`save_checkpoint`, :func:`load_checkpoint`): sharded state is
saved shard-wise, every whole-matrix state once, keyed by the parameter's name, so a checkpoint
loads into either mode and any world size.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

try:  # DTensor is part of every torch >= 2.4 build that has torch.distributed
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
except ImportError:  # pragma: no cover - builds without distributed support
    DTensor = None  # type: ignore[assignment,misc]

MODES = ("replicate", "split")


# -- cost model and assignment ----------------------------------------------------------------------
def _eigh_flops(d: int) -> float:
    # symmetric eigendecomposition with vectors: ~9 d^3 (tridiagonalisation + QR iterations)
    return 9.0 * d**3


def _qr_refresh_flops(d: int) -> float:
    # one warm-started orthogonal-iteration step: K Q (2 d^3) then Householder QR (4/3 d^3)
    return 2.0 * d**3 + 4.0 / 3.0 * d**3


def _ns_flops(m: int, n: int, steps: int, method: str = "direct", low_precision: bool = False) -> float:
    """Newton–Schulz cost by how the polynomial is evaluated (``whiten.linalg.newton_schulz``'s ``method``)."""
    a, b = min(m, n), max(m, n)
    if method == "auto":
        method = "gram" if not low_precision and b >= 1.5 * a else "direct"
    if method == "gram":  # P = X X^T, 5 short-side products per step on P, then K X
        return 4.0 * a * a * b + 8.0 * steps * a**3
    if method == "spectral":  # P = X X^T, eigh of P, V diag(q) V^T, then K X
        return 4.0 * a * a * b + _eigh_flops(a) + 2.0 * a**3
    # per iteration on the short side: A = X X^T (2 a^2 b), B = bA + cA^2 (2 a^3), B X (2 a^2 b)
    return steps * (4.0 * a * a * b + 2.0 * a**3)


def _family(optimizer: Any) -> str:
    names = [cls.__name__ for cls in type(optimizer).__mro__]
    for family in ("ProKLShampoo", "KLShampoo", "KLSOAP", "KLFactored", "SOAP", "HTMuon", "Muon"):
        if family in names:
            # KL-SOAP keeps KL-Shampoo's factors and refreshes (Adam in the eigenbasis costs the same rotations)
            return "KLShampoo" if family in ("KLSOAP", "KLFactored") else family
    return names[0]


def matrix_flops(optimizer: Any, shape: Sequence[int], group: Mapping[str, Any]) -> float:
    """Estimated flops of one matrix step of ``optimizer`` for an ``m x n`` matrix (amortised).

    The model counts matmuls (``2 m n k``), eigendecompositions (``9 d^3``) and QR refreshes
    (``2 d^3 + 4/3 d^3``) divided by their refresh interval; elementwise work is ignored. An
    optimizer class may override it by defining ``matrix_flops(shape, group)``. Only relative
    values matter: they drive :func:`assign_owners`.
    """
    custom = getattr(optimizer, "matrix_flops", None)
    if callable(custom):
        return float(custom(shape, group))
    m = int(shape[0])
    n = math.prod(int(s) for s in shape[1:])
    family = _family(optimizer)
    kron = 2.0 * (m * m * n + m * n * n)  # one two-sided product Q_L^T X Q_R, or G G^T plus G^T G
    interval = max(1, int(group.get("precondition_frequency", 1) or 1))
    if family in ("Muon", "HTMuon"):
        ns = _ns_flops(
            m,
            n,
            int(group.get("ns_steps", 5)),
            str(group.get("ns_method", "direct")),
            low_precision=group.get("ns_dtype") == "bfloat16",
        )
        power = float(group.get("power", 0.0) or 0.0)
        if power == 0.0:
            return ns
        a, b = min(m, n), max(m, n)
        kind = group.get("spectral_map", "svd")
        if kind == "svd":
            ht = 4.0 * b * a * a + 22.0 * a**3
        elif kind == "stream":
            ht = 4.0 * m * n * a + 4.0 * b * a * a
        else:  # NS polar factor times k coupled NS square roots of the Gram matrix
            k = max(1, round(math.log(power, 0.5) + 1))
            ht = ns + k * int(group.get("ns_steps", 5)) * 4.0 * a**3
        every = int(group.get("interval", 1))
        return ns * (1.0 - 1.0 / every) + ht / every
    if family == "SOAP":
        eig = _eigh_flops if group.get("use_eigh") else _qr_refresh_flops
        refresh = eig(m) + eig(n)
        # factor statistics (x2 for KL's whitened products), rotate G in, rotate the update out
        stats = 2.0 * kron if group.get("use_kl_shampoo") else kron
        return stats + 2.0 * kron + refresh / interval
    if family == "KLShampoo":
        # whitened factor statistics, G rotated for the eigenvalue EMAs, momentum rotated in and out
        return 2.0 * kron + 3.0 * kron + (_qr_refresh_flops(m) + _qr_refresh_flops(n)) / interval
    if family == "ProKLShampoo":
        r = int(group.get("rank", min(m, n)) or min(m, n))
        a, b = min(m, n), max(m, n)
        left = 2.0 * a * a * b  # products with the full left factor / basis (short side)
        ns = _ns_flops(a, b, int(group.get("ns_steps", 5)), str(group.get("ns_method", "spectral")))
        return 4.0 * left + 8.0 * a * b * r + ns + (_qr_refresh_flops(a) + 4.0 * b * r * r) / interval
    # unknown method: a Kronecker-factored default (statistics, two rotations, QR refresh)
    return 3.0 * kron + (_qr_refresh_flops(m) + _qr_refresh_flops(n)) / interval


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
def is_sharded(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def process_group_of(optimizer: Any, params: Sequence[Tensor]) -> Any:
    """The group that splits the work: the device mesh's group for DTensors, else the optimizer's."""
    meshes = []
    for p in params:  # per-module fully_shard calls build equal but distinct DeviceMesh objects
        if is_sharded(p) and all(p.device_mesh != m for m in meshes):
            meshes.append(p.device_mesh)
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
    placements = p.placements
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
def owners_of(optimizer: Any, group: Mapping[str, Any]) -> dict[int, int] | None:
    """``{id(param): owner rank}`` for a split-mode matrix group, or ``None`` when not splitting.

    The assignment balances estimated flops over all split-mode matrix groups of the optimizer
    together; it depends only on shapes and options, so every rank computes the same one. It is
    cached and recomputed when the parameters or the world size change.
    """
    if group.get("distributed_mode") != "split" or not group.get("use_matrix") or not _initialized():
        return None
    pg = process_group_of(optimizer, group["params"])
    world = dist.get_world_size(pg)
    if world == 1:
        return None
    split_groups = [g for g in optimizer.param_groups if g.get("use_matrix") and g.get("distributed_mode") == "split"]
    key = (world, tuple(id(p) for g in split_groups for p in g["params"]))
    cache = getattr(optimizer, "_owner_cache", None)
    if cache is None or cache[0] != key:
        entries = [(p, g) for g in split_groups for p in g["params"]]
        costs = [matrix_flops(optimizer, tuple(p.shape), g) for p, g in entries]
        owners = assign_owners(costs, world)
        cache = (key, {id(p): r for (p, _), r in zip(entries, owners, strict=True)})
        optimizer._owner_cache = cache
    return cache[1]


def holds_state(optimizer: Any, group: Mapping[str, Any], param: Tensor) -> bool:
    """Whether this rank keeps the matrix state of ``param`` (False for another owner's matrix).

    Under FSDP2 a phased group's elementwise state (:func:`elementwise_keys`) is on every rank anyway.
    """
    owners = owners_of(optimizer, group)
    if owners is None:
        return True
    return owners[id(param)] == dist.get_rank(process_group_of(optimizer, group["params"]))


def finite_flags(grads: Sequence[Tensor]) -> list[bool]:
    """Finite check of every gradient with one reduction; for DTensors the verdict is global."""
    if not grads:
        return []
    local = [g.to_local() if is_sharded(g) else g for g in grads]
    device = local[0].device
    norms = torch.stack(
        [
            torch.linalg.vector_norm(g.detach(), dtype=torch.float64 if g.dtype == torch.float64 else torch.float32).to(
                device, torch.float64
            )
            for g in local
        ]
    )
    sharded = [is_sharded(g) for g in grads]
    if any(sharded):
        # a NaN on one shard must skip the parameter on every rank; a NaN/Inf norm stays non-finite in a sum
        bad = (~torch.isfinite(norms)).to(torch.float64) * torch.tensor(sharded, dtype=torch.float64, device=device)
        meshes: list[Any] = []
        for g in grads:  # equal meshes (one per fully_shard call) need one reduction
            if is_sharded(g) and all(g.device_mesh != m for m in meshes):
                meshes.append(g.device_mesh)
        for mesh in meshes:
            for dim in range(mesh.ndim):
                dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=mesh.get_group(dim))
        return [bool(ok) and not b for ok, b in zip(torch.isfinite(norms).tolist(), bad.tolist(), strict=True)]
    return torch.isfinite(norms).tolist()


# -- the step ------------------------------------------------------------------------------------------
def matrix_step(optimizer: Any, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
    """Run ``optimizer._matrix_step`` on ``params`` in the group's ``distributed_mode``."""
    owners = owners_of(optimizer, group)
    sharded = [i for i, p in enumerate(params) if is_sharded(p)]
    if sharded and is_phased(optimizer, group):
        plain = [i for i, p in enumerate(params) if not is_sharded(p)]
        if plain:  # plain tensors in the group take the ordinary path (each parameter's step is independent)
            matrix_step(optimizer, group, [params[i] for i in plain], [grads[i] for i in plain])
        _phased_sharded_step(optimizer, group, [params[i] for i in sharded], [grads[i] for i in sharded], owners)
        return
    if owners is None:
        if sharded:
            _replicated_sharded_step(optimizer, group, params, grads)
        else:  # single process, or DDP: every rank holds the same gradient and runs the same step
            optimizer._matrix_step(group, params, grads)
        return
    pg = process_group_of(optimizer, group["params"])
    plain = [i for i, p in enumerate(params) if not is_sharded(p)]
    if plain:
        _split_replicated_step(optimizer, group, [params[i] for i in plain], [grads[i] for i in plain], owners, pg)
    if sharded:
        _split_sharded_step(optimizer, group, [params[i] for i in sharded], [grads[i] for i in sharded], owners, pg)


PHASES = ("_direction_phase", "_map_phase", "_apply_phase")


def is_phased(optimizer: Any, group: Mapping[str, Any] | None = None) -> bool:
    """Whether ``optimizer`` (for ``group``; ``None``: for all its groups) runs the three phases of the
    sharded protocol.

    ``_direction_phase(group, params, grads) -> inputs`` (elementwise: runs on shards) returns per
    parameter what the map needs, shaped like the parameter: one tensor (Muon: ``U``) or a tuple of
    tensors of one dtype (KL-Shampoo: ``(M, G)``, or ``(G,)`` on its initialisation step), the same
    structure on every rank; ``_map_phase(group, params, inputs) -> updates`` (on the whole inputs,
    in the same structure; ``params`` only key the state; parameter-shaped updates no wider in dtype
    than the inputs) and ``_apply_phase(group, params, updates)`` (elementwise), with ``_matrix_step``
    = the three in sequence. The state entries named in the class attribute ``elementwise_state``
    belong to the elementwise phases and live on every rank (under FSDP2 as DTensors sharded like the
    parameter); all other state is the map's, whole, on the rank(s) that run it. An optimizer that
    supports the phases for some groups only says so with ``phased_group(group) -> bool`` (KL-SOAP's
    groups take the gather path).
    """
    if not all(callable(getattr(optimizer, name, None)) for name in PHASES):
        return False
    check = getattr(optimizer, "phased_group", None)
    if not callable(check):
        return True
    groups = [group] if group is not None else optimizer.param_groups
    return all(bool(check(g)) for g in groups)


def elementwise_keys(optimizer: Any, group: Mapping[str, Any] | None = None) -> frozenset[str]:
    """State keys a phased optimizer (group) keeps on every rank (empty for the others)."""
    return frozenset(getattr(optimizer, "elementwise_state", ())) if is_phased(optimizer, group) else frozenset()


def gathered_tensors(optimizer: Any, group: Mapping[str, Any] | None = None) -> int:
    """Parameter-sized tensors per matrix that travel to the whole-matrix work under FSDP2 (traffic model).

    Phased: the map's inputs (class attribute ``map_inputs``, default 1: Muon's ``U``; KL-Shampoo's
    ``(M, G)``: 2); the gather path: ``(param, grad)``, 2. One tensor (``O`` or the new value) comes back.
    """
    return int(getattr(optimizer, "map_inputs", 1)) if is_phased(optimizer, group) else 2


def _chunk_layout(params: Sequence[Tensor], me: int, world: int) -> list[tuple[int, list[tuple[int, int]]]]:
    """:func:`_shard_bounds` of every parameter, checked against the local shards' shapes."""
    layout = [_shard_bounds(p, world) for p in params]
    for p, (dim, bounds) in zip(params, layout, strict=True):
        expected = [bounds[me][1] if d == dim else size for d, size in enumerate(p.shape)]
        if list(p.to_local().shape) != expected:
            raise RuntimeError(
                f"local shard of shape {tuple(p.to_local().shape)} of a {tuple(p.shape)} parameter is not the "
                f"torch.chunk layout {tuple(expected)} that distributed_mode='split' assumes; use 'replicate'"
            )
    return layout


def _shard_numel(p: Tensor, layout: tuple[int, list[tuple[int, int]]], rank: int) -> int:
    """Number of elements of rank ``rank``'s shard of ``p``."""
    dim, bounds = layout
    size = p.shape[dim]
    return bounds[rank][1] * (p.numel() // size) if size else 0


def _assemble_whole(
    received: Sequence[Tensor],
    mine: Sequence[int],
    params: Sequence[Tensor],
    layout: Sequence[tuple[int, list[tuple[int, int]]]],
    counts: Mapping[int, int],
) -> dict[int, list[Tensor]]:
    """Whole tensors of the matrices ``mine`` from the flat buffers of an ``all_to_all``.

    ``received[s]`` holds, for each ``i`` in ``mine`` in order, ``counts[i]`` consecutive shards of rank
    ``s`` (shaped like ``params[i]``'s shard on ``s``). Returns, per matrix, the ``counts[i]`` whole tensors.
    """
    pieces: dict[int, list[list[Tensor]]] = {i: [[] for _ in range(counts[i])] for i in mine}
    for s, buffer in enumerate(received):
        offset = 0
        for i in mine:
            dim, bounds = layout[i]
            shape = list(params[i].shape)
            shape[dim] = bounds[s][1]
            k = _shard_numel(params[i], layout[i], s)
            for chunks in pieces[i]:
                chunks.append(buffer[offset : offset + k].view(shape))
                offset += k
    return {i: [torch.cat(chunks, dim=layout[i][0]) for chunks in pieces[i]] for i in mine}


def _counted_all_to_all(
    stats: CommStats, pg: Any, send: list[list[Tensor]], recv: list[int], dtype: torch.dtype, device: Any
) -> list[Tensor]:
    """:func:`_all_to_all`, adding the bytes to and from the other ranks to ``stats``."""
    me = dist.get_rank(pg)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    sent = sum(t.numel() for r, chunk in enumerate(send) if r != me for t in chunk)
    stats.add("all_to_all", sent * itemsize, sum(n for r, n in enumerate(recv) if r != me) * itemsize)
    return _all_to_all(pg, send, recv, dtype, device)


def _as_parts(inputs: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """A phase's per-parameter value as a tuple of tensors (one tensor is a 1-tuple)."""
    return inputs if isinstance(inputs, tuple) else (inputs,)


def _like(inputs: Tensor | tuple[Tensor, ...], parts: Sequence[Tensor]) -> Tensor | tuple[Tensor, ...]:
    """``parts`` in the structure of ``inputs`` (a tensor stays a tensor, a tuple a tuple)."""
    return tuple(parts) if isinstance(inputs, tuple) else parts[0]


def _phased_sharded_step(
    optimizer: Any, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], owners: dict[int, int] | None
) -> None:
    """FSDP2 for a phased optimizer (:func:`is_phased`): the elementwise phases run on the shards.

    Each rank forms the map's inputs on its shard (the momentum is a DTensor sharded like the
    parameter): ``U`` for Muon/HTMuon, ``(M, G)`` for KL-Shampoo; only those travel. Replicate mode:
    every rank receives every other rank's shards of them (one ``all_to_all`` per dtype, the bytes
    of an all-gather), maps all whole matrices, and keeps its own slice of each ``O``. Split mode:
    the shards go to each matrix's owner (one ``all_to_all``), the owner maps them, and each rank
    gets its shard of ``O`` back (a second one). Every rank then applies its shard of ``O`` to its
    shard of the parameter. DTensors outside the FSDP2 layout (replicated, 2-D meshes; replicate
    mode only) gather the inputs with ``full_tensor`` and slice ``O`` locally.
    """
    meshes = [p.device_mesh for p in params]
    if owners is not None:
        pg = process_group_of(optimizer, group["params"])
    elif all(_is_row_sharded(p) and p.device_mesh == meshes[0] for p in params):
        pg = meshes[0].get_group()
    else:
        pg = None
    if pg is not None:  # check the layout before any state changes
        layout = _chunk_layout(params, dist.get_rank(pg), dist.get_world_size(pg))
    inputs = optimizer._direction_phase(group, params, grads)
    parts = [_as_parts(x) for x in inputs]
    for p, ts in zip(params, parts, strict=True):
        if len({t.dtype for t in ts}) != 1:
            raise RuntimeError(
                f"_direction_phase returned tensors of dtypes {[t.dtype for t in ts]} for a {tuple(p.shape)} "
                "parameter; the map's inputs of one parameter must share one dtype"
            )
    stats = comm_stats(optimizer)
    if pg is None:
        whole = []
        for p, x, ts in zip(params, inputs, parts, strict=True):
            full = [t.full_tensor() if is_sharded(t) else t for t in ts]
            world = p.device_mesh.size()
            for t in full:
                nbytes = t.numel() * t.element_size()
                stats.add("all_gather", nbytes // world, nbytes - nbytes // world)
            whole.append(_like(x, full))
        mapped = optimizer._map_phase(group, params, whole)
        # every rank holds the same whole O: slice locally, no communication
        updates = [
            distribute_tensor(O, p.device_mesh, p.placements, src_data_rank=None)
            for p, O in zip(params, mapped, strict=True)
        ]
        optimizer._apply_phase(group, params, updates)
        return
    me, world = dist.get_rank(pg), dist.get_world_size(pg)
    device = params[0].to_local().device
    local: list[Tensor | None] = [None] * len(params)

    def owned_by(i: int, rank: int) -> bool:
        return owners is None or owners[id(params[i])] == rank

    for dtype in sorted({ts[0].dtype for ts in parts}, key=str):
        idx = [i for i, ts in enumerate(parts) if ts[0].dtype == dtype]
        mine = [i for i in idx if owned_by(i, me)]
        # 1. my shard of the map's inputs of every matrix to its owner(s)
        send = [[t.to_local() for i in idx if owned_by(i, rank) for t in parts[i]] for rank in range(world)]
        recv = [sum(len(parts[i]) * _shard_numel(params[i], layout[i], s) for i in mine) for s in range(world)]
        got = _counted_all_to_all(stats, pg, send, recv, dtype, device)
        # 2. assemble the whole inputs on the owner and map them there
        assembled = _assemble_whole(got, mine, params, layout, {i: len(parts[i]) for i in mine})
        whole = [_like(inputs[i], assembled[i]) for i in mine]
        mapped = optimizer._map_phase(group, [params[i] for i in mine], whole) if mine else []
        for O in mapped:
            if torch.promote_types(O.dtype, dtype) != dtype:
                raise RuntimeError(
                    f"_map_phase returned a {O.dtype} update for {dtype} inputs; it must not be"
                    " wider (the update travels in the inputs' dtype)"
                )
        if owners is None:  # replicate: every rank has every whole O, keep my slice
            for i, O in zip(mine, mapped, strict=True):
                local[i] = O.narrow(layout[i][0], *layout[i][1][me])
            continue
        # 3. each rank's shard of O back from the owner
        back = [
            [O.narrow(layout[i][0], *layout[i][1][s]) for i, O in zip(mine, mapped, strict=True)] for s in range(world)
        ]
        recv_back = [sum(_shard_numel(params[i], layout[i], me) for i in idx if owned_by(i, s)) for s in range(world)]
        got = _counted_all_to_all(stats, pg, back, recv_back, dtype, device)
        for s in range(world):
            offset = 0
            for i in idx:
                if owned_by(i, s):
                    shape = params[i].to_local().shape
                    local[i] = got[s][offset : offset + shape.numel()].view(shape)
                    offset += shape.numel()
    updates = []
    for p, u in zip(params, local, strict=True):
        assert u is not None
        updates.append(
            DTensor.from_local(u, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
        )
    optimizer._apply_phase(group, params, updates)


def _replicated_sharded_step(optimizer: Any, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
    """FSDP2, replicate mode: gather each matrix, step on the whole matrix everywhere, keep the shard."""
    meshes = [p.device_mesh for p in params if is_sharded(p)]
    if all(is_sharded(p) and _is_row_sharded(p) and p.device_mesh == meshes[0] for p in params):
        # the FSDP2 layout: one batched exchange for all matrices instead of two collectives each
        _split_sharded_step(optimizer, group, params, grads, None, meshes[0].get_group())
        return
    stats = comm_stats(optimizer)
    full_params, full_grads = [], []
    for p, g in zip(params, grads, strict=True):
        if not is_sharded(p):
            full_params.append(p)
            full_grads.append(g)
            continue
        fp = p.detach().full_tensor()
        fg = g.full_tensor() if is_sharded(g) else g
        world = p.device_mesh.size()
        nbytes = fp.numel() * fp.element_size() + fg.numel() * fg.element_size()
        stats.add("all_gather", nbytes // world, nbytes - nbytes // world)
        full_params.append(fp)
        full_grads.append(fg)
    with _state_moved_to(optimizer.state, params, full_params):
        optimizer._matrix_step(group, full_params, full_grads)
    for p, fp in zip(params, full_params, strict=True):
        if is_sharded(p):
            # every rank holds the same full value: slice locally, no communication
            shard = distribute_tensor(fp, p.device_mesh, p.placements, src_data_rank=None)
            p.to_local().copy_(shard.to_local())


def _split_replicated_step(
    optimizer: Any, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], owners: dict[int, int], pg: Any
) -> None:
    """DDP, split mode: the owner steps its matrices, then sends their new values to every rank.

    One ``all_to_all`` per dtype (each rank sends its own matrices to all others): the bytes of
    ``N`` broadcasts, i.e. of an all-gather, in one collective instead of ``N``.
    """
    me, world = dist.get_rank(pg), dist.get_world_size(pg)
    mine = [i for i, p in enumerate(params) if owners[id(p)] == me]
    if mine:
        optimizer._matrix_step(group, [params[i] for i in mine], [grads[i] for i in mine])
    stats = comm_stats(optimizer)
    for dtype in sorted({p.dtype for p in params}, key=str):
        same = [p for p in params if p.dtype == dtype]
        owned = [p.detach() for p in same if owners[id(p)] == me]
        send = [[] if rank == me else owned for rank in range(world)]
        recv = [0 if rank == me else sum(p.numel() for p in same if owners[id(p)] == rank) for rank in range(world)]
        itemsize = torch.empty(0, dtype=dtype).element_size()
        stats.add("all_to_all", sum(p.numel() for p in owned) * (world - 1) * itemsize, sum(recv) * itemsize)
        got = _all_to_all(pg, send, recv, dtype, same[0].device)
        for rank in range(world):
            offset = 0
            for p in same:
                if rank != me and owners[id(p)] == rank:
                    p.copy_(got[rank][offset : offset + p.numel()].view(p.shape))
                    offset += p.numel()


def _all_to_all(
    pg: Any, send: list[list[Tensor]], recv_numel: list[int], dtype: torch.dtype, device: Any
) -> list[Tensor]:
    """Send ``send[r]`` (flattened, concatenated) to rank ``r``; return the flat buffer from each rank."""
    in_splits = [sum(t.numel() for t in chunk) for chunk in send]
    flat_in = torch.cat([t.reshape(-1).to(dtype) for chunk in send for t in chunk]) if sum(in_splits) else None
    if flat_in is None:
        flat_in = torch.empty(0, dtype=dtype, device=device)
    flat_out = torch.empty(sum(recv_numel), dtype=dtype, device=device)
    dist.all_to_all_single(flat_out, flat_in, recv_numel, in_splits, group=pg)
    return list(torch.split(flat_out, recv_numel))


def _is_row_sharded(p: Tensor) -> bool:
    """A DTensor on a 1-D mesh with one ``Shard`` placement (the FSDP2 layout)."""
    return p.device_mesh.ndim == 1 and len(p.placements) == 1 and isinstance(p.placements[0], Shard)


def _split_sharded_step(
    optimizer: Any,
    group: dict[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    owners: dict[int, int] | None,
    pg: Any,
) -> None:
    """FSDP2: shards to the owner (one all_to_all), whole-matrix step there, shards back (a second one).

    ``owners=None`` is replicate mode: every rank gathers every matrix (the same bytes as an
    all-gather), steps it, and keeps its own shard of the result by a local slice.
    """
    me, world = dist.get_rank(pg), dist.get_world_size(pg)
    stats = comm_stats(optimizer)
    layout = _chunk_layout(params, me, world)
    device = params[0].to_local().device

    def owned_by(i: int, rank: int) -> bool:
        return owners is None or owners[id(params[i])] == rank

    def rows(i: int, rank: int) -> int:
        return _shard_numel(params[i], layout[i], rank)

    def exchange(send: list[list[Tensor]], recv: list[int], dtype: torch.dtype) -> list[Tensor]:
        return _counted_all_to_all(stats, pg, send, recv, dtype, device)

    for dtype in sorted({p.dtype for p in params}, key=str):
        idx = [i for i, p in enumerate(params) if p.dtype == dtype]
        mine = [i for i in idx if owned_by(i, me)]
        # 1. my shard of (param, grad) of every matrix to its owner(s)
        send: list[list[Tensor]] = [[] for _ in range(world)]
        for rank in range(world):
            for i in idx:
                if owned_by(i, rank):
                    send[rank] += [params[i].to_local().detach(), grads[i].to_local()]
        got = exchange(send, [2 * sum(rows(i, s) for i in mine) for s in range(world)], dtype)
        # 2. assemble whole matrices on the owner and step there
        assembled = _assemble_whole(got, mine, params, layout, dict.fromkeys(mine, 2))
        full_params = [assembled[i][0] for i in mine]
        full_grads = [assembled[i][1].to(grads[i].dtype) for i in mine]
        if mine:
            owned = [params[i] for i in mine]
            with _state_moved_to(optimizer.state, owned, full_params):
                optimizer._matrix_step(group, full_params, full_grads)
        if owners is None:  # replicate: every rank has every new value, keep my slice
            for i, fp in zip(mine, full_params, strict=True):
                dim, bounds = layout[i]
                params[i].to_local().copy_(fp.narrow(dim, *bounds[me]))
            continue
        # 3. each rank's shard of the new values back
        back: list[list[Tensor]] = [[] for _ in range(world)]
        for i, fp in zip(mine, full_params, strict=True):
            dim, bounds = layout[i]
            for s in range(world):
                back[s].append(fp.narrow(dim, *bounds[s]))
        recv_back = [sum(rows(i, me) for i in idx if owned_by(i, s)) for s in range(world)]
        got = exchange(back, recv_back, dtype)
        for s in range(world):
            offset = 0
            for i in idx:
                if owned_by(i, s):
                    local = params[i].to_local()
                    local.copy_(got[s][offset : offset + local.numel()].view(local.shape))
                    offset += local.numel()


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
        for saved, group in zip(optim_sd["param_groups"], optimizer.param_groups, strict=True)
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
                device = param.to_local().device if is_sharded(param) else param.device
                value = torch.empty(tuple(md.size), dtype=dtype, device=device)
        else:
            value = 0  # plain Python value (step counter): DCP replaces it with the saved object
        state.setdefault(fqn, {})[key] = value
    optim_sd["state"] = state
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    set_model_state_dict(model, model_sd)
    # the state was loaded for this run's distributed_mode, which WhitenOptimizer.load_state_dict keeps
    # (else a split-mode load of a replicate-mode checkpoint would step every matrix on every rank with
    # state only on the owners)
    with _no_init_step(optimizer):
        # strict=False: in split mode the matrices owned by other ranks have no state here
        set_optimizer_state_dict(model, optimizer, optim_sd, options=StateDictOptions(strict=False))


# -- processes ------------------------------------------------------------------------------------------
def init_distributed(
    backend: str | None = None, device: str | torch.device | None = None, timeout_s: float | None = None
) -> tuple[int, int, torch.device]:
    """Join the process group a launcher (``torchrun`` / :func:`launch`) describes in the environment.

    Returns ``(rank, world_size, device)``. ``device``: ``"cpu"``, ``"cuda"`` (local rank ``i``
    gets ``cuda:i``) or ``None`` (CUDA when available). Backend: ``nccl`` for CUDA, ``gloo`` for
    CPU, unless ``backend`` is given. ``timeout_s`` bounds every collective (torch's default is 30
    minutes), so a mismatch between ranks fails with an error instead of hanging. Without
    ``WORLD_SIZE`` in the environment it returns ``(0, 1, device)`` and starts nothing.
    """
    import datetime

    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda' for init_distributed, got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use device='cpu' (gloo)")
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, torch.device(kind)
    if kind == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ValueError(
                f"local rank {local_rank} has no GPU: this machine has {count} CUDA device(s); start at most "
                f"{count} processes per node (--nproc / --nproc-per-node) or use device='cpu' (gloo)"
            )
        torch.cuda.set_device(local_rank)
        local = torch.device("cuda", local_rank)
    else:
        local = torch.device("cpu")
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {}
        if timeout_s is not None:
            kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend or ("nccl" if kind == "cuda" else "gloo"), **kwargs)
    return dist.get_rank(), dist.get_world_size(), local


def launch_command(nproc: int, argv: Sequence[str], *, module: bool = True) -> list[str]:
    """The ``torchrun`` command line :func:`launch` runs.

    Rendezvous through a c10d store on ``127.0.0.1`` port 0: the launcher binds a free port itself
    and passes it to the workers, so no port has to be chosen in advance (no race with other jobs).
    """
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--nnodes=1",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=127.0.0.1:0",
        "--local-addr=127.0.0.1",
        *(["-m"] if module else []),
        *argv,
    ]


def run_with_timeout(cmd: Sequence[str], env: Mapping[str, str] | None = None, timeout_s: float | None = None) -> int:
    """Run ``cmd`` and return its exit code; past ``timeout_s`` seconds stop it and raise ``TimeoutError``.

    Stopping sends SIGTERM first (torchrun forwards it to its workers, which run in their own
    sessions, and waits for them), then SIGKILL after 60 s. Interrupting the caller stops it too.
    """
    proc = subprocess.Popen(list(cmd), env=None if env is None else dict(env))
    try:
        return proc.wait(timeout=timeout_s)
    except BaseException as err:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if isinstance(err, subprocess.TimeoutExpired):
            raise TimeoutError(f"{' '.join(cmd[:6])} ... did not finish within {timeout_s} s; stopped it") from None
        raise


def launch(
    nproc: int,
    argv: Sequence[str],
    *,
    module: bool = True,
    env: Mapping[str, str] | None = None,
    timeout_s: float | None = None,
) -> int:
    """Run ``python -m <argv...>`` (or a script when ``module=False``) on ``nproc`` local processes.

    Uses ``torch.distributed.run`` (torchrun, see :func:`launch_command`); each process finds
    ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` / ``MASTER_PORT`` in its environment
    (see :func:`init_distributed`). ``OMP_NUM_THREADS`` defaults to 1. Returns the launcher's exit
    code; raises ``TimeoutError`` after ``timeout_s`` seconds (see :func:`run_with_timeout`).
    """
    cmd = launch_command(nproc, argv, module=module)
    full_env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **(env or {})}
    return run_with_timeout(cmd, full_env, timeout_s)


# -- helpers for a training script (e.g. `whiten bench --nproc N`) ---------------------------------
def launched() -> bool:
    """Whether this process was started by torchrun / :func:`launch` (``WORLD_SIZE`` is set)."""
    return "WORLD_SIZE" in os.environ


def without_flag(argv: Sequence[str], flag: str) -> list[str]:
    """``argv`` with ``flag VALUE`` and ``flag=VALUE`` removed (the command a launcher re-runs)."""
    out: list[str] = []
    skip = False
    for item in argv:
        if skip:
            skip = False
        elif item == flag:
            skip = True
        elif not item.startswith(flag + "="):
            out.append(item)
    return out


def relaunch(nproc: int, argv: Sequence[str], flag: str = "--nproc") -> int | None:
    """Run ``python -m <argv without flag>`` on ``nproc`` processes, unless that is already done.

    Returns the launcher's exit code, or ``None`` when the caller should just run (``nproc == 1``,
    or this process is one of the launched ones).
    """
    if nproc < 1:
        raise ValueError(f"{flag} must be >= 1, got {nproc}")
    if nproc == 1 or launched():
        return None
    return launch(nproc, without_flag(argv, flag))


def is_main_process() -> bool:
    """Rank 0, or no process group: the process that writes files and prints."""
    return not _initialized() or dist.get_rank() == 0


def rank_slice(batch: Tensor) -> Tensor:
    """This rank's equal share of a global batch (dim 0), so that the mean loss over ranks equals
    the global mean; the batch size must be divisible by the world size."""
    if not _initialized():
        return batch
    world, rank = dist.get_world_size(), dist.get_rank()
    if batch.shape[0] % world:
        raise ValueError(f"batch size {batch.shape[0]} is not divisible by the {world} processes; change --batch-size")
    per = batch.shape[0] // world
    return batch[rank * per : (rank + 1) * per]
