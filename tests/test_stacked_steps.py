"""Same-shape matrices stepped as one batch (issue 12, small matrices): KL-Shampoo and Pro-KLShampoo give the
per-matrix results (float64, across refreshes, with a skipped step that splits a batch), keep per-parameter
state, save compact checkpoints, and continue a checkpoint written by the per-matrix path."""

import io

import pytest
import torch

import whiten.linalg.batching as batching
from whiten import KLShampoo, ProKLShampoo
from whiten.linalg import map_batched, stack_groups
from whiten.optim.kl_shampoo import KLFactored

F64 = torch.float64
#: several same-shape matrices, a transposed pair (Pro-KLShampoo batches 9 x 5 with 5 x 9), odd shapes, a vector
SHAPES = [(6, 6), (6, 6), (6, 6), (5, 9), (9, 5), (5, 9), (4, 7), (8, 8), (6,)]
#: every checked option set: defaults, the other complements and scales, the adaptive rank (ranks diverge)
SETTINGS = [
    (KLShampoo, {}),
    (ProKLShampoo, {"rank": 2}),
    (ProKLShampoo, {"rank": 2, "complement": "orth", "complement_scale": "kl_norm", "ns_method": "direct"}),
    (ProKLShampoo, {"rank": 2, "complement_scale": "kl_norm", "ns_method": "gram"}),
    (ProKLShampoo, {"rank": 1, "adaptive_rank": True, "max_rank": 3, "rank_update_interval": 3}),
]


def make(cls, options, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(*shape, generator=gen, dtype=F64)) for shape in SHAPES]
    return params, cls(params, lr=0.02, precondition_frequency=3, weight_decay=0.01, **options)


def run(params, opt, steps, *, seed=1, start=0, nan_at=4):
    """``steps`` steps with fixed random gradients; at step ``nan_at`` one 6 x 6 gradient is NaN (that matrix
    skips the step, so its step counter, and its refreshes, fall behind the others of its shape)."""
    for t in range(start, start + steps):
        gen = torch.Generator().manual_seed(seed + t)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=F64)
        if t == nan_at:
            params[1].grad.fill_(float("nan"))
        opt.step()


@pytest.fixture
def stacking(monkeypatch):
    """Switch the stacking of small CPU matrices on (the default) or off (every matrix on its own); only the
    stacking (``stack_groups``): the choices that read the policy themselves (Pro's NS method) stay."""
    default = batching.stacking_helps

    def switch(on: bool) -> None:
        monkeypatch.setattr(batching, "stacking_helps", default if on else (lambda device, shape=None: False))

    return switch


@pytest.fixture
def batched_calls(monkeypatch):
    """How many stacked batches (of how many matrices) the steps ran: KL-Shampoo's ``_kl_step(batched=True)``
    and Pro-KLShampoo's stacked direction stage."""
    sizes: list[int] = []
    kl_step = KLFactored._kl_step
    pro_direction = ProKLShampoo._pro_direction

    def spy_kl(self, group, G, state, M=None, **kwargs):
        if kwargs.get("batched"):
            sizes.append(G.shape[0])
        return kl_step(self, group, G, state, M, **kwargs)

    def spy_pro(self, group, indices, members, G, M, state):
        if len(members) > 1:
            sizes.append(len(members))
        return pro_direction(self, group, indices, members, G, M, state)

    monkeypatch.setattr(KLFactored, "_kl_step", spy_kl)
    monkeypatch.setattr(ProKLShampoo, "_pro_direction", spy_pro)
    return sizes


def assert_same_run(params_a, opt_a, params_b, opt_b, *, exact=False):
    tol = {"rtol": 0.0, "atol": 0.0} if exact else {"rtol": 1e-11, "atol": 1e-12}
    for p, q in zip(params_a, params_b, strict=True):
        torch.testing.assert_close(q, p, **tol)
        state_a, state_b = opt_a.state[p], opt_b.state[q]
        assert state_a.keys() == state_b.keys()
        for key, value in state_a.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(state_b[key], value, **tol, msg=f"{tuple(p.shape)} {key}")
            else:
                assert state_b[key] == value, (tuple(p.shape), key)


@pytest.mark.parametrize(("cls", "options"), SETTINGS)
def test_stacked_steps_equal_the_per_matrix_steps(cls, options, stacking, batched_calls):
    stacking(False)
    params_a, opt_a = make(cls, options)
    run(params_a, opt_a, 11)
    assert not batched_calls
    stacking(True)
    params_b, opt_b = make(cls, options)
    run(params_b, opt_b, 11)
    # the same-shape matrices did run as batches (and the skipped 6 x 6 one split its batch after step 4)
    assert batched_calls and max(batched_calls) >= 3 and 2 in batched_calls
    assert_same_run(params_a, opt_a, params_b, opt_b)
    assert opt_b.nonfinite_skips() == opt_a.nonfinite_skips() == 1


def test_large_matrices_on_cpu_are_not_stacked(monkeypatch, batched_calls):
    monkeypatch.setattr(batching, "CPU_STACK_MAX_NUMEL", 30)  # 6 x 6 and larger count as large here
    for cls, options in SETTINGS[:2]:
        params, opt = make(cls, options)
        run(params, opt, 4)
    assert not batched_calls


@pytest.mark.parametrize(("cls", "options"), SETTINGS[:2])
def test_state_dict_of_stacked_steps_is_per_parameter_compact_and_resumes_bit_exact(cls, options):
    params, opt = make(cls, options)
    run(params, opt, 5)
    # the live state holds views of the stacked batches; the state dict hands out compact per-parameter copies
    assert any(v._base is not None for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    saved = opt.state_dict()
    for entry in saved["state"].values():
        for value in entry.values():
            if isinstance(value, torch.Tensor):
                assert value._base is None
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    params_b, opt_b = make(cls, options, seed=5)
    with torch.no_grad():
        for p, q in zip(params, params_b, strict=True):
            q.copy_(p)
    opt_b.load_state_dict(torch.load(buffer, weights_only=False))
    run(params, opt, 5, start=5)
    run(params_b, opt_b, 5, start=5)
    assert_same_run(params, opt, params_b, opt_b, exact=True)


@pytest.mark.parametrize(("cls", "options"), SETTINGS[:2])
def test_checkpoint_of_the_per_matrix_path_continues_under_stacking(cls, options, stacking):
    # a checkpoint as written before stacking existed (every matrix on its own, compact tensors) is resumed by
    # the stacked steps and continues as the per-matrix run does
    stacking(False)
    params, opt = make(cls, options)
    run(params, opt, 5)
    checkpoint = opt.state_dict()
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    values = [p.detach().clone() for p in params]
    run(params, opt, 6, start=5)  # the per-matrix continuation
    stacking(True)
    params_b, opt_b = make(cls, options)
    with torch.no_grad():
        for q, value in zip(params_b, values, strict=True):
            q.copy_(value)
    buffer.seek(0)
    opt_b.load_state_dict(torch.load(buffer, weights_only=False))
    run(params_b, opt_b, 6, start=5)
    assert_same_run(params, opt, params_b, opt_b)


def test_stack_groups_and_map_batched_take_batches_as_entries():
    gen = torch.Generator().manual_seed(0)
    entries = [torch.randn(4, 5, generator=gen), torch.randn(3, 4, 5, generator=gen), torch.randn(4, 5, generator=gen)]
    entries.append(torch.randn(5, 4, generator=gen))
    assert stack_groups(entries, stack=True) == [[0, 1, 2], [3]]
    assert stack_groups(entries, ["a", "b", "a", "a"], stack=True) == [[0, 2], [1], [3]]
    assert stack_groups(entries, stack=False) == [[0], [1], [2], [3]]
    calls = []

    def kernel(X):
        calls.append(X.shape)
        return X @ X.mT, 2 * X

    out = map_batched(kernel, entries, stack=True)
    assert calls == [(5, 4, 5), (5, 4)]  # the two matrices and the batch of three in one call
    for entry, (gram, double) in zip(entries, out, strict=True):
        assert gram.shape == entry.shape[:-1] + entry.shape[-2:-1] and double.shape == entry.shape
        torch.testing.assert_close(gram, entry @ entry.mT)
        torch.testing.assert_close(double, 2 * entry)
