#!/usr/bin/env python
"""Optimizer step benchmark: ``whiten`` optimizers against their peers on GPT-2-small shapes.

For each configuration (one GPT-2-small matrix shape, or the whole GPT-2-small parameter list)
and each method, this builds the optimizer on fresh parameters, warms it up (first step,
initialisation and one full refresh period), then times single steps and reports

* the amortised step time: the median over windows of ``T`` consecutive steps (``T`` is the
  method's refresh period, so every window holds exactly one refresh) of the window's mean;
* the optimizer-state bytes (every tensor in ``optimizer.state``, de-duplicated);
* the analytic matmul FLOPs of one step (``step_flops.py``) and the achieved FLOP rate against
  the machine's fp32 (and bf16) matmul rate, measured here with large square matmuls;
* the ratio to a reference (the peer the target is stated against) and to the fastest peer.

Peers (the optional ``[peers]`` extra, never a runtime dependency): ``torch.optim.Muon``,
HeavyBall (``heavyball``) and ``pytorch_optimizer``. A missing peer is reported as unavailable;
the rest still runs. The ``whiten`` rows are built through :mod:`whiten.optim.registry`; a
constructor error there stops the run. HeavyBall compiles its
kernels with ``torch.compile`` by default; it runs eagerly here (as ours) unless
``--compile-peers``. Non-matrix parameters (embeddings, positions, LayerNorm) go to AdamW for
every method: our built-in AdamW, the peer's own where it has one (pytorch_optimizer), otherwise
a ``torch.optim.AdamW`` stepped alongside.

Usage::

    python benchmarks/step_bench.py --out results/step-bench            # full run (~10 min, 2 cores)
    python benchmarks/step_bench.py --quick --out results/step-quick
    python benchmarks/step_bench.py --device cuda --out results/step-cuda
    python benchmarks/step_bench.py --list                               # configs and methods
    python benchmarks/step_bench.py --kron --out results/kron-step       # `make bench-kron`: Kronecker methods

Timings on a shared machine are noisy: threads are pinned (``--threads``), methods of the small
configurations are interleaved round-robin so that load bursts hit all of them, and medians are
reported with their inter-quartile range.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import inspect
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_flops as flops

from whiten.optim import registry

# --------------------------------------------------------------------------------------------
# configurations
# --------------------------------------------------------------------------------------------

D_MODEL, N_BLOCKS, VOCAB, N_CTX = 768, 12, 50257, 1024
GPT2_MATRIX_SHAPES = ((768, 768), (768, 2304), (768, 3072), (3072, 768))


@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple[int, ...]
    matrix: bool  # hidden matrix (matrix method) or not (AdamW)


def gpt2_small(blocks: int = N_BLOCKS) -> list[ParamSpec]:
    """GPT-2-small's parameter list (124.4M numbers; the head is tied to ``wte``)."""
    d = D_MODEL
    specs = [ParamSpec("wte", (VOCAB, d), False), ParamSpec("wpe", (N_CTX, d), False)]
    for b in range(blocks):
        p = f"h{b}."
        specs += [
            ParamSpec(p + "ln_1.weight", (d,), False),
            ParamSpec(p + "ln_1.bias", (d,), False),
            ParamSpec(p + "attn.c_attn.weight", (d, 3 * d), True),
            ParamSpec(p + "attn.c_attn.bias", (3 * d,), False),
            ParamSpec(p + "attn.c_proj.weight", (d, d), True),
            ParamSpec(p + "attn.c_proj.bias", (d,), False),
            ParamSpec(p + "ln_2.weight", (d,), False),
            ParamSpec(p + "ln_2.bias", (d,), False),
            ParamSpec(p + "mlp.c_fc.weight", (d, 4 * d), True),
            ParamSpec(p + "mlp.c_fc.bias", (4 * d,), False),
            ParamSpec(p + "mlp.c_proj.weight", (4 * d, d), True),
            ParamSpec(p + "mlp.c_proj.bias", (d,), False),
        ]
    specs += [ParamSpec("ln_f.weight", (d,), False), ParamSpec("ln_f.bias", (d,), False)]
    return specs


def configs() -> dict[str, list[ParamSpec]]:
    out = {f"{m}x{n}": [ParamSpec(f"w{m}x{n}", (m, n), True)] for m, n in GPT2_MATRIX_SHAPES}
    out["gpt2-small"] = gpt2_small()
    return out


# --------------------------------------------------------------------------------------------
# methods
# --------------------------------------------------------------------------------------------

LR = 1e-3


class Stepper:
    """One or two optimizers stepped together (a peer without AdamW gets ``torch.optim.AdamW``)."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = [o for o in optimizers if o is not None]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def state_bytes(self) -> int:
        seen: set[tuple[int, int]] = set()
        total = 0

        def walk(value: Any) -> None:
            nonlocal total
            if isinstance(value, Tensor):
                key = (value.data_ptr(), value.numel() * value.element_size())
                if key not in seen:
                    seen.add(key)
                    total += key[1]
            elif isinstance(value, dict):
                for v in value.values():
                    walk(v)
            elif isinstance(value, (list, tuple)):
                for v in value:
                    walk(v)

        for o in self.optimizers:
            walk(list(o.state.values()))
        return total


Builder = Callable[[list[Tensor], list[Tensor]], Stepper]


@dataclass
class Method:
    label: str  # unique row label
    impl: str  # "whiten" or the peer's package
    family: str  # methods compared with each other
    settings: str
    build: Builder
    flops: Callable[[int, int], float]
    period: int = 1
    reference: str | None = None  # label of the row the target ratio is stated against
    bf16: bool = False  # the matmul-heavy part runs in bf16
    policy: str | None = None  # whiten rows: the matmul policy ("fp32" / "bf16"); peers: None (fixed by the peer)
    notes: list[str] = field(default_factory=list)

    @property
    def is_peer(self) -> bool:
        return self.impl != "whiten"


def _find_class(module: str, name: str) -> type:
    mod = importlib.import_module(module)
    cls = getattr(mod, name, None)
    if cls is None:
        raise ImportError(f"{module}.{name} does not exist (yet)")
    return cls


def _construct(cls: type, params: Any, notes: list[str], **kwargs: Any) -> Any:
    """Call a PEER's ``cls`` with the keyword arguments its installed version accepts; note the others.

    Only for third-party peers, whose options vary between releases; ``whiten`` optimizers are built
    through :mod:`whiten.optim.registry`, where an unknown option is an error.
    """
    sig = inspect.signature(cls.__init__)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    accepted = {k: v for k, v in kwargs.items() if takes_any or k in sig.parameters}
    dropped = sorted(set(kwargs) - set(accepted))
    if dropped:
        note = f"{cls.__name__} has no option(s) {', '.join(dropped)}"
        if note not in notes:
            notes.append(note)
    return cls(params, **accepted)


def _torch_adamw(others: list[Tensor]) -> torch.optim.Optimizer | None:
    return torch.optim.AdamW(others, lr=LR, betas=(0.9, 0.95), weight_decay=0.0) if others else None


def _whiten_groups(matrices: list[Tensor], others: list[Tensor], **matrix_options: Any) -> list[dict[str, Any]]:
    groups = [{"params": matrices, "use_matrix": True, **matrix_options}]
    if others:
        groups.append({"params": others, "use_matrix": False})
    return groups


# the matmul policies every whiten row is run at: label suffix -> dtype of the hot matmuls
POLICIES = {"fp32": "float32", "bf16": "bfloat16"}


def policy_options(name: str, dtype: str) -> dict[str, str] | None:
    """The constructor option that runs registry ``name``'s hot matmuls in ``dtype``.

    ``matmul_dtype`` where the class has it (Muon's older spelling ``ns_dtype`` otherwise); a class
    with neither computes in fp32 only: ``{}`` for float32 and ``None`` (no such row) for bfloat16.
    """
    accepted = registry.get(name).option_names()
    for key in ("matmul_dtype", "ns_dtype"):
        if key in accepted:
            return {key: dtype}
    return {} if dtype == "float32" else None


def whiten_rows(
    label: str,
    family: str,
    settings: str,
    name: str,
    options: dict[str, Any],
    *,
    policies: Sequence[str],
    period: int = 1,
    reference: str | None = None,
) -> list[Method]:
    """One row per matmul policy of registry ``name`` built with ``options`` (+ the policy's option).

    The label gets the policy as a suffix (``label[fp32]``, ``label[r=128,bf16]`` for a label that
    already ends in ``]``); ``reference`` names a row label, of a whiten row (suffixed with the same
    policy) or of a peer (as given). The FLOPs are the class's own declaration
    (``matrix_flops``) with the row's options.
    """
    rows = []
    for short in policies:
        extra = policy_options(name, POLICIES[short])
        if extra is None:
            continue
        row_options = {**extra, **options}

        def build(mats: list[Tensor], others: list[Tensor], row_options: dict[str, Any] = row_options) -> Stepper:
            return Stepper(registry.get(name).build(_whiten_groups(mats, others), adamw_lr=LR, **row_options))

        def count(m: int, n: int, row_options: dict[str, Any] = row_options) -> float:
            return flops.registered(name, m, n, **row_options)

        suffixed = f"{label[:-1]},{short}]" if label.endswith("]") else f"{label}[{short}]"
        ref = reference
        if ref is not None and ref.startswith("whiten."):
            ref = f"{ref[:-1]},{short}]" if ref.endswith("]") else f"{ref}[{short}]"
        opts = ", ".join(f"{k}={v}" for k, v in extra.items())
        methods_settings = f"{settings}, {opts}" if opts else f"{settings} (fp32 only)"
        rows.append(
            Method(
                suffixed,
                "whiten",
                family,
                methods_settings,
                build,
                count,
                period=period,
                reference=ref,
                bf16=short == "bf16",
                policy=short,
            )
        )
    return rows


def method_table(
    ranks: Sequence[int],
    period: int,
    compile_ns: bool = False,
    pro_ns_method: str | None = None,
    policies: Sequence[str] = tuple(POLICIES),
) -> list[Method]:
    methods: list[Method] = []
    T = period

    # --- AdamW floor -------------------------------------------------------------------------
    methods.append(
        Method(
            "torch.optim.AdamW",
            "torch",
            "adamw",
            "betas (0.9, 0.95), foreach default",
            lambda mats, others: Stepper(torch.optim.AdamW(mats + others, lr=LR, betas=(0.9, 0.95))),
            flops.adamw,
        )
    )

    def whiten_adamw(mats: list[Tensor], others: list[Tensor]) -> Stepper:
        return Stepper(registry.get("muon").build([{"params": mats + others, "use_matrix": False}], lr=LR, adamw_lr=LR))

    methods.append(
        Method(
            "whiten AdamW fallback",
            "whiten",
            "adamw",
            "every parameter in a use_matrix=False group",
            whiten_adamw,
            flops.adamw,
            reference="torch.optim.AdamW",
        )
    )

    # --- Muon ----------------------------------------------------------------------------------
    muon_common = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True, ns_steps=5)

    def torch_muon(mats: list[Tensor], others: list[Tensor]) -> Stepper:
        if not hasattr(torch.optim, "Muon"):
            raise ImportError(f"torch {torch.__version__} has no torch.optim.Muon")
        return Stepper(torch.optim.Muon(mats, **muon_common), _torch_adamw(others))

    methods.append(
        Method("torch.optim.Muon", "torch", "muon", "NS5 Keller, bf16 NS (fixed)", torch_muon, flops.muon, bf16=True)
    )

    def hb_muon(mats: list[Tensor], others: list[Tensor]) -> Stepper:
        cls = _find_class("heavyball", "Muon")
        opt = cls(mats, lr=0.02, betas=(0.95, 0.99), weight_decay=0.1, nesterov=True)
        return Stepper(opt, _torch_adamw(others))

    methods.append(
        Method(
            "heavyball.Muon",
            "heavyball",
            "muon",
            "NS5 with HeavyBall's own per-step coefficients, bf16 NS with stochastic rounding (fixed)",
            hb_muon,
            flops.muon,
            bf16=True,
        )
    )

    def po_muon(mats: list[Tensor], others: list[Tensor]) -> Stepper:
        cls = _find_class("pytorch_optimizer", "Muon")
        groups = [{"params": mats, "use_muon": True}]
        if others:
            groups.append({"params": others, "use_muon": False})
        opt = cls(
            groups,
            lr=0.02,
            momentum=0.95,
            weight_decay=0.1,
            nesterov=True,
            ns_steps=5,
            ns_coeffs="original",
            adamw_lr=LR,
            foreach=True,
        )
        return Stepper(opt)

    methods.append(
        Method(
            "pytorch_optimizer.Muon",
            "pytorch_optimizer",
            "muon",
            "NS5 Keller, bf16 NS (fixed), foreach + same-shape stacking, own AdamW",
            po_muon,
            flops.muon,
            bf16=True,
        )
    )

    methods += whiten_rows(
        "whiten.Muon",
        "muon",
        "NS5 Keller, ns_method=auto (Gram NS where the dtype's rule says so)",
        "muon",
        {**muon_common, "compile_ns": compile_ns},
        policies=policies,
        reference="torch.optim.Muon",
    )
    methods += whiten_rows(
        "whiten.Muon[gram]",
        "muon",
        "opt-in ns_method=gram (same polynomial; in bf16 ~3x the rounding error of direct)",
        "muon",
        {**muon_common, "ns_method": "gram"},
        policies=[p for p in policies if p == "bf16"],
        reference="torch.optim.Muon",
    )

    # --- HTMuon --------------------------------------------------------------------------------
    for kind in ("svd", "ns", "stream"):
        methods += whiten_rows(
            f"whiten.HTMuon[{kind}]",
            "htmuon",
            f"p=0.125, spectral_map={kind}",
            "htmuon",
            {"lr": 0.03, "power": 0.125, "spectral_map": kind},
            policies=policies,
            reference="whiten.Muon",
        )

    # --- SOAP ----------------------------------------------------------------------------------
    methods += whiten_rows(
        "whiten.SOAP",
        "soap",
        f"QR refresh every {T}, plain factors",
        "soap",
        {
            "lr": LR,
            "betas": (0.9, 0.95),
            "shampoo_beta": 0.95,
            "weight_decay": 0.01,
            "precondition_frequency": T,
            "max_precond_dim": 4096,
        },
        policies=policies,
        period=T,
    )

    hb_notes: list[str] = []

    def hb_kron(name: str) -> Builder:
        def build(mats: list[Tensor], others: list[Tensor]) -> Stepper:
            cls = _find_class("heavyball", name)
            opt = _construct(
                cls,
                mats,
                hb_notes,
                lr=LR,
                betas=(0.9, 0.95),
                shampoo_beta=0.95,
                weight_decay=0.01,
                precondition_frequency=T,
                use_precond_schedule=False,
                max_precond_dim=4096,
            )
            return Stepper(opt, _torch_adamw(others))

        return build

    methods.append(
        Method(
            "heavyball.SOAP",
            "heavyball",
            "soap",
            f"precondition_frequency={T}, no schedule, max_precond_dim 4096",
            hb_kron("SOAP"),
            lambda m, n: flops.soap(m, n, T),
            period=T,
            notes=hb_notes,
        )
    )

    def po_soap(mats: list[Tensor], others: list[Tensor]) -> Stepper:
        cls = _find_class("pytorch_optimizer", "SOAP")
        opt = cls(mats, lr=LR, betas=(0.9, 0.95), shampoo_beta=0.95, weight_decay=0.01, precondition_frequency=T)
        return Stepper(opt, _torch_adamw(others))

    methods.append(
        Method(
            "pytorch_optimizer.SOAP",
            "pytorch_optimizer",
            "soap",
            f"precondition_frequency={T}",
            po_soap,
            lambda m, n: flops.soap(m, n, T),
            period=T,
        )
    )

    # --- KL-Shampoo ------------------------------------------------------------------------------
    methods += whiten_rows(
        "whiten.KLShampoo",
        "kl_shampoo",
        f"QR refresh every {T}",
        "kl-shampoo",
        {"lr": LR, "precondition_frequency": T},
        policies=policies,
        period=T,
    )
    methods.append(
        Method(
            "heavyball.KLShampoo",
            "heavyball",
            "kl_shampoo",
            f"precondition_frequency={T}, no schedule, max_precond_dim 4096",
            hb_kron("KLShampoo"),
            lambda m, n: flops.kl_shampoo(m, n, T),
            period=T,
            notes=hb_notes,
        )
    )

    # --- Pro-KLShampoo ---------------------------------------------------------------------------
    pro_options = {} if pro_ns_method is None else {"ns_method": pro_ns_method}
    for r in ranks:
        methods += whiten_rows(
            f"whiten.ProKLShampoo[r={r}]",
            "pro_kl_shampoo",
            f"rank {r}, refresh every {T}" + (f", ns_method={pro_ns_method}" if pro_ns_method else ""),
            f"pro-kls-r{r}",
            {"lr": LR, "precondition_frequency": T, **pro_options},
            policies=policies,
            period=T,
            reference="whiten.KLShampoo",
        )
    return methods


# Families whose peers are compared with (the "fastest peer" column).
def peer_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"torch": torch.__version__}
    for dist in ("heavyball", "pytorch_optimizer"):
        try:
            out[dist] = importlib.metadata.version(dist.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


# --------------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "process": time.process_time}
clock: Callable[[], float] = time.perf_counter


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int, reps: int) -> float:
    """Best-of-``reps`` FLOP rate of one ``size^3`` matmul (FLOP/s), timed with the benchmark's clock."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    c = a @ b
    best = math.inf
    for _ in range(reps):
        synchronize(device)
        t0 = clock()
        torch.mm(a, b, out=c)
        synchronize(device)
        best = min(best, clock() - t0)
    return 2.0 * size**3 / best


class Case:
    """One (configuration, method) pair: parameters, gradients, optimizer, timings."""

    def __init__(self, specs: list[ParamSpec], method: Method, device: torch.device, seed: int) -> None:
        self.method = method
        self.specs = specs
        gen = torch.Generator().manual_seed(seed)
        self.params = [(torch.randn(s.shape, generator=gen) * 0.02).to(device) for s in specs]
        # two gradient sets, alternated, copied into p.grad outside the timed region
        self.grad_sets = [[(torch.randn(s.shape, generator=gen) * 1e-2).to(device) for s in specs] for _ in range(2)]
        for p in self.params:
            p.grad = torch.empty_like(p)
        mats = [p for p, s in zip(self.params, specs, strict=True) if s.matrix]
        others = [p for p, s in zip(self.params, specs, strict=True) if not s.matrix]
        self.stepper = method.build(mats, others)
        self.k = 0
        self.times: list[float] = []
        self.device = device

    def step(self, record: bool) -> None:
        for p, g in zip(self.params, self.grad_sets[self.k % 2], strict=True):
            if p.grad is None:  # HeavyBall sets p.grad to None after its step
                p.grad = g.clone()
            else:
                p.grad.copy_(g)  # peers may modify p.grad in place
        self.k += 1
        synchronize(self.device)
        t0 = clock()
        self.stepper.step()
        synchronize(self.device)
        if record:
            self.times.append(clock() - t0)

    def release(self) -> None:
        self.params = self.grad_sets = []  # type: ignore[assignment]
        self.stepper = None  # type: ignore[assignment]


def summarise(times: list[float], period: int) -> dict[str, float]:
    windows = [sum(times[i : i + period]) / period for i in range(0, len(times) - period + 1, period)]
    q = statistics.quantiles(windows, n=4) if len(windows) >= 2 else [windows[0]] * 3
    return {
        "median_s": statistics.median(windows),
        "q1_s": q[0],
        "q3_s": q[2],
        "mean_s": statistics.fmean(times),
        "min_window_s": min(windows),
        "windows": len(windows),
        "steps": len(times),
    }


def matmul_flops(specs: list[ParamSpec], method: Method) -> float:
    return sum(method.flops(*s.shape) for s in specs if s.matrix)


def run_config(
    name: str,
    specs: list[ParamSpec],
    methods: list[Method],
    args: argparse.Namespace,
    device: torch.device,
    rates: dict[str, float],
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    numel = sum(math.prod(s.shape) for s in specs)
    interleave = numel * len(methods) <= args.interleave_numel
    steps = args.whole_steps if name == "gpt2-small" else args.steps
    rounds = args.rounds if interleave else 1
    rows: list[dict[str, Any]] = []
    cases: list[tuple[Method, Case | None, dict[str, Any]]] = []

    def new_row(method: Method) -> dict[str, Any]:
        return {
            "config": name,
            "method": method.label,
            "impl": method.impl,
            "family": method.family,
            "settings": method.settings,
            "period": method.period,
            "reference": method.reference,
            "bf16": method.bf16,
            "policy": method.policy,
            "notes": method.notes,
            "status": "ok",
        }

    def prepare(method: Method) -> tuple[Case | None, dict[str, Any]]:
        row = new_row(method)
        try:
            case = Case(specs, method, device, args.seed)
        except (ImportError, AttributeError, TypeError, ValueError, RuntimeError) as exc:
            if not method.is_peer:  # ours are built through the registry: a bad option is a bug, not a blank row
                raise
            row["status"] = f"unavailable: {type(exc).__name__}: {exc}"
            log(f"  {method.label:32s} {row['status']}")
            return None, row
        try:
            t0 = time.perf_counter()
            for _ in range(method.period + 1):  # first step (initialisation) + one full refresh period
                case.step(record=False)
            row["warmup_s"] = time.perf_counter() - t0
        except Exception as exc:  # a peer failing on this machine must not stop the run
            row["status"] = f"error: {type(exc).__name__}: {exc}"
            log(f"  {method.label:32s} {row['status']}")
            case.release()
            return None, row
        return case, row

    def finish(method: Method, case: Case, row: dict[str, Any]) -> None:
        row.update(summarise(case.times, method.period))
        row["state_bytes"] = case.stepper.state_bytes()
        row["matmul_flops"] = matmul_flops(specs, method)
        med = row["median_s"]
        row["flop_rate"] = row["matmul_flops"] / med if med > 0 else 0.0
        row["frac_fp32_peak"] = row["flop_rate"] / rates["float32"]
        row["frac_bf16_peak"] = row["flop_rate"] / rates["bfloat16"] if rates.get("bfloat16") else None
        log(
            f"  {method.label:32s} {med * 1e3:10.2f} ms  state {row['state_bytes'] / 2**20:9.1f} MiB  "
            f"{row['flop_rate'] / 1e9:7.1f} GFLOP/s"
        )
        case.release()

    windows = max(args.kron_windows, math.ceil(steps / args.period))

    def timed_steps(method: Method, round_index: int) -> int:
        if method.period > 1:  # whole refresh windows, one per round
            return method.period if round_index < windows else 0
        return max(1, math.ceil(steps / rounds)) if round_index < rounds else 0

    if interleave:
        for method in methods:
            case, row = prepare(method)
            cases.append((method, case, row))
        for round_index in range(max(rounds, windows)):
            for method, case, row in cases:
                if case is None or row["status"] != "ok":
                    continue
                try:
                    for _ in range(timed_steps(method, round_index)):
                        case.step(record=True)
                except Exception as exc:
                    row["status"] = f"error: {type(exc).__name__}: {exc}"
        for method, case, row in cases:
            if case is not None and row["status"] == "ok":
                finish(method, case, row)
            elif case is not None:
                log(f"  {method.label:32s} {row['status']}")
            rows.append(row)
    else:
        for method in methods:
            case, row = prepare(method)
            if case is not None:
                try:
                    for _ in range(method.period * windows if method.period > 1 else steps):
                        case.step(record=True)
                    finish(method, case, row)
                except Exception as exc:
                    row["status"] = f"error: {type(exc).__name__}: {exc}"
                    log(f"  {method.label:32s} {row['status']}")
                    case.release()
            rows.append(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict[str, Any]]) -> None:
    ok = {r["method"]: r for r in rows if r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        ref = ok.get(r["reference"]) if r["reference"] else None
        r["ratio_to_reference"] = r["median_s"] / ref["median_s"] if ref else None
        peers = [p for p in ok.values() if p["family"] == r["family"] and p["impl"] != "whiten"]
        if r["impl"] == "whiten" and peers:
            fastest = min(peers, key=lambda p: p["median_s"])
            r["fastest_peer"] = fastest["method"]
            r["ratio_to_fastest_peer"] = r["median_s"] / fastest["median_s"]
        else:
            r["fastest_peer"] = r["ratio_to_fastest_peer"] = None


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def _fmt_ratio(value: float | None, against: str | None) -> str:
    return f"{value:.2f}x {against}" if value is not None and against else ""


def _fmt_peak(row: dict[str, Any]) -> str:
    """Achieved rate as a share of the measured matmul rate of the dtype the method's matmuls run in."""
    if not row["matmul_flops"]:
        return "–"
    if row["bf16"] and row.get("frac_bf16_peak") is not None:
        return f"{100 * row['frac_bf16_peak']:.0f}% bf16"
    return f"{100 * row['frac_fp32_peak']:.0f}% fp32"


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [
        "# Optimizer step benchmark",
        "",
        f"- device: {meta['device']} ({meta['device_name']}), torch {meta['torch']}, threads {meta['threads']}, "
        f"clock {meta['clock']}",
        f"- peers: {', '.join(f'{k} {v}' for k, v in meta['peers'].items())}",
        f"- measured matmul rate ({meta['matmul_size']}^3): fp32 {meta['matmul_rate']['float32'] / 1e9:.1f} GFLOP/s, "
        f"bf16 {meta['matmul_rate'].get('bfloat16', 0) / 1e9:.1f} GFLOP/s",
        f"- step time = median over windows of T steps (T = refresh period) of the window mean, after warm-up "
        f"(first step + T); refreshes amortised. {meta['command']}",
        "- FLOP rate counts matmul FLOPs only (benchmarks/step_flops.py); LAPACK (QR/eigh/SVD) time lowers it. "
        "% of peak: against the measured rate of the dtype the row's hot matmuls run in (bf16 for the bf16 "
        "policy and the bf16 peers, fp32 otherwise). Every whiten row runs at each matmul policy "
        "(`[fp32]`: matmul_dtype float32, `[bf16]`: bfloat16).",
        "",
    ]
    by_config: dict[str, list[dict[str, Any]]] = {}
    for row in result["results"]:
        by_config.setdefault(row["config"], []).append(row)
    for config, rows in by_config.items():
        lines += [
            f"## {config}",
            "",
            "| method | settings | step ms (IQR) | state MiB | GFLOP/step | GFLOP/s | % of peak | vs reference "
            "| vs fastest peer |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            if r["status"] != "ok":
                lines.append(f"| {r['method']} | {r['settings']} | {r['status'][:90]} | | | | | | |")
                continue
            lines.append(
                f"| {r['method']} | {r['settings']} | {r['median_s'] * 1e3:.1f} ({r['q1_s'] * 1e3:.1f}–"
                f"{r['q3_s'] * 1e3:.1f}) | {r['state_bytes'] / 2**20:.1f} | {r['matmul_flops'] / 1e9:.2f} | "
                f"{r['flop_rate'] / 1e9:.1f} | {_fmt_peak(r)} | "
                f"{_fmt_ratio(r['ratio_to_reference'], r['reference'])} | "
                f"{_fmt_ratio(r['ratio_to_fastest_peer'], r['fastest_peer'])} |"
            )
        lines.append("")
    lines += kron_summary(result["results"])
    notes = sorted({n for row in result["results"] for n in row["notes"]})
    if notes:
        lines += ["Settings that could not be passed:", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


KRON_TARGET = "whiten.ProKLShampoo[r=128]"
KRON_TARGET_TIME, KRON_TARGET_BYTES = 0.60, 0.35  # Pro-KLShampoo r=128 vs KL-Shampoo (docs/pro_kl_shampoo.md)


def kron_summary(results: list[dict[str, Any]]) -> list[str]:
    """``--kron``: time and state bytes vs KL-Shampoo at the same matmul policy, summed over the shapes."""
    ok = [r for r in results if r["status"] == "ok" and r["family"] in KRON_FAMILIES and r["config"] != "gpt2-small"]
    lines: list[str] = []
    for policy in POLICIES:
        kl = {r["config"]: r for r in ok if r["method"] == f"whiten.KLShampoo[{policy}]"}
        if not kl:
            continue
        shapes = list(kl)
        lines += [
            f"## Kronecker methods vs KL-Shampoo[{policy}] (sum over {', '.join(shapes)})",
            "",
            "| method | step ms | state MiB | time / KL | bytes / KL |",
            "|---|---:|---:|---:|---:|",
        ]
        kl_time = sum(r["median_s"] for r in kl.values())
        kl_bytes = sum(r["state_bytes"] for r in kl.values())
        for method in dict.fromkeys(r["method"] for r in ok if r["policy"] in (policy, None)):
            rows = [r for r in ok if r["method"] == method and r["config"] in kl]
            if len(rows) == len(shapes):
                t, b = sum(r["median_s"] for r in rows), sum(r["state_bytes"] for r in rows)
                lines.append(f"| {method} | {t * 1e3:.1f} | {b / 2**20:.2f} | {t / kl_time:.2f} | {b / kl_bytes:.3f} |")
        target = f"{KRON_TARGET[:-1]},{policy}]"
        targets = [r for r in ok if r["method"] == target and r["config"] in kl]
        if targets:
            lines += ["", f"Targets for {target} (time <= {KRON_TARGET_TIME}x, bytes <= {KRON_TARGET_BYTES}x):", ""]
            for r in targets:
                time_ratio = r["median_s"] / kl[r["config"]]["median_s"]
                bytes_ratio = r["state_bytes"] / kl[r["config"]]["state_bytes"]
                time_met = "met" if time_ratio <= KRON_TARGET_TIME else "NOT met"
                bytes_met = "met" if bytes_ratio <= KRON_TARGET_BYTES else "NOT met"
                lines.append(
                    f"- {r['config']}: time {time_ratio:.2f}x ({time_met}), bytes {bytes_ratio:.3f}x ({bytes_met})"
                )
        lines.append("")
    return lines


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------

QUICK_CONFIGS = ("768x768", "768x3072")
FULL_CONFIGS = ("768x768", "768x2304", "768x3072", "3072x768", "gpt2-small")
# Kron methods need an eigh of every factor at initialisation (~25 s for 3072x3072 on 2 CPU cores);
# on CPU they run on the smallest and the largest shape only unless asked (--kron-configs).
KRON_FAMILIES = ("soap", "kl_shampoo", "pro_kl_shampoo")
CPU_KRON_CONFIGS = ("768x768", "768x3072")
WHOLE_FAMILIES = ("adamw", "muon")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="results/step-bench", help="output folder (step_bench.json, step_bench.md)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads on CPU (default 1)")
    ap.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default=None,
        help="'process' (CPU time of this process; default on CPU: robust on a shared machine, "
        "meaningful with --threads 1) or 'wall' (default on CUDA)",
    )
    ap.add_argument("--quick", action="store_true", help="two shapes, fewer steps, no whole model")
    ap.add_argument(
        "--kron",
        action="store_true",
        help="`make bench-kron`: SOAP, KL-Shampoo and Pro-KLShampoo (ranks 32-256) on the four GPT-2 matrix shapes, "
        "with the sums over the shapes and the Pro-KLShampoo r=128 targets",
    )
    ap.add_argument(
        "--policies",
        nargs="+",
        choices=list(POLICIES),
        default=list(POLICIES),
        help="matmul policies of the whiten rows (default: both; fp32 = matmul_dtype float32, bf16 = bfloat16)",
    )
    ap.add_argument("--ns-method", default=None, help="Pro-KLShampoo ns_method (default: its own default)")
    ap.add_argument("--configs", nargs="*", help=f"subset of {', '.join(FULL_CONFIGS)}")
    ap.add_argument(
        "--kron-configs",
        nargs="*",
        help="configs for SOAP / KL-Shampoo / Pro-KLShampoo (default: all on CUDA; the three distinct shapes on CPU)",
    )
    ap.add_argument(
        "--whole-families",
        nargs="*",
        default=None,
        help=f"method families run on gpt2-small (default {' '.join(WHOLE_FAMILIES)} on CPU, all on CUDA)",
    )
    ap.add_argument("--methods", default=None, help="regular expression on method labels")
    ap.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed steps per method (default 10; refresh methods: rounded up to whole periods)",
    )
    ap.add_argument("--whole-steps", type=int, default=None, help="timed steps on gpt2-small")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds for the small configs")
    ap.add_argument("--period", type=int, default=10, help="preconditioner refresh period T of the Kron methods")
    ap.add_argument(
        "--kron-windows",
        type=int,
        default=2,
        help="timed refresh windows (of --period steps) per refresh method (default 2)",
    )
    ap.add_argument("--ranks", type=int, nargs="*", default=[32, 64, 128, 256], help="Pro-KLShampoo ranks")
    ap.add_argument("--interleave-numel", type=float, default=1.5e8, help=argparse.SUPPRESS)
    ap.add_argument("--compile-peers", action="store_true", help="let HeavyBall torch.compile its kernels")
    ap.add_argument(
        "--compile",
        action="store_true",
        help="our Muon rows with compile_ns=True (NS through torch.compile; compile time excluded)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--list", action="store_true", help="print configs and methods and exit")
    args = ap.parse_args(argv)
    if args.kron:
        shapes = [f"{m}x{n}" for m, n in GPT2_MATRIX_SHAPES]
        args.configs = args.configs or shapes
        args.kron_configs = args.kron_configs if args.kron_configs is not None else shapes
        args.methods = args.methods or r"^whiten\.(SOAP|KLShampoo|ProKLShampoo)"
    if args.quick:
        args.steps = args.steps or 4
        args.rounds = args.rounds or 2
        args.configs = args.configs or list(QUICK_CONFIGS)
        args.ranks = args.ranks if args.ranks != [32, 64, 128, 256] else [128]
    args.steps = args.steps or 10
    args.whole_steps = args.whole_steps or 2
    args.rounds = args.rounds or 2
    args.configs = args.configs or list(FULL_CONFIGS)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    all_configs = configs()
    methods = method_table(
        args.ranks, args.period, compile_ns=args.compile, pro_ns_method=args.ns_method, policies=args.policies
    )
    if args.methods:
        methods = [m for m in methods if re.search(args.methods, m.label)]
    if args.list:
        print("configs:", ", ".join(all_configs))
        for m in methods:
            print(f"  {m.label:32s} [{m.family}] {m.settings}")
        return 0
    unknown = [c for c in args.configs if c not in all_configs]
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; choose from {list(all_configs)}")
    global clock
    if args.clock is None:
        args.clock = "process" if device.type == "cpu" else "wall"
    if device.type == "cuda" and args.clock != "wall":
        raise SystemExit("--clock process cannot time CUDA kernels; use --clock wall")
    clock = CLOCKS[args.clock]
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if not args.compile_peers:
        try:
            import heavyball.utils

            heavyball.utils.compile_mode = None  # eager, as ours
        except ImportError:
            pass
    kron_configs = args.kron_configs
    if kron_configs is None:
        kron_configs = list(all_configs) if device.type == "cuda" else list(CPU_KRON_CONFIGS)
    whole_families = args.whole_families
    if whole_families is None:
        whole_families = sorted({m.family for m in methods}) if device.type == "cuda" else list(WHOLE_FAMILIES)

    os.makedirs(args.out, exist_ok=True)
    log_lines: list[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        log_lines.append(line)

    size = 4096 if device.type == "cuda" else 2048
    rates = {
        dt: max(matmul_rate(device, getattr(torch, dt), size, 5) for _ in range(2)) for dt in ("float32", "bfloat16")
    }
    log(f"matmul rate {size}^3: fp32 {rates['float32'] / 1e9:.1f} GFLOP/s, bf16 {rates['bfloat16'] / 1e9:.1f} GFLOP/s")
    meta = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "clock": args.clock,
        "compiled_ns": args.compile,
        "peers": peer_versions(),
        "matmul_size": size,
        "matmul_rate": rates,
        "command": "python " + " ".join([os.path.relpath(__file__), *(argv if argv is not None else sys.argv[1:])]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "steps": args.steps,
        "whole_steps": args.whole_steps,
        "rounds": args.rounds,
        "period": args.period,
    }
    results: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for config in args.configs:
        chosen = [
            m
            for m in methods
            if (m.family not in KRON_FAMILIES or config in kron_configs)
            and (config != "gpt2-small" or m.family in whole_families)
        ]
        log(f"[{config}] {len(chosen)} methods")
        results += run_config(config, all_configs[config], chosen, args, device, rates, log)
        meta["elapsed_s"] = time.perf_counter() - t_start
        out = {"meta": meta, "results": results}
        with open(os.path.join(args.out, "step_bench.json"), "w") as fh:
            json.dump(out, fh, indent=1)
        with open(os.path.join(args.out, "step_bench.md"), "w") as fh:
            fh.write(markdown(out))
    log(f"done in {time.perf_counter() - t_start:.0f} s -> {args.out}/step_bench.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
