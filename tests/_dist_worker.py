"""One rank of the multi-process tests (started by tests/test_distributed.py through ``launch``).

Usage: ``_dist_worker.py OUT_DIR [OPTIMIZER | +OPTIMIZER ...]``. For every optimizer it runs DDP and
FSDP2, each replicated and work-split, and DCP save/load at step HALF (``+NAME``: FSDP2 split only),
and saves what it saw to ``OUT_DIR/rank<r>.pt`` for the test process to compare with its
single-process reference.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
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
from whiten.optim.distributed import (
    comm_stats,
    init_distributed,
    load_checkpoint,
    owners_of,
    rank_slice,
    save_checkpoint,
)


def wrap(kind: str) -> torch.nn.Module:
    model = make_model()
    if kind == "ddp":
        return DistributedDataParallel(model)
    fully_shard(model)  # one FSDP unit: two collectives per step keep the test fast
    return model


def ownership(model: torch.nn.Module, optimizer) -> dict[str, tuple[int, bool]]:
    """name -> (assigned owner, whether this rank holds state) for every matrix parameter."""
    out = {}
    for group in optimizer.param_groups:
        owners = owners_of(optimizer, group)
        for p in group["params"]:
            if group["use_matrix"]:
                name = next(n for n, q in model.named_parameters() if q is p).removeprefix("module.")
                out[name] = (owners[id(p)] if owners else -1, bool(optimizer.state.get(p)))
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


def other_layouts() -> dict:
    """DTensor parameters outside FSDP2's layout: column shards (split and replicate) and replicated
    DTensors (replicate, through full_tensor); 3 Muon steps on fixed gradients."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    weights, grads = layout_problem()
    out: dict = {}
    cases = [("shard1-split", (Shard(1),), "split"), ("shard1-replicate", (Shard(1),), "replicate"),
             ("replicated-replicate", (Replicate(),), "replicate"), ("replicated-split", (Replicate(),), "split")]
    for label, placements, mode in cases:
        params = [torch.nn.Parameter(distribute_tensor(w.clone(), mesh, placements)) for w in weights]
        optimizer = make_layout_optimizer(params, mode)
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
    rank, world, _ = init_distributed()
    x, y = make_data()
    x, y = rank_slice(x), rank_slice(y)

    def mean(t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t)
        return t / world

    results: dict[str, dict] = {}
    for name in names:
        brief = name.startswith("+")  # "+NAME": only the FSDP2 split run (the most involved path)
        name = name.removeprefix("+")
        for kind in ("fsdp",) if brief else ("ddp", "fsdp"):
            for mode in ("split",) if brief else ("replicate", "split"):
                model = wrap(kind)
                optimizer = make_optimizer(name, model, mode)
                losses = train(model, optimizer, x, y, STEPS, mean)
                results[f"{name}/{kind}/{mode}"] = {
                    "losses": losses,
                    "params": full_params(model),
                    "ownership": ownership(model, optimizer),
                    "comm_bytes_per_step": (comm_stats(optimizer).sent + comm_stats(optimizer).received) / STEPS,
                }
            if brief:
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
    if "Muon" in names:
        results["nonfinite"] = nonfinite_on_one_shard(x, y, rank)
        results["layouts"] = other_layouts()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
