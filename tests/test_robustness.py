"""Robustness under extreme inputs and faults (issue 13): each test reproduces one finding."""

import pytest
import torch
from torch import nn

from whiten import KLSOAP, REKLS, SOAP, HTMuon, KLShampoo, Muon, ProKLShampoo
from whiten.linalg import newton_schulz, newton_schulz_left_factor, newton_schulz_spectral_factor, schatten_power_ns

OPTIMIZERS = {
    "muon": lambda ps, **kw: Muon(ps, lr=0.02, **kw),
    "htmuon_svd": lambda ps, **kw: HTMuon(ps, lr=0.02, **kw),
    "htmuon_ns": lambda ps, **kw: HTMuon(ps, lr=0.02, spectral_map="ns", **kw),
    "htmuon_stream": lambda ps, **kw: HTMuon(ps, lr=0.02, spectral_map="stream", **kw),
    "soap": lambda ps, **kw: SOAP(ps, lr=1e-3, precondition_frequency=2, **kw),
    "soap_kl": lambda ps, **kw: SOAP(ps, lr=1e-3, use_kl_shampoo=True, **kw),
    "rekls": lambda ps, **kw: REKLS(ps, lr=1e-3, **kw),
    "kl_shampoo": lambda ps, **kw: KLShampoo(ps, lr=1e-3, precondition_frequency=2, **kw),
    "kl_soap": lambda ps, **kw: KLSOAP(ps, lr=1e-3, precondition_frequency=2, **kw),
    "pro_kl_shampoo": lambda ps, **kw: ProKLShampoo(ps, lr=1e-3, rank=2, precondition_frequency=2, **kw),
    # the spectral NS takes an eigh, so fp32 (Muon's default matmul_dtype is bf16 since issue 12)
    "muon_spectral": lambda ps, **kw: Muon(ps, lr=0.02, ns_method="spectral", matmul_dtype="float32", **kw),
}
# (optimizer, decomposition it runs) for the fault-injection tests
FAULT_CASES = [
    ("muon_spectral", "eigh"),
    ("htmuon_svd", "svd"),
    ("htmuon_stream", "qr"),
    ("htmuon_stream", "svd"),
    ("soap", "eigh"),
    ("soap", "qr"),
    ("soap_kl", "qr"),
    ("rekls", "eigh"),
    ("kl_shampoo", "eigh"),
    ("kl_shampoo", "qr"),
    ("kl_soap", "eigh"),
    ("kl_soap", "qr"),
    ("pro_kl_shampoo", "eigh"),
    ("pro_kl_shampoo", "qr"),
]


def rank_one(m: int, n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, 1, generator=gen) @ torch.randn(1, n, generator=gen)


# -- 1. the finiteness check cannot overflow ------------------------------------------------------
@pytest.mark.parametrize("nonfinite", ["skip", "raise"])
def test_huge_finite_gradient_is_not_classified_non_finite(nonfinite):
    W = nn.Parameter(torch.randn(64, 64))
    b = nn.Parameter(torch.randn(64))
    opt = Muon([W, b], lr=0.02, nonfinite=nonfinite)
    W0 = W.detach().clone()
    W.grad = torch.full((64, 64), 1e18)  # sum(g^2) = 4e39 > fp32 max, every entry finite
    b.grad = torch.full((64,), 1e3)
    opt.step()
    assert opt.nonfinite_skips() == 0
    assert opt.state[W]["step"] == 1
    assert torch.isfinite(W).all() and not torch.equal(W.detach(), W0)


def test_newton_schulz_direct_normalises_huge_input():
    G = torch.full((64, 64), 1e18) + torch.eye(64) * 1e17
    O = newton_schulz(G, method="direct")
    reference = newton_schulz(G.double() / 1e18, method="direct").float()
    torch.testing.assert_close(O, reference, atol=1e-4, rtol=1e-4)


# -- 3. Newton-Schulz on the Gram matrix is self-correcting for any ns_steps ----------------------
@pytest.mark.parametrize("method", ["gram", "auto", "spectral", "direct"])
@pytest.mark.parametrize("steps", [10, 20, 99])
def test_newton_schulz_rank_one_stays_finite_for_many_steps(method, steps):
    G = rank_one(32, 96)
    O = newton_schulz(G, steps, method=method)
    assert torch.isfinite(O).all()
    # the polar factor of u v^T is u v^T / (|u| |v|): the Gram and spectral paths find it, the noise of the
    # other singular directions (grown to ~1 by the polynomial, as in the direct iteration) stays bounded
    polar = G / torch.linalg.matrix_norm(G)
    assert O.abs().max() < 2.0
    assert torch.sum(O * polar) > 0.6


@pytest.mark.parametrize("steps", [10, 30, 60])
def test_gram_left_factor_matches_direct_iteration_beyond_one_segment(steps):
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(8, 24, dtype=torch.float64, generator=gen)
    K, P = newton_schulz_left_factor(X, steps, "keller")
    torch.testing.assert_close(
        K @ X, newton_schulz(X, steps, "keller", compute_dtype=X.dtype, method="direct"), atol=1e-9, rtol=0
    )
    torch.testing.assert_close(P, X @ X.mT)
    torch.testing.assert_close(
        newton_schulz(X, steps, "keller", compute_dtype=X.dtype, method="gram"), K @ X, atol=1e-9, rtol=0
    )


def test_spectral_factor_on_rank_one_at_99_steps():
    X = rank_one(16, 48)
    K, _ = newton_schulz_spectral_factor(X, 99, "keller")
    O = K @ X
    assert torch.isfinite(K).all()
    # only the one resolved direction: O is (close to) the exact polar factor
    torch.testing.assert_close(O, X / torch.linalg.matrix_norm(X) * (O.norm() / 1.0), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["muon", "htmuon_ns"])
@pytest.mark.parametrize("ns_method", ["gram", "auto", "spectral"])
def test_muon_rank_one_gradient_with_many_ns_steps(name, ns_method):
    W = nn.Parameter(torch.randn(16, 48))
    fp32 = {"matmul_dtype": "float32"} if ns_method == "spectral" else {}  # an eigh: fp32 (bf16 default refuses)
    opt = OPTIMIZERS[name]([W], ns_steps=20, ns_method=ns_method, **fp32)
    for _ in range(3):
        W.grad = rank_one(16, 48)
        opt.step()
    assert torch.isfinite(W).all()


# -- 5. HTMuon "ns" map is overflow-safe -----------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("magnitude", [1e9, 1e10, 1e20])
def test_schatten_power_ns_huge_input(dtype, magnitude):
    gen = torch.Generator().manual_seed(0)
    U = torch.randn(32, 96, generator=gen)
    O = schatten_power_ns((U * magnitude).to(dtype), 0.125)
    assert torch.isfinite(O).all()
    # A diag(s^p) B^T is homogeneous of degree p: the map of c U is c^p times the map of U (ridge aside)
    reference = schatten_power_ns(U.to(dtype).double(), 0.125, ridge=0.0) * magnitude**0.125
    torch.testing.assert_close(O.double(), reference, rtol=0.05, atol=0.05 * reference.abs().max().item())


# -- 2. fp16 factor storage is refused with the reason ----------------------------------------------
@pytest.mark.parametrize("cls", [KLShampoo, KLSOAP, ProKLShampoo])
def test_float16_state_dtype_is_refused(cls):
    with pytest.raises(ValueError, match=r"float16.*range"):
        cls([nn.Parameter(torch.randn(8, 8))], state_dtype="float16")


# -- 7. validation ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("make", "option"),
    [
        (lambda ps: Muon(ps, eps=0.0), "eps"),
        (lambda ps: HTMuon(ps, lr=0.02, eps=0.0), "eps"),
        (lambda ps: KLSOAP(ps, eps=0.0), "eps"),
        (lambda ps: Muon(ps, adamw_eps=0.0), "adamw_eps"),
        (lambda ps: KLShampoo(ps, adamw_eps=0.0), "adamw_eps"),
        (lambda ps: SOAP(ps, lr=1e-3, adamw_eps=0.0), "adamw_eps"),
        (lambda ps: SOAP(ps, lr=1e-3, betas=(0.9, 1.0)), r"betas\[1\]"),
        (lambda ps: SOAP(ps, lr=1e-3, eps=-1), "eps"),
        (lambda ps: SOAP(ps, lr=1e-3, betas="0.9,0.95"), "'0.9,0.95'"),
        (lambda ps: KLShampoo(ps, betas="0.9,0.95"), "'0.9,0.95'"),
    ],
)
def test_degenerate_options_are_refused_under_the_name_passed(make, option):
    with pytest.raises(ValueError, match=option) as info:
        make([nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(4))])
    message = str(info.value)
    if not option.startswith("adamw"):
        assert not message.startswith("adamw_")  # the derived AdamW copy is not blamed


@pytest.mark.parametrize("cls", [KLShampoo, KLSOAP, ProKLShampoo])
def test_tiny_init_factor_is_clamped(cls):
    W = nn.Parameter(torch.randn(8, 8))
    opt = cls([W], init_factor=1e-30, precondition_frequency=2, **({"rank": 2} if cls is ProKLShampoo else {}))
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):  # 1/lam = 1e30 times G^2 ~ 1e8 overflowed the statistics before the clamp
        W.grad = torch.randn(8, 8, generator=gen) * 1e4
        opt.step()
    assert torch.isfinite(W).all()
    lams = [v for k, v in opt.state[W].items() if k.startswith("lam_") or k in ("Lam", "sigma")]
    assert lams and all(torch.isfinite(v).all() for v in lams)


def test_parameter_errors_name_the_parameter():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"'0.bias'"):
        Muon([{"params": list(model.named_parameters()), "use_matrix": True}])
    from whiten import param_groups

    groups = param_groups(model, embeddings_and_head="matrix")
    groups[1]["use_matrix"] = True  # the gains and biases, wrongly sent to the matrix method
    with pytest.raises(ValueError, match=r"'0.bias'"):
        Muon(groups)
    opt = Muon(list(model.named_parameters()), nonfinite="raise")
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    model[1].weight.grad = torch.full_like(model[1].weight, float("nan"))
    with pytest.raises(FloatingPointError, match=r"'1.weight'"):
        opt.step()


@pytest.mark.parametrize("source", [Muon, SOAP])
@pytest.mark.parametrize("target", [KLShampoo, KLSOAP, ProKLShampoo])
def test_loading_another_optimizers_state_into_the_kl_family_is_refused(source, target):
    W = nn.Parameter(torch.randn(8, 8))
    other = source([W], lr=1e-3)
    W.grad = torch.randn(8, 8)
    other.step()
    other.step()
    opt = target([W], **({"rank": 2} if target is ProKLShampoo else {}))
    with pytest.raises(ValueError, match="not saved by"):
        opt.load_state_dict(other.state_dict())


# -- 4. transactional steps: a failed decomposition changes nothing ---------------------------------
def _snapshot(opt, params):
    return [
        (p.detach().clone(), {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()})
        for p in params
    ]


def _assert_same(opt, params, snapshot, ignore=("fault_skips", "nonfinite_skips")):
    for p, (value, state) in zip(params, snapshot, strict=True):
        assert torch.equal(p.detach(), value)
        now = {k: v for k, v in opt.state[p].items() if k not in ignore}
        then = {k: v for k, v in state.items() if k not in ignore}
        assert now.keys() == then.keys()
        for key, v in then.items():
            assert torch.equal(now[key], v) if isinstance(v, torch.Tensor) else now[key] == v, key


class _Fault:
    """Make ``torch.linalg.<name>`` raise ``LinAlgError`` on its calls number ``first`` .. ``last`` (0-based)."""

    def __init__(self, monkeypatch, name, first=0, last=10**9):
        self.calls, self.first, self.last = 0, first, last
        original = getattr(torch.linalg, name)

        def faulty(*args, **kwargs):
            self.calls += 1
            if self.first <= self.calls - 1 <= self.last:
                raise torch.linalg.LinAlgError(f"injected {name} failure")
            return original(*args, **kwargs)

        monkeypatch.setattr(torch.linalg, name, faulty)


def _setup(name, nonfinite, seed=0):
    torch.manual_seed(seed)
    params = [nn.Parameter(torch.randn(6, 10)), nn.Parameter(torch.randn(6, 10)), nn.Parameter(torch.randn(10, 6))]
    params.append(nn.Parameter(torch.randn(6)))  # an AdamW parameter
    return params, OPTIMIZERS[name](params, nonfinite=nonfinite)


def _grads(step, params):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=gen) for p in params]


@pytest.mark.parametrize(("name", "fn"), FAULT_CASES)
def test_failed_decomposition_raises_changes_nothing_and_a_retry_equals_an_unfaulted_step(name, fn, monkeypatch):
    params, opt = _setup(name, "raise")
    ref_params, ref = _setup(name, "raise")
    faults = 0
    for step in range(5):
        for p, q, g in zip(params, ref_params, _grads(step, params), strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        ref.step()
        before = _snapshot(opt, params)
        raised = None
        with monkeypatch.context() as patch:  # a persistent fault: the fallbacks fail too
            fault = _Fault(patch, fn)
            try:
                opt.step()
            except torch.linalg.LinAlgError as error:
                raised = error
        assert (raised is not None) == (fault.calls > 0)
        if raised is not None:
            assert "no parameter or state was changed" in str(raised)
            faults += 1
            _assert_same(opt, params, before)
            opt.step()  # the retry, without the fault
        _assert_same(ref, ref_params, _snapshot(opt, params))
    assert faults > 0 and opt.fault_skips() == 0


@pytest.mark.parametrize(("name", "fn"), FAULT_CASES)
def test_failed_decomposition_is_skipped_and_counted(name, fn, monkeypatch):
    params, opt = _setup(name, "skip")
    counted = 0
    for step in range(5):
        for p, g in zip(params, _grads(step, params), strict=True):
            p.grad = g
        before = _snapshot(opt, params)
        skips = [opt.state[p].get("fault_skips", 0) for p in params]
        with monkeypatch.context() as patch:
            fault = _Fault(patch, fn)
            opt.step()
        failed = [i for i, p in enumerate(params) if opt.state[p].get("fault_skips", 0) > skips[i]]
        assert bool(failed) == bool(fault.calls)
        counted += len(failed)
        _assert_same(opt, [params[i] for i in failed], [before[i] for i in failed])
    assert counted > 0 and opt.fault_skips() == counted
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize(("name", "fn"), FAULT_CASES)
def test_a_transient_decomposition_failure_is_absorbed_by_the_fallbacks(name, fn, monkeypatch):
    params, opt = _setup(name, "raise")
    faults = 0
    for step in range(5):
        for p, g in zip(params, _grads(step, params), strict=True):
            p.grad = g
        with monkeypatch.context() as patch:
            fault = _Fault(patch, fn, first=0, last=0)  # the first call fails, its fp64 retry succeeds
            opt.step()
        faults += fault.calls > 0
    assert faults > 0 and opt.fault_skips() == 0
    assert all(torch.isfinite(p).all() for p in params)


# -- 6. guarded statistics: an overflow is not committed ------------------------------------------
@pytest.mark.parametrize(
    ("make", "shape", "scales"),
    [
        (lambda ps: REKLS(ps, lr=1e-3), (8, 16), [1e-20] * 3 + [1e15]),
        (lambda ps: SOAP(ps, lr=1e-3, use_kl_shampoo=True), (8, 16), [1e-20] * 3 + [1e15]),
        (lambda ps: SOAP(ps, lr=1e-3, use_kl_shampoo=True, kl_init="peer"), (8, 16), [1e15]),
        (lambda ps: KLShampoo(ps, lr=1e-3), (1, 1), [1e20] * 2),
        (lambda ps: KLSOAP(ps, lr=1e-3), (4, 4), [1e20] * 2),
        (lambda ps: ProKLShampoo(ps, lr=1e-3, rank=2), (4, 8), [1e-20, 1e-20, 1e20]),
    ],
    ids=["rekls", "soap_kl", "soap_kl_peer_init", "kl_shampoo_1x1", "kl_soap", "pro_kl_shampoo"],
)
def test_overflowing_statistics_are_not_committed(make, shape, scales):
    W = nn.Parameter(torch.randn(*shape))
    opt = make([W])
    gen = torch.Generator().manual_seed(0)
    for scale in [*scales, 1.0, 1.0, 1.0]:
        W.grad = torch.randn(*shape, generator=gen) * scale
        opt.step()  # no LinAlgError: a failing step is skipped and counted
        state = opt.state[W]
        assert torch.isfinite(W).all()
        assert all(torch.isfinite(v).all() for v in state.values() if isinstance(v, torch.Tensor))
    assert opt.fault_skips() >= 1 and opt.nonfinite_skips() == 0
    steps_done = opt.state[W]["step"]
    W.grad = torch.randn(*shape, generator=gen)
    opt.step()
    assert opt.state[W]["step"] == steps_done + 1  # not frozen: ordinary gradients step again


def test_adamw_gradient_whose_square_overflows_is_skipped_up_front():
    b = nn.Parameter(torch.randn(8))
    opt = Muon([b], nonfinite="skip")
    b.grad = torch.full((8,), 1e30)
    opt.step()
    assert opt.fault_skips() == 1 and "exp_avg_sq" not in opt.state[b]
    b.grad = torch.ones(8)
    opt.step()
    assert torch.isfinite(opt.state[b]["exp_avg_sq"]).all()
    strict = Muon([b], nonfinite="raise")
    b.grad = torch.full((8,), 1e30)
    with pytest.raises(FloatingPointError, match="overflows"):
        strict.step()


# -- found by the property suite ---------------------------------------------------------------------
def test_pro_kl_shampoo_no_gain_eigenvalue_does_not_poison_the_sketch():
    # beta = 0 and a tiny gradient: the eigenvalue targets underflow to 0, which the clamp stores as +inf
    W = nn.Parameter(torch.randn(1, 2))
    opt = ProKLShampoo([W], betas=(0.0, 0.0), precondition_frequency=1, max_precond_dim=2, rank=1, ns_steps=1)
    gen = torch.Generator().manual_seed(0)
    for scale in [1.0, 1.0, 1e-23, 1.0, 1.0]:
        W.grad = torch.randn(1, 2, generator=gen) * scale
        opt.step()
    assert opt.fault_skips() == 0
    assert torch.isfinite(opt.state[W]["Y_sketch"]).all()


def test_htmuon_stream_map_of_a_huge_momentum():
    W = nn.Parameter(torch.randn(4, 8))
    opt = HTMuon([W], lr=0.0, spectral_map="stream", power=0.5, momentum=0.5, nesterov=False)
    gen = torch.Generator().manual_seed(0)
    for scale in [1.0, 1e20, 1.0, 1.0]:  # the momentum holds ~1e19 for the following steps
        W.grad = torch.randn(4, 8, generator=gen) * scale
        opt.step()
    assert opt.fault_skips() == 0 and opt.state[W]["step"] == 4


@pytest.mark.parametrize("steps", [5, 6, 10])
def test_gram_newton_schulz_with_bf16_compute_dtype_is_stable(steps):
    torch.manual_seed(0)
    G = torch.randn(5, 1) @ torch.randn(1, 2)  # the Gram iteration in bf16 gave 12.75 at 5 steps, inf at 7
    O = newton_schulz(G, steps, compute_dtype=torch.bfloat16, method="gram")
    assert O.dtype == torch.bfloat16 and O.float().abs().max() < 2.0


def test_pro_kl_shampoo_adaptive_rank_after_a_zero_gradient():
    # beta = 0: a zero gradient leaves every eigenvalue at +inf ("no gain"), an all-zero spectrum for the rank rule
    W = nn.Parameter(torch.randn(1, 3))
    opt = ProKLShampoo(
        [W], betas=(0.0, 0.0), precondition_frequency=1, max_precond_dim=3, rank=1, ns_steps=1, adaptive_rank=True
    )
    opt.defaults["rank_update_interval"] = opt.param_groups[0]["rank_update_interval"] = 1
    for g in [torch.randn(1, 3), torch.zeros(1, 3), torch.randn(1, 3)]:
        W.grad = g
        opt.step()
    assert opt.state[W]["rank"] == 1 and torch.isfinite(W).all()


def test_a_raising_group_leaves_the_counters_of_other_groups_unchanged(monkeypatch):
    W, V, b = nn.Parameter(torch.randn(6, 10)), nn.Parameter(torch.randn(6, 10)), nn.Parameter(torch.randn(6))
    opt = SOAP([{"params": [W], "nonfinite": "skip"}, {"params": [V], "nonfinite": "raise"}, {"params": [b]}], lr=1e-3)
    W.grad, V.grad, b.grad = torch.full((6, 10), float("nan")), torch.randn(6, 10), torch.full((6,), 1e30)
    with monkeypatch.context() as patch:
        _Fault(patch, "eigh")
        with pytest.raises(torch.linalg.LinAlgError):
            opt.step()
    assert opt.nonfinite_skips() == 0 and opt.fault_skips() == 0 and not opt.state[V]
