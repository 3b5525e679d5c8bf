"""The step paths of a matrix group under ``torch.distributed`` (DDP and FSDP2, replicate and split)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

try:  # DTensor is part of every torch >= 2.4 build that has torch.distributed
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
except ImportError:  # pragma: no cover - builds without distributed support
    DTensor = None  # type: ignore[assignment,misc]

from whiten.optim.base import PhasedOptimizer, WhitenOptimizer, local_tensor
from whiten.optim.distributed.ownership import (
    CommStats,
    _shard_bounds,
    _state_moved_to,
    comm_stats,
    full_tensor,
    is_sharded,
    mesh_of,
    owners_of,
    placements_of,
    process_group_of,
)


# -- the step ------------------------------------------------------------------------------------------
def matrix_step(optimizer: WhitenOptimizer, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
    """Run ``optimizer._matrix_step`` on ``params`` in the group's ``distributed_mode``."""
    owners = owners_of(optimizer, group)
    sharded = [i for i, p in enumerate(params) if is_sharded(p)]
    if sharded and isinstance(optimizer, PhasedOptimizer) and is_phased(optimizer, group):
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


def is_phased(optimizer: WhitenOptimizer, group: Mapping[str, Any] | None = None) -> bool:
    """Whether ``optimizer`` (for ``group``; ``None``: for all its groups) runs the three phases of
    :class:`whiten.optim.base.PhasedOptimizer` (and so keeps its elementwise state sharded under FSDP2).

    The protocol is the class: an optimizer that is not a ``PhasedOptimizer`` takes the gather path;
    one that is but lacks a phase cannot be instantiated. ``phased_group`` opts groups out (KL-SOAP's).
    """
    if not isinstance(optimizer, PhasedOptimizer):
        return False
    groups = [group] if group is not None else optimizer.param_groups
    return all(optimizer.phased_group(g) for g in groups)


def elementwise_keys(optimizer: WhitenOptimizer, group: Mapping[str, Any] | None = None) -> frozenset[str]:
    """State keys a phased optimizer (group) keeps on every rank (empty for the others)."""
    if isinstance(optimizer, PhasedOptimizer) and is_phased(optimizer, group):
        return frozenset(optimizer.elementwise_state)
    return frozenset()


def gathered_tensors(optimizer: WhitenOptimizer, group: Mapping[str, Any] | None = None) -> int:
    """Parameter-sized tensors per matrix that travel to the whole-matrix work under FSDP2 (traffic model).

    Phased: the map's inputs (``PhasedOptimizer.map_inputs``: Muon's ``U``, 1; KL-Shampoo's ``(M, G)``, 2);
    the gather path: ``(param, grad)``, 2. One tensor (``O`` or the new value) comes back.
    """
    if isinstance(optimizer, PhasedOptimizer) and is_phased(optimizer, group):
        return optimizer.map_inputs
    return 2


def _chunk_layout(params: Sequence[Tensor], me: int, world: int) -> list[tuple[int, list[tuple[int, int]]]]:
    """:func:`_shard_bounds` of every parameter, checked against the local shards' shapes."""
    layout = [_shard_bounds(p, world) for p in params]
    for p, (dim, bounds) in zip(params, layout, strict=True):
        expected = [bounds[me][1] if d == dim else size for d, size in enumerate(p.shape)]
        if list(local_tensor(p).shape) != expected:
            raise RuntimeError(
                f"local shard of shape {tuple(local_tensor(p).shape)} of a {tuple(p.shape)} parameter is not the "
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


def _phased_sharded_step(
    optimizer: PhasedOptimizer,
    group: dict[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    owners: dict[int, int] | None,
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
    meshes = [mesh_of(p) for p in params]
    if owners is not None:
        pg = process_group_of(optimizer, group["params"])
    elif all(_is_row_sharded(p) and mesh_of(p) == meshes[0] for p in params):
        pg = meshes[0].get_group()
    else:
        pg = None
    if pg is not None:  # check the layout before any state changes
        layout = _chunk_layout(params, dist.get_rank(pg), dist.get_world_size(pg))
    inputs = optimizer._direction_phase(group, params, grads)
    parts = [x.tensors() for x in inputs]
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
            full = [full_tensor(t) if is_sharded(t) else t for t in ts]
            world = mesh_of(p).size()
            for t in full:
                nbytes = t.numel() * t.element_size()
                stats.add("all_gather", nbytes // world, nbytes - nbytes // world)
            whole.append(x.with_tensors(full))
        mapped = optimizer._map_phase(group, params, whole)
        # every rank holds the same whole O: slice locally, no communication
        updates: list[Tensor] = [
            distribute_tensor(O, mesh_of(p), placements_of(p), src_data_rank=None)
            for p, O in zip(params, mapped, strict=True)
        ]
        optimizer._apply_phase(group, params, updates)
        return
    me, world = dist.get_rank(pg), dist.get_world_size(pg)
    device = local_tensor(params[0]).device
    local: list[Tensor | None] = [None] * len(params)

    def owned_by(i: int, rank: int) -> bool:
        return owners is None or owners[id(params[i])] == rank

    for dtype in sorted({ts[0].dtype for ts in parts}, key=str):
        idx = [i for i, ts in enumerate(parts) if ts[0].dtype == dtype]
        mine = [i for i in idx if owned_by(i, me)]
        # 1. my shard of the map's inputs of every matrix to its owner(s)
        send = [[local_tensor(t) for i in idx if owned_by(i, rank) for t in parts[i]] for rank in range(world)]
        recv = [sum(len(parts[i]) * _shard_numel(params[i], layout[i], s) for i in mine) for s in range(world)]
        got = _counted_all_to_all(stats, pg, send, recv, dtype, device)
        # 2. assemble the whole inputs on the owner and map them there
        assembled = _assemble_whole(got, mine, params, layout, {i: len(parts[i]) for i in mine})
        whole = [inputs[i].with_tensors(assembled[i]) for i in mine]
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
                    shape = local_tensor(params[i]).shape
                    local[i] = got[s][offset : offset + shape.numel()].view(shape)
                    offset += shape.numel()
    updates = []
    for p, u in zip(params, local, strict=True):
        assert u is not None
        updates.append(
            DTensor.from_local(u, mesh_of(p), placements_of(p), run_check=False, shape=p.shape, stride=p.stride())
        )
    optimizer._apply_phase(group, params, updates)


def _replicated_sharded_step(
    optimizer: WhitenOptimizer, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]
) -> None:
    """FSDP2, replicate mode: gather each matrix, step on the whole matrix everywhere, keep the shard."""
    meshes = [mesh_of(p) for p in params if is_sharded(p)]
    if all(is_sharded(p) and _is_row_sharded(p) and mesh_of(p) == meshes[0] for p in params):
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
        fp = full_tensor(p.detach())
        fg = full_tensor(g) if is_sharded(g) else g
        world = mesh_of(p).size()
        nbytes = fp.numel() * fp.element_size() + fg.numel() * fg.element_size()
        stats.add("all_gather", nbytes // world, nbytes - nbytes // world)
        full_params.append(fp)
        full_grads.append(fg)
    with _state_moved_to(optimizer.state, params, full_params):
        optimizer._matrix_step(group, full_params, full_grads)
    for p, fp in zip(params, full_params, strict=True):
        if is_sharded(p):
            # every rank holds the same full value: slice locally, no communication
            shard = distribute_tensor(fp, mesh_of(p), placements_of(p), src_data_rank=None)
            local_tensor(p).copy_(local_tensor(shard))


def _split_replicated_step(
    optimizer: WhitenOptimizer,
    group: dict[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    owners: dict[int, int],
    pg: Any,
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
    return mesh_of(p).ndim == 1 and len(placements_of(p)) == 1 and isinstance(placements_of(p)[0], Shard)


def _split_sharded_step(
    optimizer: WhitenOptimizer,
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
    device = local_tensor(params[0]).device

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
                    send[rank] += [local_tensor(params[i]).detach(), local_tensor(grads[i])]
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
                local_tensor(params[i]).copy_(fp.narrow(dim, *bounds[me]))
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
                    local = local_tensor(params[i])
                    local.copy_(got[s][offset : offset + local.numel()].view(local.shape))
                    offset += local.numel()
