"""A step never waits on the host (issue 12): no value is read back to Python on a step that is not a refresh.

On CUDA every read of a tensor value (``.item()``, ``.tolist()``, ``bool(t)``, ``float(t)``, ``.cpu()``,
``torch.nonzero``, boolean-mask indexing) blocks the host until the device has caught up. On CPU there is no
such wait, so the tests make every such read raise while ``opt.step()`` runs (:func:`no_host_reads`) and step
each registry optimizer past its initialisation step, on steps that are not refreshes. The same guard runs the
CUDA check (``benchmarks/cuda_checks.py``, with ``torch.cuda.set_sync_debug_mode("error")`` on a GPU).
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from whiten import KLSOAP, SOAP, HTMuon, KLShampoo, Muon, ProKLShampoo
from whiten.optim.registry import get

ROOT = Path(__file__).resolve().parents[1]


def _cuda_checks():
    spec = importlib.util.spec_from_file_location("cuda_checks", ROOT / "benchmarks" / "cuda_checks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["cuda_checks"] = module
    spec.loader.exec_module(module)
    return module


checks = _cuda_checks()
no_host_reads = checks.no_host_reads
HostReadError = checks.HostReadError


def _model() -> nn.Module:
    torch.manual_seed(0)
    # matrices of two shapes (batched stages), a wide one (Pro-KLShampoo's projection), gains and biases (AdamW)
    return nn.Sequential(nn.Linear(12, 24), nn.LayerNorm(24), nn.Linear(24, 24), nn.Linear(24, 40), nn.Linear(40, 6))


def _grads(model: nn.Module, step: int) -> None:
    gen = torch.Generator().manual_seed(1000 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)


def test_the_guard_catches_every_kind_of_host_read():
    t = torch.ones(3)
    reads = [
        lambda: t.sum().item(),
        lambda: t.tolist(),
        lambda: bool(t.sum() > 0),
        lambda: float(t.sum()),
        lambda: int(t.sum()),
        lambda: t.cpu(),
        lambda: torch.nonzero(t),
        lambda: t.nonzero(),
        lambda: t[t > 0],
        lambda: t.numpy(),
        lambda: range(t.sum().long()),
    ]
    for read in reads:
        with no_host_reads(), pytest.raises(HostReadError):
            read()
    with no_host_reads():  # device-side arithmetic, selections and shape queries are fine
        torch.where(t > 0, t, 0.0).add_(1.0)
        assert t.shape[0] == 3 and t.numel() == 3
    assert t.sum().item() == 3.0  # restored afterwards


# Every optimizer of the registry in its default configuration; the steps checked are past the initialisation
# step and avoid the refresh steps (every `precondition_frequency`-th; SOAP refreshes its basis by a QR every
# step, which needs no host read; REKLS takes an eigh every step, whose CUDA kernel checks its result on the host,
# and HTMuon's default map an SVD, which does the same: on CPU those checks stay inside the kernels)
CASES = ["muon", "htmuon", "soap", "soap-kl", "rekls", "kl-shampoo", "klsoap", "pro-kls-r8", "pro-kls-r16"]


@pytest.mark.parametrize("name", CASES)
def test_a_step_reads_nothing_back_to_the_host(name):
    model = _model()
    spec = get(name)
    opt = checks.build(spec, model)
    # the first step initialises the statistics (it may read flags: a parameter without state has nothing to
    # keep); steps 2-5 are not refreshes in the default configuration
    for step in range(6):
        _grads(model, step)
        with no_host_reads() if step >= 2 else contextlib.nullcontext():
            opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_refresh_steps_are_the_only_ones_that_read_back():
    # KL-Shampoo at precondition_frequency=3: the refresh steps (counted from the first update) may read back
    model = _model()
    opt = KLShampoo(model.parameters(), lr=1e-3, precondition_frequency=3)
    for step in range(8):
        _grads(model, step)
        refresh = step >= 1 and step % 3 == 0  # the state's step counter reaches 3, 6 on these calls
        with no_host_reads() if step >= 1 and not refresh else contextlib.nullcontext():
            opt.step()


def _snapshot(opt, params):
    return [
        (p.detach().clone(), {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()})
        for p in params
    ]


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: Muon(ps, lr=0.02),
        lambda ps: KLShampoo(ps, lr=1e-3),
        # the accelerator default (no eigh): on CPU the default "spectral" complement takes an eigh of the
        # NaN Gram, which fails, and a failed decomposition is decided on the host
        lambda ps: ProKLShampoo(ps, lr=1e-3, rank=4, ns_method="auto"),
    ],
    ids=["muon", "kl-shampoo", "pro-kl-shampoo"],
)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_masked_skip_is_all_or_nothing(make, bad):
    model = _model()
    params = list(model.parameters())
    opt = make(params)
    for step in range(3):
        _grads(model, step)
        opt.step()
    before = _snapshot(opt, params)
    _grads(model, 3)
    matrix, vector = model[2].weight, model[1].bias  # one parameter of each half gets a non-finite gradient
    matrix.grad[3, 5] = bad
    vector.grad[0] = bad
    with no_host_reads():  # the skip is decided on the device
        opt.step()
    skipped = [i for i, p in enumerate(params) if p is matrix or p is vector]
    for i in skipped:
        value, state = before[i]
        assert torch.equal(params[i].detach(), value)
        now = {k: v for k, v in opt.state[params[i]].items() if k != "nonfinite_skips"}
        assert now.keys() == state.keys()
        for key, v in state.items():
            assert torch.equal(now[key], v) if torch.is_tensor(v) else now[key] == v, key
        assert opt.state[params[i]]["nonfinite_skips"] == 1  # read lazily, after the step
    for i, p in enumerate(params):
        if i not in skipped:
            assert not torch.equal(p.detach(), before[i][0])  # the healthy parameters stepped
    assert opt.nonfinite_skips() == 2 and opt.fault_skips() == 0


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: Muon(ps, lr=0.02),
        lambda ps: HTMuon(ps, lr=0.02, interval=2),
        lambda ps: SOAP(ps, lr=1e-3),
        lambda ps: SOAP(ps, lr=1e-3, precondition_frequency=3, nesterov=True),
        lambda ps: KLShampoo(ps, lr=1e-3, precondition_frequency=3),
        lambda ps: KLSOAP(ps, lr=1e-3, precondition_frequency=3),
        lambda ps: ProKLShampoo(ps, lr=1e-3, rank=4, precondition_frequency=3),
    ],
    ids=["muon", "htmuon-interval-2", "soap", "soap-T3-nesterov", "kl-shampoo-T3", "klsoap-T3", "pro-kls-T3"],
)
def test_a_masked_skip_equals_not_calling_step(make):
    # one parameter gets a NaN gradient on two calls: its trajectory (bias corrections, refresh schedule) must
    # equal that of a run without those calls, although the int step counters learn of the skips only later
    def run(skip_calls: bool) -> list:
        model = _model()
        params = list(model.parameters())
        opt = make(params)
        target = model[2].weight
        for step in range(11):
            _grads(model, step)
            if step in (3, 5):
                if skip_calls:
                    continue
                target.grad[0, 0] = float("nan")
                for p in params:  # only the target is poisoned; the others see no gradient on this call
                    if p is not target:
                        p.grad = None
            opt.step()
        assert opt.nonfinite_skips() == (0 if skip_calls else 2)
        state = {k: v for k, v in opt.state[target].items() if k != "nonfinite_skips"}
        return [target.detach().clone(), *(v.clone() if torch.is_tensor(v) else v for v in state.values())]

    for a, b in zip(run(True), run(False), strict=True):
        assert torch.equal(a, b) if torch.is_tensor(a) else a == b


def test_skip_counters_read_lazily_survive_a_checkpoint():
    model = _model()
    opt = Muon(model.parameters(), lr=0.02)
    for step in range(4):
        _grads(model, step)
        if step == 2:
            model[0].weight.grad[0, 0] = float("nan")
        with no_host_reads() if step >= 1 else contextlib.nullcontext():
            opt.step()
    saved = opt.state_dict()
    entry = saved["state"][0]
    assert entry["nonfinite_skips"] == 1 and entry["step"] == 3
    restored = Muon(_model().parameters(), lr=0.02)
    restored.load_state_dict(saved)
    assert restored.nonfinite_skips() == 1


@pytest.mark.parametrize(
    "make",
    [lambda ps: Muon(ps, lr=0.02), lambda ps: KLShampoo(ps, lr=1e-3), lambda ps: ProKLShampoo(ps, lr=1e-3, rank=4)],
    ids=["muon", "kl-shampoo", "pro-kl-shampoo"],
)
def test_dynamo_finds_no_graph_break_in_a_step(make):
    # a host read (.tolist(), bool(t)) in the step is a graph break: a step that dynamo captures whole reads nothing
    model = _model()
    opt = make(model.parameters())
    for step in range(2):
        _grads(model, step)
        opt.step()
    _grads(model, 2)
    explanation = torch._dynamo.explain(opt.step)()
    reasons = [str(b.reason) for b in explanation.break_reasons]
    assert explanation.graph_break_count == 0, reasons


def test_cuda_check_script_runs_its_loop_on_cpu_and_skips_cleanly_without_cuda(capsys):
    assert checks.run_checks(torch.device("cpu"), names=["muon", "kl-shampoo", "pro-kls-r16"], steps=5) == []
    if not torch.cuda.is_available():
        assert checks.main([]) == 0
        assert "no CUDA" in capsys.readouterr().out
