"""Eigenbasis rotation around a gradient spike (docs/diagnostics/spike.md).

One ``(128, 64)`` parameter receives i.i.d. ``N(0, 1)`` gradients (CPU generator, seed 0, so the
sequence is the same on every device) with a ``1000x`` gradient at iteration ``spike_at = 50``
(0-based, as the original SOAP-vs-REKLS experiment). After every step the optimizer's eigenbasis (``Q_L``; for
Pro-KLShampoo also the tracked subspace ``U``) is recorded and compared with two references of
the same run: ``Q(spike_at - 1)`` (pre-spike) and ``Q(spike_at)`` (post-spike). The original experiment's
tables report, for offsets ``N``, the top-1 angle and the largest principal angle of the top-``k``
subspaces to the pre-spike basis at iteration ``spike_at - 1 - N`` ("before": steady-state drift)
and ``spike_at - 1 + N`` ("after": the spike plus ``N - 1`` recovery steps), and the top
eigenvalues of ``L`` with the top/2nd ratio.

Precision. ``"high"`` means TF32 matmul operands (10-bit mantissa) inside the optimizer's own
``fp32_matmul_prec`` blocks. On CUDA the real setting is used. On CPU (where PyTorch ignores it)
the step runs under :func:`whiten.linalg.emulate_global_matmul_precision`, which rounds operands
exactly where the optimizer sets the precision (SOAP: factor update and projections, not the QR
refresh), i.e. the same blocks a GPU would run in TF32. Optimizers without a precision option run
their whole step at the requested precision (reported as ``precision_scope="step"``).

Angles are computed in float64 from sines and cosines (:mod:`whiten.diagnostics.angles`), so
they are accurate below the ``~0.03`` degree floor of the original experiment's fp32 ``arccos``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from whiten.diagnostics.angles import angle_trajectory_deg
from whiten.diagnostics.devices import check_device
from whiten.linalg import PRECISIONS, emulate_global_matmul_precision, matmul_precision
from whiten.optim import registry

# the knobs the experiment sets on every optimizer (SpikeConfig fields), and how a user sets them
SET_BY_SPIKE = {
    "lr": "the spike experiment (lr = 1)",
    "betas": "the spike experiment",
    "weight_decay": "the spike experiment",
    "shampoo_beta": "the spike experiment",
    "precondition_frequency": "--precondition-frequency",
    "kl_init": "--kl-init",
    "fp32_matmul_prec": "--precisions",
}


def spike_names() -> list[str]:
    """Registry names whose optimizer keeps an eigenbasis the experiment can record."""
    return [name for name in registry.names() if registry.get(name).bases]


def spike_spec(name: str) -> registry.OptimizerSpec:
    """The registry spec of ``name``; ``ValueError`` for an unknown name or one without an eigenbasis."""
    spec = registry.get(name)
    if not spec.bases:
        raise ValueError(
            f"optimizer {name!r} keeps no eigenbasis to record; choose from {', '.join(spike_names())}, pro-kls-rN"
        )
    return spec


KL_INIT_CHOICES = ("safe", "peer")


@dataclass
class SpikeConfig:
    """The experiment's knobs; defaults are the original experiment's (docs/diagnostics/spike.md)."""

    shape: tuple[int, int] = (128, 64)
    seed: int = 0
    spike_at: int = 50
    spike_scale: float = 1000.0
    normal_scale: float = 1.0
    steps: int = 200
    lr: float = 1.0
    betas: tuple[float, float] = (0.9, 0.95)
    shampoo_beta: float = 0.95
    weight_decay: float = 0.0
    optimizers: tuple[str, ...] = ("soap-kl", "rekls")  # registry names (pro-kls-rN: Pro-KLShampoo at rank N)
    precisions: tuple[str, ...] = ("high", "highest")
    kl_inits: tuple[str, ...] = ("safe",)
    top_k: int = 8
    offsets: tuple[int, ...] = (1, 2, 5, 10)
    precondition_frequency: int = 1  # KL-Shampoo / Pro-KLShampoo refresh every step, like SOAP
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # extra constructor options per name
    device: str = "cpu"
    n_eigenvalues: int = 10

    def validate(self) -> None:
        check_device(self.device, "device")
        if len(self.shape) != 2 or min(self.shape) < 2:
            raise ValueError(f"shape must be two dimensions >= 2, got {self.shape}")
        if not self.optimizers:
            raise ValueError(f"optimizers is empty; choose from {', '.join(spike_names())}, pro-kls-rN")
        for name in self.optimizers:
            try:
                spike_spec(name)
            except ValueError as err:
                raise ValueError(f"--optimizers: {err}") from None
        for name, options in self.options.items():
            if name not in self.optimizers:
                raise ValueError(f"--option names {name!r}, which is not in --optimizers {list(self.optimizers)}")
            spike_spec(name).check_options(options, SET_BY_SPIKE)
        bad = [p for p in self.precisions if p not in PRECISIONS]
        if bad or not self.precisions:
            raise ValueError(f"precisions {bad or '[]'} not valid; choose from {PRECISIONS}")
        bad = [k for k in self.kl_inits if k not in KL_INIT_CHOICES]
        if bad or not self.kl_inits:
            raise ValueError(f"kl_inits {bad or '[]'} not valid; choose from {KL_INIT_CHOICES}")
        if self.spike_at < 1 or self.spike_at >= self.steps:
            raise ValueError(f"spike_at must be in [1, steps - 1] = [1, {self.steps - 1}], got {self.spike_at}")
        if any(o < 1 for o in self.offsets):
            raise ValueError(f"offsets must be >= 1, got {self.offsets}")
        if self.offsets and (
            self.spike_at - 1 - max(self.offsets) < 0 or self.spike_at - 1 + max(self.offsets) >= self.steps
        ):
            raise ValueError(
                f"offset {max(self.offsets)} reaches outside the run (spike_at={self.spike_at}, steps={self.steps}); "
                "use smaller offsets, a later spike or more steps"
            )
        if not 1 <= self.top_k <= min(self.shape):
            raise ValueError(f"top_k must be in [1, {min(self.shape)}], got {self.top_k}")


def gradient_sequence(config: SpikeConfig) -> Iterator[Tensor]:
    """The original experiment's gradients: ``randn * normal_scale``, ``* spike_scale`` at ``spike_at`` (fp32, CPU)."""
    gen = torch.Generator(device="cpu").manual_seed(config.seed)
    for i in range(config.steps):
        scale = config.spike_scale * config.normal_scale if i == config.spike_at else config.normal_scale
        yield torch.randn(config.shape, generator=gen, dtype=torch.float32) * scale


def _build(
    spec: registry.OptimizerSpec, param: Tensor, config: SpikeConfig, precision: str, kl_init: str
) -> torch.optim.Optimizer:
    """The optimizer at the experiment's settings; what each class takes is declared in the registry."""
    options: dict[str, Any] = {
        "lr": config.lr,
        "betas": config.betas,
        "weight_decay": config.weight_decay,
        "shampoo_beta": config.shampoo_beta,
        "precondition_frequency": config.precondition_frequency,
        **config.options.get(spec.name, {}),
    }
    if spec.kl_init:
        options["kl_init"] = kl_init
    if spec.own_precision:
        options["fp32_matmul_prec"] = precision
    return spec.build([param], **options)


def _step_context(device: torch.device, precision: str, own_precision: bool) -> contextlib.AbstractContextManager:
    stack = contextlib.ExitStack()
    if not own_precision:
        stack.enter_context(matmul_precision(precision))
    if device.type != "cuda":
        stack.enter_context(emulate_global_matmul_precision())
    return stack


@dataclass
class SpikeRun:
    """One optimizer at one precision: recorded bases, angles, eigenvalues."""

    optimizer: str
    label: str
    precision: str
    kl_init: str | None
    device: str
    emulated: bool
    precision_scope: str
    seconds: float
    bases: dict[str, dict[str, Any]] = field(default_factory=dict)
    top_eigenvalues: list[list[float]] = field(default_factory=list)
    trajectories: dict[str, Tensor] = field(default_factory=dict, repr=False)


def run_one(config: SpikeConfig, optimizer: str, precision: str, kl_init: str = "safe") -> SpikeRun:
    """Drive one optimizer through the gradient sequence and measure its basis rotation."""
    spec = spike_spec(optimizer)
    own_precision = spec.own_precision
    device = torch.device(config.device)
    param = torch.zeros(config.shape, device=device, dtype=torch.float32, requires_grad=True)
    opt = _build(spec, param, config, precision, kl_init)
    trajectories: dict[str, list[Tensor]] = {b: [] for b in spec.bases}
    top_eigs: list[list[float]] = []
    start = time.perf_counter()
    for grad in gradient_sequence(config):
        param.grad = grad.to(device)
        with _step_context(device, precision, own_precision):
            opt.step()
        state = opt.state[param]
        for basis in spec.bases:
            if basis not in state:
                raise ValueError(f"{spec.cls.__name__} keeps no state {basis!r}; cannot record that basis")
            Q = state[basis].detach().to("cpu", torch.float32, copy=True)
            if basis == "U" and isinstance(state.get("Lam"), Tensor):
                # the tracked subspace's columns come in QR order; "top-k" means the k largest Lam
                Q = Q[:, torch.argsort(state["Lam"].detach().cpu().reshape(-1), descending=True)]
            trajectories[basis].append(Q)
        if "L" in state:
            eigs = torch.linalg.eigvalsh(state["L"].detach().double().cpu()).flip(0)
            top_eigs.append(eigs[: config.n_eigenvalues].tolist())
    seconds = time.perf_counter() - start
    run = SpikeRun(
        optimizer=optimizer,
        label=spec.name + (f" [{kl_init} KL init]" if spec.kl_init and kl_init != "safe" else ""),
        precision=precision,
        kl_init=kl_init if spec.kl_init else None,
        device=str(device),
        emulated=device.type != "cuda" and precision != "highest",
        precision_scope="optimizer" if own_precision else "step",
        seconds=seconds,
        top_eigenvalues=top_eigs,
    )
    for basis, traj in trajectories.items():
        stack = torch.stack(traj)
        run.trajectories[basis] = stack
        run.bases[basis] = rotation_curves(stack, config.spike_at, config.top_k)
    return run


def rotation_curves(trajectory: Tensor, spike_at: int, top_k: int) -> dict[str, Any]:
    """Top-1 and top-k largest angles (degrees) of every step to the pre- and post-spike references."""
    k = min(top_k, trajectory.shape[-1])
    pre, post = trajectory[spike_at - 1], trajectory[spike_at]
    return {
        "k": k,
        "angles_to_pre": {
            "top1": angle_trajectory_deg(trajectory, pre, 1),
            f"top{top_k}": angle_trajectory_deg(trajectory, pre, k),
        },
        "angles_to_post": {
            "top1": angle_trajectory_deg(trajectory, post, 1),
            f"top{top_k}": angle_trajectory_deg(trajectory, post, k),
        },
    }


def offset_table(run: SpikeRun | dict[str, Any], basis: str, config: SpikeConfig) -> list[dict[str, float]]:
    """Rows ``{N, before_top1, before_topk, after_top1, after_topk}`` (degrees, to the pre-spike basis)."""
    bases = run.bases if isinstance(run, SpikeRun) else run["bases"]
    curves = bases[basis]["angles_to_pre"]
    topk = f"top{config.top_k}"
    rows = []
    for n in config.offsets:
        before, after = config.spike_at - 1 - n, config.spike_at - 1 + n
        rows.append(
            {
                "N": n,
                "before_top1": curves["top1"][before],
                "before_topk": curves[topk][before],
                "after_top1": curves["top1"][after],
                "after_topk": curves[topk][after],
            }
        )
    return rows


def eigenvalue_table(run: SpikeRun, config: SpikeConfig) -> list[dict[str, Any]]:
    """The original experiment's eigenvalue rows: steps (1-based) around the spike, eig[0, 1, 4, 9], top/2nd."""
    rows = []
    s = config.spike_at
    for i in (s - 5, s - 1, s, s + 1, s + 4, s + 9, s + 19):
        if not 0 <= i < len(run.top_eigenvalues):
            continue
        eigs = run.top_eigenvalues[i]
        rows.append(
            {
                "step": i + 1,
                "spike": i == s,
                "eig": {str(j): eigs[j] for j in (0, 1, 4, 9) if j < len(eigs)},
                "top_over_2nd": eigs[0] / eigs[1] if len(eigs) > 1 and eigs[1] > 0 else math.inf,
            }
        )
    return rows


@dataclass
class SpikeResult:
    config: SpikeConfig
    runs: list[SpikeRun]

    def to_json(self) -> dict[str, Any]:
        runs = []
        for run in self.runs:
            entry = {k: v for k, v in asdict(run).items() if k != "trajectories"}
            entry["tables"] = {basis: offset_table(run, basis, self.config) for basis in run.bases}
            entry["eigenvalue_table"] = eigenvalue_table(run, self.config)
            runs.append(entry)
        return {"config": asdict(self.config), "runs": runs}

    def format_tables(self) -> str:
        return format_spike_tables(self.to_json())


def format_spike_tables(result: dict[str, Any]) -> str:
    """The original experiment's tables, one per run and basis, then the eigenvalue tables."""
    cfg = result["config"]
    s, topk = cfg["spike_at"], f"top-{cfg['top_k']}"
    out: list[str] = []
    for prec in cfg["precisions"]:
        out += ["", "#" * 72, f"# fp32_matmul_prec = {prec!r}", "#" * 72]
        for run in (r for r in result["runs"] if r["precision"] == prec):
            for basis, rows in run["tables"].items():
                emu = ", CPU TF32/bf16 emulation" if run["emulated"] else ""
                title = (
                    f"{run['label']} - {basis}: principal angle to pre-spike basis "
                    f"(iteration {s - 1}, 0-based), degrees [{run['device']}{emu}]"
                )
                rule = "-" * len(title)
                out += [
                    "",
                    title,
                    rule,
                    f" {'':>3} | {'BEFORE spike':^21} | {'AFTER spike':^21}",
                    f" {'N':>3} | {'top-1':>10} {topk:>10} | {'top-1':>10} {topk:>10}",
                    rule,
                ]
                for r in rows:
                    out.append(
                        f" {r['N']:>3} | {r['before_top1']:>9.3f}° {r['before_topk']:>9.3f}° | "
                        f"{r['after_top1']:>9.3f}° {r['after_topk']:>9.3f}°"
                    )
                out.append(rule)
    out += ["", f"Eigenvalues of L around the spike (steps 1-based; the spike is ingested at step {s + 1})"]
    for run in result["runs"]:
        if not run["eigenvalue_table"]:
            continue
        out += [
            "",
            f"{run['label']} ({run['precision']})",
            f"{'step':>5} {'eig[0]':>12} {'eig[1]':>12} {'eig[4]':>12} {'eig[9]':>12} {'top/2nd':>9}",
            "-" * 68,
        ]
        for r in run["eigenvalue_table"]:
            e = [f"{r['eig'].get(j, math.nan):>12.4g}" for j in ("0", "1", "4", "9")]
            mark = "  <-- spike" if r["spike"] else ""
            out.append(f"{r['step']:>5} {' '.join(e)} {r['top_over_2nd']:>9.4f}{mark}")
    return "\n".join(out)


def run_spike_experiment(
    config: SpikeConfig | None = None,
    *,
    progress: Callable[[str], None] | None = None,
    **overrides: Any,
) -> SpikeResult:
    """Run every (optimizer, KL init, precision) of ``config`` (defaults: the original experiment's setup).

    Keyword overrides replace config fields, e.g. ``run_spike_experiment(steps=80, optimizers=("rekls",))``.
    ``kl_inits`` apply to the optimizers that have that option (SOAP, REKLS); the others run once.
    """
    config = config or SpikeConfig()
    if overrides:
        config = SpikeConfig(**{**asdict(config), **overrides})
    for key in ("shape", "betas", "optimizers", "precisions", "kl_inits", "offsets"):
        setattr(config, key, tuple(getattr(config, key)))
    config.validate()
    runs = []
    for name in config.optimizers:
        inits: Sequence[str] = config.kl_inits if spike_spec(name).kl_init else ("safe",)
        for kl_init in inits:
            for precision in config.precisions:
                run = run_one(config, name, precision, kl_init)
                if progress is not None:
                    progress(f"{run.label} @ {precision}: {run.seconds:.1f}s")
                runs.append(run)
    return SpikeResult(config, runs)
