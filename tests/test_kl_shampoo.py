"""KL-Shampoo and KL-SOAP: agreement with an independent dense re-implementation of the reference
pseudocode (yorkerlin/KL-Methods ``optim/kl_opt.py``, SPEC §4), 3-D statistics against Kronecker
products, max_precond_dim, convergence, checkpoints, bad input and gradient spikes."""

import copy
import math

import pytest
import torch

from whiten import KLSOAP, KLShampoo, ProKLShampoo
from whiten.linalg import clamp_eigenvalues, ema_eigenvalues, kl_tensor_statistics

F64 = torch.float64


# -- an independent dense re-implementation of the reference (no code shared with whiten) --------
def reference_kl(
    grads, W0, *, lr, betas, shampoo_beta, eps, wd, T, init_factor, soap=False, precond_right=True, init_bases=None
):
    """The reference algorithm written naively: dense inverses, eigenvalues kept as ``lam^{-1/2}`` as in
    ``KLOpt`` (``eigen_sqrt_inv``), NaN/Inf gains mapped to 0, clamp ``max(10, min(d, 4000))``.

    A one-sample factor of a non-square gradient is rank deficient, so its null-space eigenvectors are
    arbitrary; ``init_bases`` lets the reference adopt the optimizer's choice (checked to be eigenbases)."""
    W = W0.clone()
    m, n = W.shape
    b1, b2 = betas
    b = shampoo_beta if shampoo_beta >= 0 else b2

    def sqrt_inv(D, d):
        s = (1.0 / torch.sqrt(D)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        return s.clamp(max=max(10, min(d, 4000)))

    def eig_desc(S):
        return torch.linalg.eigh(0.5 * (S + S.T))[1].flip(-1)

    t = None
    for G in grads:
        if t is None:  # initialisation step: factors and bases only
            L = (1 - b) * G @ G.T / n
            R = (1 - b) * G.T @ G / m
            QL = eig_desc(L)
            QR = eig_desc(R) if precond_right else torch.eye(n, dtype=F64)
            if init_bases is not None:
                for S, Q, mine in ((L, QL, init_bases[0]), (R, QR, init_bases[1])):
                    if mine is not None:  # same descending eigenvalues: a valid eigenbasis of the same factor
                        vals = torch.diagonal(mine.T @ S @ mine)
                        torch.testing.assert_close(S @ mine, mine * vals, atol=1e-12, rtol=0)
                        torch.testing.assert_close(vals, torch.diagonal(Q.T @ S @ Q), atol=1e-12, rtol=0)
                QL = init_bases[0]
                QR = init_bases[1] if init_bases[1] is not None else QR
            sL = torch.full((m,), init_factor**-0.5, dtype=F64)
            sR = torch.full((n,), init_factor**-0.5 if precond_right else 1.0, dtype=F64)
            M = torch.zeros(m, n, dtype=F64)
            V = torch.zeros(m, n, dtype=F64)
            t = 0
            continue
        t += 1
        if soap:
            Gp = QL.T @ G @ QR
            M = b1 * M + (1 - b1) * Gp
            V = b2 * V + (1 - b2) * Gp * Gp
            U = QL @ (M / (V.sqrt() + eps)) @ QR.T
            if t % T == 0:
                M = QL @ M @ QR.T
        else:
            M = b1 * M + (1 - b1) * G
            d = torch.outer(sL, sR)
            d = d / (1 + eps * d)
            U = QL @ ((QL.T @ M @ QR) * d) @ QR.T
        SR_inv = QR @ torch.diag(sR**2) @ QR.T
        SL_inv = QL @ torch.diag(sL**2) @ QL.T
        L = b * L + (1 - b) / n * (G @ SR_inv @ G.T)
        if precond_right:
            R = b * R + (1 - b) / m * (G.T @ SL_inv @ G)
        E = QL.T @ G @ QR
        ldiag = ((E * sR[None, :]) ** 2).mean(1)
        rdiag = ((E * sL[:, None]) ** 2).mean(0)
        sL = sqrt_inv((b * (1 / sL**2).nan_to_num(posinf=0.0) + (1 - b) * ldiag), m)
        if precond_right:
            sR = sqrt_inv((b * (1 / sR**2).nan_to_num(posinf=0.0) + (1 - b) * rdiag), n)
        if t % T == 0:
            QL = torch.linalg.qr(L @ QL).Q
            if precond_right:
                QR = torch.linalg.qr(R @ QR).Q
            if soap:
                M = QL.T @ M @ QR
        W = W - lr * U
        W = W - lr * wd * W
    return W, {"L": L, "R": R, "Q_L": QL, "Q_R": QR, "lam_L": sL**-2, "lam_R": sR**-2, "exp_avg": M}


def run_optimizer(opt_cls, grads, W0, **kwargs):
    W = torch.nn.Parameter(W0.clone())
    opt = opt_cls([W], **kwargs)
    for G in grads:
        W.grad = G.clone()
        opt.step()
    return W.detach(), opt.state[W], opt


def random_grads(steps, shape, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    # anisotropic rows and columns so that the factors have distinct eigenvalues
    left = torch.linspace(0.5, 2.0, shape[0], dtype=dtype)
    right = torch.linspace(0.3, 3.0, shape[1], dtype=dtype)
    return [left[:, None] * torch.randn(*shape, generator=gen, dtype=dtype) * right[None, :] for _ in range(steps)]


HYPER = dict(lr=0.05, betas=(0.9, 0.95), shampoo_beta=-1, eps=1e-8, init_factor=0.1)


@pytest.mark.parametrize("soap", [False, True])
def test_matches_dense_reference_pseudocode(soap):
    grads = random_grads(26, (5, 7))
    W0 = torch.randn(5, 7, dtype=F64, generator=torch.Generator().manual_seed(1))
    cls = KLSOAP if soap else KLShampoo
    _, first, _ = run_optimizer(cls, grads[:1], W0, weight_decay=0.1, precondition_frequency=5, **HYPER)
    bases = (first["Q_L"], first["Q_R"])
    W_ref, ref = reference_kl(grads, W0, wd=0.1, T=5, soap=soap, init_bases=bases, **HYPER)
    W, state, _ = run_optimizer(cls, grads, W0, weight_decay=0.1, precondition_frequency=5, **HYPER)
    assert state["step"] == 25
    torch.testing.assert_close(W, W_ref, rtol=1e-9, atol=1e-10)
    for key in ("L", "R", "Q_L", "Q_R", "lam_L", "lam_R", "exp_avg"):
        torch.testing.assert_close(state[key], ref[key], rtol=1e-9, atol=1e-10, msg=key)


def test_first_step_is_initialisation_only():
    grads = random_grads(1, (4, 6))
    W0 = torch.randn(4, 6, dtype=F64)
    # the reference code's defaults (KLShampoo's own differ: see test_defaults_differ_from_the_reference_code...)
    W, state, _ = run_optimizer(KLShampoo, grads, W0, weight_decay=0.5, lr=1.0, betas=(0.9, 0.98), init_factor=0.1)
    assert torch.equal(W, W0)  # no update and no weight decay on the initialisation step
    assert state["step"] == 0 and torch.count_nonzero(state["exp_avg"]) == 0
    torch.testing.assert_close(state["L"], 0.02 * grads[0] @ grads[0].T / 6)
    torch.testing.assert_close(state["lam_R"], torch.full((6,), 0.1, dtype=F64))


def test_defaults_differ_from_the_reference_code_where_documented():
    W = torch.nn.Parameter(torch.zeros(3, 4))
    (shampoo,) = KLShampoo([W]).param_groups
    (soap,) = KLSOAP([W]).param_groups
    assert (shampoo["betas"], shampoo["init_factor"]) == ((0.95, 0.95), "grad_rms")  # docs/kl_shampoo.md, measured
    assert (soap["betas"], soap["init_factor"]) == ((0.9, 0.98), 0.1)  # the reference code's
    (explicit,) = KLShampoo([W], betas=(0.9, 0.98), init_factor=0.1).param_groups
    assert (explicit["betas"], explicit["init_factor"]) == ((0.9, 0.98), 0.1)
    grads = random_grads(1, (40, 48))
    _, state, _ = run_optimizer(KLShampoo, grads, torch.randn(40, 48, dtype=F64), lr=1.0)
    torch.testing.assert_close(state["lam_L"], grads[0].square().mean().sqrt().expand(40))


def test_max_precond_dim_leaves_large_side_unpreconditioned():
    grads = random_grads(13, (4, 9))
    W0 = torch.randn(4, 9, dtype=F64)
    _, first, _ = run_optimizer(KLShampoo, grads[:1], W0, max_precond_dim=8, **HYPER)
    W_ref, ref = reference_kl(grads, W0, wd=0.0, T=4, precond_right=False, init_bases=(first["Q_L"], None), **HYPER)
    W, state, _ = run_optimizer(
        KLShampoo, grads, W0, weight_decay=0.0, precondition_frequency=4, max_precond_dim=8, **HYPER
    )
    assert {"R", "Q_R", "lam_R"}.isdisjoint(state) and state["Q_L"].shape == (4, 4)
    torch.testing.assert_close(W, W_ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(state["lam_L"], ref["lam_L"], rtol=1e-9, atol=1e-12)


def test_tensor_statistics_match_kronecker_products():
    gen = torch.Generator().manual_seed(3)
    d = (3, 4, 5)
    G = torch.randn(*d, dtype=F64, generator=gen)
    Qs = [torch.linalg.qr(torch.randn(k, k, dtype=F64, generator=gen)).Q for k in d]
    lams = [torch.rand(k, dtype=F64, generator=gen) + 0.2 for k in d]
    inv = [Q @ torch.diag(1 / lam) @ Q.T for Q, lam in zip(Qs, lams, strict=True)]
    stats = kl_tensor_statistics(G, Qs, lams)
    numel = G.numel()
    for k in range(3):
        others = [j for j in range(3) if j != k]
        Gk = G.movedim(k, 0).reshape(d[k], -1)  # columns indexed (j1, j2) row-major
        dense = Gk @ torch.kron(inv[others[0]], inv[others[1]]) @ Gk.T * d[k] / numel
        torch.testing.assert_close(stats.factors[k], dense)
        expected_lam = torch.diagonal(Qs[k].T @ dense @ Qs[k])
        torch.testing.assert_close(stats.eigenvalues[k], expected_lam)
    # a dimension without a basis is the identity factor
    partial = kl_tensor_statistics(G, [Qs[0], None, Qs[2]], [lams[0], None, lams[2]])
    assert partial.factors[1] is None
    G0 = G.reshape(3, -1)
    dense0 = G0 @ torch.kron(torch.eye(4, dtype=F64), inv[2]) @ G0.T * 3 / numel
    torch.testing.assert_close(partial.factors[0], dense0)


def test_three_dimensional_parameter_state_and_progress():
    torch.manual_seed(0)
    target = torch.randn(3, 6, 5)
    W = torch.nn.Parameter(torch.zeros(3, 6, 5))
    opt = KLShampoo([W], lr=0.05, weight_decay=0.0, precondition_frequency=3)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = (W - target).square().sum()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    state = opt.state[W]
    assert {k: tuple(state[k].shape) for k in ("F0", "F1", "F2", "lam_F1")} == {
        "F0": (3, 3),
        "F1": (6, 6),
        "F2": (5, 5),
        "lam_F1": (6,),
    }
    assert "L" not in state
    assert losses[-1] < 0.5 * losses[1]
    # a 4-D conv weight is flattened to (out, in*kh*kw)
    conv = torch.nn.Parameter(torch.randn(4, 2, 3, 3))
    opt = KLShampoo([conv])
    for _ in range(2):
        conv.grad = torch.randn_like(conv)
        opt.step()
    assert opt.state[conv]["R"].shape == (18, 18)


def test_clamp_and_eigenvalue_ema_follow_the_reference():
    lam = torch.tensor([1.0, 1e-9, float("nan"), float("inf"), -1.0, 0.0])
    out = clamp_eigenvalues(lam, 50)
    assert out[0] == 1.0 and out[1] == pytest.approx(1 / 50**2)
    assert torch.isinf(out[2:]).all()  # the reference gives these gain lam^{-1/2} = 0
    # an infinite (no-gain) eigenvalue is read as 0 by the next EMA, exactly as the reference's nan_to_num
    nxt = ema_eigenvalues(torch.tensor([float("inf"), 2.0]), torch.tensor([3.0, 3.0]), 0.9, 50)
    torch.testing.assert_close(nxt, torch.tensor([0.3, 2.1]))


def teacher_data(seed=0):
    """A 10-class problem labelled by a random tanh teacher on badly scaled inputs (10x spread)."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(2048, 20, generator=gen) * torch.logspace(0, -1, 20)
    teacher = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(1.5 * torch.randn(p.shape, generator=gen))
        return X, teacher(3 * X).argmax(1)


def train(make_opt, steps=80, seed=0):
    """Minibatch training of a 2-hidden-layer MLP with a cosine schedule; returns (first loss, final loss)."""
    X, y = teacher_data()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(20, 48), torch.nn.Tanh(), torch.nn.Linear(48, 48), torch.nn.Tanh(), torch.nn.Linear(48, 10)
    )
    opt = make_opt(list(net.parameters()))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / steps)))
    with torch.no_grad():
        first = torch.nn.functional.cross_entropy(net(X), y).item()
    for _ in range(steps):
        idx = torch.randint(0, X.shape[0], (128,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(X[idx]), y[idx]).backward()
        opt.step()
        schedule.step()
    with torch.no_grad():
        return first, torch.nn.functional.cross_entropy(net(X), y).item()


@pytest.fixture(scope="module")
def best_sgd_loss():
    # SGD with momentum at the best lr of a grid that brackets its optimum (lr 1; 3 is already much worse)
    return min(train(lambda p, lr=lr: torch.optim.SGD(p, lr=lr, momentum=0.9))[1] for lr in (0.3, 1.0, 2.0))


FAST = dict(betas=(0.9, 0.95), weight_decay=0.0, precondition_frequency=5)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: KLShampoo(p, lr=0.1, **FAST),  # init_factor="grad_rms" takes full steps from the start
        lambda p: KLSOAP(p, lr=0.1, **FAST),
        lambda p: ProKLShampoo(p, lr=0.03, rank=4, **FAST),
        lambda p: ProKLShampoo(p, lr=0.3, rank=4, complement_scale="kl_norm", **FAST),
    ],
    ids=["KLShampoo", "KLSOAP", "ProKLShampoo", "ProKLShampoo-kl_norm"],
)
def test_reduces_loss_and_beats_sgd(make_opt, best_sgd_loss):
    first, last = train(make_opt)
    assert last < 0.5 * first
    assert last < best_sgd_loss


def spiky_grads(shape, steps=30, spike_at=15, factor=1000.0):
    gen = torch.Generator().manual_seed(5)
    return [torch.randn(*shape, generator=gen) * (factor if i == spike_at else 1.0) for i in range(steps)]


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: KLShampoo(p, precondition_frequency=4),
        lambda p: KLSOAP(p, precondition_frequency=4),
        lambda p: ProKLShampoo(p, precondition_frequency=4, rank=3),
        lambda p: ProKLShampoo(p, precondition_frequency=4, rank=3, complement_scale="kl_norm"),
    ],
)
def test_gradient_spike_at_fp32_leaves_state_finite(make_opt):
    W = torch.nn.Parameter(torch.randn(12, 20))
    opt = make_opt([W])
    for G in spiky_grads((12, 20)):
        W.grad = G
        opt.step()
        assert torch.isfinite(W).all()
    state = opt.state[W]
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            assert torch.isfinite(value).all(), key
    for key in [k for k in state if k.startswith("Q_")] + (["U"] if "U" in state else []):
        Q = state[key]
        torch.testing.assert_close(Q.T @ Q, torch.eye(Q.shape[1]), atol=1e-4, rtol=0, msg=key)


def checkpoint_roundtrip(make_opt, shape, steps_before=7, steps_after=6):
    gen = torch.Generator().manual_seed(11)
    grads = [torch.randn(*shape, generator=gen) for _ in range(steps_before + steps_after)]
    bias_grads = [torch.randn(shape[0], generator=gen) for _ in grads]
    W = torch.nn.Parameter(torch.randn(*shape, generator=gen))
    b = torch.nn.Parameter(torch.zeros(shape[0]))
    opt = make_opt([W, b])
    for G, gb in zip(grads[:steps_before], bias_grads, strict=False):
        W.grad, b.grad = G.clone(), gb.clone()
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    W2 = torch.nn.Parameter(W.detach().clone())
    b2 = torch.nn.Parameter(b.detach().clone())
    for G, gb in zip(grads[steps_before:], bias_grads[steps_before:], strict=True):
        W.grad, b.grad = G.clone(), gb.clone()
        opt.step()
    opt2 = make_opt([W2, b2])
    opt2.load_state_dict(saved)
    for G, gb in zip(grads[steps_before:], bias_grads[steps_before:], strict=True):
        W2.grad, b2.grad = G.clone(), gb.clone()
        opt2.step()
    assert torch.equal(W, W2) and torch.equal(b, b2)
    for key, value in opt.state[W].items():
        other = opt2.state[W2][key]
        if isinstance(value, torch.Tensor):
            assert value.dtype == other.dtype and torch.equal(value, other), key
        else:
            assert value == other, key
    return opt2


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: KLShampoo(p, lr=0.01, precondition_frequency=3, state_dtype="bfloat16"),
        lambda p: KLSOAP(p, lr=0.01, precondition_frequency=3, max_precond_dim=10),
    ],
)
def test_state_dict_round_trip_is_bit_exact(make_opt):
    opt2 = checkpoint_roundtrip(make_opt, (6, 11))
    group = opt2.param_groups[0]
    assert group["preconditioner"] in ("kl", "adam") and "state_dtype" in group  # every switch is in the groups


def test_switches_survive_in_param_groups():
    W = torch.nn.Parameter(torch.randn(4, 5))
    opt = KLSOAP([W], precondition_frequency=7, state_dtype="bfloat16", max_precond_dim=64, init_factor=0.3)
    group = opt.state_dict()["param_groups"][0]
    assert (group["preconditioner"], group["precondition_frequency"], group["state_dtype"]) == ("adam", 7, "bfloat16")
    assert (group["max_precond_dim"], group["init_factor"]) == (64, 0.3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(lr=-1.0), "lr"),
        (dict(betas=(0.9, 1.0)), r"betas\[1\]"),
        (dict(shampoo_beta=-0.5), "shampoo_beta"),
        (dict(shampoo_beta=1.5), "shampoo_beta"),
        (dict(precondition_frequency=0), "precondition_frequency"),
        (dict(init_factor=0.0), "init_factor"),
        (dict(init_factor="rms"), "init_factor must be a finite number > 0 or .grad_rms."),
        (dict(max_precond_dim=0), "max_precond_dim"),
        (dict(state_dtype="int8"), "state_dtype"),
        (dict(eps=float("nan")), "eps"),
    ],
)
def test_bad_arguments_are_refused_clearly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KLShampoo([torch.nn.Parameter(torch.randn(3, 3))], **kwargs)


def test_bad_parameters_and_groups_are_refused():
    with pytest.raises(ValueError, match="complex"):
        KLShampoo([torch.nn.Parameter(torch.randn(3, 3, dtype=torch.complex64))])
    W = torch.nn.Parameter(torch.randn(3, 3))
    with pytest.raises(ValueError, match="preconditioner"):
        KLShampoo([{"params": [W], "preconditioner": "shampoo"}])


def test_bf16_parameter_keeps_fp32_statistics_and_trains():
    W = torch.nn.Parameter(torch.randn(6, 8).to(torch.bfloat16))
    opt = KLShampoo([W], lr=0.01, state_dtype="bfloat16")
    for _ in range(4):
        W.grad = torch.randn(6, 8).to(torch.bfloat16)
        opt.step()
    state = opt.state[W]
    assert state["L"].dtype == torch.bfloat16 and state["Q_L"].dtype == torch.float32
    assert state["exp_avg"].dtype == torch.float32 and W.dtype == torch.bfloat16
    assert math.isfinite(W.float().sum().item())


@pytest.mark.parametrize("cls, extra", [(KLShampoo, {}), (ProKLShampoo, {"rank": 3})])
def test_bf16_factor_state_tracks_the_fp32_run(cls, extra):
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(12, 20, generator=g) * torch.linspace(0.2, 2, 20) for _ in range(25)]
    W0 = torch.randn(12, 20, generator=g)
    moved = {}
    for state_dtype in ("float32", "bfloat16"):
        W = torch.nn.Parameter(W0.clone())
        opt = cls([W], lr=0.01, precondition_frequency=4, state_dtype=state_dtype, **extra)
        for G in grads:
            W.grad = G
            opt.step()
        assert opt.state[W]["L"].dtype == getattr(torch, state_dtype)
        moved[state_dtype] = W.detach() - W0
    # the factors only steer the (fp32) bases: the runs differ by bf16 round-off, not by a different algorithm
    rel = (moved["float32"] - moved["bfloat16"]).norm() / moved["float32"].norm()
    assert 0 < rel < 0.02


def test_grad_rms_init_starts_at_the_gradient_scale_and_is_invariant_to_it():
    grads = random_grads(12, (40, 48))
    W0 = torch.randn(40, 48, dtype=F64)
    _, state, _ = run_optimizer(KLShampoo, grads[:1], W0, lr=1.0, init_factor="grad_rms")
    mean_square = grads[0].square().mean()
    torch.testing.assert_close(state["lam_L"] * state["lam_R"][0], mean_square.expand(40))
    # one side above max_precond_dim: the other side alone carries the mean square
    _, state, _ = run_optimizer(KLShampoo, grads[:1], W0, lr=1.0, init_factor="grad_rms", max_precond_dim=45)
    assert "lam_R" not in state
    torch.testing.assert_close(state["lam_L"], mean_square.expand(40))
    # the updates until the first basis refresh are the same for a loss scaled by 2^10 (the update is
    # M / sqrt(lam_L lam_R), and a power of two rounds alike; the refresh reads the factor L, whose
    # initialisation G G^T / n is the reference's, not whitened, so later steps mix in the scale) ...
    options = dict(lr=0.01, weight_decay=0.0, precondition_frequency=5, eps=0.0, matmul_dtype="float32")
    W1, _, _ = run_optimizer(KLShampoo, grads[:5], W0, init_factor="grad_rms", **options)
    W2, _, _ = run_optimizer(KLShampoo, [1024.0 * g for g in grads[:5]], W0, init_factor="grad_rms", **options)
    torch.testing.assert_close(W1, W2, rtol=1e-9, atol=1e-12)
    assert not torch.equal(W1, W0)
    # ... and not with a constant init_factor
    W3, _, _ = run_optimizer(KLShampoo, grads[:5], W0, init_factor=0.1, **options)
    W4, _, _ = run_optimizer(KLShampoo, [1024.0 * g for g in grads[:5]], W0, init_factor=0.1, **options)
    assert (W3 - W4).abs().max() > 1e-3 * (W3 - W0).abs().max()


def test_grad_rms_init_of_a_three_dimensional_tensor():
    G = torch.randn(3, 6, 5, dtype=F64, generator=torch.Generator().manual_seed(0))
    _, state, _ = run_optimizer(KLShampoo, [G], torch.zeros(3, 6, 5, dtype=F64), init_factor="grad_rms")
    product = state["lam_F0"][0] * state["lam_F1"][0] * state["lam_F2"][0]
    torch.testing.assert_close(product, G.square().mean())
