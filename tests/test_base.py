"""Shared optimizer behaviour (SPEC §6): routing, validation, non-finite policy, schedulers, groups."""

import pytest
import torch
from torch import nn

from whiten import HTMuon, Muon, param_groups, split_parameters


def test_routing_splits_vectors_and_scalars_to_adamw():
    W = nn.Parameter(torch.randn(6, 4))
    b = nn.Parameter(torch.randn(4))
    s = nn.Parameter(torch.tensor(0.5))  # 0-d parameters are valid and go to AdamW
    opt = Muon([W, b, s], lr=0.02, adamw_lr=1e-3, adamw_eps=1e-10, adamw_weight_decay=0.01)
    matrix_group, adamw_group = opt.param_groups
    assert matrix_group["use_matrix"] and matrix_group["params"] == [W]
    assert not adamw_group["use_matrix"] and adamw_group["lr"] == 1e-3 and adamw_group["weight_decay"] == 0.01
    b0, s0 = b.detach().clone(), s.detach().clone()
    gb, gs = torch.randn(4), torch.tensor(0.3)
    W.grad, b.grad, s.grad = torch.randn(6, 4), gb.clone(), gs.clone()
    opt.step()
    # first AdamW step: update = lr * g / (|g| + eps) after bias correction, plus decoupled decay
    expected_b = b0 * (1 - 1e-3 * 0.01) - 1e-3 * gb / (gb.abs() + 1e-10)
    torch.testing.assert_close(b.detach(), expected_b)
    torch.testing.assert_close(s.detach(), s0 * (1 - 1e-5) - 1e-3 * torch.sign(gs))


def test_adamw_fallback_matches_torch_adamw():
    torch.manual_seed(0)
    b = nn.Parameter(torch.randn(10))
    ref = nn.Parameter(b.detach().clone())
    ours = Muon(
        [{"params": [b], "use_matrix": False}],
        adamw_lr=3e-3,
        adamw_betas=(0.9, 0.99),
        adamw_eps=1e-8,
        adamw_weight_decay=0.1,
    )
    theirs = torch.optim.AdamW([ref], lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    for _ in range(15):
        g = torch.randn(10)
        b.grad, ref.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(b, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -1.0}, "lr"),
        ({"momentum": 1.0}, "momentum"),
        ({"weight_decay": float("nan")}, "weight_decay"),
        ({"ns_steps": 0}, "ns_steps"),
        ({"ns_coefficients": "fastest"}, "ns_coefficients"),
        ({"adjust_lr_fn": "rms"}, "adjust_lr_fn"),
        ({"adamw_betas": (0.9, 1.5)}, "adamw_betas"),
        ({"nonfinite": "ignore"}, "nonfinite"),
        ({"ns_dtype": "float16"}, "ns_dtype"),
        ({"ns_method": "fast"}, "ns_method"),
        ({"nesterov": "yes"}, "nesterov"),
        ({"ns_coefficients": (3.0, -4.0)}, "ns_coefficients"),
        ({"eps": -1e-7}, "eps"),
        ({"lr": "0.1"}, "lr"),
        ({"adamw_lr": -1e-3}, "adamw_lr"),
        ({"adamw_eps": float("inf")}, "adamw_eps"),
        ({"maximize": 1}, "maximize"),
    ],
)
def test_invalid_options_name_the_option(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Muon([nn.Parameter(torch.randn(3, 3))], **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"spectral_map": "qr"}, "spectral_map"),
        ({"interval": 0}, "interval"),
        ({"power": -0.5}, "power"),
        ({"spectral_map": "ns", "power": 2.0}, "power"),
        ({"normuon_beta2": 1.0}, "normuon_beta2"),
        ({"power": float("nan")}, "power"),
        ({"normuon": "yes"}, "normuon"),
        ({"ns_ridge": -1.0}, "ns_ridge"),
        ({"interval": 1.5}, "interval"),
    ],
)
def test_htmuon_invalid_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HTMuon([nn.Parameter(torch.randn(3, 3))], lr=0.01, **kwargs)


def test_per_group_overrides_are_validated_too():
    opt = Muon([nn.Parameter(torch.randn(3, 3))], lr=0.01)
    with pytest.raises(ValueError, match="momentum"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(4, 4))], "momentum": -0.1})


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="complex"):
        Muon([nn.Parameter(torch.randn(3, 3, dtype=torch.complex64))])
    with pytest.raises(ValueError, match="sparse"):
        Muon([torch.randn(3, 3).to_sparse().requires_grad_()])
    with pytest.raises(ValueError, match="use_matrix=True"):
        Muon([{"params": [nn.Parameter(torch.randn(3))], "use_matrix": True}])
    with pytest.raises(ValueError, match="use_matrix=True"):  # a 0-d parameter cannot take the matrix method
        HTMuon([{"params": [nn.Parameter(torch.tensor(1.0))], "use_matrix": True}], lr=0.01)
    with pytest.raises(TypeError, match="Tensors"):
        Muon([[1.0, 2.0]])
    with pytest.raises(ValueError, match="floating point"):
        Muon([torch.zeros(3, 3, dtype=torch.long)])
    W = nn.Parameter(torch.randn(4, 4))
    opt = Muon([W])
    W.grad = torch.randn(4, 4).to_sparse()
    with pytest.raises(ValueError, match="sparse gradients"):
        opt.step()


def _snapshot(opt, params):
    return [p.detach().clone() for p in params], {
        id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()} for p in params
    }


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_is_skipped_and_counted(bad):
    W, V, b = nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(3))
    opt = HTMuon([W, V, b], lr=0.02, normuon=True)
    for _ in range(2):
        W.grad, V.grad, b.grad = torch.randn(5, 3), torch.randn(4, 4), torch.randn(3)
        opt.step()
    (w0, v0, b0), states = _snapshot(opt, [W, V, b])
    poisoned = torch.randn(5, 3)
    poisoned[1, 2] = bad
    W.grad, V.grad, b.grad = poisoned, torch.randn(4, 4), torch.full((3,), bad)
    opt.step()
    assert torch.equal(W.detach(), w0) and torch.equal(b.detach(), b0)
    for p in (W, b):
        for key, value in states[id(p)].items():
            assert torch.equal(opt.state[p][key], value) if torch.is_tensor(value) else opt.state[p][key] == value
    assert not torch.equal(V.detach(), v0)  # healthy parameters still step
    assert opt.nonfinite_skips() == 2
    assert all(torch.isfinite(t).all() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


def test_nonfinite_raise_changes_nothing():
    W, V = nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(3))
    opt = Muon([W, V], lr=0.02, nonfinite="raise")
    W.grad, V.grad = torch.randn(5, 3), torch.randn(3)
    opt.step()
    (w0, v0), states = _snapshot(opt, [W, V])
    W.grad, V.grad = torch.randn(5, 3), torch.tensor([1.0, float("nan"), 0.0])  # bad grad in the LAST group
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step()
    assert torch.equal(W.detach(), w0) and torch.equal(V.detach(), v0)
    assert torch.equal(opt.state[W]["momentum_buffer"], states[id(W)]["momentum_buffer"])


def test_closure_maximize_and_grad_untouched():
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(6, 4))
    W_max = nn.Parameter(W.detach().clone())
    target = torch.randn(6, 4)
    opt = Muon([W], lr=0.05)
    opt_max = Muon([W_max], lr=0.05, maximize=True)

    def closure():
        opt.zero_grad()
        loss = (W - target).square().sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and loss.item() > 0
    W_max.grad = -2 * (W_max.detach() - target)  # gradient of the negated loss
    grad_before = W_max.grad.clone()
    opt_max.step()
    torch.testing.assert_close(W_max.detach(), W.detach())
    assert torch.equal(W_max.grad, grad_before)


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_no_gradient_is_modified_and_maximize_flips_both_halves(maximize, dtype):
    gen = torch.Generator().manual_seed(0)
    shapes = [(6, 4), (3, 2, 2, 2), (4,), ()]
    params = [nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    for make in (
        lambda ps, mx: Muon(ps, lr=0.02, maximize=mx),
        lambda ps, mx: HTMuon(ps, lr=0.02, maximize=mx, normuon=True),
    ):
        ps = [nn.Parameter(p.detach().clone()) for p in params]
        ref = [nn.Parameter(p.detach().clone()) for p in params]
        opt, opt_ref = make(ps, maximize), make(ref, False)
        for _ in range(2):
            for p, q, g in zip(ps, ref, grads, strict=True):
                p.grad, q.grad = g.clone(), (-g if maximize else g).clone()
            opt.step()
            opt_ref.step()
            for p, g in zip(ps, grads, strict=True):
                assert torch.equal(p.grad, g)  # never modified in place
        for p, q in zip(ps, ref, strict=True):
            assert p.dtype == dtype
            assert torch.equal(p, q)  # maximize == minimising the negated gradient, matrix AND AdamW halves


def test_lr_scheduler_scales_both_halves():
    opt = Muon([nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(4))], lr=0.02, adamw_lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.01, 5e-4]
    del sched


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.block = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.lm_head = nn.Linear(8, 11, bias=False)
        self.lm_head.weight = self.embed.weight  # tied


def test_param_groups_helper_keller_and_htmuon_splits():
    model = TinyLM()
    matrix, adamw = split_parameters(model)
    assert [n for n, _ in matrix] == ["block.weight"]
    assert {n for n, _ in adamw} == {"embed.weight", "block.bias", "norm.weight", "norm.bias"}
    matrix_all, _ = split_parameters(model, embeddings_and_head="matrix")
    assert {n for n, _ in matrix_all} == {"embed.weight", "block.weight"}
    groups = param_groups(model, adamw_options={"lr": 5e-4})
    opt = Muon(groups, lr=0.02)
    assert [g["use_matrix"] for g in opt.param_groups] == [True, False]
    assert opt.param_groups[1]["lr"] == 5e-4
    with pytest.raises(ValueError, match="embeddings_and_head"):
        split_parameters(model, embeddings_and_head="head")
    # untied: the embedding is found by its type, the head by its name, a conv kernel stays a matrix
    untied = nn.ModuleDict({"tok": nn.Embedding(11, 8), "conv": nn.Conv2d(2, 3, 3), "output": nn.Linear(8, 11)})
    matrix, adamw = split_parameters(untied)
    assert [n for n, _ in matrix] == ["conv.weight"]
    assert {n for n, _ in adamw} == {"tok.weight", "conv.bias", "output.weight", "output.bias"}
    matrix, _ = split_parameters(untied, embeddings_and_head="matrix")
    assert [n for n, _ in matrix] == ["tok.weight", "conv.weight", "output.weight"]
    assert [n for n, _ in split_parameters(untied, head_names=())[0]] == ["conv.weight", "output.weight"]


def test_state_bytes_counts_tensors_exactly():
    W = nn.Parameter(torch.randn(6, 4))
    b = nn.Parameter(torch.randn(4))
    opt = Muon([W, b])
    W.grad, b.grad = torch.randn(6, 4), torch.randn(4)
    opt.step()
    assert opt.state_bytes() == 6 * 4 * 4 + 2 * 4 * 4


def test_checkpoint_without_a_newer_option_loads_with_its_default_and_bad_values_are_refused():
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(8, 24))
    opt = Muon([W], lr=0.02, ns_method="gram")
    W.grad = torch.randn(8, 24)
    opt.step()
    old = opt.state_dict()
    for group in old["param_groups"]:
        del group["ns_method"]  # as written before the option existed
    fresh = Muon([W], lr=0.02)  # default ns_method="auto"
    fresh.load_state_dict(old)
    assert all(group["ns_method"] == "auto" for group in fresh.param_groups)
    fresh.step()  # no KeyError
    assert torch.isfinite(W).all()
    bad = opt.state_dict()
    bad["param_groups"][0]["ns_method"] = "fast"
    with pytest.raises(ValueError, match="ns_method"):
        Muon([W], lr=0.02).load_state_dict(bad)


def test_spectral_ns_method_refuses_bf16_at_construction():
    with pytest.raises(ValueError, match="ns_method='spectral'"):
        Muon([nn.Parameter(torch.randn(4, 6))], ns_method="spectral", ns_dtype="bfloat16")


def test_load_state_dict_keeps_the_loading_runs_distributed_mode():
    W = nn.Parameter(torch.randn(6, 4))
    saver = Muon([W], lr=0.02, momentum=0.8)
    saver.set_distributed_mode("split")
    loader = Muon([W], lr=0.5)
    loader.load_state_dict(saver.state_dict())
    assert [g["distributed_mode"] for g in loader.param_groups] == ["replicate"] * len(loader.param_groups)
    assert loader.param_groups[0]["momentum"] == 0.8 and loader.param_groups[0]["lr"] == 0.02
