"""Scale-out of the whiten optimizers: a cost/communication model and a CPU measurement.

Model (``--model``, no processes): for a GPT-2-small-like set of hidden matrices it computes, for
each optimizer and world size N (1, 2, 8, 64), the optimizer's own communication per rank and
step (bytes received, the volume that bounds its time on any network) and the matrix work per
rank (the busiest rank's estimated flops under the greedy cost-balanced assignment that
``distributed_mode="split"`` uses), for

    ddp/replicate   every rank steps every matrix; the optimizer sends nothing
    ddp/split       owners step their matrices, then send the new values to all: each rank receives
                    all matrices it does not own, P - P_own
    fsdp/replicate  every rank gathers every (param, grad) pair (SOAP): 2 P (N-1)/N; KL-Shampoo and
                    Pro-KLShampoo (momentum sharded, (M, G) travels, not the parameter): the same bytes;
                    Muon/HTMuon (momentum sharded, only the direction U travels): P (N-1)/N
    fsdp/split      shards to the owner, new shards back: receives 2 P_own (N-1)/N + (P - P_own)/N
                    (SOAP's (param, grad), the KL methods' (M, G), O or the new value back);
                    Muon/HTMuon (U shards to the owner, O shards back): P_own (N-1)/N + (P - P_own)/N

(P = bytes of all matrix parameters, P_own = those the rank owns; U, M, G and O are in the
statistics dtype, fp32 here as the parameters. The KL methods' initialisation step moves G alone;
the measurement skips it with the warm-up steps.) For context it also lists the
data-parallel traffic itself (DDP ring all-reduce 2 P (N-1)/N; FSDP all-gather + reduce-scatter
the same). Optimizer state per rank: full copy of every matrix's state (replicate) or the owned
share (split).

Measurement (``--measure``): launches 1 and 2 CPU processes (gloo) with torchrun through
``whiten.bench.launch.launch`` and times optimizer steps of a small MLP under DDP and FSDP2,
replicate and split (median wall time of rank 0 between barriers, and each rank's process CPU
time of the step, which shows the split of the work even on a shared machine), and records the
bytes the optimizer itself moved (``comm_stats``), which must
equal the model's number for that MLP (checked and printed). The machine is shared: timings are
noisy, compare them only within one run.

Usage: ``python benchmarks/dist_scaling.py --model --measure --out results/dist-scaling``
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from whiten.bench import launch as wl
from whiten.optim import distributed as wd
from whiten.optim import registry

# registry names (one spelling across every command) and the options of this benchmark: the lr sets only
# the step size, not the cost or the traffic being measured
OPTIMIZERS: dict[str, dict] = {
    "muon": {"lr": 0.02},
    "htmuon": {"lr": 0.05},
    "soap": {"lr": 3e-3, "precondition_frequency": 10},
    "kl-shampoo": {"lr": 3e-3},
    "pro-kls-r128": {"lr": 3e-3},
}


def build(name: str, params) -> torch.optim.Optimizer:
    """The registry's optimizer ``name`` with this benchmark's options."""
    return registry.get(name).build(params, **OPTIMIZERS[name])


def gpt2_small_matrices(layers: int = 12, d: int = 768) -> list[tuple[int, int]]:
    """Hidden matrices of a GPT-2-small-like model (embeddings and head are on AdamW)."""
    return [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)] * layers


def model_table(shapes: list[tuple[int, int]], worlds: list[int], itemsize: int = 4) -> list[dict]:
    rows = []
    total_bytes = sum(m * n for m, n in shapes) * itemsize
    for name in OPTIMIZERS:
        optimizer = build(name, torch.nn.Linear(2, 2).parameters())
        group = optimizer.param_groups[0]
        costs = [wd.matrix_flops(optimizer, shape, group) for shape in shapes]
        gathered = wd.gathered_tensors(optimizer, group)  # to the map per matrix: U, (M, G), or (param, grad)
        for world in worlds:
            owners = wd.assign_owners(costs, world)
            load = [sum(c for c, o in zip(costs, owners, strict=True) if o == r) for r in range(world)]
            own_bytes = [
                sum(m * n for (m, n), o in zip(shapes, owners, strict=True) if o == r) * itemsize for r in range(world)
            ]
            busiest = max(range(world), key=lambda r: load[r])
            p_own = own_bytes[busiest]
            frac = (world - 1) / world
            rows.append(
                {
                    "optimizer": name,
                    "world": world,
                    "total_gflop": sum(costs) / 1e9,
                    "split_gflop_busiest_rank": load[busiest] / 1e9,
                    "split_speedup_bound": sum(costs) / load[busiest],
                    "bytes_ddp_replicate": 0,
                    "bytes_ddp_split": total_bytes - p_own if world > 1 else 0,
                    "bytes_fsdp_replicate": round(gathered * total_bytes * frac),
                    "bytes_fsdp_split": round(gathered * p_own * frac + (total_bytes - p_own) / world)
                    if world > 1
                    else 0,
                    "bytes_data_parallel": round(2 * total_bytes * frac),
                    "max_owned_fraction": max(own_bytes) / total_bytes,
                }
            )
    return rows


def print_model(rows: list[dict]) -> None:
    mib = 2**20
    print(
        f"{'optimizer':13s} {'N':>3s} {'GF/step':>8s} {'split GF busiest':>16s} {'speedup':>7s} "
        f"{'ddp-split MiB':>13s} {'fsdp-rep MiB':>12s} {'fsdp-split MiB':>14s} {'DP MiB':>7s}"
    )
    for r in rows:
        print(
            f"{r['optimizer']:13s} {r['world']:3d} {r['total_gflop']:8.1f} {r['split_gflop_busiest_rank']:16.2f} "
            f"{r['split_speedup_bound']:7.1f} {r['bytes_ddp_split'] / mib:13.1f} "
            f"{r['bytes_fsdp_replicate'] / mib:12.1f} {r['bytes_fsdp_split'] / mib:14.1f} "
            f"{r['bytes_data_parallel'] / mib:7.1f}"
        )


# -- measurement -----------------------------------------------------------------------------------------
def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    dims = [128, 384, 128, 256, 256, 128]
    layers: list[torch.nn.Module] = []
    for d_in, d_out in itertools.pairwise(dims):
        layers += [torch.nn.Linear(d_in, d_out), torch.nn.GELU()]
    return torch.nn.Sequential(*layers[:-1])


MEASURE_SHAPES = [tuple(p.shape) for p in _mlp().parameters() if p.ndim == 2]


def worker(out: Path, names: list[str], steps: int, warmup: int) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    rank, world, _ = wl.init_distributed(device="cpu", timeout_s=600)
    gen = torch.Generator().manual_seed(rank)
    x, y = torch.randn(64, 128, generator=gen), torch.randn(64, 128, generator=gen)
    kinds = (
        [("single", "replicate")]
        if world == 1
        else [("ddp", "replicate"), ("ddp", "split"), ("fsdp", "replicate"), ("fsdp", "split")]
    )
    results = []
    for name in names:
        for kind, mode in kinds:
            model = _mlp()
            if kind == "ddp":
                model = DistributedDataParallel(model)
            elif kind == "fsdp":
                fully_shard(model)
            optimizer = build(name, model.parameters())
            optimizer.set_distributed_mode(mode)
            times, cpu = [], []
            for step in range(warmup + steps):
                optimizer.zero_grad(set_to_none=True)
                torch.nn.functional.mse_loss(model(x), y).backward()
                if world > 1:
                    torch.distributed.barrier()
                if step == warmup:
                    wd.comm_stats(optimizer).reset()
                start, start_cpu = time.perf_counter(), time.process_time()
                optimizer.step()
                step_cpu = time.process_time() - start_cpu  # this rank's own CPU work (and gloo's threads)
                if world > 1:
                    torch.distributed.barrier()  # the step is done when the slowest rank is
                if step >= warmup:
                    times.append(time.perf_counter() - start)
                    cpu.append(step_cpu)
            stats = wd.comm_stats(optimizer)
            results.append(
                {
                    "optimizer": name,
                    "kind": kind,
                    "mode": mode,
                    "world": world,
                    "rank": rank,
                    "step_ms_median": 1e3 * statistics.median(times),
                    "step_cpu_ms_median": 1e3 * statistics.median(cpu),
                    "bytes_received_per_step": stats.received / steps,
                    "bytes_sent_per_step": stats.sent / steps,
                }
            )
    (out / f"measure-n{world}-rank{rank}.json").write_text(json.dumps(results, indent=1))
    if world > 1:
        torch.distributed.destroy_process_group()


def measure(out: Path, names: list[str], steps: int, warmup: int) -> list[dict]:
    rows = []
    for nproc in (1, 2):
        code = wl.launch(
            nproc,
            [
                os.path.abspath(__file__),
                "--worker",
                "--out",
                str(out),
                "--steps",
                str(steps),
                "--warmup",
                str(warmup),
                "--optimizers",
                *names,
            ],
            module=False,
        )
        if code != 0:
            raise SystemExit(f"measurement with {nproc} processes failed (exit {code})")
        for rank in range(nproc):
            rows += json.loads((out / f"measure-n{nproc}-rank{rank}.json").read_text())
    return rows


def check_and_print_measurement(rows: list[dict]) -> None:
    print(
        f"\n{'optimizer':13s} {'setup':16s} {'N':>2s} {'step ms (rank 0)':>16s} {'CPU ms r0':>9s} {'CPU ms r1':>9s} "
        f"{'recv B/step':>11s} {'model B':>8s}"
    )
    mismatches: list[str] = []
    cpu_of = {(r["optimizer"], r["kind"], r["mode"], r["world"], r["rank"]): r["step_cpu_ms_median"] for r in rows}
    total = sum(m * n for m, n in MEASURE_SHAPES) * 4
    for r in rows:
        if r["rank"] != 0:
            continue
        model_bytes = None
        if r["world"] == 2:
            optimizer = build(r["optimizer"], torch.nn.Linear(2, 2).parameters())
            group = optimizer.param_groups[0]
            owners = wd.assign_owners([wd.matrix_flops(optimizer, s, group) for s in MEASURE_SHAPES], 2)
            own = sum(m * n for (m, n), o in zip(MEASURE_SHAPES, owners, strict=True) if o == 0) * 4
            gathered = wd.gathered_tensors(optimizer, group)  # U (Muon, HTMuon), (M, G) (KL), or (param, grad)
            model_bytes = {
                ("ddp", "replicate"): 0,
                ("ddp", "split"): total - own,
                ("fsdp", "replicate"): gathered * total / 2,
                ("fsdp", "split"): gathered * own / 2 + (total - own) / 2,
            }[(r["kind"], r["mode"])]
            r["model_bytes_received"] = model_bytes
            if r["bytes_received_per_step"] != model_bytes:
                mismatches.append(
                    f"{r['optimizer']} {r['kind']}/{r['mode']}: measured "
                    f"{r['bytes_received_per_step']:.0f} B, model {model_bytes:.0f} B"
                )
        other = cpu_of.get((r["optimizer"], r["kind"], r["mode"], r["world"], 1))
        print(
            f"{r['optimizer']:13s} {r['kind'] + '/' + r['mode']:16s} {r['world']:2d} {r['step_ms_median']:16.2f} "
            f"{r['step_cpu_ms_median']:9.2f} {'' if other is None else f'{other:9.2f}':>9s} "
            f"{r['bytes_received_per_step']:11.0f} {'' if model_bytes is None else f'{model_bytes:8.0f}'}"
        )
    if mismatches:
        raise SystemExit("measured traffic differs from the model:\n" + "\n".join(mismatches))
    print("measured traffic of rank 0 = the model in every setup")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="store_true", help="print the cost/communication model")
    parser.add_argument("--measure", action="store_true", help="time 1 vs 2 CPU processes")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("results/dist-scaling"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.worker:
        worker(args.out, args.optimizers, args.steps, args.warmup)
        return 0
    if not (args.model or args.measure):
        args.model = True
    report: dict = {}
    if args.model:
        rows = model_table(gpt2_small_matrices(), [1, 2, 8, 64])
        print("GPT-2-small hidden matrices (48 matrices, 85M parameters, fp32); optimizer traffic per rank and step")
        print_model(rows)
        report["model"] = rows
    if args.measure:
        rows = measure(args.out, args.optimizers, args.steps, args.warmup)
        check_and_print_measurement(rows)
        report["measured"] = rows
    (args.out / "dist_scaling.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
