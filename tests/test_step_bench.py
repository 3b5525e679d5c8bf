"""``benchmarks/step_bench.py``: every whiten row at each matmul policy, FLOPs from the classes' declarations."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from whiten.optim import registry

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def step_bench() -> ModuleType:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location("step_bench_policies", BENCHMARKS / "step_bench.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))
        sys.modules.pop("step_bench_policies", None)
        sys.modules.pop("step_flops", None)  # imported by step_bench from the benchmarks folder


def _matmul_dtype_option(name: str) -> str | None:
    accepted = registry.get(name).option_names()
    return next((key for key in ("matmul_dtype", "ns_dtype") if key in accepted), None)


def test_every_whiten_row_runs_at_each_policy_its_class_offers(step_bench):
    methods = step_bench.method_table([8], period=2)
    whiten = [m for m in methods if m.impl == "whiten" and m.family != "adamw"]
    families = {m.family for m in whiten}
    assert families == {"muon", "htmuon", "soap", "kl_shampoo", "pro_kl_shampoo"}
    name_of = {"muon": "muon", "htmuon": "htmuon", "soap": "soap", "kl_shampoo": "kl-shampoo"}
    for family in families:
        rows = [m for m in whiten if m.family == family]
        policies = {m.policy for m in rows}
        option = _matmul_dtype_option(name_of.get(family, "pro-kls-r8"))
        assert policies == ({"fp32", "bf16"} if option else {"fp32"}), family
        for m in rows:
            assert m.label.endswith(f"{m.policy}]") and m.bf16 == (m.policy == "bf16")
            if option:
                assert f"{option}={step_bench.POLICIES[m.policy]}" in m.settings
    only_fp32 = step_bench.method_table([8], period=2, policies=["fp32"])
    assert {m.policy for m in only_fp32 if m.impl == "whiten"} == {"fp32", None}


def test_policy_rows_build_with_the_policy_and_count_the_declared_flops(step_bench, monkeypatch):
    methods = {m.label: m for m in step_bench.method_table([8], period=2)}
    mats, others = [torch.randn(12, 6)], [torch.zeros(6)]
    for label in ("whiten.Muon[fp32]", "whiten.Muon[bf16]"):
        optimizer = methods[label].build(mats, others).optimizers[0]
        option = _matmul_dtype_option("muon")
        assert optimizer.param_groups[0][option] == step_bench.POLICIES[label[-5:-1]]
    # the FLOPs of each row are the matrix products its optimizer really runs: FlopCounterMode over the row's
    # own steps (after the initialisation steps), averaged over its refresh period
    for label, m in methods.items():
        if m.impl != "whiten" or m.family == "adamw":
            continue
        W = torch.randn(24, 72)
        stepper = m.build([W], [])
        gen = torch.Generator().manual_seed(0)

        def counted(stepper=stepper, W=W, gen=gen) -> int:
            W.grad = torch.randn(W.shape, generator=gen)
            with FlopCounterMode(display=False) as counter:
                stepper.step()
            return counter.get_total_flops()

        for _ in range(2):
            counted()
        measured = sum(counted() for _ in range(m.period)) / m.period
        assert m.flops(24, 72) == pytest.approx(measured, rel=1e-12) and measured > 0, label
    # the reference of a whiten row is the row at the same policy
    assert methods["whiten.ProKLShampoo[r=8,fp32]"].reference == "whiten.KLShampoo[fp32]"
    assert methods["whiten.HTMuon[ns,bf16]"].reference == "whiten.Muon[bf16]"
    assert methods["whiten.Muon[bf16]"].reference == "torch.optim.Muon"


def test_kron_summary_compares_at_the_same_policy(step_bench):
    def row(method: str, policy: str | None, config: str, seconds: float) -> dict:
        family = "kl_shampoo" if "KL" in method and "Pro" not in method else "pro_kl_shampoo"
        return {"status": "ok", "family": family, "config": config, "method": method, "policy": policy}, seconds

    rows = []
    for r, seconds in (
        row("whiten.KLShampoo[fp32]", "fp32", "768x768", 1.0),
        row("whiten.KLShampoo[bf16]", "bf16", "768x768", 0.5),
        row("whiten.ProKLShampoo[r=128,fp32]", "fp32", "768x768", 0.5),
        row("whiten.ProKLShampoo[r=128,bf16]", "bf16", "768x768", 0.4),
    ):
        rows.append({**r, "median_s": seconds, "state_bytes": 100})
    text = "\n".join(step_bench.kron_summary(rows))
    assert "KL-Shampoo[fp32]" in text and "KL-Shampoo[bf16]" in text
    assert "- 768x768: time 0.50x (met)" in text and "- 768x768: time 0.80x (NOT met)" in text
