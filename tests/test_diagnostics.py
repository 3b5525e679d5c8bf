"""Tests of the diagnostics: angles, HT-SR alpha, spike-and-flat KL gap, TF32 emulation, spectra, spike, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from whiten.diagnostics.alpha import fit_power_law, hill_alpha, mean_by_type, module_type_of, weight_alpha
from whiten.diagnostics.angles import largest_angle_deg, subspace_angles
from whiten.diagnostics.spectra import factor_spectra, record_spectra
from whiten.diagnostics.spike import SpikeConfig, run_spike_experiment
from whiten.linalg import (
    emulate_global_matmul_precision,
    emulate_matmul_precision,
    matmul_precision,
    principal_angles,
    round_mantissa,
)
from whiten.linalg.spectrum import choose_rank, energy_captured, kl_gap, kl_gap_all, tail_am_gm_ratio

# ---------------------------------------------------------------------------------------------- angles


def _rotated_basis(n: int, angles: list[float], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A k-dim basis and its rotation by the given principal angles (float64, random frame)."""
    k = len(angles)
    frame, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    A = frame[:, :k]
    B = torch.stack([math.cos(t) * frame[:, i] + math.sin(t) * frame[:, k + i] for i, t in enumerate(angles)], 1)
    return A, B


def test_subspace_angles_recover_hand_built_rotations() -> None:
    angles = [1e-6, 1e-3, 0.3, 1.2, math.pi / 2]
    A, B = _rotated_basis(12, angles)
    got = subspace_angles(A, B)
    assert torch.allclose(got, torch.tensor(sorted(angles), dtype=torch.float64), atol=1e-12, rtol=1e-9)
    # the arccos-only kernel agrees on large angles but cannot see tiny ones
    assert torch.allclose(principal_angles(A, B)[2:], got[2:], atol=1e-7)


def test_largest_angle_top1_and_topk_and_invariance() -> None:
    A, B = _rotated_basis(10, [0.1, 0.2, 0.7])
    # mix the columns inside each span: angles are a property of the subspaces
    mix, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))
    assert largest_angle_deg(A, B @ mix, 3) == pytest.approx(math.degrees(0.7), abs=1e-9)
    assert largest_angle_deg(A, B, 1) == pytest.approx(math.degrees(0.1), abs=1e-9)
    assert largest_angle_deg(A, -B, 2) == pytest.approx(math.degrees(0.2), abs=1e-9)  # sign flips are no rotation
    # fp32 bases: the sine branch resolves a 0.001 degree rotation that fp32 arccos rounds away
    A, B = _rotated_basis(64, [math.radians(1e-3)])
    assert largest_angle_deg(A.float(), B.float(), 1) == pytest.approx(1e-3, rel=0.05)


def test_angle_bad_input() -> None:
    with pytest.raises(ValueError, match="k must be"):
        largest_angle_deg(torch.eye(4), torch.eye(4), 5)
    with pytest.raises(ValueError, match="same space"):
        subspace_angles(torch.eye(4)[:, :2], torch.eye(5)[:, :2])


# ---------------------------------------------------------------------------------------------- alpha


def _pareto(alpha: float, n: int, xmin: float, seed: int) -> torch.Tensor:
    u = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return xmin * u.pow(-1.0 / (alpha - 1.0))  # density ~ x^-alpha above xmin


@pytest.mark.parametrize("rule", ["ks", "median"])
@pytest.mark.parametrize("alpha", [2.0, 3.0, 4.5])
def test_hill_alpha_recovers_power_law_exponent(rule: str, alpha: float) -> None:
    # stated tolerance: 4 standard errors of the Hill estimator, (alpha - 1) / sqrt(n_tail)
    for seed in range(3):
        fit = fit_power_law(_pareto(alpha, 1500, 0.5, seed), rule)
        assert fit.rule == rule
        assert abs(fit.alpha - alpha) <= 4 * (alpha - 1) / math.sqrt(fit.n_tail), (seed, fit)


def test_ks_rule_finds_the_tail_above_a_bulk() -> None:
    # uniform bulk on [0.1, 1] (1000 values) plus a Pareto(alpha=2.5) tail from x = 2 (1000 values)
    gen = torch.Generator().manual_seed(3)
    bulk = 0.1 + 0.9 * torch.rand(1000, dtype=torch.float64, generator=gen)
    data = torch.cat([bulk, _pareto(2.5, 1000, 2.0, 4)])
    ks = fit_power_law(data, "ks")
    assert 1.5 <= ks.xmin <= 3.0
    assert abs(ks.alpha - 2.5) <= 4 * 1.5 / math.sqrt(ks.n_tail)
    # the median rule's tail starts in the bulk, so it is not a power law: it must read lighter/other
    assert abs(fit_power_law(data, "median").alpha - 2.5) > abs(ks.alpha - 2.5)


def test_hill_formula_by_hand() -> None:
    lam = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64)
    alpha, n = hill_alpha(lam, 2.0)
    assert n == 3 and alpha == pytest.approx(1 + 3 / (math.log(1) + math.log(2) + math.log(4)))


def test_weight_alpha_on_model_and_state_dict() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32))
    layers = weight_alpha(model, "median")
    assert [r.name for r in layers] == ["0.weight", "2.weight"]  # biases skipped
    W = model[0].weight.detach().double()
    s = torch.linalg.svdvals(W)
    assert layers[0].spectral_norm == pytest.approx(float(s[0]), rel=1e-9)
    assert layers[0].stable_rank == pytest.approx(float((s**2).sum() / s[0] ** 2), rel=1e-9)
    same = weight_alpha(model.state_dict(), "median")
    assert [r.alpha for r in same] == [r.alpha for r in layers]
    assert mean_by_type(layers)["ALL"]["count"] == 2
    assert module_type_of("blocks.3.attn.c_proj.weight") == "attn.c_proj"
    with pytest.raises(ValueError, match="xmin_rule"):
        weight_alpha(model, "mean")
    with pytest.raises(ValueError, match="no weight matrix"):
        weight_alpha({"b": torch.zeros(5)})


# ------------------------------------------------------------------------------------ spike-and-flat


def _direct_kl(cov_true: torch.Tensor, cov_model: torch.Tensor) -> float:
    d = cov_true.shape[0]
    sol = torch.linalg.solve(cov_model, cov_true)
    return 0.5 * float(torch.trace(sol) - d + torch.logdet(cov_model) - torch.logdet(cov_true))


def test_kl_gap_matches_direct_gaussian_kl() -> None:
    gen = torch.Generator().manual_seed(1)
    m, n, r = 3, 6, 2
    # a factor with a spike and a non-flat tail, and an arbitrary SPD other factor
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    lam = torch.tensor([9.0, 5.0, 1.3, 1.0, 0.8, 0.4], dtype=torch.float64)
    C = Q @ torch.diag(lam) @ Q.T
    X = torch.randn(m, m, dtype=torch.float64, generator=gen)
    S_other = X @ X.T + m * torch.eye(m, dtype=torch.float64)
    # spike-and-flat restriction: keep the top r, replace the tail by its mean (the KL-optimal sigma)
    lam_r = torch.cat([lam[:r], lam[r:].mean().expand(n - r)])
    C_r = Q @ torch.diag(lam_r) @ Q.T
    direct = _direct_kl(torch.kron(S_other, C), torch.kron(S_other, C_r))
    assert kl_gap(lam, r, m) == pytest.approx(direct, rel=1e-10)
    am_gm = float(lam[r:].mean() / lam[r:].log().mean().exp())
    assert tail_am_gm_ratio(lam, r) == pytest.approx(am_gm, rel=1e-12)
    # the mean is the best flat value: any other sigma gives a larger KL
    worse = Q @ torch.diag(torch.cat([lam[:r], (1.1 * lam[r:].mean()).expand(n - r)])) @ Q.T
    assert _direct_kl(torch.kron(S_other, C), torch.kron(S_other, worse)) > direct


def test_kl_gap_properties_and_rank_choice() -> None:
    lam = torch.tensor([50.0, 20.0, 5.0, 1.0, 1.0, 1.0, 1.0])
    gaps = kl_gap_all(lam, 4)
    assert gaps[-1] == 0 and gaps[3] == pytest.approx(0.0, abs=1e-12)  # flat tail after the spike
    assert bool((gaps[1:] <= gaps[:-1] + 1e-12).all())  # non-increasing in r
    assert choose_rank(lam, 1e-9) == 3
    assert choose_rank(lam, float(gaps[1] / 4)) == 1  # tolerance is per column of the other side
    assert energy_captured(lam, 3) == pytest.approx(75 / 79)
    with pytest.raises(ValueError, match="rank must be"):
        kl_gap(lam, 8, 4)
    with pytest.raises(ValueError, match="other_dim"):
        kl_gap(lam, 1, 0)


# ------------------------------------------------------------------------------------ TF32 emulation


def test_round_mantissa_bits() -> None:
    x = torch.tensor([1 + 2**-11, 1 + 2**-10, 1 + 2**-8, 1 + 2**-7, 1 + 3 * 2**-11], dtype=torch.float32)
    tf32 = round_mantissa(x, 10)
    assert tf32[0] == 1.0  # half an ulp of TF32, ties to even -> 1
    assert tf32[1] == 1 + 2**-10  # representable in TF32
    assert tf32[4] == 1 + 2**-9  # 1.5 ulp -> rounds to the even neighbour
    bf16 = round_mantissa(x, 7)
    assert bf16[2] == 1.0 and bf16[3] == 1 + 2**-7
    assert torch.equal(bf16, x.to(torch.bfloat16).float())  # bf16 keeps 7 explicit bits, same rounding


@pytest.mark.parametrize("bits", [10, 7])
def test_round_mantissa_matches_float64_reference(bits: int) -> None:
    # independent reference: scale by the operand's ulp at `bits` mantissa bits and round half to even in float64
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(20000, generator=gen) * torch.exp2(torch.randint(-30, 30, (20000,), generator=gen).float())
    ties = (1 + (2 * torch.arange(1, 200) + 1) * 2.0 ** -(bits + 1)).float()  # exactly half an ulp above a value
    x = torch.cat([x, ties, -ties])
    xd = x.double()
    ulp = torch.exp2(torch.floor(torch.log2(xd.abs())) - bits)
    reference = torch.round(xd / ulp) * ulp  # torch.round: half to even
    got = round_mantissa(x, bits)
    assert torch.equal(got.double(), reference)
    low = got.view(torch.int32) & ((1 << (23 - bits)) - 1)
    assert int(low.abs().max()) == 0  # only `bits` explicit mantissa bits survive
    assert float(((got.double() - xd).abs() / ulp).max()) <= 0.5
    assert torch.equal(round_mantissa(x.double(), bits), x.double())  # only fp32 operands are rounded


def test_emulated_matmul_equals_matmul_of_rounded_operands() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, 24, generator=gen), torch.randn(24, 8, generator=gen)
    with emulate_matmul_precision("high"):
        inside = a @ b
    assert torch.equal(inside, round_mantissa(a, 10) @ round_mantissa(b, 10))
    assert not torch.equal(inside, a @ b)
    with emulate_matmul_precision("highest"):
        assert torch.equal(a @ b, a @ b)
    # the "follow" mode rounds only where torch's precision is lowered (as the optimizers do)
    with emulate_global_matmul_precision():
        plain = a @ b
        with matmul_precision("high"):
            lowered = torch.matmul(a, b)
    assert torch.equal(plain, a @ b) and torch.equal(lowered, inside)


# ------------------------------------------------------------------------------------ factor spectra


def _trained_optimizer(cls_name: str, **options):
    import whiten

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20, bias=True), nn.Tanh(), nn.Linear(20, 6, bias=False))
    opt = getattr(whiten, cls_name)(model.parameters(), lr=1e-3, **options)
    x = torch.randn(64, 12)
    for _ in range(4):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize(
    ("cls_name", "sides"), [("SOAP", {"L", "R"}), ("KLShampoo", {"L", "R"}), ("ProKLShampoo", {"L", "U"})]
)
def test_factor_spectra_from_live_optimizer_and_state_dict(cls_name: str, sides: set[str]) -> None:
    options = {"rank": 4, "precondition_frequency": 1} if cls_name == "ProKLShampoo" else {}
    model, opt = _trained_optimizer(cls_name, **options)
    live = factor_spectra(opt, rank=2, tol=0.5)
    assert {f.side for f in live} == sides
    loaded = factor_spectra({"optimizer": opt.state_dict(), "step": 4}, rank=2, tol=0.5)
    assert [(f.layer, f.side, f.eigenvalues) for f in loaded] == [(f.layer, f.side, f.eigenvalues) for f in live]
    for f in live:
        assert f.dim * f.other_dim in (12 * 20, 20 * 6)
        lam = torch.tensor(f.eigenvalues, dtype=torch.float64)
        assert f.kl_gap == pytest.approx(kl_gap(lam, f.rank, f.other_dim), rel=1e-12)
        # Pro-KLShampoo's adaptive-rank rule: choose_rank per column of the other side, bounded to [1, max_rank]
        assert f.chosen_rank == max(1, min(f.max_rank, choose_rank(lam, 0.5, 1)))
        assert f.max_rank == (f.dim if f.side != "U" else 4)  # U: its tracked directions (rank=4, not adaptive)
    record = record_spectra(opt, model, step=4)
    assert {f["layer"] for f in record["factors"]} <= {"0.weight", "2.weight"}
    json.dumps(record)  # JSON-ready for the bench's diagnostics.jsonl


def test_factor_spectra_eigenvalues_are_the_factor_eigenvalues() -> None:
    _, opt = _trained_optimizer("SOAP", use_kl_shampoo=True)
    state = next(s for s in opt.state.values() if "L" in s)
    L = state["L"].double()
    expected = torch.linalg.eigvalsh(0.5 * (L + L.T)).flip(0)  # fp32 round-off leaves L slightly asymmetric
    found = next(f for f in factor_spectra(opt) if f.side == "L" and f.dim == state["L"].shape[0])
    assert torch.allclose(torch.tensor(found.eigenvalues, dtype=torch.float64), expected, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("tol", [1e-4, 0.1, 0.5, 2.0])
def test_chosen_rank_is_pro_kl_shampoo_adaptive_rank(tol: float) -> None:
    import whiten

    # a 16 x 32 parameter whose column spectrum has 5 graded directions over a flat tail
    gen = torch.Generator().manual_seed(0)
    W = torch.zeros(16, 32, requires_grad=True)
    opt = whiten.ProKLShampoo(
        [W],
        lr=1e-3,
        rank=2,
        max_rank=10,
        adaptive_rank=True,
        rank_update_interval=1,
        rank_tolerance=tol,
        precondition_frequency=1,
    )
    scales = torch.tensor([10.0, 6.0, 4.0, 3.0, 2.0] + [1.0] * 27)
    for _ in range(12):
        W.grad = torch.randn(16, 32, generator=gen) * scales
        opt.step()
    (side_u,) = [f for f in factor_spectra(opt, tol=tol) if f.side == "U"]
    # the rank Pro-KLShampoo itself picked at its last rank update (this step) from the same state
    assert side_u.chosen_rank == opt.state[W]["rank"]
    assert side_u.max_rank == 10 and side_u.dim == 32 and side_u.other_dim == 16


def test_factor_spectra_bad_input() -> None:
    with pytest.raises(ValueError, match="no optimizer state_dict"):
        factor_spectra({"model": {}})
    model = nn.Linear(4, 4)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="no Kronecker factor"):
        factor_spectra(sgd)
    assert record_spectra(sgd, model, step=1)["factors"] == []  # the bench hook runs for every optimizer
    with pytest.raises(ValueError, match="use="):
        factor_spectra({"state": {}, "param_groups": []}, use="eigs")


# ------------------------------------------------------------------------------------ spike experiment


def test_spike_tables_and_precision_and_init_behaviour() -> None:
    torch.set_num_threads(1)
    res = run_spike_experiment(
        steps=30,
        spike_at=14,
        shape=(48, 24),
        optimizers=("rekls",),
        precisions=("high", "highest"),
        kl_inits=("safe", "peer"),
    )
    data = res.to_json()
    assert len(data["runs"]) == 4
    runs = {(r["kl_init"], r["precision"]): r for r in data["runs"]}
    text = res.format_tables()
    assert "BEFORE spike" in text and "top/2nd" in text and "<-- spike" in text
    table = runs[("peer", "highest")]["tables"]["Q_L"]
    assert [row["N"] for row in table] == [1, 2, 5, 10]
    # peer init (the notebook's setup): at fp32 the basis is frozen, the spike included
    assert max(max(row["before_topk"], row["after_topk"]) for row in table) < 1.0
    # ... while emulated TF32 lets the spike through: the notebook's ~90 degree jump
    assert max(row["after_topk"] for row in runs[("peer", "high")]["tables"]["Q_L"]) > 45.0
    # correct init at fp32: the basis follows the data, jumps to the spike's eigenbasis, then stays there
    safe = runs[("safe", "highest")]
    assert safe["tables"]["Q_L"][-1]["before_topk"] > 5.0
    assert safe["tables"]["Q_L"][1]["after_topk"] > 45.0
    post = safe["bases"]["Q_L"]["angles_to_post"]["top8"]
    assert max(post[14:]) < 1.0
    json.dumps(data)


def test_spike_rekls_at_the_spec_configuration() -> None:
    """SPEC 8.1 setup (128 x 64, seed 0, 1000x at 50, ...) truncated to the 61 iterations the tables use."""
    torch.set_num_threads(1)
    res = run_spike_experiment(steps=61, optimizers=("rekls",), precisions=("highest",), kl_inits=("safe", "peer"))
    runs = {r["kl_init"]: r for r in res.to_json()["runs"]}
    # peer init (the notebook's setup): the basis is frozen at fp32, before and after the spike
    peer = runs["peer"]
    assert max(max(v for k, v in row.items() if k != "N") for row in peer["tables"]["Q_L"]) < 0.01
    ratios = [row["top_over_2nd"] for row in peer["eigenvalue_table"]]
    assert max(ratios) - min(ratios) < 1e-6  # the frozen first-step factor, only decaying
    eig = {row["step"]: row["eig"]["0"] for row in peer["eigenvalue_table"]}
    assert eig[52] < eig[51] < eig[50]  # the spike (ingested at step 51) never enters L
    # safe init: the spike's KL target dominates L, the basis jumps to the spike's eigenbasis and stays
    safe = runs["safe"]
    table = safe["tables"]["Q_L"]
    assert all(row["after_topk"] > 80.0 for row in table)  # documented: 87.98 degrees at every offset
    assert table[-1]["before_topk"] > 45.0  # not frozen before the spike (documented: 88.7 at N = 10)
    assert max(safe["bases"]["Q_L"]["angles_to_post"]["top8"][50:]) < 0.01
    eig = {row["step"]: row["eig"]["0"] for row in safe["eigenvalue_table"]}
    assert eig[51] / eig[50] > 1e4


def test_spike_config_bad_input() -> None:
    with pytest.raises(ValueError, match="optimizers"):
        run_spike_experiment(optimizers=("adam",))
    with pytest.raises(ValueError, match="offset 10 reaches outside"):
        run_spike_experiment(steps=20, spike_at=5)
    with pytest.raises(ValueError, match="precisions"):
        SpikeConfig(precisions=("tf32",)).validate()


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_spectra_alpha_spike(tmp_path, capsys) -> None:
    from whiten.cli import main

    model, opt = _trained_optimizer("KLShampoo")
    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 4}, ckpt)
    assert main(["diagnose", "spectra", str(ckpt), "--rank", "2", "--out", str(tmp_path / "s"), "--no-plots"]) == 0
    records = json.loads((tmp_path / "s" / "spectra.json").read_text())
    assert records[0]["step"] == 4 and records[0]["factors"]
    # the bench's diagnostics.jsonl: {"step", "record_spectra": snapshot, "weight_alpha": [...]} per line
    lines = [{"step": s, "record_spectra": record_spectra(opt, model), "weight_alpha": []} for s in (2, 4)]
    (tmp_path / "diagnostics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    assert (
        main(["diagnose", "spectra", str(tmp_path / "diagnostics.jsonl"), "--out", str(tmp_path / "j"), "--no-plots"])
        == 0
    )
    assert [r["step"] for r in json.loads((tmp_path / "j" / "spectra.json").read_text())] == [2, 4]
    big = nn.Sequential(nn.Linear(40, 60), nn.Linear(60, 30))
    torch.save(big.state_dict(), tmp_path / "w.pt")
    assert (
        main(
            [
                "diagnose",
                "alpha",
                f"a={tmp_path / 'w.pt'}",
                "--xmin",
                "median",
                "--out",
                str(tmp_path / "a"),
                "--no-plots",
            ]
        )
        == 0
    )
    out = json.loads((tmp_path / "a" / "alpha.json").read_text())
    assert out["a"]["layers"][0]["xmin_rule"] == "median"
    assert (
        main(
            [
                "diagnose",
                "spike",
                "--steps",
                "25",
                "--spike-at",
                "12",
                "--offsets",
                "1,2",
                "--shape",
                "24x12",
                "--optimizers",
                "soap",
                "--precisions",
                "highest",
                "--out",
                str(tmp_path / "k"),
                "--no-plots",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "k" / "spike.json").read_text())["runs"][0]["tables"]["Q_L"]
    assert main(["diagnose", "spectra", str(tmp_path / "missing.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bench_record_every_then_diagnose_the_results_folder(tmp_path, capsys) -> None:
    """End to end: ``whiten bench --record-every`` with the real recorders, then both CLIs on its folder."""
    import random

    from whiten.cli import main

    rng = random.Random(0)
    words = ["the", "king", "is", "dead", "long", "live", "queen", "and", "her", "lord"]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(6)) for _ in range(800)) + "\n")
    out = tmp_path / "bench"
    assert (
        main(
            [
                "bench",
                "--data",
                str(corpus),
                "--model",
                "gpt-tiny",
                "--ctx",
                "16",
                "--batch-size",
                "4",
                "--eval-batches",
                "1",
                "--eval-every",
                "4",
                "--no-progress",
                "--optimizers",
                "kl-shampoo,muon",
                "--steps",
                "4",
                "--record-every",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    entries = [json.loads(line) for line in (out / "runs" / "kl-shampoo-s0" / "diagnostics.jsonl").open()]
    assert [e["step"] for e in entries] == [2, 4]
    assert entries[-1]["record_spectra"]["factors"] and entries[-1]["weight_alpha"][0]["xmin_rule"] == "ks"
    capsys.readouterr()
    # a results folder: the Muon run (no Kronecker factors) is skipped with a note, --rank is re-applied
    assert main(["diagnose", "spectra", str(out), "--rank", "3", "--out", str(tmp_path / "s"), "--no-plots"]) == 0
    assert "skipping run muon-s0" in capsys.readouterr().out
    records = json.loads((tmp_path / "s" / "spectra.json").read_text())
    assert [(r["run"], r["step"]) for r in records] == [("kl-shampoo-s0", 2), ("kl-shampoo-s0", 4)]
    f = records[-1]["factors"][0]
    lam = torch.tensor(f["eigenvalues"], dtype=torch.float64)
    assert f["rank"] == 3 and f["kl_gap"] == pytest.approx(kl_gap(lam, 3, f["other_dim"]), rel=1e-12)
    # alpha: one run per run folder, compared in one table
    assert main(["diagnose", "alpha", str(out), "--out", str(tmp_path / "a"), "--no-plots"]) == 0
    assert set(json.loads((tmp_path / "a" / "alpha.json").read_text())) == {"kl-shampoo-s0", "muon-s0"}
    assert main(["diagnose", "alpha", str(out), "--xmin", "median"]) == 2  # recorded with ks: refuse to mix rules
    assert "recorded with the x_min rule 'ks'" in capsys.readouterr().err
    assert main(["diagnose", "spectra", str(tmp_path)]) == 2
    assert "holds no bench run" in capsys.readouterr().err
    assert main(["diagnose", "spectra", str(out), "--tol", "-1"]) == 2  # not swallowed as "skipping run"
    assert "--tol must be >= 0" in capsys.readouterr().err


def test_plots_are_written(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from whiten.diagnostics.plots import plot_alpha, plot_spectra, plot_spike_angles, plot_spike_eigenvalues

    torch.set_num_threads(1)
    data = run_spike_experiment(
        steps=14, spike_at=11, shape=(12, 6), offsets=(1, 2), top_k=2, optimizers=("rekls", "pro-kls-r2")
    ).to_json()
    model, opt = _trained_optimizer("KLShampoo")
    paths = [
        plot_spike_angles(data, tmp_path / "angles.png"),
        plot_spike_eigenvalues(data, tmp_path / "eigs.png"),
        plot_spectra([record_spectra(opt, model, step=4, rank=2)], tmp_path / "spectra.png"),
        plot_alpha(
            {"a": weight_alpha(nn.Sequential(nn.Linear(40, 60), nn.Linear(60, 30)), "median")}, tmp_path / "alpha.png"
        ),
    ]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
