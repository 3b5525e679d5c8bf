"""Options that reproduce reference behaviours (issue 14): Emerging-Optimizers v0.3.0's eigh-path
re-sort of ``exp_avg_sq`` (SOAP ``use_eigh``, REKLS) and HTMuon ``stream``'s identity start."""

import pytest
import torch

import whiten
from whiten.linalg import initial_stream_basis, schatten_power_stream


def _grads(steps: int, shape=(6, 4)) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(*shape, dtype=torch.float64, generator=gen) for _ in range(steps)]


def _run(make, grads):
    W = torch.nn.Parameter(torch.zeros(grads[0].shape, dtype=torch.float64))
    opt = make([W])
    snapshots = []
    for g in grads:
        W.grad = g.clone()
        opt.step()
        snapshots.append(({k: v.clone() for k, v in opt.state[W].items() if torch.is_tensor(v)}, W.detach().clone()))
    return snapshots


@pytest.mark.parametrize("cls", ["SOAP", "REKLS"])
def test_eigh_sort_exp_avg_sq_permutes_the_second_moment_by_old_rayleigh_quotients(cls):
    kwargs = dict(lr=0.1, weight_decay=0.0)
    if cls == "SOAP":
        kwargs["use_eigh"] = True
    grads = _grads(2)
    plain = _run(lambda p: getattr(whiten, cls)(p, **kwargs), grads)
    sorted_ = _run(lambda p: getattr(whiten, cls)(p, eigh_sort_exp_avg_sq=True, **kwargs), grads)
    torch.testing.assert_close(sorted_[0][1], plain[0][1], rtol=0, atol=0)  # step 1: exp_avg_sq is 0
    assert not torch.allclose(sorted_[1][1], plain[1][1], rtol=1e-3, atol=0)  # step 2 differs
    # v0.3.0: v2 = lerp(v1 permuted by argsort(diag(Q1^T K2 Q1)), G'^2, 1 - b2): the difference to the
    # unsorted run is b2 (perm(v1) - v1); the bases (and G') are the same in both runs
    state1, state2 = sorted_[0][0], sorted_[1][0]
    order_L = torch.argsort(torch.diag(state1["Q_L"].T @ state2["L"] @ state1["Q_L"]), descending=True)
    order_R = torch.argsort(torch.diag(state1["Q_R"].T @ state2["R"] @ state1["Q_R"]), descending=True)
    v1 = state1["exp_avg_sq"]
    beta2 = 0.95
    torch.testing.assert_close(
        state2["exp_avg_sq"] - plain[1][0]["exp_avg_sq"], beta2 * (v1[order_L][:, order_R] - v1), rtol=1e-9, atol=1e-14
    )
    assert not torch.equal(order_L, torch.arange(len(order_L))) or not torch.equal(order_R, torch.arange(len(order_R)))


def test_eigh_sort_exp_avg_sq_leaves_the_qr_path_alone():
    grads = _grads(3)
    plain = _run(lambda p: whiten.SOAP(p, lr=0.1), grads)
    option = _run(lambda p: whiten.SOAP(p, lr=0.1, eigh_sort_exp_avg_sq=True), grads)
    torch.testing.assert_close(option[-1][1], plain[-1][1], rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(6, 4), (4, 6)])
def test_htmuon_stream_identity_start(shape):
    V0 = initial_stream_basis(torch.randn(3, *shape), "identity")
    k = min(shape)
    assert V0.shape == (3, shape[1], k)
    torch.testing.assert_close(V0, torch.eye(shape[1], k).expand(3, -1, -1))

    grads = _grads(1, shape)
    W = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64))
    opt = whiten.HTMuon([W], lr=0.1, spectral_map="stream", stream_start="identity", weight_decay=0.0)
    W.grad = grads[0].clone()
    opt.step()
    U = grads[0].lerp((1 - 0.95) * grads[0], 0.95)  # Nesterov direction after one step
    expected, basis = schatten_power_stream(U, torch.eye(shape[1], k, dtype=torch.float64), 0.125)
    factor = max(1.0, shape[0] / shape[1]) ** 0.5
    torch.testing.assert_close(W.detach(), -0.1 * factor * expected)
    torch.testing.assert_close(opt.state[W]["stream_basis"], basis)
    svd_start = whiten.HTMuon([torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64))], lr=0.1)
    assert svd_start.defaults["stream_start"] == "svd"
    with pytest.raises(ValueError, match="stream_start"):
        whiten.HTMuon([W], lr=0.1, stream_start="eye")
