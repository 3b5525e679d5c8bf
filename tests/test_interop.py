"""Drop-in conventions of other training code (issue 14): torch.optim state dicts, Keller-style
``use_muon`` groups, unknown group keys, tensor ``lr``, schedulers that cycle ``betas``."""

import copy
import warnings

import pytest
import torch
from torch import nn

import whiten

MATRIX_METHODS = {
    "Muon": lambda groups, **kw: whiten.Muon(groups, lr=0.02, **kw),
    "HTMuon": lambda groups, **kw: whiten.HTMuon(groups, lr=0.02, **kw),
    "SOAP": lambda groups, **kw: whiten.SOAP(groups, lr=3e-3, **kw),
    "REKLS": lambda groups, **kw: whiten.REKLS(groups, lr=3e-3, **kw),
    "KLSOAP": lambda groups, **kw: whiten.KLSOAP(groups, lr=3e-3, **kw),
    "KLShampoo": lambda groups, **kw: whiten.KLShampoo(groups, lr=3e-3, **kw),
    "ProKLShampoo": lambda groups, **kw: whiten.ProKLShampoo(groups, lr=3e-3, rank=2, **kw),
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int = 1, scheduler=None) -> None:
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        x, y = torch.randn(8, 6, generator=gen, dtype=dtype), torch.randn(8, 4, generator=gen, dtype=dtype)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# -- torch.optim state dicts ---------------------------------------------------------------------


def test_torch_optim_muon_state_keeps_the_matrix_method():
    # whiten.Muon(ns_dtype="bfloat16") is bit-identical to torch.optim.Muon: a switch mid-run continues it
    model = nn.Sequential(nn.Linear(6, 5, bias=False), nn.Linear(5, 4, bias=False))
    reference = torch.optim.Muon(model.parameters(), lr=0.02, weight_decay=0.1)
    _train(model, reference, 3)
    saved, weights = copy.deepcopy(reference.state_dict()), [p.detach().clone() for p in model.parameters()]
    _train(model, reference, 2, seed=2)
    expected = _flat(model)

    with torch.no_grad():
        for p, w in zip(model.parameters(), weights, strict=True):
            p.copy_(w)
    switched = whiten.Muon(model.parameters(), lr=0.02, weight_decay=0.1, ns_dtype="bfloat16")
    switched.load_state_dict(saved)
    assert [g["use_matrix"] for g in switched.param_groups] == [True]
    _train(model, switched, 2, seed=2)
    assert all("momentum_buffer" in s and "exp_avg" not in s for s in switched.state.values())
    torch.testing.assert_close(_flat(model), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", sorted(MATRIX_METHODS))
def test_torch_optim_adamw_state_keeps_each_parameter_on_its_method(name):
    model = _model()
    matrices = [p for p in model.parameters() if p.ndim == 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    adamw = torch.optim.AdamW([{"params": matrices}, {"params": vectors}], lr=1e-3, weight_decay=0.01)
    _train(model, adamw, 3)
    saved, weights = copy.deepcopy(adamw.state_dict()), [p.detach().clone() for p in vectors]
    _train(model, adamw, 1, seed=2)
    expected_vectors = torch.cat([p.detach().flatten() for p in vectors])
    with torch.no_grad():
        for p, w in zip(vectors, weights, strict=True):
            p.copy_(w)

    kwargs = dict(adamw_lr=1e-3, adamw_betas=(0.9, 0.999), adamw_eps=1e-8, adamw_weight_decay=0.01)
    optimizer = MATRIX_METHODS[name](model.parameters(), **kwargs)
    fresh_model = _model()
    fresh = MATRIX_METHODS[name](fresh_model.parameters(), **kwargs)
    with pytest.warns(UserWarning, match="dropped"):  # AdamW moments mean nothing to the matrix method
        optimizer.load_state_dict(saved)
    assert [g["use_matrix"] for g in optimizer.param_groups] == [True, False]
    assert optimizer.param_groups[0]["lr"] == 1e-3  # the schedule's position comes from the checkpoint
    _train(model, optimizer, 1, seed=2)
    _train(fresh_model, fresh, 1, seed=2)
    fresh_keys = [sorted(fresh.state[p]) for p in fresh.param_groups[0]["params"]]
    assert [sorted(optimizer.state[p]) for p in matrices] == fresh_keys
    # the AdamW half continued torch.optim.AdamW's moments
    assert all(optimizer.state[p]["step"] == 4 for p in vectors)
    torch.testing.assert_close(torch.cat([p.detach().flatten() for p in vectors]), expected_vectors)


# -- Keller-style groups and unknown keys --------------------------------------------------------


def test_use_muon_groups_are_honoured():
    embedding, hidden = nn.Embedding(10, 4), nn.Linear(4, 4)
    optimizer = whiten.Muon(
        [
            {"params": [hidden.weight], "use_muon": True, "lr": 0.02},
            {"params": [embedding.weight, hidden.bias], "use_muon": False, "lr": 3e-4, "eps": 1e-9},
        ]
    )
    assert [g["use_matrix"] for g in optimizer.param_groups] == [True, False]
    assert optimizer.param_groups[1]["adamw_eps"] == 1e-9  # Keller's Adam group: eps is Adam's
    assert all("use_muon" not in g for g in optimizer.param_groups)
    (embedding(torch.tensor([1, 2])) @ hidden.weight.T + hidden.bias).square().sum().backward()
    optimizer.step()
    assert "exp_avg" in optimizer.state[embedding.weight]  # AdamW, not the matrix method
    assert "momentum_buffer" in optimizer.state[hidden.weight]


def test_use_muon_conflicting_with_use_matrix_is_refused():
    with pytest.raises(ValueError, match="use_muon=False and use_matrix=True"):
        whiten.Muon([{"params": [nn.Linear(3, 3).weight], "use_muon": False, "use_matrix": True}])


def test_unknown_group_keys_warn_and_known_ones_do_not():
    layer = nn.Linear(3, 3)
    with pytest.warns(UserWarning, match=r"\['momentun'\]"):
        whiten.Muon([{"params": [layer.weight], "momentun": 0.9}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer = whiten.SOAP(
            [{"params": [layer.weight], "initial_lr": 1e-3, "foreach": None, "betas": (0.9, 0.99)}], lr=1e-3
        )
        torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=10)
        optimizer.add_param_group({"params": [layer.bias], "use_matrix": False, "amsgrad": False})


# -- tensor lr -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MATRIX_METHODS))
def test_tensor_lr_equals_float_lr_with_a_scheduler(name):
    results = []
    for lr in (3e-3, torch.tensor(3e-3, dtype=torch.float64)):
        model = _model().double()  # the eigenbasis methods amplify fp32 rounding (alpha vs mul)
        optimizer = MATRIX_METHODS[name](model.parameters())
        for group in optimizer.param_groups:
            group["lr"] = lr.clone() if isinstance(lr, torch.Tensor) else lr
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        _train(model, optimizer, 4, scheduler=scheduler)
        results.append(_flat(model))
        if isinstance(lr, torch.Tensor):
            assert all(isinstance(g["lr"], torch.Tensor) for g in optimizer.param_groups)
            assert float(optimizer.param_groups[0]["lr"]) == pytest.approx(3e-3 / 4)
    torch.testing.assert_close(results[1], results[0], rtol=1e-10, atol=1e-12)


def test_tensor_lr_in_the_constructor_validation_and_state_dict():
    model = _model()
    optimizer = whiten.Muon(model.parameters(), lr=torch.tensor(0.02), adamw_lr=None)
    matrix_lr, adamw_lr = (g["lr"] for g in optimizer.param_groups)
    assert isinstance(adamw_lr, torch.Tensor) and adamw_lr is not matrix_lr  # a scheduler updates each in place
    _train(model, optimizer, 2)
    again = whiten.Muon(_model().parameters(), lr=0.5)
    again.load_state_dict(optimizer.state_dict())
    assert float(again.param_groups[0]["lr"]) == pytest.approx(0.02)
    for bad in (torch.tensor([0.1]), torch.tensor(-0.1), torch.tensor(1)):
        with pytest.raises(ValueError, match="lr"):
            whiten.Muon(model.parameters(), lr=bad)


def test_tensor_lr_under_compile():
    from compile_check import TinyNet

    results = []
    for backend in (None, "aot_eager"):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = TinyNet().double()
        optimizer = whiten.Muon(model.parameters(), lr=torch.tensor(0.02), adamw_lr=torch.tensor(1e-3))
        step = optimizer.step if backend is None else torch.compile(optimizer.step, backend=backend)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            x, y = (torch.randn(32, 8, generator=gen, dtype=torch.float64) for _ in range(2))
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            step()
            for group in optimizer.param_groups:
                group["lr"].mul_(0.5)  # what a scheduler does to a tensor lr
        results.append(_flat(model))
    torch.testing.assert_close(results[1], results[0], rtol=1e-10, atol=1e-12)


# -- schedulers that cycle betas -------------------------------------------------------------------


def test_adamw_groups_follow_cycled_betas():
    model = _model()
    optimizer = whiten.SOAP(model.parameters(), lr=3e-3, adamw_betas=(0.8, 0.99))
    adamw_group = optimizer.param_groups[1]
    assert not adamw_group["use_matrix"] and adamw_group["betas"] == (0.8, 0.99)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=20, cycle_momentum=True)
    _train(model, optimizer, 5, scheduler=scheduler)
    matrix_beta1, adamw_beta1 = (g["betas"][0] for g in optimizer.param_groups)
    assert adamw_beta1 == matrix_beta1 != 0.8  # both halves cycled alike
    assert adamw_group["betas"][1] == 0.99

    def after_one_step(beta1: float) -> torch.Tensor:
        model = _model()
        optimizer = whiten.SOAP(model.parameters(), lr=3e-3)
        optimizer.param_groups[1]["betas"] = (beta1, 0.95)
        _train(model, optimizer, 2)
        return torch.cat([p.detach().flatten() for p in model.parameters() if p.ndim == 1])

    assert not torch.allclose(after_one_step(0.5), after_one_step(0.9))  # the AdamW step reads the group's betas


def test_per_group_scheduler_lists_use_explicit_groups():
    # one user group becomes two param groups; explicit groups (whiten.param_groups) keep the count
    model = _model()
    optimizer = whiten.Muon(whiten.param_groups(model))
    assert len(optimizer.param_groups) == 2
    adamw_lr = optimizer.param_groups[1]["lr"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda s: 1.0, lambda s: 0.5])
    _train(model, optimizer, 1, scheduler=scheduler)
    assert optimizer.param_groups[1]["lr"] == pytest.approx(adamw_lr * 0.5)
