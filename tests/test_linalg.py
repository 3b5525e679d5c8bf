"""Numerical kernels: Newton–Schulz, spectral maps, eigen/QR helpers, precision control."""

import math

import pytest
import torch

from conftest import random_with_singular_values
from whiten.linalg import (
    coupled_newton_schulz_sqrt,
    eigh_descending,
    emulate_matmul_precision,
    initial_stream_basis,
    kl_eigenvalue_targets,
    kl_factor_targets,
    map_batched,
    matmul_precision,
    newton_schulz,
    ns_power_rounds,
    ns_schedule,
    orthogonal_iteration,
    polar_svd,
    principal_angles,
    round_mantissa,
    schatten_power_ns,
    schatten_power_stream,
    schatten_power_svd,
    sort_basis,
)


def scalar_ns(x: torch.Tensor, name: str, steps: int) -> torch.Tensor:
    schedule = ns_schedule(name, steps)
    x = x / schedule.norm_scale
    for a, b, c in schedule.coefficients:
        x = a * x + b * x**3 + c * x**5
    return x


# documented bands (docs/linalg.md): singular values of NS(G) when every s_i / ||G||_F >= 1e-2
NS_BANDS = {("keller", 5): (0.68, 1.14), ("polar_express", 5): (0.87, 1.13), ("polar_express", 8): (0.999, 1.001)}


@pytest.mark.parametrize("name", ["keller", "polar_express"])
@pytest.mark.parametrize("shape", [(48, 24), (24, 48), (32, 32)])
def test_newton_schulz_acts_on_singular_values_only(name, shape):
    k = min(shape)
    s = torch.logspace(0, -2, k, dtype=torch.float64)
    G = random_with_singular_values(*shape, s)
    A, sv, Bh = torch.linalg.svd(G, full_matrices=False)
    out = newton_schulz(G, 5, name, compute_dtype=torch.float64)
    expected = (A * scalar_ns(sv / torch.linalg.norm(G), name, 5)) @ Bh
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("name", "steps"), list(NS_BANDS))
def test_newton_schulz_singular_value_band(name, steps):
    low, high = NS_BANDS[(name, steps)]
    for seed, shape in enumerate([(64, 32), (32, 64), (40, 40)]):
        k = min(shape)
        s = torch.logspace(0, -1, k, dtype=torch.float64)
        s = s / s.norm() * 1.0
        s = torch.clamp(s, min=1e-2)  # every normalised singular value >= 1e-2
        G = random_with_singular_values(*shape, s, seed=seed).float()
        sv = torch.linalg.svdvals(newton_schulz(G, steps, name).double())
        assert low <= sv.min().item() and sv.max().item() <= high, (name, steps, sv.min(), sv.max())


def test_polar_svd_identities_float64():
    G = random_with_singular_values(30, 12, torch.linspace(3.0, 0.1, 12))
    P = polar_svd(G)
    assert P.dtype == torch.float64
    torch.testing.assert_close(P.T @ P, torch.eye(12, dtype=torch.float64), atol=1e-12, rtol=0)
    H = P.T @ G  # G = P H with H symmetric positive definite
    torch.testing.assert_close(H, H.T, atol=1e-12, rtol=0)
    assert torch.linalg.eigvalsh(H).min() > 0
    torch.testing.assert_close(P @ H, G, atol=1e-12, rtol=0)


def test_newton_schulz_batched_matches_loop_and_bf16_path():
    torch.manual_seed(0)
    X = torch.randn(3, 20, 12)
    batched = newton_schulz(X)
    for i in range(3):
        torch.testing.assert_close(batched[i], newton_schulz(X[i]), atol=1e-5, rtol=1e-5)
    low = newton_schulz(X[0], compute_dtype=torch.bfloat16)
    assert low.dtype == torch.bfloat16
    assert (low.float() - batched[0]).abs().max() < 0.05
    assert newton_schulz(torch.zeros(4, 6)).abs().max() == 0  # eps floor: zero in, zero out


def test_polar_express_schedule_is_spec_table():
    """SPEC §7: the seven published tuples / (1.01, 1.01^3, 1.01^5), then (1.875, -1.25, 0.375); norm x 1.01."""
    published = [
        (8.28721201814563, -23.595886519098837, 17.300387312530933),
        (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
        (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
        (3.3184196573706015, -2.488488024314874, 0.51004894012372),
        (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
        (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
        (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    ]
    schedule = ns_schedule("polar_express", 9)
    assert schedule.norm_scale == 1.01 and schedule.steps == 9
    for got, (a, b, c) in zip(schedule.coefficients[:7], published, strict=True):
        assert got == pytest.approx((a / 1.01, b / 1.01**3, c / 1.01**5), rel=1e-15)
    assert schedule.coefficients[7:] == ((1.875, -1.25, 0.375),) * 2
    assert ns_schedule("polar_express", 3).coefficients == schedule.coefficients[:3]
    keller = ns_schedule("keller", 4)
    assert keller.norm_scale == 1.0 and keller.coefficients == ((3.4445, -4.7750, 2.0315),) * 4
    # the normaliser: X_0 = G / (1.01 ||G||_F), so a rank-one input's first iterate is exactly a/1.01 + ...
    G = torch.zeros(3, 5, dtype=torch.float64)
    G[0, 0] = 2.0
    a, b, c = schedule.coefficients[0]
    x0 = 1.0 / 1.01
    out = newton_schulz(G, 1, "polar_express", compute_dtype=torch.float64)
    assert out[0, 0].item() == pytest.approx(a * x0 + b * x0**3 + c * x0**5, rel=1e-14)


def test_ns_schedule_rejects_bad_values():
    with pytest.raises(ValueError, match="ns_coefficients"):
        ns_schedule("nope", 5)
    with pytest.raises(ValueError, match="ns_steps"):
        ns_schedule("keller", 0)
    assert ns_schedule((1.0, 2.0, 3.0), 2).coefficients == ((1.0, 2.0, 3.0),) * 2
    assert ns_schedule("polar_express", 10).coefficients[-1] == (1.875, -1.25, 0.375)


def test_schatten_power_limits():
    G = random_with_singular_values(20, 9, torch.linspace(2.0, 0.2, 9))
    torch.testing.assert_close(schatten_power_svd(G, 0.0), polar_svd(G), atol=1e-12, rtol=0)
    torch.testing.assert_close(schatten_power_svd(G, 1.0), G, atol=1e-12, rtol=0)


def _schatten_norm(D: torch.Tensor, q: float) -> torch.Tensor:
    return torch.linalg.svdvals(D).pow(q).sum().pow(1.0 / q)


@pytest.mark.parametrize("power", [0.125, 0.5])
def test_schatten_power_is_steepest_descent_in_schatten_q(power):
    """A s^p B^T / ||.||_q maximises <G, D> on the unit Schatten-q ball, q = 1 + 1/p."""
    q = 1.0 + 1.0 / power
    G = random_with_singular_values(16, 10, torch.logspace(0.5, -1, 10), seed=3)
    D_star = schatten_power_svd(G, power)
    best = (G * D_star).sum() / _schatten_norm(D_star, q)
    # Hölder: the maximum equals the dual (Schatten-p*) norm of G with 1/q + 1/q* = 1
    q_dual = q / (q - 1.0)
    torch.testing.assert_close(best, _schatten_norm(G, q_dual), rtol=1e-10, atol=0)
    gen = torch.Generator().manual_seed(1)
    for _ in range(200):
        D = torch.randn(16, 10, dtype=torch.float64, generator=gen)
        D = D + 0.5 * torch.rand((), dtype=torch.float64, generator=gen) * D_star  # also probe near the optimum
        assert (G * D).sum() / _schatten_norm(D, q) <= best + 1e-12


def test_ns_power_rounds_matches_reference_rule():
    assert [ns_power_rounds(p) for p in (1.0, 0.5, 0.25, 0.125, 0.1)] == [1, 2, 3, 4, 4]
    with pytest.raises(ValueError):
        ns_power_rounds(0.0)


def test_schatten_power_ns_equals_its_scalar_iteration():
    """The NS variant is a matrix function: check it against the same iteration on singular values."""
    m, n, power, ridge = 24, 12, 0.125, 1e-6
    G = random_with_singular_values(m, n, torch.logspace(0, -1.5, n), seed=2)
    out = schatten_power_ns(G, power, ridge=ridge)
    A, s, Bh = torch.linalg.svd(G, full_matrices=False)
    ortho = scalar_ns(s / s.norm(), "keller", 5)
    lam = s**2 + ridge
    for _ in range(ns_power_rounds(power)):  # coupled NS square root, on eigenvalues of the Gram
        norm = lam.norm()
        y, z = lam / norm, torch.ones_like(lam)
        for _ in range(5):
            t = 0.5 * (3.0 - z * y)
            y, z = y * t, t * z
        lam = y * norm.sqrt() + ridge  # the reference adds the ridge again after every root
    expected = (A * (ortho * lam)) @ Bh
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-10)
    # the Gram may be formed on either side: the wide orientation gives the transpose
    torch.testing.assert_close(schatten_power_ns(G.T, power, ridge=ridge), expected.T, rtol=1e-9, atol=1e-10)
    # it only approximates the exact map: Keller NS5 leaves singular values in ~[0.68, 1.13] (docs)
    G_good = random_with_singular_values(m, n, torch.linspace(1.0, 0.6, n), seed=4)
    exact = schatten_power_svd(G_good, power)
    assert (schatten_power_ns(G_good, power) - exact).norm() / exact.norm() < 0.25


@pytest.mark.parametrize("shape", [(3, 10, 6), (2, 5, 9)])
def test_power_maps_batch_over_leading_dims(shape):
    """Stacked same-shape matrices (what map_batched does on accelerators) give the per-matrix results."""
    gen = torch.Generator().manual_seed(7)
    X = torch.randn(shape, dtype=torch.float64, generator=gen)
    for fn in (
        lambda M: schatten_power_svd(M, 0.125),
        lambda M: schatten_power_ns(M, 0.125),
        lambda M: newton_schulz(M, 5, "polar_express", compute_dtype=torch.float64),
        polar_svd,
    ):
        batched = fn(X)
        for i in range(shape[0]):
            torch.testing.assert_close(batched[i], fn(X[i]), atol=1e-12, rtol=1e-12)
    V0 = initial_stream_basis(X)
    O, _ = schatten_power_stream(X, V0, 0.125)
    for i in range(shape[0]):
        Oi, _ = schatten_power_stream(X[i], V0[i], 0.125)
        torch.testing.assert_close(O[i], Oi, atol=1e-12, rtol=1e-12)


def test_coupled_newton_schulz_sqrt_converges_for_well_conditioned():
    X = random_with_singular_values(10, 10, torch.linspace(1.0, 0.5, 10))
    S = X @ X.T
    root, inv_root = coupled_newton_schulz_sqrt(S, steps=12)
    torch.testing.assert_close(root @ root, S, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(root @ inv_root, torch.eye(10, dtype=torch.float64), atol=1e-8, rtol=1e-8)


def test_stream_map_exact_from_exact_basis_and_converges_from_stale_one():
    G = random_with_singular_values(20, 8, torch.linspace(3.0, 0.5, 8), seed=5)
    exact = schatten_power_svd(G, 0.125)
    O, V = schatten_power_stream(G, initial_stream_basis(G), 0.125)
    torch.testing.assert_close(O, exact, atol=1e-10, rtol=1e-10)
    gen = torch.Generator().manual_seed(0)
    V, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64, generator=gen))
    first, _ = schatten_power_stream(G, V, 0.125)
    for _ in range(60):
        O, V = schatten_power_stream(G, V, 0.125)
    assert (O - exact).norm() < 1e-6 < (first - exact).norm()


def test_eigh_descending_order_and_fallback(monkeypatch):
    X = random_with_singular_values(12, 12, torch.linspace(4.0, 0.1, 12))
    S = (X @ X.T).float()
    vals, vecs = eigh_descending(S)
    assert torch.all(vals[:-1] >= vals[1:])
    torch.testing.assert_close((vecs * vals) @ vecs.T, S, atol=1e-4, rtol=1e-4)

    real_eigh = torch.linalg.eigh
    calls = []

    def flaky(A, *args, **kwargs):
        calls.append(A.dtype)
        if len(calls) <= 2:  # fp32 fails, first fp64 try fails, jittered fp64 succeeds
            raise torch.linalg.LinAlgError("did not converge")
        return real_eigh(A, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    vals2, _ = eigh_descending(S)
    assert calls == [torch.float32, torch.float64, torch.float64]
    assert vals2.dtype == torch.float32 and torch.all(vals2[:-1] >= vals2[1:])
    torch.testing.assert_close(vals2, vals, atol=1e-3, rtol=1e-3)


def test_orthogonal_iteration_and_sort_basis():
    X = random_with_singular_values(10, 10, torch.tensor([5.0, 3.0, 1.0, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.01]))
    S = X @ X.T
    _, exact = eigh_descending(S)
    Q, _ = torch.linalg.qr(exact[:, :3] + 0.3 * torch.randn(10, 3, dtype=torch.float64))
    Q = orthogonal_iteration(S, Q, steps=40)
    assert principal_angles(Q, exact[:, :3]).max() < 1e-6
    perm = torch.tensor([3, 0, 2, 1, 4, 5, 6, 7, 8, 9])
    sorted_Q, order = sort_basis(S, exact[:, perm])
    torch.testing.assert_close(sorted_Q, exact)
    assert order.tolist()[:4] == [1, 3, 2, 0]


def test_principal_angles_of_hand_built_rotation():
    theta = 0.3
    e = torch.eye(6, dtype=torch.float64)
    rotated = torch.stack([math.cos(theta) * e[:, 0] + math.sin(theta) * e[:, 5], e[:, 1]], dim=1)
    angles = principal_angles(e[:, :2], rotated)
    torch.testing.assert_close(angles, torch.tensor([0.0, theta], dtype=torch.float64), atol=1e-7, rtol=0)


def test_matmul_precision_restores_even_on_error():
    before = torch.get_float32_matmul_precision()
    with pytest.raises(RuntimeError), matmul_precision("medium"):
        assert torch.get_float32_matmul_precision() == "medium"
        raise RuntimeError("boom")
    assert torch.get_float32_matmul_precision() == before
    with pytest.raises(ValueError, match="precision"), matmul_precision("fast"):
        pass


def test_round_mantissa_bits():
    one = torch.tensor([1.0 + 2**-11, 1.0 + 2**-10, 1.0 + 3 * 2**-11, -(1.0 + 2**-10)], dtype=torch.float32)
    tf32 = round_mantissa(one, 10)
    # 1 + 2^-11 is a tie -> even (1.0); 1 + 3*2^-11 rounds up to 1 + 2^-9
    assert tf32.tolist() == [1.0, 1.0 + 2**-10, 1.0 + 2**-9, -(1.0 + 2**-10)]
    x = torch.randn(10000)
    torch.testing.assert_close(round_mantissa(x, 7), x.bfloat16().float(), atol=0, rtol=0)
    special = torch.tensor([float("inf"), float("nan"), 0.0])
    out = round_mantissa(special, 10)
    assert out[0] == float("inf") and out[1].isnan() and out[2] == 0


def test_emulated_matmul_rounds_operands():
    torch.manual_seed(0)
    A, B = torch.randn(16, 8), torch.randn(8, 4)
    with emulate_matmul_precision("high"):
        emulated = A @ B
        emulated_mm = torch.mm(A, B)
        emulated_addmm = torch.addmm(torch.ones(16, 4), A, B)
    expected = round_mantissa(A, 10) @ round_mantissa(B, 10)
    torch.testing.assert_close(emulated, expected, atol=0, rtol=0)
    torch.testing.assert_close(emulated_mm, expected, atol=0, rtol=0)
    torch.testing.assert_close(emulated_addmm, expected + 1, atol=1e-6, rtol=0)
    assert not torch.equal(emulated, A @ B)  # outside the context: full fp32
    with emulate_matmul_precision("highest"):
        assert torch.equal(A @ B, A @ B)


def test_emulated_precision_covers_tensordot_and_einsum_operand_lists():
    # the N-D KL statistics contract with tensordot; einsum also takes its operands as a list
    torch.manual_seed(0)
    A, B = torch.randn(6, 8), torch.randn(8, 5)
    rA, rB = round_mantissa(A, 10), round_mantissa(B, 10)
    with emulate_matmul_precision("high"):
        tdot = torch.tensordot(A, B, dims=1)
        ein = torch.einsum("ij,jk->ik", [A, B])
    torch.testing.assert_close(tdot, torch.tensordot(rA, rB, dims=1), atol=0, rtol=0)
    torch.testing.assert_close(ein, torch.einsum("ij,jk->ik", rA, rB), atol=0, rtol=0)
    assert not torch.equal(tdot, torch.tensordot(A, B, dims=1))


def test_kl_targets_match_dense_formulas():
    gen = torch.Generator().manual_seed(0)
    m, n = 7, 5
    G = torch.randn(m, n, dtype=torch.float64, generator=gen)
    Q_L, _ = torch.linalg.qr(torch.randn(m, m, dtype=torch.float64, generator=gen))
    Q_R, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    lam_L = torch.rand(m, dtype=torch.float64, generator=gen) + 0.1
    lam_R = torch.rand(n, dtype=torch.float64, generator=gen) + 0.1
    SL_inv = Q_L @ torch.diag(1 / lam_L) @ Q_L.T
    SR_inv = Q_R @ torch.diag(1 / lam_R) @ Q_R.T
    left, right = kl_factor_targets(G, Q_L, lam_L, Q_R, lam_R)
    torch.testing.assert_close(left, G @ SR_inv @ G.T / n)
    torch.testing.assert_close(right, G.T @ SL_inv @ G / m)
    E = Q_L.T @ G @ Q_R
    tl, tr = kl_eigenvalue_targets(E, lam_L, lam_R)
    torch.testing.assert_close(tl, torch.diagonal(Q_L.T @ left @ Q_L))
    torch.testing.assert_close(tr, torch.diagonal(Q_R.T @ right @ Q_R))


def test_map_batched_matches_loop_and_keeps_order():
    mats = [torch.randn(4, 3), torch.randn(5, 2), torch.randn(4, 3)]
    out = map_batched(lambda X: X * 2 + X.sum(dim=(-2, -1), keepdim=True), mats)
    for mat, res in zip(mats, out, strict=True):
        torch.testing.assert_close(res, mat * 2 + mat.sum())


@pytest.mark.parametrize("shape", [(2500, 40), (3, 1700, 30), (90, 20)])
def test_gram_from_block_triangle_equals_plain_product(shape):
    from whiten.linalg import gram

    gen = torch.Generator().manual_seed(12)
    X = torch.randn(shape, dtype=torch.float64, generator=gen)
    for block_rows in (400, 768, 10_000):
        out = gram(X, block_rows=block_rows)
        torch.testing.assert_close(out, X @ X.mT, rtol=1e-12, atol=1e-12)
        if X.size(-2) >= 2 * block_rows:  # the blocks below the diagonal mirror those above it
            edge = round(X.size(-2) / (X.size(-2) // block_rows))
            assert torch.equal(out[..., edge:, :edge], out[..., :edge, edge:].mT)
    # a strided view: G^T G without a copy
    G = torch.randn(30, 1000, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(gram(G.mT, block_rows=300), G.mT @ G, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="block_rows"):
        gram(X, block_rows=0)


def test_principal_angles_resolve_tiny_angles():
    """arccos of the cosines reads 0 below ~sqrt(2 eps) (1e-8 in fp64); the sines resolve it."""
    angle = 1e-10
    e = torch.eye(5, dtype=torch.float64)
    tilted = e[:, :2].clone()
    tilted[:, 1] = math.cos(angle) * e[:, 1] + math.sin(angle) * e[:, 4]
    got = principal_angles(e[:, :2], tilted)
    assert got[-1].item() == pytest.approx(angle, rel=1e-6)
    assert principal_angles(tilted, e[:, :3]).shape == (2,)  # min(p, q) angles, either order


def test_map_batched_returns_tuples_per_matrix():
    """A kernel returning (factor, gram) gets its pair back per matrix, stacked or not, in input order."""
    mats = [torch.randn(3, 5, dtype=torch.float64) for _ in range(3)] + [torch.randn(2, 4, dtype=torch.float64)]
    for stack in (True, False):
        out = map_batched(lambda X: (2 * X, X @ X.mT), mats, stack=stack)
        for X, (double, gram_) in zip(mats, out, strict=True):
            assert torch.equal(double, 2 * X)
            torch.testing.assert_close(gram_, X @ X.mT)
