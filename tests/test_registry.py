"""The optimizer registry: one spelling of every name, options checked against the class, used everywhere."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from whiten import KLShampoo, Muon, ProKLShampoo
from whiten.diagnostics.spike import SpikeConfig, run_spike_experiment
from whiten.optim import registry


def test_every_name_builds_its_class_with_the_options_the_name_fixes() -> None:
    for name in [*registry.names(), "pro-kls-r3"]:
        spec = registry.get(name)
        opt = spec.build([torch.nn.Parameter(torch.zeros(4, 4))], lr=spec.default_lr)
        assert type(opt) is spec.cls, name
        for key, value in spec.options.items():
            assert opt.param_groups[0][key] == value, (name, key)
    assert registry.get("pro-kls-r3").options == {"rank": 3} and registry.get("kl-shampoo").cls is KLShampoo


def test_the_state_keys_the_diagnostics_read_are_the_ones_each_optimizer_keeps() -> None:
    """``bases`` (spike) and ``factors`` (spectra) name real state keys: a renamed key fails here."""
    torch.manual_seed(0)
    for name in [*registry.names(), "pro-kls-r3"]:
        spec = registry.get(name)
        param = torch.nn.Parameter(torch.randn(80, 72))  # wider than every listed rank: Pro-KLShampoo tracks U
        opt = spec.build([param], lr=1e-3, precondition_frequency=1) if spec.bases else spec.build([param], lr=1e-3)
        for _ in range(2):
            param.grad = torch.randn(80, 72)
            opt.step()
        state = opt.state[param]
        assert set(spec.bases) <= set(state) and set(spec.factors) <= set(state), (name, sorted(state))
        assert bool(spec.bases) == bool(spec.factors), name  # what keeps a basis keeps factors
    assert not registry.get("muon").factors and not registry.get("adamw").bases


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("klshampoo", "it is spelt 'kl-shampoo' now"),
        ("proklshampoo", "it is spelt 'pro-kls-r16' now"),
        ("kl-soap", "it is spelt 'klsoap' now"),
        ("muonn", "did you mean 'muon'?"),
        ("pro-kls-r0", "unknown optimizer 'pro-kls-r0'"),
    ],
)
def test_unknown_or_old_names_are_refused_with_the_right_spelling(name: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        registry.get(name)


def test_options_are_checked_against_the_constructor_and_never_dropped() -> None:
    muon = registry.get("muon")
    with pytest.raises(ValueError, match=r"'muon' \(Muon\) has no option 'badkey'; valid options: lr, .*ns_method"):
        muon.check_options({"badkey": 1})
    with pytest.raises(ValueError, match="set by --lr"):
        muon.check_options({"lr": 0.1}, {"lr": "--lr"})
    with pytest.raises(ValueError, match="ns_method='nope' is not valid"):  # the class's own value check
        muon.check_options({"ns_method": "nope"})
    muon.check_options({"ns_method": "gram", "momentum": 0.9})
    muon.check_options({"adamw_lr": 1e-3, "nonfinite": "raise"})  # the shared options (**common) are valid too
    # REKLS forwards **options to SOAP: SOAP's keywords are valid, its fixed ones refused by REKLS itself
    rekls = registry.get("rekls")
    assert {"kl_init", "max_precond_dim", "precondition_frequency"} <= set(rekls.option_names())
    with pytest.raises(ValueError, match="REKLS fixes use_eigh=True"):
        rekls.check_options({"use_eigh": False})
    with pytest.raises(ValueError, match="fixed by the name"):
        registry.get("pro-kls-r8").check_options({"rank": 4})
    with pytest.raises(ValueError, match="fixed by the name"):
        registry.get("soap-kl").check_options({"use_kl_shampoo": False})


def test_parse_options() -> None:
    assert registry.parse_options(["muon.ns_steps=3", "muon.ns_method=gram", "adamw.amsgrad=True"]) == {
        "muon": {"ns_steps": 3, "ns_method": "gram"},
        "adamw": {"amsgrad": True},
    }
    for bad in ("muon", "muon.x", ".x=1", "muon.=1"):
        with pytest.raises(ValueError, match=r"OPTIMIZER\.KEY=VALUE"):
            registry.parse_options([bad])


def test_spike_passes_the_rank_of_the_name_and_fails_loudly_if_the_class_renames_it(monkeypatch) -> None:
    torch.set_num_threads(1)
    small = dict(steps=8, spike_at=4, shape=(12, 8), offsets=(1,), top_k=2, precisions=("highest",))
    run = run_spike_experiment(optimizers=("pro-kls-r3",), **small).runs[0]
    assert run.trajectories["U"].shape == (8, 12, 3)  # the tracked subspace has the name's rank

    class Renamed(ProKLShampoo):  # a class whose rank option is spelt differently
        def __init__(self, params, lr: float = 1e-4, *, tracked_rank: int = 128, **options) -> None:
            super().__init__(params, lr, rank=tracked_rank, **options)

    real = registry._pro_kls_spec
    monkeypatch.setattr(registry, "_pro_kls_spec", lambda rank: dataclasses.replace(real(rank), cls=Renamed))
    with pytest.raises(TypeError, match="rank"):  # not silently a full-rank KL-Shampoo run
        run_spike_experiment(optimizers=("pro-kls-r3",), **small)


def test_spike_refuses_optimizers_without_an_eigenbasis_and_bad_options() -> None:
    with pytest.raises(ValueError, match="'muon' keeps no eigenbasis"):
        SpikeConfig(optimizers=("muon",)).validate()
    with pytest.raises(ValueError, match="spelt 'kl-shampoo' now"):
        SpikeConfig(optimizers=("klshampoo",)).validate()
    with pytest.raises(ValueError, match="'rekls' \\(REKLS\\) has no option 'bad'"):
        SpikeConfig(optimizers=("rekls",), options={"rekls": {"bad": 1}}).validate()
    with pytest.raises(ValueError, match="set by --kl-init"):
        SpikeConfig(optimizers=("rekls",), options={"rekls": {"kl_init": "peer"}}).validate()


def test_step_bench_whiten_rows_come_from_the_registry(monkeypatch) -> None:
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "step_bench.py"
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location("step_bench_under_test", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
        sys.modules.pop("step_bench_under_test", None)
    requested: list[str] = []
    real_get = registry.get
    monkeypatch.setattr(registry, "get", lambda name: requested.append(name) or real_get(name))
    methods = {m.label: m for m in module.method_table([4], period=2)}
    mats, others = [torch.zeros(6, 4)], [torch.zeros(4)]
    for label, method in methods.items():
        if method.impl != "whiten":
            continue
        requested.clear()
        stepper = method.build(mats, others)
        assert requested and all(type(o) is real_get(requested[0]).cls for o in stepper.optimizers), label
    assert isinstance(methods["whiten.Muon[bf16]"].build(mats, others).optimizers[0], Muon)
    # an option the class does not take is an error, not a note in the report
    monkeypatch.setattr(registry, "get", lambda name: dataclasses.replace(real_get(name), cls=KLShampoo))
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        methods["whiten.Muon[bf16]"].build(mats, others)
