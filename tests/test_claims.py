"""The claims pipeline: the noise rule, the Pro-KLShampoo-vs-KL-Shampoo table, and ``whiten diagnose claims``
end to end on toy bench / sweep / spike results (seconds)."""

from __future__ import annotations

import json
import math
import random
import re
import statistics
from pathlib import Path

import pytest

from whiten.cli import main
from whiten.diagnostics.claims import discover
from whiten.diagnostics.claims_table import claim_cells, format_pro_vs_kl_table, pro_vs_kl_table
from whiten.diagnostics.compare import (
    BETTER,
    CONFIRMED,
    MISSING,
    NEITHER,
    NOISE,
    NOT_TESTABLE,
    PARTLY,
    REFUTED,
    WORSE,
    claim_verdict,
    combine_verdicts,
    compare,
    noise_level,
    seed_stats,
    verdict_of,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TOY = [
    "--steps",
    "6",
    "--ctx",
    "16",
    "--batch-size",
    "4",
    "--seeds",
    "0,1",
    "--record-every",
    "3",
    "--eval-every",
    "3",
    "--eval-batches",
    "2",
    "--jobs",
    "1",
    "--no-progress",
]
GPT_OPTIMIZERS = "adamw,muon,htmuon,soap,kl-shampoo,pro-kls-r8"
LLAMA_OPTIMIZERS = "muon,htmuon,kl-shampoo,pro-kls-r8"  # no adamw: the targets come from the worst


def s(mean, std=0.0, n=3):
    return {"mean": mean, "std": std, "n": n}


# -- the noise rule ------------------------------------------------------------------------------
def test_losses_within_the_larger_of_seed_std_and_001_are_noise():
    assert compare(s(2.000), s(2.009), "loss") == NOISE  # below the 0.01 floor, however tight the seeds
    assert compare(s(2.000), s(2.011), "loss") == BETTER
    assert compare(s(2.011), s(2.000), "loss") == WORSE
    assert compare(s(2.00, 0.05), s(2.04, 0.01), "loss") == NOISE  # within one seed std of either side
    assert compare(s(2.00, 0.01), s(2.04, 0.05), "loss") == NOISE
    assert compare(s(2.00, 0.01), s(2.06, 0.05), "loss") == BETTER
    assert compare(s(2.0), s(2.01), "loss") == NOISE  # exactly at the threshold: not called
    assert noise_level(s(2.0, 0.02), s(2.1, 0.03), "loss") == 0.03


def test_times_use_the_seed_spread_or_5_percent_and_bytes_1_percent():
    assert compare(s(100.0), s(104.9), "seconds") == NOISE
    assert compare(s(100.0), s(105.1), "seconds") == BETTER
    assert compare(s(100.0, 10.0), s(109.0), "seconds") == NOISE  # the seed spread dominates
    assert compare(s(1000.0), s(1009.0), "bytes") == NOISE
    assert compare(s(1000.0), s(1011.0), "bytes") == BETTER
    assert compare(s(3.0), s(3.2), "alpha") == BETTER
    assert compare(s(3.0), s(3.04), "alpha") == NOISE
    # higher is better when asked
    assert compare(s(2.0), s(1.0), "loss", lower_is_better=False) == BETTER


def test_not_reached_missing_and_bad_kind():
    assert compare(s(10.0), None, "seconds") == BETTER  # only this side reached the target
    assert compare(None, s(10.0), "seconds") == WORSE
    assert compare(None, None, "seconds") == NEITHER
    assert compare(s(None), s(1.0), "loss") == MISSING
    assert compare(s(float("nan")), s(1.0), "loss") == MISSING
    with pytest.raises(ValueError, match="kind 'time' is not valid"):
        compare(s(1.0), s(2.0), "time")


def test_claim_verdicts():
    assert claim_verdict([BETTER, BETTER]) == CONFIRMED
    assert claim_verdict([BETTER, NOISE]) == PARTLY
    assert claim_verdict([WORSE, NOISE]) == REFUTED
    assert claim_verdict([NOISE, NOISE]) == REFUTED  # "beats" is not shown by numbers within noise
    assert claim_verdict([MISSING, NEITHER]) == NOT_TESTABLE
    assert claim_verdict([BETTER, MISSING]) == CONFIRMED  # unmeasured cells do not count
    assert claim_verdict([NOISE, BETTER], passing=(BETTER, NOISE)) == CONFIRMED
    assert verdict_of([True, None, False]) == PARTLY and verdict_of([None]) == NOT_TESTABLE
    assert combine_verdicts([CONFIRMED, CONFIRMED]) == CONFIRMED
    assert combine_verdicts([CONFIRMED, NOT_TESTABLE]) == PARTLY  # a family missing
    assert combine_verdicts([REFUTED, REFUTED]) == REFUTED
    assert combine_verdicts([REFUTED, CONFIRMED]) == PARTLY
    assert combine_verdicts([NOT_TESTABLE]) == NOT_TESTABLE
    assert seed_stats([1.0, 3.0, None, float("inf")]) == {"mean": 2.0, "std": math.sqrt(2.0), "n": 2}


def _entry(loss, std, state, rss, wall, hits):
    return {
        "final_val_loss": s(loss, std),
        "optimizer_state_bytes": s(state),
        "peak_rss_bytes": s(rss),
        "peak_cuda_bytes": {"mean": None, "std": None, "n": 0},
        "train_time_s": s(wall),
        "cpu_time_s": s(wall),
        "to_target": [
            {"target": 3.0, "reached": "3/3" if h else "1/3", "seconds": s(h) if h else None, "steps": s(10.0)}
            for h in hits
        ],
    }


def test_pro_vs_kl_table_on_a_hand_made_summary():
    summary = {
        "targets": {"losses": [3.0, 2.5]},
        "aggregate": {
            "adamw": _entry(2.5, 0.01, 1e6, 1e8, 10.0, [1.0, 2.0]),
            "kl-shampoo": _entry(2.40, 0.01, 8e6, 2e8, 20.0, [5.0, None]),
            "pro-kls-r16": _entry(2.30, 0.02, 2e6, 1.995e8, 21.0, [4.0, 9.0]),
            "pro-kls-r8": _entry(2.405, 0.01, 1e6, 3e8, 30.0, [None, None]),
        },
    }
    table = pro_vs_kl_table(summary)
    assert [row["rank"] for row in table["rows"]] == [8, 16]  # by rank, not by label order
    r8, r16 = table["rows"]
    assert r16["cells"]["final_val_loss"]["verdict"] == BETTER
    assert r16["cells"]["peak_rss_bytes"]["verdict"] == NOISE  # 0.25% below: within 1%
    assert r16["cells"]["train_time_s"]["verdict"] == NOISE  # 5% slower: at the threshold
    assert [hit["seconds"]["verdict"] for hit in r16["to_target"]] == [BETTER, BETTER]  # 4 < 5; reached vs not
    assert r8["cells"]["final_val_loss"]["verdict"] == NOISE
    assert [hit["seconds"]["verdict"] for hit in r8["to_target"]] == [WORSE, NEITHER]
    # the claim's cells: loss, peak memory (RSS without a CUDA peak), wall-clock to each target
    assert claim_cells(table) == [NOISE, WORSE, WORSE, NEITHER, BETTER, NOISE, BETTER, BETTER]
    # a summary without the CUDA peak (written before it existed): peak memory falls back to peak RSS
    for entry in summary["aggregate"].values():
        del entry["peak_cuda_bytes"]
    old = pro_vs_kl_table(summary)
    assert old["rows"][0]["cells"]["peak_cuda_bytes"]["verdict"] == MISSING
    assert claim_cells(old) == claim_cells(table)
    text = format_pro_vs_kl_table(table)
    assert "| r=16 | 2.3000 ± 0.0200 vs 2.4000 ± 0.0100 ✓ |" in text
    assert "CUDA peak" not in text  # no CUDA run: no empty column
    with pytest.raises(ValueError, match="no 'kl-shampoo' run"):
        pro_vs_kl_table({"aggregate": {"pro-kls-r8": {}}})
    with pytest.raises(ValueError, match="no pro-kls-rN run"):
        pro_vs_kl_table({"aggregate": {"kl-shampoo": {}}})


# -- end to end ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """Toy claims results: both families' benches, a GPT sweep, a saved spike run (no LLaMA sweep)."""
    rng = random.Random(0)
    words = ["the", "king", "is", "dead", "long", "live", "queen", "and", "her", "lord"]
    lines = [" ".join(words[(i + j) % len(words)] for j in range(rng.randint(4, 8))) for i in range(1500)]
    root = tmp_path_factory.mktemp("claims")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n")
    res = root / "results"
    data = ["--data", str(corpus)]
    for preset, model, optimizers, name in (
        ("claims", "gpt-tiny", GPT_OPTIMIZERS, "gpt"),
        ("claims-llama", "llama-tiny", LLAMA_OPTIMIZERS, "llama"),
    ):
        args = ["bench", "--preset", preset, "--model", model, *data, *TOY, "--optimizers", optimizers]
        assert main([*args, "--out", str(res / name)]) == 0
    sweep = ["sweep", "--preset", "claims", "--model", "gpt-tiny", *data, *TOY, "--seeds", "0"]
    assert main([*sweep, "--optimizers", "kl-shampoo", "--factors", "0.5,1", "--out", str(res / "sweep-gpt")]) == 0
    # a second sweep of the same family, over another optimizer and one more lr of the first: merged
    assert main([*sweep, "--optimizers", "muon,kl-shampoo", "--factors", "2", "--out", str(res / "sweep-gpt-2")]) == 0
    spike = ["diagnose", "spike", "--shape", "16x8", "--steps", "24", "--spike-at", "12", "--optimizers", "rekls"]
    assert main([*spike, "--kl-init", "safe,peer", "--no-plots", "--out", str(res / "spike")]) == 0
    return res


@pytest.fixture(scope="module")
def page(results) -> tuple[Path, str, dict]:
    docs = results.parent / "docs"
    assert main(["diagnose", "claims", str(results), "--out", str(docs / "claims.md")]) == 0
    data = json.loads((docs / "img" / "claims" / "claims.json").read_text())
    return docs, (docs / "claims.md").read_text(), data


def _section(text: str, number: int) -> str:
    start = text.index(f"## Claim {number}: ")
    end = text.find("\n## ", start + 1)
    return text[start:end]


def _fmt(stat: dict, spec: str = ".4f") -> str:
    return f"{stat['mean']:{spec}} ± {stat['std']:{spec}}"


def test_bench_writes_the_pro_vs_kl_table(results):
    summary = json.loads((results / "gpt" / "summary.json").read_text())
    assert [row["rank"] for row in summary["pro_vs_kl"]["rows"]] == [8]
    assert "Pro-KLShampoo rN vs KL-Shampoo" in (results / "gpt" / "results.md").read_text()
    assert summary["aggregate"]["adamw"]["peak_cuda_bytes"]["n"] == 0  # CPU: no CUDA peak
    env = json.loads((results / "gpt" / "config.json").read_text())["environment"]
    assert env["cpu_count"] >= 1 and "cpu_model" in env


def test_page_has_six_claims_with_verdicts_and_figures(page):
    docs, text, data = page
    verdicts = (CONFIRMED, PARTLY, REFUTED, NOT_TESTABLE)
    for number in range(1, 7):
        section = _section(text, number)
        found = re.search(r"\*\*Verdict: ([a-z ]+)\*\*", section)
        assert found and found.group(1) in verdicts, number
        assert "Source: " in section and "Rule: " in section and "```bash" in section
        assert "What CPU scale can and cannot show:" in section
    assert [c["number"] for c in data["claims"]] == [1, 2, 3, 4, 5, 6]
    headline = text[: text.index("## Inputs")]
    for claim in data["claims"]:
        assert f"| {claim['number']} | {claim['title']} | **{claim['verdict']}** |" in headline
    assert data["claims"][1]["verdict"] == CONFIRMED  # the float64 identities hold
    figures = [Path(p) for p in data["figures"]]
    assert len(figures) >= 4
    for path in figures:
        assert path.parent == docs / "img" / "claims" and path.read_bytes()[:8] == PNG_SIGNATURE
        assert f"](img/claims/{path.name})" in text
    assert "missing: no LLaMA-style (llama) sweep folder" in text
    assert "## Why KL-Shampoo was weak at mini" in text and "Not investigated" in text
    assert "torch " in text[text.index("## Machine") :]


def test_page_numbers_are_the_summary_numbers(results, page):
    _, text, data = page
    claim3 = _section(text, 3)
    for family in ("gpt", "llama"):
        agg = json.loads((results / family / "summary.json").read_text())["aggregate"]
        pro, kl = agg["pro-kls-r8"], agg["kl-shampoo"]
        loss_cell = f"{_fmt(pro['final_val_loss'])} vs {_fmt(kl['final_val_loss'])}"
        state_cell = (
            f"{pro['optimizer_state_bytes']['mean'] / 2**20:.3f} vs {kl['optimizer_state_bytes']['mean'] / 2**20:.3f}"
        )
        assert loss_cell in claim3 and state_cell in claim3, family
        # the verdict symbol follows the stated rule, recomputed here from the summary's numbers
        diff = pro["final_val_loss"]["mean"] - kl["final_val_loss"]["mean"]
        noise = max(pro["final_val_loss"]["std"], kl["final_val_loss"]["std"], 0.01)
        symbol = "≈" if abs(diff) <= noise else ("✓" if diff < 0 else "✗")
        assert f"{loss_cell} {symbol}" in claim3, family
        row = data["pro_vs_kl"][family]["rows"][0]
        assert row["cells"]["final_val_loss"]["pro"]["mean"] == pro["final_val_loss"]["mean"]
        assert row["cells"]["train_time_s"]["kl"]["mean"] == kl["train_time_s"]["mean"]
    gpt = json.loads((results / "gpt" / "summary.json").read_text())["aggregate"]
    claim4 = _section(text, 4)
    assert f"| gpt | soap | {_fmt(gpt['kl-shampoo']['final_val_loss'])} vs {_fmt(gpt['soap']['final_val_loss'])}" in (
        claim4
    )
    # claim 5: HTMuon's mean alpha over the hidden matrices, from the runs' last weight_alpha records
    per_seed = []
    for seed in (0, 1):
        path = results / "gpt" / "runs" / f"htmuon-s{seed}" / "diagnostics.jsonl"
        last = [json.loads(x) for x in path.read_text().splitlines() if x.strip()][-1]["weight_alpha"]
        per_seed.append(statistics.fmean(a["alpha"] for a in last if a["name"].startswith("blocks.")))
    expected = f"HTMuon {statistics.fmean(per_seed):.3f} ± {statistics.stdev(per_seed):.3f}"
    assert expected in _section(text, 5)
    # the sweep grid merged over both GPT sweeps, with the best lr on the merged grid's edge flagged
    rows = [
        row
        for name in ("sweep-gpt", "sweep-gpt-2")
        for row in json.loads((results / name / "sweep.json").read_text())["results"]["kl-shampoo"]
    ]
    rows.sort(key=lambda r: r["lr"])
    assert len(rows) == 3
    cells = ", ".join(f"{r['lr']:g}: {r['final_val_loss']:.4f}" for r in rows)
    best = min(rows, key=lambda r: r["final_val_loss"])["lr"]
    edge = "**yes: widen the grid**" if best in (rows[0]["lr"], rows[-1]["lr"]) else "no"
    assert f"| kl-shampoo | {cells} | {best} | {edge} |" in text
    assert "--grid kl-shampoo=" in text
    muon = json.loads((results / "sweep-gpt-2" / "sweep.json").read_text())["results"]["muon"][0]
    assert f"| muon | {muon['lr']:g}: {muon['final_val_loss']:.4f} | {muon['lr']} | **yes: widen the grid** |" in text
    # claim 6: the saved spike run's angles
    spike = json.loads((results / "spike" / "spike.json").read_text())
    peer_high = next(r for r in spike["runs"] if r["kl_init"] == "peer" and r["precision"] == "high")
    after = max(max(r["after_top1"], r["after_topk"]) for r in peer_high["tables"]["Q_L"])
    assert data["spike_parts"][peer_high["label"]]["high"]["after"] == after
    assert f"/ {after:.1f} |" in _section(text, 6)


def test_investigation_file_is_copied_and_bad_results_dirs_fail_clearly(results, tmp_path, capsys):
    only_spike = tmp_path / "res"
    (only_spike / "spike").mkdir(parents=True)
    (only_spike / "spike" / "spike.json").write_text((results / "spike" / "spike.json").read_text())
    (only_spike / "kl_shampoo_investigation.md").write_text("KL-Shampoo's lr was 10x too small (measured).\n")
    assert main(["diagnose", "claims", str(only_spike), "--out", str(tmp_path / "c.md")]) == 0
    text = (tmp_path / "c.md").read_text()
    assert "KL-Shampoo's lr was 10x too small (measured)." in text and "Not investigated" not in text
    assert "missing: no GPT-2-style (gpt) bench folder" in text
    assert "**Verdict: not testable here**" in _section(text, 3)
    # another gpt bench without a claims preset (e.g. bench-default) does not displace the claims one
    other = only_spike / "a-bench-default"
    other.mkdir()
    config = json.loads((results / "gpt" / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "bench": {**config["bench"], "preset": "default"}}))
    (other / "summary.json").write_text((results / "gpt" / "summary.json").read_text())
    (only_spike / "z-gpt").symlink_to(results / "gpt")
    found = discover(only_spike)
    assert found.benches["gpt"] == only_spike / "z-gpt"
    assert any(note.startswith("ignored:") and "a-bench-default" in note for note in found.notes)
    capsys.readouterr()
    for bad, message in ((tmp_path / "nope", "is not a folder"), (tmp_path / "empty", "holds no bench")):
        if bad.name == "empty":
            bad.mkdir()
        assert main(["diagnose", "claims", str(bad), "--out", str(tmp_path / "x.md")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("whiten diagnose claims: error:") and message in err and "\n" not in err
