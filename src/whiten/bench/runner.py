"""Training runs of the benchmark: one run per (optimizer, lr, seed), checkpointed and resumable.

What is timed: each training step from fetching its batch to the end of ``optimizer.step()``
(split into forward+backward and optimizer step), with a device synchronisation at each
boundary on CUDA. Beside wall-clock the runner sums the process CPU time of the same steps
(``time.process_time``): on a shared CPU it is far less disturbed by other jobs than wall-clock,
so time-to-target is reported in both. Evaluation, logging, checkpoints and diagnostics recording are outside the
clock; the wall-clock of a run is the sum of its step times, so it survives interruption and
resumption.

Schedule (the same shape for every optimizer; each optimizer scales it by its own lr):
linear warmup over ``warmup`` steps from ``lr/warmup``, then either cosine decay to
``min_lr_ratio * lr`` at the last step (``cosine``) or constant followed by a linear decay to
``min_lr_ratio * lr`` over the last ``decay_fraction`` of the steps (``wsd``,
warmup-stable-decay). The factor multiplies the initial lr of every param group, so the AdamW
half of a matrix method follows the same shape.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from whiten.bench.data import TokenData, train_batch, val_batches
from whiten.bench.launch import launched, rank_slice
from whiten.bench.models import ModelConfig, build_model, count_parameters
from whiten.bench.optimizers import build_optimizer, check_bench_options, optimizer_state_bytes
from whiten.bench.precision import PRECISIONS, autocast, check_precision, default_precision
from whiten.diagnostics.devices import check_device
from whiten.diagnostics.io import read_json, read_jsonl
from whiten.optim.registry import get as get_spec


@dataclass
class BenchConfig:
    """Everything that determines a benchmark invocation (saved as ``config.json``)."""

    optimizers: list[str]
    model: str = "gpt-tiny"
    ctx: int = 64
    batch_size: int = 16
    steps: int = 600
    warmup: int | None = None  # None -> 5% of the steps
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2
    weight_decay: float = 0.0
    seeds: list[int] = field(default_factory=lambda: [0])
    lrs: dict[str, float] = field(default_factory=dict)  # explicit per-optimizer lr overrides
    embed_lr: float = 1e-2  # AdamW lr of embeddings, head, gains and biases (the same for every optimizer)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # extra constructor options per optimizer
    tokenizer: str = "byte"
    data: str | None = None
    val_fraction: float = 0.1
    eval_every: int | None = None  # None -> steps // 24 (25 evaluations)
    eval_batches: int = 8
    targets: list[float] | None = None  # absolute val-loss targets; None -> relative to AdamW's final loss
    target_factors: list[float] = field(default_factory=lambda: [1.10, 1.05, 1.02, 1.0])
    checkpoint_every: int | None = None  # None -> steps // 6
    record_every: int = 0
    device: str = "cpu"
    threads: int | None = 1
    jobs: int = 1  # runs trained at once, each in its own process (``threads`` torch threads each)
    preset: str | None = None
    precision: str | None = None  # "fp32" or "bf16" (mixed); None -> the device's default (whiten.bench.precision)

    def __post_init__(self) -> None:
        # step-count options left at None scale with --steps, so `--steps 50` alone is a valid run
        if isinstance(self.steps, int) and self.steps >= 1:
            if self.warmup is None:
                self.warmup = round(0.05 * self.steps)
            if self.eval_every is None:
                self.eval_every = max(1, self.steps // 24)
            if self.checkpoint_every is None:
                self.checkpoint_every = max(1, self.steps // 6)
        if self.precision is None:
            with contextlib.suppress(RuntimeError):  # not a device: validate() says so
                self.precision = default_precision(self.device)

    def validate(self) -> None:
        """Refuse bad configurations with one-line messages naming the option."""
        if not self.optimizers:
            raise ValueError("--optimizers is empty; give at least one name (see `whiten bench --list`)")
        for name in self.optimizers:
            get_spec(name)
        if len(set(self.optimizers)) != len(self.optimizers):
            raise ValueError(f"--optimizers lists a name twice: {self.optimizers}")
        for name, options in self.options.items():
            spec = get_spec(name)
            if name not in self.optimizers:
                raise ValueError(f"--option names {name!r}, which is not in --optimizers {self.optimizers}")
            check_bench_options(spec, options)
        for name, lr in self.lrs.items():
            get_spec(name)
            if not (isinstance(lr, float | int) and math.isfinite(lr) and lr > 0):
                raise ValueError(f"--lr {name}={lr} is not valid; the learning rate must be a number > 0")
        if not (isinstance(self.embed_lr, float | int) and math.isfinite(self.embed_lr) and self.embed_lr > 0):
            raise ValueError(f"--embed-lr {self.embed_lr} is not valid; it must be > 0")
        for name, value in (
            ("steps", self.steps),
            ("batch-size", self.batch_size),
            ("ctx", self.ctx),
            ("eval-every", self.eval_every),
            ("eval-batches", self.eval_batches),
            ("checkpoint-every", self.checkpoint_every),
        ):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"--{name} {value} is not valid; it must be an integer >= 1")
        if not (isinstance(self.warmup, int) and 0 <= self.warmup < self.steps):
            raise ValueError(f"--warmup {self.warmup} must be >= 0 and smaller than --steps {self.steps}")
        if self.schedule not in ("cosine", "wsd"):
            raise ValueError(f"--schedule {self.schedule!r} is not valid; use 'cosine' or 'wsd'")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"--min-lr-ratio {self.min_lr_ratio} must be in [0, 1]")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ValueError(f"--decay-fraction {self.decay_fraction} must be in (0, 1]")
        if self.weight_decay < 0:
            raise ValueError(f"--weight-decay {self.weight_decay} must be >= 0")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds {self.seeds} must be a non-empty list of distinct integers")
        if self.targets is not None and not all(math.isfinite(t) and t > 0 for t in self.targets):
            raise ValueError(f"--targets {self.targets} must be positive losses")
        if not self.target_factors or not all(f > 0 for f in self.target_factors):
            raise ValueError(f"target factors {self.target_factors} must be positive")
        if self.record_every < 0:
            raise ValueError(f"--record-every {self.record_every} must be >= 0 (0 = off)")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads {self.threads} must be >= 1")
        if not (isinstance(self.jobs, int) and self.jobs >= 1):
            raise ValueError(f"--jobs {self.jobs} must be an integer >= 1")
        if self.jobs > 1 and launched():
            raise ValueError("--jobs > 1 cannot be combined with --nproc; use one or the other")
        check_device(self.device)
        if self.precision is None:
            raise ValueError("--precision is not set; use one of " + ", ".join(PRECISIONS))
        check_precision(self.precision)

    def lr_for(self, name: str) -> float:
        return float(self.lrs.get(name, get_spec(name).default_lr))

    def embed_lr_value(self) -> float:
        return float(self.embed_lr)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"config has unknown fields {sorted(unknown)}; it was written by another version")
        # results folders written before --precision existed trained in fp32
        return cls(**{"precision": "fp32", **data})


def lr_factor(step: int, cfg: BenchConfig) -> float:
    """Multiplier of every group's initial lr at (0-based) step ``step``."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    floor = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        span = max(1, cfg.steps - 1 - cfg.warmup)
        progress = min(1.0, (step - cfg.warmup) / span)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    decay_steps = max(1, round(cfg.decay_fraction * cfg.steps))
    decay_start = cfg.steps - decay_steps
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start + 1) / decay_steps)
    return 1.0 + (floor - 1.0) * progress


@dataclass(frozen=True)
class RunSpec:
    """One training run: which optimizer, at which lr, with which seed, under which label."""

    optimizer: str
    lr: float
    seed: int
    label: str  # the optimizer name in a bench, "name@lr" in a sweep

    @property
    def run_id(self) -> str:
        return f"{self.label}-s{self.seed}".replace("/", "_")


class PeakMemory:
    """Peak resident memory of this process during a block (sampled), and CUDA peak allocation."""

    def __init__(self, device: torch.device, interval_s: float = 0.02) -> None:
        self.device = device
        self.interval_s = interval_s
        self.peak_rss = current_rss()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_rss = max(self.peak_rss, current_rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_rss = max(self.peak_rss, current_rss())

    def cuda_peak(self) -> int | None:
        return int(torch.cuda.max_memory_allocated(self.device)) if self.device.type == "cuda" else None


def current_rss() -> int:
    """Resident set size of this process in bytes (Linux ``/proc``; ``ru_maxrss`` elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class StopFlag:
    """First Ctrl-C asks the running step loop to checkpoint and stop; a second one aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopFlag]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        self._previous = signal.getsignal(signal.SIGINT)

        def handler(signum: int, frame: object) -> None:
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True

        signal.signal(signal.SIGINT, handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, self._previous)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: list[tuple[Tensor, Tensor]], device: torch.device, precision: str = "fp32"
) -> float:
    """Mean next-token loss over the fixed validation batches (token-weighted), at the training ``precision``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        with autocast(device, precision):
            _, loss = model(x.to(device), y.to(device))
        assert loss is not None
        total += float(loss) * y.numel()
        count += y.numel()
    model.train(was_training)
    return total / count


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_json(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_jsonable) + "\n")
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    """JSON fallback for diagnostics records: dataclasses, tensors, tuples, other objects."""
    if hasattr(value, "as_dict"):
        return value.as_dict()
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    return str(value)


def find_recorders() -> dict[str, Callable[..., Any]]:
    """The diagnostics the ``--record-every`` hook calls: ``record_spectra`` and ``weight_alpha``.

    Imported here, when a run records, so that a plain benchmark never loads the diagnostics.
    """
    from whiten.diagnostics.alpha import weight_alpha
    from whiten.diagnostics.spectra import record_spectra

    return {"record_spectra": record_spectra, "weight_alpha": weight_alpha}


def _record(recorders: dict[str, Callable[..., Any]], optimizer: Any, model: nn.Module, step: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"step": step}
    for name, fn in recorders.items():
        try:
            entry[name] = fn(optimizer, model, step=step) if name == "record_spectra" else fn(model)
        except Exception as err:  # a diagnostics failure must not kill a training run
            entry[name] = {"error": f"{type(err).__name__}: {err}"}
    return entry


def run_one(
    cfg: BenchConfig,
    spec: RunSpec,
    model_config: ModelConfig,
    data: TokenData,
    run_dir: Path,
    *,
    resume: bool,
    progress: bool,
    stop: StopFlag,
    stop_after: int | None = None,
) -> dict[str, Any] | None:
    """Train one run; returns its result, or ``None`` when it stopped early with a checkpoint."""
    run_dir.mkdir(parents=True, exist_ok=True)
    result_path, ckpt_path, log_path = run_dir / "result.json", run_dir / "checkpoint.pt", run_dir / "log.jsonl"
    if resume and result_path.exists():
        return read_json(result_path)
    device = torch.device(cfg.device)
    if launched() and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per process
    model = build_model(model_config, seed=spec.seed, device=device)
    optimizer = build_optimizer(
        get_spec(spec.optimizer),
        model,
        lr=spec.lr,
        weight_decay=cfg.weight_decay,
        embed_lr=cfg.embed_lr_value(),
        extra_options=cfg.options.get(spec.optimizer),
    )
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    # whiten bench --nproc N: gradients all-reduced over the processes, each with a slice of the batch
    train_model = DistributedDataParallel(model) if launched() else model
    val = val_batches(data.val, batch_size=cfg.batch_size, ctx=cfg.ctx, max_batches=cfg.eval_batches)
    tokens_per_step = cfg.batch_size * cfg.ctx
    precision = cfg.precision or "fp32"
    clock = {"train_s": 0.0, "fb_s": 0.0, "opt_s": 0.0, "cpu_s": 0.0}
    step, peak_rss, diverged = 0, 0, False
    if resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, clock, peak_rss = ckpt["step"], ckpt["clock"], ckpt["peak_rss"]
        kept = [r for r in read_jsonl(log_path, missing_ok=True) if r["step"] <= step]
        log_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    else:
        for stale in (log_path, ckpt_path, result_path, run_dir / "diagnostics.jsonl"):
            stale.unlink(missing_ok=True)
    recorders = find_recorders() if cfg.record_every else {}

    def save_checkpoint() -> None:
        state = {
            "step": step,
            "clock": clock,
            "peak_rss": max(peak_rss, memory.peak_rss),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
        }
        _atomic_save(state, ckpt_path)

    from tqdm.auto import tqdm

    bar = tqdm(
        total=cfg.steps,
        initial=step,
        desc=spec.label,
        disable=not progress,
        leave=False,
        dynamic_ncols=True,
        mininterval=0.5,
    )
    log = log_path.open("a")
    memory = PeakMemory(device)
    try:
        with memory:
            if step == 0:
                first = {"step": 0, "tokens": 0, "time_s": 0.0, "cpu_s": 0.0}
                log.write(json.dumps({**first, "val_loss": evaluate(model, val, device, precision)}) + "\n")
            model.train()
            while step < cfg.steps:
                if stop.requested or (stop_after is not None and step >= stop_after):
                    save_checkpoint()
                    return None
                factor = lr_factor(step, cfg)
                for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                    group["lr"] = base * factor
                _sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                x, y = train_batch(data.train, seed=spec.seed, step=step, batch_size=cfg.batch_size, ctx=cfg.ctx)
                x, y = rank_slice(x.to(device, non_blocking=True)), rank_slice(y.to(device, non_blocking=True))
                with autocast(device, precision):  # backward follows the forward's dtypes; weights stay fp32
                    _, loss = train_model(x, y)
                assert loss is not None
                loss.backward()
                _sync(device)
                t1 = time.perf_counter()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                _sync(device)
                t2, c2 = time.perf_counter(), time.process_time()
                clock["cpu_s"] += c2 - c0
                clock["train_s"] += t2 - t0
                clock["fb_s"] += t1 - t0
                clock["opt_s"] += t2 - t1
                step += 1
                train_loss = loss.item()
                record: dict[str, Any] = {
                    "step": step,
                    "tokens": step * tokens_per_step,
                    "time_s": clock["train_s"],
                    "cpu_s": clock["cpu_s"],
                    "train_loss": train_loss,
                    "lr_factor": factor,
                }
                log.write(json.dumps(record) + "\n")
                if not math.isfinite(train_loss):
                    diverged = True
                    break
                if step % cfg.eval_every == 0 or step == cfg.steps:
                    val_loss = evaluate(model, val, device, precision)
                    log.write(
                        json.dumps(
                            {
                                "step": step,
                                "tokens": step * tokens_per_step,
                                "time_s": clock["train_s"],
                                "cpu_s": clock["cpu_s"],
                                "val_loss": val_loss,
                            }
                        )
                        + "\n"
                    )
                    bar.set_postfix(train=f"{train_loss:.3f}", val=f"{val_loss:.3f}", refresh=False)
                if cfg.record_every and recorders and step % cfg.record_every == 0:
                    entry = _record(recorders, optimizer, model, step)
                    with (run_dir / "diagnostics.jsonl").open("a") as diag:
                        diag.write(json.dumps(entry, default=_jsonable) + "\n")
                bar.update(1)
                if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                    log.flush()
                    save_checkpoint()
    finally:
        log.close()
        bar.close()
    peak_rss = max(peak_rss, memory.peak_rss)
    records = read_jsonl(log_path, missing_ok=True)
    vals = [r for r in records if "val_loss" in r]
    trains = [r for r in records if "train_loss" in r]
    last_train = [r["train_loss"] for r in trains[-max(1, cfg.eval_every) :]]
    result = {
        "label": spec.label,
        "optimizer": spec.optimizer,
        "lr": spec.lr,
        "seed": spec.seed,
        "steps": step,
        "tokens": step * tokens_per_step,
        "diverged": diverged,
        "initial_val_loss": vals[0]["val_loss"] if vals else None,
        "final_val_loss": vals[-1]["val_loss"] if vals and not diverged else float("nan"),
        "final_train_loss": sum(last_train) / len(last_train) if last_train and not diverged else float("nan"),
        "train_time_s": clock["train_s"],
        "wall_clock_s": clock["train_s"],  # the benchmark's wall-clock: training steps only, evaluation excluded
        "cpu_time_s": clock.get("cpu_s"),
        "fwd_bwd_time_s": clock["fb_s"],
        "optimizer_time_s": clock["opt_s"],
        "tokens_per_s": step * tokens_per_step / clock["train_s"] if clock["train_s"] > 0 else None,
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "peak_rss_bytes": peak_rss,
        "peak_cuda_bytes": memory.cuda_peak(),
        "parameters": count_parameters(model_config),
    }
    _write_json(result, result_path)
    ckpt_path.unlink(missing_ok=True)  # a finished run keeps its result and log, not its weights
    return result


def run_all(
    cfg: BenchConfig,
    specs: list[RunSpec],
    model_config: ModelConfig,
    data: TokenData,
    out: Path,
    *,
    resume: bool,
    progress: bool,
    stop_after: int | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[list[dict[str, Any]], bool]:
    """Run every spec (``cfg.jobs`` at a time); returns ``(results, complete)`` with results in spec order."""
    if cfg.jobs > 1 and len(specs) > 1:
        return _run_parallel(
            cfg,
            specs,
            model_config,
            data,
            out,
            resume=resume,
            progress=progress,
            stop_after=stop_after,
            on_result=on_result,
        )
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    results = []
    stop = StopFlag()
    with stop.installed():
        for spec in specs:
            result = run_one(
                cfg,
                spec,
                model_config,
                data,
                out / "runs" / spec.run_id,
                resume=resume,
                progress=progress,
                stop=stop,
                stop_after=stop_after,
            )
            if result is None:
                return results, False
            results.append(result)
            if on_result is not None:
                on_result(result)
    return results, True


# The worker processes of ``--jobs``: the corpus is sent once per process, not once per run.
_WORKER_DATA: TokenData | None = None


def _init_worker(threads: int | None, data: TokenData) -> None:
    global _WORKER_DATA
    _WORKER_DATA = data
    if threads is not None:
        torch.set_num_threads(threads)
    # Ctrl-C reaches the whole process group: each worker checkpoints its run and returns None
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker_run(
    cfg: BenchConfig, spec: RunSpec, model_config: ModelConfig, run_dir: Path, resume: bool, stop_after: int | None
) -> dict[str, Any] | None:
    assert _WORKER_DATA is not None
    stop = StopFlag()
    with stop.installed():
        return run_one(
            cfg,
            spec,
            model_config,
            _WORKER_DATA,
            run_dir,
            resume=resume,
            progress=False,
            stop=stop,
            stop_after=stop_after,
        )


def _run_parallel(
    cfg: BenchConfig,
    specs: list[RunSpec],
    model_config: ModelConfig,
    data: TokenData,
    out: Path,
    *,
    resume: bool,
    progress: bool,
    stop_after: int | None,
    on_result: Callable[[dict[str, Any]], None] | None,
) -> tuple[list[dict[str, Any]], bool]:
    """``--jobs N``: N worker processes, a fresh one per run (so each run's peak RSS is its own).

    Each run is the same computation as in one process (the runs are deterministic given the settings); its
    wall-clock shares the machine with the other jobs, which is why the process CPU time is reported beside it.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from tqdm.auto import tqdm

    context = multiprocessing.get_context("spawn")  # no forked torch thread pools or CUDA contexts
    results: dict[int, dict[str, Any] | None] = {}
    bar = tqdm(total=len(specs), desc=f"runs ({cfg.jobs} jobs)", disable=not progress, dynamic_ncols=True)
    with ProcessPoolExecutor(
        max_workers=cfg.jobs,
        mp_context=context,
        initializer=_init_worker,
        initargs=(cfg.threads, data),
        max_tasks_per_child=1,
    ) as pool:
        futures = {
            pool.submit(_worker_run, cfg, spec, model_config, out / "runs" / spec.run_id, resume, stop_after): i
            for i, spec in enumerate(specs)
        }
        stop = StopFlag()
        with stop.installed():  # first Ctrl-C: no new runs; the running ones checkpoint (they get it too)
            for future in as_completed(futures):
                if future.cancelled():
                    continue
                index = futures[future]
                results[index] = future.result()
                bar.update(1)
                if results[index] is not None and on_result is not None:
                    on_result(results[index])
                if stop.requested:
                    for pending in futures:
                        pending.cancel()
    bar.close()
    ordered = [results.get(i) for i in range(len(specs))]
    done = [r for r in ordered if r is not None]
    return done, len(done) == len(specs)
