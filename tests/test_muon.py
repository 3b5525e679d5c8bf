"""Muon and HTMuon: oracle comparison, exact update formulas, convergence, checkpoints."""

import copy

import pytest
import torch
import torch.optim._muon as torch_muon

from conftest import random_with_singular_values
from whiten import HTMuon, Muon
from whiten.linalg import newton_schulz, polar_svd, schatten_power_ns, schatten_power_svd


def _fp32_zeropower(grad, ns_coefficients, ns_steps, eps):
    """torch.optim.Muon's iteration with fp32 instead of bf16, written out independently."""
    a, b, c = ns_coefficients
    X = grad.float()
    tall = grad.size(0) > grad.size(1)
    if tall:
        X = X.T
    X = X / X.norm().clamp(min=eps)
    for _ in range(ns_steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


def _run_pair(ours, theirs, params_ours, params_theirs, steps=20, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p, q in zip(params_ours, params_theirs, strict=True):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr_fn", [None, "match_rms_adamw"])
def test_muon_matches_torch_optim_muon_fp32(monkeypatch, nesterov, adjust_lr_fn):
    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", _fp32_zeropower)
    torch.manual_seed(0)
    shapes = [(32, 16), (16, 48), (24, 24)]
    ours_p = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ref_p = [torch.nn.Parameter(p.detach().clone()) for p in ours_p]
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    # fp32 Newton–Schulz against torch.optim.Muon with fp32 inputs (our default is bf16, docs/precision.md)
    _run_pair(Muon(ours_p, **kw, matmul_dtype="float32"), torch.optim.Muon(ref_p, **kw), ours_p, ref_p)
    for p, q in zip(ours_p, ref_p, strict=True):
        torch.testing.assert_close(p, q, atol=2e-5, rtol=2e-5)


def test_muon_bf16_iteration_matches_unmodified_torch_muon():
    torch.manual_seed(1)
    ours_p = [torch.nn.Parameter(torch.randn(40, 20))]
    ref_p = [torch.nn.Parameter(ours_p[0].detach().clone())]
    _run_pair(Muon(ours_p, lr=0.02, ns_dtype="bfloat16"), torch.optim.Muon(ref_p, lr=0.02), ours_p, ref_p)
    torch.testing.assert_close(ours_p[0], ref_p[0], atol=1e-6, rtol=1e-6)


def test_muon_first_step_formula_float64_and_conv_flattening():
    gen = torch.Generator().manual_seed(0)
    W0 = torch.randn(8, 3, 2, 2, dtype=torch.float64, generator=gen)
    G = torch.randn(8, 3, 2, 2, dtype=torch.float64, generator=gen)
    W = torch.nn.Parameter(W0.clone())
    opt = Muon([W], lr=0.1, weight_decay=0.05, momentum=0.9, nesterov=True)
    W.grad = G.clone()
    opt.step()
    U = (G.lerp((1 - 0.9) * G, 0.9)).reshape(8, 12)  # buf = (1 - mu) G after one step
    O = newton_schulz(U, 5, "keller", compute_dtype=torch.float64)
    expected = W0 * (1 - 0.1 * 0.05) - 0.1 * 1.0 * O.reshape(W0.shape)  # 8 x 12 is wide: factor 1
    torch.testing.assert_close(W.detach(), expected, atol=1e-12, rtol=0)
    assert torch.equal(W.grad, G)  # p.grad untouched


def test_htmuon_update_is_unnormalised_power_map_with_shape_factor():
    gen = torch.Generator().manual_seed(0)
    W0 = torch.randn(12, 6, dtype=torch.float64, generator=gen)
    G = torch.randn(12, 6, dtype=torch.float64, generator=gen)
    W = torch.nn.Parameter(W0.clone())
    opt = HTMuon([W], lr=0.03, weight_decay=0.0, power=0.125, momentum=0.95)
    W.grad = G.clone()
    opt.step()
    U = G.lerp(0.05 * G, 0.95)
    expected = W0 - 0.03 * (12 / 6) ** 0.5 * schatten_power_svd(U, 0.125)
    torch.testing.assert_close(W.detach(), expected, atol=1e-12, rtol=0)


def test_htmuon_power_zero_svd_is_exact_polar():
    G = random_with_singular_values(10, 7, torch.logspace(0, -3, 7), seed=2)
    W = torch.nn.Parameter(torch.zeros(10, 7, dtype=torch.float64))
    opt = HTMuon([W], lr=1.0, weight_decay=0.0, power=0.0, momentum=0.0, nesterov=False)
    W.grad = G
    opt.step()
    torch.testing.assert_close(-W.detach() / (10 / 7) ** 0.5, polar_svd(G), atol=1e-12, rtol=0)


def test_htmuon_interval_uses_ns_between_power_steps_and_counts():
    G = random_with_singular_values(9, 6, torch.linspace(2, 0.5, 6))
    W = torch.nn.Parameter(torch.zeros(9, 6, dtype=torch.float64))
    opt = HTMuon([W], lr=1.0, weight_decay=0.0, momentum=0.0, nesterov=False, interval=2)
    deltas = []
    for _ in range(2):
        before = W.detach().clone()
        W.grad = G.clone()
        opt.step()
        deltas.append((before - W.detach()) / 1.5**0.5)
    torch.testing.assert_close(deltas[0], newton_schulz(G, 5, compute_dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(deltas[1], schatten_power_svd(G, 0.125), atol=1e-12, rtol=0)
    assert opt.state[W]["step"] == 2


def test_htmuon_stream_first_step_equals_svd_and_ns_variant_close():
    torch.manual_seed(0)
    G = random_with_singular_values(16, 8, torch.linspace(1.0, 0.6, 8)).float()
    results = {}
    for kind in ("svd", "stream", "ns"):
        W = torch.nn.Parameter(torch.zeros(16, 8))
        opt = HTMuon([W], lr=1.0, weight_decay=0.0, momentum=0.0, nesterov=False, spectral_map=kind)
        W.grad = G.clone()
        opt.step()
        results[kind] = W.detach().clone()
    torch.testing.assert_close(results["stream"], results["svd"], atol=1e-5, rtol=1e-5)
    rel = (results["ns"] - results["svd"]).norm() / results["svd"].norm()
    assert rel < 0.25  # the reference NS variant is approximate by construction (docs/muon_htmuon.md)


def test_htmuon_ns_map_is_the_reference_procedure_and_honours_ns_dtype():
    gen = torch.Generator().manual_seed(3)
    G = torch.randn(6, 14, dtype=torch.float64, generator=gen)
    W = torch.nn.Parameter(torch.zeros(6, 14, dtype=torch.float64))
    opt = HTMuon(
        [W], lr=0.5, weight_decay=0.0, momentum=0.0, nesterov=False, spectral_map="ns", power=0.25, ns_ridge=1e-4
    )
    W.grad = G.clone()
    opt.step()
    torch.testing.assert_close(-W.detach() / 0.5, schatten_power_ns(G, 0.25, ridge=1e-4), atol=1e-12, rtol=0)
    # bf16 Newton–Schulz factor (the reference's zeropower precision): close to, but not equal to, fp32
    outs = {}
    for ns_dtype in ("float32", "bfloat16"):
        V = torch.nn.Parameter(torch.zeros(6, 14))
        o = HTMuon([V], lr=1.0, weight_decay=0.0, momentum=0.0, nesterov=False, spectral_map="ns", ns_dtype=ns_dtype)
        V.grad = G.float()
        o.step()
        outs[ns_dtype] = V.detach()
    assert outs["bfloat16"].dtype == torch.float32
    rel = ((outs["bfloat16"] - outs["float32"]).norm() / outs["float32"].norm()).item()
    assert 0 < rel < 0.05


def test_normuon_tall_matrix_keeps_map_norm_then_shape_factor():
    gen = torch.Generator().manual_seed(1)
    G = torch.randn(18, 8, dtype=torch.float64, generator=gen) * torch.logspace(0, 1, 18, dtype=torch.float64)[:, None]
    W = torch.nn.Parameter(torch.zeros(18, 8, dtype=torch.float64))
    opt = HTMuon([W], lr=1.0, weight_decay=0.0, momentum=0.0, nesterov=False, normuon=True, normuon_beta2=0.5)
    W.grad = G.clone()
    opt.step()
    O = schatten_power_svd(G, 0.125)
    v = 0.5 * O.square().mean(-1)  # lerp from zero with weight 1 - beta2
    expected = O * torch.rsqrt(v + 1e-10)[:, None]
    expected = expected * O.norm() / expected.norm() * (18 / 8) ** 0.5
    torch.testing.assert_close(-W.detach(), expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(opt.state[W]["normuon_v"], v, atol=1e-15, rtol=1e-12)


def test_named_parameters_are_accepted_like_torch_muon():
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 2))
    opt = Muon(model.named_parameters(), lr=0.02)
    assert [g["param_names"] for g in opt.param_groups] == [["0.weight", "1.weight"], ["0.bias", "1.bias"]]
    assert [g["use_matrix"] for g in opt.param_groups] == [True, False]
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    with pytest.raises(TypeError, match="named_parameters"):
        Muon([("w", torch.nn.Parameter(torch.randn(3, 3))), torch.nn.Parameter(torch.randn(3, 3))])
    with pytest.raises(TypeError, match="set"):
        Muon([{"params": {torch.nn.Parameter(torch.randn(3, 3))}}])  # unordered: state would not map back


def test_normuon_rows_are_balanced_and_norm_preserved():
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(8, 16, dtype=torch.float64, generator=gen) * torch.logspace(0, 2, 8, dtype=torch.float64)[:, None]
    outs = {}
    for normuon in (False, True):
        W = torch.nn.Parameter(torch.zeros(8, 16, dtype=torch.float64))
        opt = HTMuon([W], lr=1.0, weight_decay=0.0, momentum=0.0, nesterov=False, normuon=normuon, normuon_beta2=0.0)
        W.grad = G.clone()
        opt.step()
        outs[normuon] = -W.detach()
    torch.testing.assert_close(outs[True].norm(), outs[False].norm())
    row_rms = outs[True].square().mean(-1).sqrt()
    torch.testing.assert_close(row_rms, torch.full_like(row_rms, row_rms.mean().item()), rtol=1e-6, atol=0)


def _mlp_problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(256, 16, generator=gen)
    teacher = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    torch.manual_seed(seed + 100)
    for p in teacher.parameters():
        p.data.normal_(0, 1.0)
    with torch.no_grad():
        Y = teacher(X)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    return model, X, Y


def _train(make_opt, steps=150):
    model, X, Y = _mlp_problem()
    opt = make_opt(model)
    first = None
    for _ in range(steps):

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(X), Y)
            loss.backward()
            return loss

        loss = opt.step(closure)
        first = float(loss.detach()) if first is None else first
    with torch.no_grad():
        return first, float(torch.nn.functional.mse_loss(model(X), Y))


def test_muon_and_htmuon_train_and_beat_sgd():
    best_sgd = min(_train(lambda m, lr=lr: torch.optim.SGD(m.parameters(), lr=lr))[1] for lr in (0.01, 0.03, 0.1))
    for make in (
        lambda m: Muon(m.parameters(), lr=0.02, weight_decay=0.0, adamw_lr=3e-3),
        lambda m: HTMuon(m.parameters(), lr=0.05, weight_decay=0.0, adamw_lr=3e-3),
        lambda m: HTMuon(m.parameters(), lr=0.05, weight_decay=0.0, adamw_lr=3e-3, spectral_map="stream", normuon=True),
        lambda m: HTMuon(m.parameters(), lr=0.05, weight_decay=0.0, adamw_lr=3e-3, spectral_map="ns", interval=2),
    ):
        first, last = _train(make)
        assert last < 0.3 * first
        assert last < best_sgd


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: Muon(ps, lr=0.02, nesterov=False, ns_coefficients="polar_express", ns_steps=6),
        lambda ps: Muon(
            ps,
            lr=0.02,
            momentum=0.9,
            weight_decay=0.05,
            ns_dtype="bfloat16",
            ns_method="direct",
            adjust_lr_fn="match_rms_adamw",
            eps=1e-6,
            adamw_lr=1e-3,
            adamw_betas=(0.8, 0.9),
            adamw_eps=1e-9,
            adamw_weight_decay=0.01,
            maximize=True,
            nonfinite="raise",
        ),
        lambda ps: HTMuon(ps, lr=0.03, spectral_map="stream", interval=3, normuon=True, normuon_beta2=0.9),
        lambda ps: HTMuon(
            ps,
            lr=0.03,
            spectral_map="ns",
            power=0.25,
            ns_ridge=1e-5,
            ns_coefficients=(3.0, -3.2, 1.2),
            ns_steps=7,
            interval=2,
        ),
    ],
)
def test_state_dict_round_trip_is_bit_exact(make):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(12, 8)), torch.nn.Parameter(torch.randn(8))]
    opt = make(params)
    gen = torch.Generator().manual_seed(5)
    grads = [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(10)]

    def run(optimizer, ps, gs):
        for step_grads in gs:
            for p, g in zip(ps, step_grads, strict=True):
                p.grad = g.clone()
            optimizer.step()

    run(opt, params, grads[:5])
    saved = copy.deepcopy(opt.state_dict())
    clone_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    # built with DIFFERENT options: every switch must come back from the state dict
    restored = type(opt)(clone_params, lr=0.5)
    restored.load_state_dict(saved)
    for ours, theirs in zip(restored.param_groups, opt.param_groups, strict=True):
        assert {**ours, "params": None} == {**theirs, "params": None}
    run(opt, params, grads[5:])
    run(restored, clone_params, grads[5:])
    for p, q in zip(params, clone_params, strict=True):
        assert torch.equal(p, q)
    assert opt.state[params[0]]["step"] == restored.state[clone_params[0]]["step"] == 10


def test_bf16_and_fp64_parameters_keep_wide_statistics():
    W16 = torch.nn.Parameter(torch.randn(8, 4).bfloat16())
    W64 = torch.nn.Parameter(torch.randn(8, 4, dtype=torch.float64))
    opt = HTMuon([W16, W64], lr=0.01, normuon=True)
    for _ in range(2):
        W16.grad = torch.randn(8, 4).bfloat16()
        W64.grad = torch.randn(8, 4, dtype=torch.float64)
        opt.step()
    assert opt.state[W16]["momentum_buffer"].dtype == torch.float32
    assert opt.state[W64]["momentum_buffer"].dtype == torch.float64
    assert W16.dtype == torch.bfloat16
    restored = HTMuon(
        [torch.nn.Parameter(W16.detach().clone()), torch.nn.Parameter(W64.detach().clone())], lr=0.01, normuon=True
    )
    restored.load_state_dict(opt.state_dict())
    p16 = restored.param_groups[0]["params"][0]
    assert restored.state[p16]["momentum_buffer"].dtype == torch.float32
    assert torch.equal(restored.state[p16]["momentum_buffer"], opt.state[W16]["momentum_buffer"])
