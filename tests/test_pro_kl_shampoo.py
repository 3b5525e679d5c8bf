"""Pro-KLShampoo: the float64 identities of SPEC §5, a dense re-implementation of the reconstructed step,
reduction to KL-Shampoo at rank n, memory, subspace tracking on synthetic spike-and-flat gradients,
the adaptive-rank rule, checkpoints and bad input."""

import copy
import math

import pytest
import torch

from whiten import KLShampoo, ProKLShampoo
from whiten.linalg import (
    newton_schulz,
    newton_schulz_left_factor,
    newton_schulz_spectral_factor,
    polar_svd,
    principal_angles,
    spike_flat_statistics,
)
from whiten.linalg.spectrum import kl_gap, tail_am_gm_ratio
from whiten.optim.pro_kl_shampoo import adaptive_rank

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def orthonormal(n, k, seed):
    return torch.linalg.qr(torch.randn(n, k, dtype=F64, generator=gen(seed))).Q


def spd(n, seed, lo=0.5, hi=2.0):
    Q = orthonormal(n, n, seed)
    return Q @ torch.diag(torch.linspace(lo, hi, n, dtype=F64)) @ Q.T


def mpow(S, p, rcond=1e-10):
    """Symmetric (pseudo-)power: eigenvalues below ``rcond * max`` are treated as zero."""
    w, V = torch.linalg.eigh(0.5 * (S + S.T))
    keep = w > rcond * w.max()
    wp = torch.where(keep, w.clamp(min=1e-300) ** p, torch.zeros_like(w))
    return V @ torch.diag(wp) @ V.T


def gaussian_kl(S1, S2):
    """KL(N(0, S1) || N(0, S2)) by the dense formula."""
    d = S1.shape[0]
    return 0.5 * (torch.trace(torch.linalg.solve(S2, S1)) - d + torch.logdet(S2) - torch.logdet(S1)).item()


# -- the identities of SPEC §5 ------------------------------------------------------------------
def test_fact1_family_is_closed_under_powers_and_direction_splits():
    n, r, m = 9, 3, 4
    U = orthonormal(n, r, 0)
    Lam = torch.tensor([5.0, 2.5, 1.7], dtype=F64)
    sigma = 0.6
    P = torch.eye(n, dtype=F64) - U @ U.T
    S_R = U @ torch.diag(Lam) @ U.T + sigma * P
    for p in (-1.0, -0.5, 0.5, 2.0):
        torch.testing.assert_close(mpow(S_R, p), U @ torch.diag(Lam**p) @ U.T + sigma**p * P)
    S_L = spd(m, 1)
    M = torch.randn(m, n, dtype=F64, generator=gen(2))
    full = mpow(S_L, -0.5) @ M @ mpow(S_R, -0.5)
    split = mpow(S_L, -0.5) @ (M @ U) @ torch.diag(Lam**-0.5) @ U.T + sigma**-0.5 * mpow(S_L, -0.5) @ M @ P
    torch.testing.assert_close(full, split)


def test_fact2_m_projection_is_optimal_and_gap_matches_dense_kl():
    m, n, r = 3, 8, 3
    eigs = torch.tensor([9.0, 4.0, 2.5, 1.6, 1.2, 1.0, 0.7, 0.4], dtype=F64)  # full rank, anisotropic tail
    V = orthonormal(n, n, 3)
    C = V @ torch.diag(eigs) @ V.T
    S_L = spd(m, 4)
    truth = torch.kron(S_L, C)

    def family_kl(U, Lam, sigma):
        P = torch.eye(n, dtype=F64) - U @ U.T
        return gaussian_kl(truth, torch.kron(S_L, U @ torch.diag(Lam) @ U.T + sigma * P))

    U = V[:, :r]
    Lam = torch.diagonal(U.T @ C @ U)
    sigma = torch.trace((torch.eye(n, dtype=F64) - U @ U.T) @ C).item() / (n - r)
    best = family_kl(U, Lam, sigma)
    # the excess KL over the full factor (KL 0) is m (n - r)/2 log(AM/GM of the tail)
    tail = eigs[r:]
    expected = 0.5 * m * (n - r) * math.log(tail.mean().item() / tail.log().mean().exp().item())
    assert best == pytest.approx(expected, rel=1e-10)
    assert kl_gap(eigs, r, m) == pytest.approx(best, rel=1e-10)
    assert tail_am_gm_ratio(eigs, r) == pytest.approx(tail.mean().item() / tail.log().mean().exp().item())
    # perturbing any parameter, or using another subspace, only increases the KL
    for dLam, dsig in ((0.1, 0.0), (-0.1, 0.0), (0.0, 0.05), (0.0, -0.05)):
        assert family_kl(U, Lam * (1 + dLam), sigma * (1 + dsig)) > best
    other = torch.linalg.qr(V[:, :r] + 0.3 * torch.randn(n, r, dtype=F64, generator=gen(5))).Q
    Lam_o = torch.diagonal(other.T @ C @ other)
    sigma_o = torch.trace((torch.eye(n, dtype=F64) - other @ other.T) @ C).item() / (n - r)
    assert family_kl(other, Lam_o, sigma_o) > best
    # for a fixed (non-optimal) subspace, Lam = diag(U^T C U) and sigma = tr(P C)/(n - r) are still optimal
    for scale in (0.95, 1.05):
        assert family_kl(other, Lam_o * scale, sigma_o) > family_kl(other, Lam_o, sigma_o)
        assert family_kl(other, Lam_o, sigma_o * scale) > family_kl(other, Lam_o, sigma_o)


def test_fact3_restricted_statistics_match_dense_formulas():
    m, n, R, r = 5, 11, 4, 3  # R tracked directions, the first r active
    G = torch.randn(m, n, dtype=F64, generator=gen(6))
    Q_L = orthonormal(m, m, 7)
    lam_L = torch.rand(m, dtype=F64, generator=gen(8)) + 0.3
    U = orthonormal(n, R, 9)
    Lam = torch.tensor([4.0, 3.0, 2.0, 1.5], dtype=F64)
    sigma = torch.tensor(0.8, dtype=F64)
    stats = spike_flat_statistics(G, Q_L, lam_L, U, Lam, sigma, r)
    I = torch.eye(n, dtype=F64)
    sigma_eff = ((n - R) * sigma + Lam[r:].sum()) / (n - r)  # the flat value of the rank-r family
    U_r = U[:, :r]
    SR_inv = U_r @ torch.diag(1 / Lam[:r]) @ U_r.T + (I - U_r @ U_r.T) / sigma_eff
    SL_inv = Q_L @ torch.diag(1 / lam_L) @ Q_L.T
    left = G @ SR_inv @ G.T / n
    C = G.T @ SL_inv @ G / m
    torch.testing.assert_close(stats.left, left)
    torch.testing.assert_close(stats.lam_left, torch.diagonal(Q_L.T @ left @ Q_L))
    torch.testing.assert_close(stats.Lam, torch.diagonal(U.T @ C @ U))
    torch.testing.assert_close(stats.sigma, torch.trace((I - U @ U.T) @ C) / (n - R))
    torch.testing.assert_close(stats.sketch, C @ U)


def test_identity_a_orthogonalization_recovers_kl_right_factor():
    m, n, r = 3, 10, 2
    M = torch.randn(m, n, dtype=F64, generator=gen(10))
    U = orthonormal(n, r, 11)
    P = torch.eye(n, dtype=F64) - U @ U.T
    S_L = spd(m, 12)
    Y = mpow(S_L, -0.5) @ M @ P
    S_hat = P @ M.T @ torch.linalg.inv(S_L) @ M @ P / m  # KL-Shampoo's right factor on the momentum
    torch.testing.assert_close(math.sqrt(m) * polar_svd(Y), mpow(S_L, -0.5) @ (M @ P) @ mpow(S_hat, -0.5))


def test_identity_b_one_sample_fixed_point_gives_orthogonal_directions():
    n = 4
    X = torch.randn(n, n, dtype=F64, generator=gen(13))
    polar = polar_svd(X)
    for S_R in (torch.eye(n, dtype=F64), mpow(X.T @ X, 0.5), spd(n, 14, 0.3, 3.0)):
        S_L = X @ torch.linalg.inv(S_R) @ X.T / n
        torch.testing.assert_close(S_R, X.T @ torch.linalg.inv(S_L) @ X / n)  # a fixed point
        Z = mpow(S_L, -0.5) @ X @ mpow(S_R, -0.5)
        torch.testing.assert_close(Z @ Z.T, n * torch.eye(n, dtype=F64))  # Muon-like: all singular values equal
        torch.testing.assert_close(Z, math.sqrt(n) * polar_svd(X @ mpow(S_R, -0.5)))
    # the solutions S_R ~ I and S_R ~ (X^T X)^{1/2} give exactly sqrt(n) polar(X) ...
    for S_R in (2.0 * torch.eye(n, dtype=F64), mpow(X.T @ X, 0.5)):
        S_L = X @ torch.linalg.inv(S_R) @ X.T / n
        torch.testing.assert_close(mpow(S_L, -0.5) @ X @ mpow(S_R, -0.5), math.sqrt(n) * polar)
    # ... but not every solution does (the SPEC's stronger wording; see docs/pro_kl_shampoo.md)
    S_R = spd(n, 14, 0.3, 3.0)
    S_L = X @ torch.linalg.inv(S_R) @ X.T / n
    assert torch.dist(mpow(S_L, -0.5) @ X @ mpow(S_R, -0.5), math.sqrt(n) * polar) > 1e-2


def test_fact6_newton_schulz_output_stays_in_the_complement():
    m, n, r = 6, 14, 4
    U = orthonormal(n, r, 15)
    A = torch.randn(m, n, dtype=F64, generator=gen(16))
    X = (A - (A @ U) @ U.T) * (torch.rand(m, 1, dtype=F64, generator=gen(17)) + 0.5)
    for coefficients in ("keller", "polar_express"):
        O = newton_schulz(X, 5, coefficients, compute_dtype=F64)
        assert torch.linalg.matrix_norm(O @ U) < 1e-12 * torch.linalg.matrix_norm(O)


def test_gram_newton_schulz_equals_direct_iteration():
    X = torch.randn(3, 7, 20, dtype=F64, generator=gen(30)) * torch.logspace(0, -2, 20, dtype=F64)
    for coefficients in ("keller", "polar_express", (2.0, -1.5, 0.5)):
        K, P = newton_schulz_left_factor(X, 6, coefficients)
        torch.testing.assert_close(K @ X, newton_schulz(X, 6, coefficients, compute_dtype=F64))
        torch.testing.assert_close(P, X @ X.mT)
    with pytest.raises(ValueError, match="wide"):
        newton_schulz_left_factor(X.mT)


# -- the optimizer step against a dense re-implementation ----------------------------------------
def reference_pro(grads, W0, init, *, lr, beta1, beta, wd, T, init_factor, complement, scale_kind, ns_steps=5):
    """SPEC §5's step with dense n x n matrices (eps = 0): S_R^{-1/2}, S_R^{-1}, C and P_perp formed explicitly."""
    W = W0.clone()
    m, n = W.shape
    I = torch.eye(n, dtype=F64)
    L, Q_L, U = init
    r = U.shape[1]
    lam_L = torch.full((m,), init_factor, dtype=F64)
    Lam = torch.full((r,), init_factor, dtype=F64)
    sigma = torch.tensor(init_factor, dtype=F64)
    Y = U * init_factor
    M = torch.zeros(m, n, dtype=F64)

    def clamp(lam, d):
        return lam.clamp(min=1.0 / max(10, min(d, 4000)) ** 2)

    for t, G in enumerate(grads[1:], start=1):
        M = beta1 * M + (1 - beta1) * G
        P = I - U @ U.T
        SL_mh = Q_L @ torch.diag(lam_L**-0.5) @ Q_L.T
        sub = SL_mh @ M @ U @ torch.diag(Lam**-0.5) @ U.T
        Yc = SL_mh @ M @ P if complement == "left_whitened_orth" else M @ P
        O = newton_schulz(Yc, ns_steps, "keller", compute_dtype=F64)
        if scale_kind == "sqrt_m":
            c = math.sqrt(m)
        elif scale_kind == "muon_rms":
            c = 0.2 * math.sqrt(max(m, n))
        else:
            c = sigma**-0.5 * torch.linalg.matrix_norm(SL_mh @ M @ P) / torch.linalg.matrix_norm(O)
        W = W - lr * (sub + c * O)
        W = W * (1 - lr * wd)
        SR_inv = U @ torch.diag(1 / Lam) @ U.T + P / sigma
        SL_inv = Q_L @ torch.diag(1 / lam_L) @ Q_L.T
        left = G @ SR_inv @ G.T / n
        C = G.T @ SL_inv @ G / m
        L = beta * L + (1 - beta) * left
        lam_L = clamp(beta * lam_L + (1 - beta) * torch.diagonal(Q_L.T @ left @ Q_L), m)
        Lam = clamp(beta * Lam + (1 - beta) * torch.diagonal(U.T @ C @ U), n)
        sigma = clamp(beta * sigma + (1 - beta) * torch.trace(P @ C) / (n - r), n)
        Y = beta * Y + (1 - beta) * C @ U
        if t % T == 0:
            Q_L = torch.linalg.qr(L @ Q_L).Q
            order = torch.argsort(Lam, descending=True)
            Lam = Lam[order]
            U = torch.linalg.qr(Y[:, order]).Q
            Y = U * Lam
    return W, {"L": L, "Q_L": Q_L, "lam_L": lam_L, "U": U, "Lam": Lam, "sigma": sigma, "Y_sketch": Y}


def anisotropic_grads(steps, m, n, seed):
    g = gen(seed)
    rows = torch.linspace(0.5, 2.0, m, dtype=F64)[:, None]
    cols = torch.linspace(0.3, 3.0, n, dtype=F64)[None, :]
    return [rows * torch.randn(m, n, dtype=F64, generator=g) * cols for _ in range(steps)]


@pytest.mark.parametrize(
    ("complement", "scale_kind", "transpose", "shape"),
    [  # n >= 1.5 m runs Newton–Schulz on the Gram matrix, (6, 8) runs it directly
        ("left_whitened_orth", "sqrt_m", False, (4, 9)),
        ("left_whitened_orth", "sqrt_m", False, (6, 8)),
        ("left_whitened_orth", "kl_norm", True, (4, 9)),
        ("left_whitened_orth", "kl_norm", False, (6, 8)),
        ("orth", "muon_rms", False, (4, 9)),
        ("orth", "kl_norm", True, (6, 8)),
    ],
)
def test_step_matches_dense_reconstruction(complement, scale_kind, transpose, shape):
    (m, n), r = shape, 3
    grads = anisotropic_grads(11, m, n, 18)
    W0 = torch.randn(m, n, dtype=F64, generator=gen(19))
    hyper = dict(lr=0.05, betas=(0.9, 0.95), eps=0.0, weight_decay=0.1, precondition_frequency=3, init_factor=0.1)
    kwargs = dict(rank=r, complement=complement, complement_scale=scale_kind, **hyper)
    if transpose:  # restrict the rows of an n x m parameter: the state is that of the transposed matrix
        kwargs["project_side"] = "left"
    W = torch.nn.Parameter((W0.T if transpose else W0).clone())
    opt = ProKLShampoo([W], **kwargs)
    for i, G in enumerate(grads):
        W.grad = (G.T if transpose else G).clone()
        opt.step()
        if i == 0:
            state = opt.state[W]
            # initial U spans the top-r right singular vectors of the first gradient
            Vt = torch.linalg.svd(grads[0]).Vh[:r].T
            assert principal_angles(state["U"], Vt).max() < 1e-6
            init = (state["L"].clone(), state["Q_L"].clone(), state["U"].clone())
    W_ref, ref = reference_pro(
        grads,
        W0,
        init,
        lr=0.05,
        beta1=0.9,
        beta=0.95,
        wd=0.1,
        T=3,
        init_factor=0.1,
        complement=complement,
        scale_kind=scale_kind,
    )
    state = opt.state[W]
    assert state["transposed"] is transpose and state["step"] == 10
    torch.testing.assert_close(W.detach().T if transpose else W.detach(), W_ref, rtol=1e-9, atol=1e-11)
    for key, value in ref.items():
        torch.testing.assert_close(state[key], value, rtol=1e-9, atol=1e-11, msg=key)


def test_rank_at_least_n_is_kl_shampoo():
    grads = anisotropic_grads(31, 6, 10, 20)
    W0 = torch.randn(6, 10, dtype=F64, generator=gen(21))
    # the same betas and init_factor on both sides: KLShampoo's defaults differ (docs/kl_shampoo.md)
    hyper = dict(lr=0.02, weight_decay=0.05, precondition_frequency=4, betas=(0.9, 0.98), init_factor=0.1)
    runs = {}
    for name, make in {
        "kl": lambda p: KLShampoo(p, **hyper),
        "pro_auto": lambda p: ProKLShampoo(p, rank=10, **hyper),
        "pro_big": lambda p: ProKLShampoo(p, rank=64, complement="orth", **hyper),
        "pro_left": lambda p: ProKLShampoo(p, rank=6, project_side="left", **hyper),
        "pro_right": lambda p: ProKLShampoo(p, rank=12, project_side="right", **hyper),
        "pro_adaptive": lambda p: ProKLShampoo(p, rank=4, adaptive_rank=True, max_rank=10, **hyper),
    }.items():
        W = torch.nn.Parameter(W0.clone())
        opt = make([W])
        for G in grads:
            W.grad = G.clone()
            opt.step()
        runs[name] = (W.detach(), opt.state[W])
    W_kl, state_kl = runs["kl"]
    for name in ("pro_auto", "pro_big", "pro_left", "pro_right", "pro_adaptive"):
        W, state = runs[name]
        torch.testing.assert_close(W, W_kl, rtol=1e-12, atol=1e-14, msg=name)
        assert set(state) == set(state_kl), name
        torch.testing.assert_close(state["lam_R"], state_kl["lam_R"], rtol=1e-12, atol=1e-14)


def test_state_memory_is_m_squared_plus_n_r():
    m, n, r = 8, 96, 4
    W = torch.nn.Parameter(torch.randn(m, n))
    opt = ProKLShampoo([W], rank=r)
    for _ in range(3):
        W.grad = torch.randn(m, n)
        opt.step()
    shapes = {k: tuple(v.shape) for k, v in opt.state[W].items() if isinstance(v, torch.Tensor)}
    assert shapes == {
        "L": (m, m),
        "Q_L": (m, m),
        "lam_L": (m,),
        "U": (n, r),
        "Lam": (r,),
        "sigma": (),
        "Y_sketch": (n, r),
        "exp_avg": (m, n),
    }
    assert max(math.prod(s) for s in shapes.values()) < n * n
    # "auto" restricts the larger side: a tall matrix keeps its (small) column factor in full
    T = torch.nn.Parameter(torch.randn(n, m))
    opt_t = ProKLShampoo([T], rank=r)
    for _ in range(2):
        T.grad = torch.randn(n, m)
        opt_t.step()
    assert opt_t.state[T]["transposed"] is True and opt_t.state[T]["L"].shape == (m, m)
    kl = KLShampoo([W2 := torch.nn.Parameter(torch.randn(m, n))])
    W2.grad = torch.randn(m, n)
    kl.step()
    expected = 4 * (2 * m * m + m + 2 * n * r + r + 1 + m * n)  # SPEC §5 count plus the momentum, fp32
    assert opt.state_bytes() == expected < kl.state_bytes()


# -- subspace tracking on synthetic spike-and-flat gradients -------------------------------------
def spike_and_flat_stream(m, n, spikes, seed, steps):
    """Rank-rho signal plus i.i.d. noise: ``G = S_L^{1/2} (Z_1 + Z_2 V diag(sqrt(s - 1)) V^T)``.

    ``Z_1, Z_2`` are independent standard normal, so ``E[g g^T] = S_L (x) S_R`` with the spike-and-flat
    ``S_R = V diag(s) V^T + (I - V V^T)``: the right factor KL-Shampoo should find.
    """
    g = gen(seed)
    V = orthonormal(n, len(spikes), seed + 1)
    signal = V @ torch.diag((torch.tensor(spikes, dtype=F64) - 1).sqrt()) @ V.T  # rank rho
    SL_half = mpow(spd(m, seed + 2, 0.5, 2.0), 0.5)
    grads = []
    for _ in range(steps):
        noise = torch.randn(m, n, dtype=F64, generator=g)
        coefficients = torch.randn(m, n, dtype=F64, generator=g)
        grads.append((SL_half @ (noise + coefficients @ signal)).float())
    return grads, V


def run_tracker(grads, **kwargs):
    W = torch.nn.Parameter(torch.zeros(grads[0].shape))
    opt = ProKLShampoo([W], lr=0.0, weight_decay=0.0, precondition_frequency=5, shampoo_beta=0.98, **kwargs)
    for G in grads:
        W.grad = G
        opt.step()
    return opt.state[W]


def test_tracked_subspace_and_ratios_converge_to_the_truth():
    spikes = (30.0, 12.0, 5.0)
    grads, V = spike_and_flat_stream(16, 48, spikes, 22, 300)
    state = run_tracker(grads, rank=3)
    assert principal_angles(state["U"].double(), V).max() < 0.15  # radians
    ratios = (state["Lam"] / state["sigma"]).double()
    torch.testing.assert_close(ratios, torch.tensor(spikes, dtype=F64), rtol=0.2, atol=0)


def test_kl_gap_formula_matches_the_measured_kl_of_the_tracked_factors():
    """Full-rank anisotropic right covariance: the fitted spike-and-flat Kronecker factor's KL to the true
    gradient covariance is the gap formula m (n - r)/2 log(AM/GM of the tail) plus estimation noise."""
    m, n, r = 6, 20, 3
    V = orthonormal(n, n, 41)
    eigs = torch.cat([torch.tensor([20.0, 10.0, 6.0], dtype=F64), torch.linspace(2.5, 0.3, n - 3, dtype=F64)])
    S_L = spd(m, 42, 0.5, 2.0)
    truth = torch.kron(S_L, V @ torch.diag(eigs) @ V.T)
    A_half, C_half = mpow(S_L, 0.5), V @ torch.diag(eigs.sqrt()) @ V.T
    g = gen(40)
    grads = [A_half @ torch.randn(m, n, dtype=F64, generator=g) @ C_half for _ in range(400)]
    measured = {}
    for name, cls, extra in (("pro", ProKLShampoo, {"rank": r}), ("kl", KLShampoo, {})):
        W = torch.nn.Parameter(torch.zeros(m, n, dtype=F64))
        opt = cls([W], lr=0.0, weight_decay=0.0, precondition_frequency=5, shampoo_beta=0.98, **extra)
        for G in grads:
            W.grad = G
            opt.step()
        s = opt.state[W]
        fitted_left = s["Q_L"] @ torch.diag(s["lam_L"]) @ s["Q_L"].T
        if name == "pro":
            U = s["U"]
            fitted_right = U @ torch.diag(s["Lam"]) @ U.T + s["sigma"] * (torch.eye(n, dtype=F64) - U @ U.T)
        else:
            fitted_right = s["Q_R"] @ torch.diag(s["lam_R"]) @ s["Q_R"].T
        measured[name] = gaussian_kl(truth, torch.kron(fitted_left, fitted_right))
    gap = kl_gap(eigs, r, m)
    assert gap == pytest.approx(0.5 * m * (n - r) * math.log(eigs[r:].mean() / eigs[r:].log().mean().exp()))
    # the family's minimum is the gap, so any fitted member is above it; the fit is close to that minimum
    assert gap <= measured["pro"] < 1.08 * gap, (measured, gap)
    # the unrestricted fit of the same stream only pays the estimation noise
    assert measured["kl"] < 0.15 * gap, (measured, gap)


def test_adaptive_rank_finds_the_spike_rank():
    grads, _ = spike_and_flat_stream(16, 48, (30.0, 12.0, 5.0), 23, 300)
    state = run_tracker(grads, rank=1, adaptive_rank=True, max_rank=8, rank_update_interval=10)
    assert state["U"].shape == (48, 8) and state["rank"] == 3


def test_adaptive_rank_rule_on_exact_spectra():
    m, n = 32, 200
    flat = torch.ones(n, dtype=F64)
    spiked = flat.clone()
    spiked[:4] = torch.tensor([50.0, 20.0, 8.0, 3.0])
    # dropping the 3x spike costs 1/2 (3 - 1 - ln 3) ~ 0.45 nats per row: kept at tolerance 0.4, not at 0.5
    assert adaptive_rank(spiked, m, 0.4, 16) == 4
    assert adaptive_rank(spiked, m, 0.5, 16) == 3
    assert adaptive_rank(spiked, m, 0.0, 16) == 4  # an exactly flat tail has zero gap
    assert adaptive_rank(spiked, m, 0.5, 2) == 2  # bounded by max_rank
    assert adaptive_rank(flat, m, 0.5, 16) == 1  # nothing to track: the minimum rank
    assert tail_am_gm_ratio(spiked, 4) == pytest.approx(1.0)
    assert kl_gap(spiked, 4, m) == pytest.approx(0.0, abs=1e-9)
    # isolated spikes: gap per row ~ 1/2 sum (s - 1 - ln s), independent of n
    assert kl_gap(spiked, 3, m) / m == pytest.approx(0.5 * (3 - 1 - math.log(3)), rel=0.02)
    with pytest.raises(ValueError, match="NaN or Inf"):
        adaptive_rank(torch.tensor([1.0, float("nan")]), m, 0.5, 1)


# -- checkpoints and bad input ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(rank=3, adaptive_rank=True, max_rank=5, rank_update_interval=2, complement_scale="kl_norm"),
        dict(rank=2, project_side="left", complement="orth", state_dtype="bfloat16", ns_coefficients="polar_express"),
    ],
)
def test_state_dict_round_trip_is_bit_exact(kwargs):
    g = gen(24)
    grads = [torch.randn(7, 12, generator=g) for _ in range(14)]
    W = torch.nn.Parameter(torch.randn(7, 12, generator=g))
    make = lambda p: ProKLShampoo(p, lr=0.01, precondition_frequency=3, **kwargs)  # noqa: E731
    opt = make([W])
    for G in grads[:7]:
        W.grad = G.clone()
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    W2 = torch.nn.Parameter(W.detach().clone())
    for G in grads[7:]:
        W.grad = G.clone()
        opt.step()
    opt2 = make([W2])
    opt2.load_state_dict(saved)
    for G in grads[7:]:
        W2.grad = G.clone()
        opt2.step()
    assert torch.equal(W, W2)
    for key, value in opt.state[W].items():
        other = opt2.state[W2][key]
        if isinstance(value, torch.Tensor):
            assert value.dtype == other.dtype and torch.equal(value, other), key
        else:
            assert value == other, key
    for name, value in kwargs.items():
        assert opt2.param_groups[0][name] == value


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(rank=0), "rank"),
        (dict(project_side="top"), "project_side"),
        (dict(complement="svd"), "complement"),
        (dict(complement_scale="rms"), "complement_scale"),
        (dict(ns_steps=0), "ns_steps"),
        (dict(ns_coefficients="bogus"), "ns_coefficients"),
        (dict(adaptive_rank=True, rank=8, max_rank=4), "max_rank"),
        (dict(rank_tolerance=-1.0), "rank_tolerance"),
        (dict(rank_update_interval=0), "rank_update_interval"),
        (dict(adaptive_rank="yes"), "adaptive_rank"),
    ],
)
def test_bad_arguments_are_refused_clearly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ProKLShampoo([torch.nn.Parameter(torch.randn(4, 6))], **kwargs)


def test_rank_above_short_side_and_tensor_parameters():
    # R > m: the first gradient has only m right singular vectors; U is completed to R orthonormal columns
    W = torch.nn.Parameter(torch.randn(4, 20))
    experts = torch.nn.Parameter(torch.randn(3, 4, 5))  # 3-D: full KL-Shampoo factors, one per dimension
    opt = ProKLShampoo([W, experts], rank=8, precondition_frequency=2)
    for _ in range(5):
        W.grad, experts.grad = torch.randn(4, 20), torch.randn(3, 4, 5)
        opt.step()
    U = opt.state[W]["U"]
    assert U.shape == (20, 8)
    torch.testing.assert_close(U.T @ U, torch.eye(8), atol=1e-5, rtol=0)
    assert torch.isfinite(W).all() and {"F0", "F1", "F2", "Q_F2", "lam_F1"} <= set(opt.state[experts])


# -- the spectral evaluation of the complement's Newton–Schulz polynomial --------------------------
def test_spectral_newton_schulz_equals_the_matrix_iteration():
    U = orthonormal(20, 6, 31)
    A = torch.randn(3, 7, 20, dtype=F64, generator=gen(32)) * torch.logspace(0, -2, 20, dtype=F64)
    X = A - (A @ U) @ U.mT  # rank-deficient complement coordinates, as in the optimizer (batched)
    for coefficients in ("keller", "polar_express", (2.0, -1.5, 0.5)):
        for steps in (1, 5, 9):
            K, P = newton_schulz_spectral_factor(X, steps, coefficients)
            expected = newton_schulz(X, steps, coefficients, compute_dtype=F64)
            torch.testing.assert_close(K @ X, expected, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(P, X @ X.mT)
    square = torch.randn(9, 9, dtype=F64, generator=gen(33))
    K, _ = newton_schulz_spectral_factor(square, 5, "keller")
    expected = newton_schulz(square, 5, "keller", compute_dtype=F64)
    torch.testing.assert_close(K @ square, expected, rtol=1e-10, atol=1e-12)
    # fp32: as close to the exact polynomial as the iterations are
    wide = torch.randn(48, 160, generator=gen(34)) * torch.logspace(0, -2, 160)
    exact = newton_schulz(wide.double(), 5, "keller", compute_dtype=F64)
    K32, _ = newton_schulz_spectral_factor(wide, 5, "keller")
    assert ((K32 @ wide).double() - exact).norm() < 1e-4 * exact.norm()
    # a zero input gives a zero output, a tall one is refused
    K0, _ = newton_schulz_spectral_factor(torch.zeros(4, 6, dtype=F64))
    assert torch.isfinite(K0).all() and torch.count_nonzero(K0 @ torch.zeros(4, 6, dtype=F64)) == 0
    with pytest.raises(ValueError, match="wide"):
        newton_schulz_spectral_factor(torch.randn(6, 4))


@pytest.mark.parametrize("shape", [(4, 9), (6, 8), (7, 7)])
def test_every_ns_method_gives_the_same_trajectory(shape):
    grads = anisotropic_grads(9, *shape, 35)
    W0 = torch.randn(*shape, dtype=F64, generator=gen(36))
    finals = {}
    for method in ("spectral", "auto", "gram", "direct"):
        W = torch.nn.Parameter(W0.clone())
        opt = ProKLShampoo([W], lr=0.05, rank=2, precondition_frequency=3, ns_method=method, complement_scale="kl_norm")
        for G in grads:
            W.grad = G.clone()
            opt.step()
        finals[method] = W.detach()
    for method, W in finals.items():
        torch.testing.assert_close(W, finals["direct"], rtol=1e-10, atol=1e-12, msg=method)
    with pytest.raises(ValueError, match="ns_method"):
        ProKLShampoo([torch.nn.Parameter(torch.randn(4, 6))], ns_method="svd")
