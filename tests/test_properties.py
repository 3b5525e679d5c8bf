"""Property-based robustness suite (hypothesis): random optimizers, options, shapes, dtypes and gradients.

Asserted for every valid configuration and every step: no exception, parameters and state finite while
the gradients are finite, no dtype or shape drift of parameters and state, ``p.grad`` untouched.

Profiles (``WHITEN_HYPOTHESIS_PROFILE``): ``"ci"`` (default, part of ``make test``; derandomized, no example
database, bounded to about a minute on 2 cores) and ``"fuzz"`` (``make fuzz``; ``WHITEN_FUZZ_EXAMPLES``
examples, default 10,000). With ``WHITEN_FUZZ_REPORT=path`` the run writes its figures (examples, steps,
skipped steps, crashes, non-finite values, wall time) to that JSON file; ``docs/reliability.md`` has them.
"""

from __future__ import annotations

import json
import os
import platform
import time
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from whiten import KLSOAP, REKLS, SOAP, HTMuon, KLShampoo, Muon, ProKLShampoo

PROFILE = os.environ.get("WHITEN_HYPOTHESIS_PROFILE", "ci")
_COMMON = dict(deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
settings.register_profile("ci", max_examples=400, **_COMMON)
settings.register_profile("fuzz", max_examples=int(os.environ.get("WHITEN_FUZZ_EXAMPLES", "10000")), **_COMMON)
settings.load_profile(PROFILE)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
GRADIENT_KINDS = ("normal", "zero", "rank1", "constant", "spiked")
MAX_STEPS = 12 if PROFILE == "fuzz" else 4
FIGURES: dict[str, Any] = {"examples": 0, "steps": 0, "fault_skips": 0, "crashes": 0, "nonfinite_values": 0}
#: per optimizer, the gradient exponents (log10 of the magnitude) of the steps that a fault skip hit
SKIPS_BY_EXPONENT: dict[str, dict[int, int]] = {}

unit = st.floats(0.0, 0.99)
betas = st.tuples(unit, unit)


@st.composite
def optimizer_options(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """An optimizer name and options drawn across their documented ranges."""
    name = draw(st.sampled_from(["Muon", "HTMuon", "SOAP", "REKLS", "KLShampoo", "KLSOAP", "ProKLShampoo"]))
    common: dict[str, Any] = {
        "weight_decay": draw(st.floats(0.0, 0.2)),
        "maximize": draw(st.booleans()),
        "adamw_lr": draw(st.sampled_from([None, 1e-3])),
    }
    if name in ("Muon", "HTMuon"):
        options = {
            "lr": draw(st.floats(0.0, 0.05)),
            "momentum": draw(unit),
            "nesterov": draw(st.booleans()),
            "ns_steps": draw(st.integers(1, 30)),
            "ns_coefficients": draw(st.sampled_from(["keller", "polar_express"])),
            "ns_method": draw(st.sampled_from(["auto", "direct", "gram", "spectral"])),
            "ns_dtype": draw(st.sampled_from(["float32", "bfloat16", "float64"])),
            "adjust_lr_fn": draw(st.sampled_from([None, "original", "match_rms_adamw"])),
        }
        if options["ns_method"] == "spectral" and options["ns_dtype"] == "bfloat16":
            options["ns_dtype"] = "float32"  # refused by validation (eigh has no bf16 kernel)
        if name == "HTMuon":
            spectral_map = draw(st.sampled_from(["svd", "ns", "stream"]))
            top = 1.0 if spectral_map == "ns" else 2.0
            options |= {
                "spectral_map": spectral_map,
                "power": draw(st.floats(0.01 if spectral_map == "ns" else 0.0, top)),
                "interval": draw(st.integers(1, 3)),
                "normuon": draw(st.booleans()),
            }
        return name, options | common
    if name in ("SOAP", "REKLS"):
        options = {
            "lr": draw(st.floats(0.0, 0.01)),
            "betas": draw(betas),
            "shampoo_beta": draw(unit),
            "eps": draw(st.sampled_from([1e-12, 1e-8, 1e-4])),
            "weight_decay_method": draw(st.sampled_from(["decoupled", "independent", "l2"])),
            "nesterov": draw(st.booleans()),
            "correct_bias": draw(st.booleans()),
            "power_iter_steps": draw(st.integers(1, 2)),
            "max_update_rms": draw(st.sampled_from([0.0, 1.0])),
            "precondition_frequency": draw(st.integers(1, 3)),
            "max_precond_dim": draw(st.integers(1, 8)),
            "kl_init": draw(st.sampled_from(["safe", "peer"])),
        }
        if name == "SOAP":
            options |= {"use_eigh": draw(st.booleans()), "use_kl_shampoo": draw(st.booleans())}
        return name, options | common
    options = {
        "lr": draw(st.floats(0.0, 0.01)),
        "betas": draw(betas),
        "shampoo_beta": draw(st.sampled_from([-1, 0.0, 0.5, 0.95])),
        "eps": draw(st.sampled_from([1e-12, 1e-8, 1e-4])),
        "precondition_frequency": draw(st.integers(1, 3)),
        "init_factor": draw(st.sampled_from([1e-30, 1e-3, 0.1, 1.0])),
        "max_precond_dim": draw(st.integers(1, 8)),
        "state_dtype": draw(st.sampled_from(["float32", "bfloat16"])),
    }
    if name == "ProKLShampoo":
        options |= {
            "rank": draw(st.integers(1, 4)),
            "project_side": draw(st.sampled_from(["auto", "left", "right"])),
            "complement": draw(st.sampled_from(["left_whitened_orth", "orth"])),
            "complement_scale": draw(st.sampled_from(["sqrt_m", "kl_norm", "muon_rms"])),
            "ns_steps": draw(st.integers(1, 30)),
            "ns_method": draw(st.sampled_from(["spectral", "auto", "gram", "direct"])),
            "adaptive_rank": draw(st.booleans()),
            "rank_update_interval": draw(st.integers(1, 3)),
        }
    return name, options | common


CLASSES = {
    "Muon": Muon,
    "HTMuon": HTMuon,
    "SOAP": SOAP,
    "REKLS": REKLS,
    "KLShampoo": KLShampoo,
    "KLSOAP": KLSOAP,
    "ProKLShampoo": ProKLShampoo,
}

shapes = st.lists(st.integers(1, 6), min_size=0, max_size=4).map(tuple)


def gradient(kind: str, shape: tuple[int, ...], magnitude: float, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "zero":
        return torch.zeros(shape, dtype=dtype)
    if kind == "constant":
        return torch.full(shape, magnitude, dtype=dtype)
    if kind == "rank1" and len(shape) >= 2:
        u = torch.randn(shape[0], 1, generator=gen, dtype=torch.float64)
        v = torch.randn(1, int(torch.Size(shape[1:]).numel()), generator=gen, dtype=torch.float64)
        return ((u @ v) * magnitude).reshape(shape).to(dtype)
    g = torch.randn(shape, generator=gen, dtype=torch.float64) * magnitude
    if kind == "spiked":
        g = g * 1e-3
        g.view(-1)[int(torch.randint(g.numel(), (1,), generator=gen))] = magnitude
    return g.to(dtype)


def _floating_state(opt: torch.optim.Optimizer, p: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v for k, v in opt.state[p].items() if isinstance(v, torch.Tensor) and v.is_floating_point()}


@given(
    config=optimizer_options(),
    param_shapes=st.lists(shapes, min_size=1, max_size=3),
    dtype=st.sampled_from(list(DTYPES)),
    steps=st.lists(
        st.tuples(st.sampled_from(GRADIENT_KINDS), st.integers(-30, 30), st.integers(0, 2**16)),
        min_size=1,
        max_size=MAX_STEPS,
    ),
)
def test_random_configurations_never_crash_or_poison_state(config, param_shapes, dtype, steps):
    name, options = config
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(shape, dtype=torch.float64).to(DTYPES[dtype])) for shape in param_shapes]
    FIGURES["examples"] += 1
    FIGURES["torch_threads"] = torch.get_num_threads()  # conftest.py runs each test on one thread
    try:
        opt = CLASSES[name](params, **options)
        dtypes: dict[tuple[int, str], tuple[torch.dtype, torch.Size]] = {}
        for kind, exponent, seed in steps:
            grads = [gradient(kind, tuple(p.shape), 10.0**exponent, p.dtype, seed + i) for i, p in enumerate(params)]
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            skips = opt.fault_skips()
            opt.step()
            FIGURES["steps"] += 1
            if opt.fault_skips() > skips:
                hist = SKIPS_BY_EXPONENT.setdefault(name, {})
                hist[exponent] = hist.get(exponent, 0) + 1
            for i, (p, g) in enumerate(zip(params, grads, strict=True)):
                assert torch.equal(p.grad, g), "p.grad was modified"
                assert p.dtype == DTYPES[dtype] and p.shape == g.shape
                bad = int((~torch.isfinite(p)).sum())
                for key, value in _floating_state(opt, p).items():
                    # +inf eigenvalues are KL-Shampoo's deliberate "no gain" value (clamp_eigenvalues)
                    ok = value != -torch.inf if opt.infinite_state_ok(key) else torch.isfinite(value)
                    bad += int((~ok | torch.isnan(value)).sum())
                    before = dtypes.setdefault((i, key), (value.dtype, value.shape))
                    assert (value.dtype, value.shape) == before, f"state {key!r} drifted"
                FIGURES["nonfinite_values"] += bad
                assert bad == 0, f"non-finite values in parameter {i} or its state after a finite gradient"
        FIGURES["fault_skips"] += opt.fault_skips()
    except Exception:
        FIGURES["crashes"] += 1
        raise


@pytest.fixture(scope="module", autouse=True)
def _report():
    start = time.perf_counter()
    yield
    path = os.environ.get("WHITEN_FUZZ_REPORT")
    if path:
        figures = dict(FIGURES)
        figures |= {
            "steps_with_a_fault_skip_by_gradient_exponent": {
                name: dict(sorted(hist.items())) for name, hist in sorted(SKIPS_BY_EXPONENT.items())
            },
            "profile": PROFILE,
            "wall_s": round(time.perf_counter() - start, 1),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs",
            "torch": torch.__version__,
        }
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(figures, f, indent=2)
