"""One rank of the multi-process tests (started by tests/test_distributed.py through ``launch``).

Usage: ``_dist_worker.py OUT_DIR [OPTIMIZER | +OPTIMIZER ...]``. For every optimizer it runs DDP and
FSDP2, each replicated and work-split, DCP save/load at step HALF, and a resume from
``OUT_DIR/ckpt1-NAME`` (saved by one process) where it exists (``+NAME``: the FSDP2 runs only); for
Muon and KLShampoo also FSDP2 with one unit per layer (``fsdp-units``). It records the losses, the
final parameters, which matrices each rank's whole-matrix work (``_matrix_step``, or the map phase of
the phased optimizers) was called on, where the state lives and the optimizer's own traffic, and saves it to
``OUT_DIR/rank<r>.pt`` for the test process to compare with its single-process reference.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _dist_common import (
    HALF,
    STEPS,
    full_params,
    layout_problem,
    make_data,
    make_layout_optimizer,
    make_model,
    make_optimizer,
    train,
)
from whiten.bench.launch import init_distributed, rank_slice
from whiten.optim.base import MapInput
from whiten.optim.distributed import (
    comm_stats,
    elementwise_keys,
    is_phased,
    load_checkpoint,
    owners_of,
    save_checkpoint,
)

UNITS = ("Muon", "KLShampoo")  # optimizers also run with one FSDP unit per layer
TIMEOUT_S = 300  # every collective; a rank mismatch fails instead of hanging the test


def wrap(kind: str) -> torch.nn.Module:
    model = make_model()
    if kind == "ddp":
        return DistributedDataParallel(model)
    if kind == "fsdp-units":  # as users do: each layer its own unit (and device mesh object), then the root
        for layer in (model.a, model.b, model.c):
            fully_shard(layer)
    fully_shard(model)  # "fsdp": one FSDP unit, two collectives per step keep the test fast
    return model


def record_matrix_steps(model: torch.nn.Module, optimizer) -> dict[str, int]:
    """Count, per matrix name, the calls of the whole-matrix work that included that matrix.

    That is ``optimizer._matrix_step``, or for a phased optimizer (Muon, HTMuon, KL-Shampoo,
    Pro-KLShampoo) its map phase ``_map_phase(group, params, inputs)`` (also called by its
    ``_matrix_step``). The full-size proxies of FSDP2 shards are new tensors, so matrices are told
    apart by the shape of the tensors the work gets (the matrix, or the map's inputs: ``U``, or each
    of ``(M, G)``; all distinct in the test model).
    """
    by_shape = {tuple(p.shape): n.removeprefix("module.") for n, p in model.named_parameters() if p.ndim == 2}
    counts = dict.fromkeys(by_shape.values(), 0)
    name = "_map_phase" if is_phased(optimizer) else "_matrix_step"
    inner = getattr(optimizer, name)

    def recorded(group, params, tensors):
        # the tensors the work gets: a shard or any other part of a matrix is recorded as such (and fails the test)
        for item in params if name == "_matrix_step" else tensors:
            keys = set()
            for t in item.tensors() if isinstance(item, MapInput) else (item,):  # KL-Shampoo's (M, G): each whole
                if isinstance(t, DTensor):
                    keys.add(f"a DTensor, not a whole matrix: {tuple(t.shape)}")
                else:
                    keys.add(by_shape.get(tuple(t.shape), f"not a whole matrix: {tuple(t.shape)}"))
            for key in keys:
                counts[key] = counts.get(key, 0) + 1
        return inner(group, params, tensors)

    setattr(optimizer, name, recorded)  # the instance attribute shadows the method
    return counts


def state_layout(model: torch.nn.Module, optimizer) -> dict[str, list[str]]:
    """name -> how each state tensor is held: "shard" (a DTensor of the parameter's local shard shape),
    "full" (a plain tensor of the parameter's full shape) or "other" (any other shape, e.g. factors)."""
    out = {}
    for name, p in model.named_parameters():
        kinds = []
        for value in optimizer.state.get(p, {}).values():
            if not isinstance(value, torch.Tensor) or value.ndim == 0:
                continue
            if isinstance(value, DTensor):
                local = p.to_local() if isinstance(p, DTensor) else p
                kinds.append("shard" if value.to_local().shape == local.shape else "other")
            else:
                kinds.append("full" if value.shape == p.shape else "other")
        out[name.removeprefix("module.")] = kinds
    return out


def ownership(model: torch.nn.Module, optimizer) -> dict[str, tuple[int, bool]]:
    """name -> (assigned owner, whether this rank holds matrix state) for every matrix parameter.

    Matrix state is any entry but a phased optimizer's sharded elementwise state (Muon's momentum as
    a DTensor, its step counter), which every rank holds under FSDP2.
    """
    elementwise = elementwise_keys(optimizer)
    out = {}
    for group in optimizer.param_groups:
        owners = owners_of(optimizer, group)
        for p in group["params"]:
            if group["use_matrix"]:
                name = next(n for n, q in model.named_parameters() if q is p).removeprefix("module.")
                held = any(
                    key not in elementwise or (isinstance(value, torch.Tensor) and not isinstance(value, DTensor))
                    for key, value in optimizer.state.get(p, {}).items()
                )
                out[name] = (owners[id(p)] if owners else -1, held)
    return out


def momentum_numel(model: torch.nn.Module, optimizer) -> dict[str, tuple[int, int]]:
    """matrix name -> (local elements of its momentum buffer on this rank, local elements of the parameter).

    The momentum is the first entry of a phased optimizer's ``elementwise_state`` (Muon's
    ``momentum_buffer``, KL-Shampoo's ``exp_avg``)."""
    key = getattr(optimizer, "elementwise_state", ("momentum_buffer",))[0]
    out = {}
    for name, p in model.named_parameters():
        buf = optimizer.state.get(p, {}).get(key)
        if p.ndim == 2 and buf is not None:
            local = buf.to_local() if isinstance(buf, DTensor) else buf
            out[name.removeprefix("module.")] = (local.numel(), (p.to_local() if isinstance(p, DTensor) else p).numel())
    return out


def nonfinite_on_one_shard(x: torch.Tensor, y: torch.Tensor, rank: int) -> dict:
    """A NaN in rank 1's shard of c.weight only: every rank must skip c.weight (and agree to)."""
    model = wrap("fsdp")
    optimizer = make_optimizer("Muon", model, "split")
    train(model, optimizer, x, y, 1)
    before = full_params(model)
    optimizer.zero_grad(set_to_none=True)
    torch.nn.functional.mse_loss(model(x), y).backward()
    if rank == 1:
        model.c.weight.grad.to_local()[0, 0] = float("nan")
    optimizer.step()
    after = full_params(model)
    return {
        "unchanged": [k for k in before if torch.equal(before[k], after[k])],
        "skips": optimizer.nonfinite_skips(),
    }


def make_kl_layout_optimizer(params: list[torch.Tensor], mode: str = "replicate") -> Any:
    """KL-Shampoo for :func:`other_layouts`: 3 steps are the initialisation step, an update with a refresh, one more."""
    from whiten.optim import KLShampoo

    optimizer = KLShampoo(params, lr=0.01, weight_decay=0.1, precondition_frequency=2)
    optimizer.set_distributed_mode(mode)
    return optimizer


def other_layouts(make: Any = make_layout_optimizer) -> dict:
    """DTensor parameters outside FSDP2's layout: column shards (split and replicate) and replicated
    DTensors (replicate, through full_tensor); 3 steps of ``make``'s optimizer (Muon) on fixed gradients."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    weights, grads = layout_problem()
    out: dict = {}
    cases = [
        ("shard1-split", (Shard(1),), "split"),
        ("shard1-replicate", (Shard(1),), "replicate"),
        ("replicated-replicate", (Replicate(),), "replicate"),
        ("replicated-split", (Replicate(),), "split"),
    ]
    for label, placements, mode in cases:
        params = [torch.nn.Parameter(distribute_tensor(w.clone(), mesh, placements)) for w in weights]
        optimizer = make(params, mode)
        try:
            for step in range(3):
                for p, g in zip(params, grads, strict=True):
                    p.grad = distribute_tensor(g * (step + 1), mesh, placements)
                optimizer.step()
        except ValueError as err:
            out[label] = f"ValueError: {err}"
            continue
        out[label] = [p.detach().full_tensor() for p in params]
    return out


def main() -> None:
    out_dir, names = sys.argv[1], sys.argv[2:]
    torch.set_num_threads(1)
    rank, world, _ = init_distributed(device="cpu", timeout_s=TIMEOUT_S)
    x, y = make_data()
    x, y = rank_slice(x), rank_slice(y)

    def mean(t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t)
        return t / world

    results: dict[str, dict] = {}
    for name in names:
        brief = name.startswith("+")  # "+NAME": only the FSDP2 runs (the most involved path)
        name = name.removeprefix("+")
        kinds = ("fsdp",) if brief else ("ddp", "fsdp", *(("fsdp-units",) if name in UNITS else ()))
        for kind in kinds:
            for mode in ("replicate", "split"):
                model = wrap(kind)
                optimizer = make_optimizer(name, model, mode)
                computed = record_matrix_steps(model, optimizer)
                losses = train(model, optimizer, x, y, STEPS, mean)
                stats = comm_stats(optimizer)
                results[f"{name}/{kind}/{mode}"] = {
                    "losses": losses,
                    "params": full_params(model),
                    "ownership": ownership(model, optimizer),
                    "computed": computed,
                    "state_layout": state_layout(model, optimizer),
                    "momentum_numel": momentum_numel(model, optimizer),
                    "comm_bytes_per_step": (stats.sent + stats.received) / STEPS,
                    "comm_kinds": sorted(stats.by_kind),
                }
            if brief or kind == "fsdp-units":
                continue
            # checkpoint: save at step HALF (split mode), load into a fresh model/optimizer, finish
            model = wrap(kind)
            optimizer = make_optimizer(name, model, "split")
            first = train(model, optimizer, x, y, HALF, mean)
            path = os.path.join(out_dir, f"ckpt-{name}-{kind}")
            save_checkpoint(path, model, optimizer)
            del model, optimizer
            model = wrap(kind)
            optimizer = make_optimizer(name, model, "split")
            load_checkpoint(path, model, optimizer)
            second = train(model, optimizer, x, y, STEPS - HALF, mean)
            results[f"{name}/{kind}/ckpt"] = {"losses": first + second, "params": full_params(model)}
        # a checkpoint the test process saved on 1 process (replicate mode) at step HALF: load it on
        # this world size in split mode, finish the run
        single = os.path.join(out_dir, f"ckpt1-{name}")
        for kind in ("ddp", "fsdp") if os.path.isdir(single) else ():
            model = wrap(kind)
            optimizer = make_optimizer(name, model, "split")
            load_checkpoint(single, model, optimizer)
            losses = train(model, optimizer, x, y, STEPS - HALF, mean)
            results[f"{name}/{kind}/from1"] = {"losses": losses, "params": full_params(model)}
    if "Muon" in names:
        results["nonfinite"] = nonfinite_on_one_shard(x, y, rank)
        results["layouts"] = other_layouts()
        results["layouts-KLShampoo"] = other_layouts(make_kl_layout_optimizer)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
