"""``whiten bench`` / ``sweep`` / ``plot`` end to end on a tiny model and a small text file."""

from __future__ import annotations

import itertools
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch

from whiten.bench import runner
from whiten.bench.cli import PRESETS
from whiten.bench.optimizers import build_optimizer, optimizer_state_bytes
from whiten.bench.report import PLOT_FILES, time_to_target
from whiten.bench.runner import BenchConfig, lr_factor
from whiten.cli import main
from whiten.optim.registry import get as get_spec
from whiten.optim.registry import names as registry_names

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# a small model and a handful of steps: every test here runs in a few seconds
TINY = [
    "--model",
    "gpt-tiny",
    "--ctx",
    "16",
    "--batch-size",
    "8",
    "--eval-batches",
    "2",
    "--eval-every",
    "4",
    "--no-progress",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rng = random.Random(0)
    words = ["the", "king", "is", "dead", "long", "live", "queen", "and", "her", "lord"]
    lines = [" ".join(words[(i + j) % len(words)] for j in range(rng.randint(4, 8))) for i in range(1500)]
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def _available() -> list[str]:
    names = registry_names()
    # one rank of Pro-KLShampoo is enough here; the others differ in an option only
    return [n for n in names if not n.startswith("pro-kls") or n == "pro-kls-r8"]


def _bench(corpus: Path, out: Path, *extra: str) -> int:
    return main(["bench", "--data", str(corpus), *TINY, "--out", str(out), *extra])


def _train_losses(out: Path, run_id: str) -> list[float]:
    records = runner.read_jsonl(out / "runs" / run_id / "log.jsonl")
    return [r["train_loss"] for r in records if "train_loss" in r]


def test_every_available_optimizer_trains_and_outputs_parse(corpus, tmp_path, capsys):
    names = _available()
    # every optimizer of the issue exists now: one that became unavailable must fail here, not be skipped
    assert {"adamw", "muon", "htmuon", "soap", "soap-kl", "rekls", "kl-shampoo", "klsoap", "pro-kls-r8"} <= set(names)
    out = tmp_path / "res"
    code = _bench(corpus, out, "--optimizers", ",".join(names), "--steps", "16", "--seeds", "0")
    assert code == 0
    printed = capsys.readouterr().out
    assert "| optimizer |" in printed and "adamw" in printed
    summary = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["bench"]["optimizers"] == names and config["model"]["parameters"] > 0
    assert len(summary["runs"]) == len(names)
    for run in summary["runs"]:
        # the loss goes down from the untrained model's ~ln(256)
        assert not run["diverged"], run["label"]
        assert run["final_val_loss"] < run["initial_val_loss"] - 0.5, run["label"]
        assert run["train_time_s"] > 0 and run["optimizer_state_bytes"] > 0
        assert run["fwd_bwd_time_s"] + run["optimizer_time_s"] <= run["train_time_s"] + 1e-9
        assert run["peak_rss_bytes"] > 0
        assert len(run["to_target"]) == 4  # AdamW's final loss x (1.10, 1.05, 1.02, 1.00)
        # the CLI contract: per optimizer and seed, these keys of DIR/summary.json
        assert run["wall_clock_s"] == run["train_time_s"] and math.isfinite(run["final_val_loss"])
        assert all({"target", "step", "seconds"} <= set(hit) for hit in run["to_target"])
        log = runner.read_jsonl(out / "runs" / f"{run['label']}-s0" / "log.jsonl")
        assert [r["step"] for r in log if "train_loss" in r] == list(range(1, 17))
    adamw = next(r for r in summary["runs"] if r["label"] == "adamw")
    assert summary["targets"]["losses"][-1] == pytest.approx(adamw["final_val_loss"])
    # AdamW reaches its own final loss at the end at the latest (earlier when the curve is not monotone)
    assert 0 < adamw["to_target"][-1]["step"] <= 16
    assert 0 < summary["aggregate"]["adamw"]["time_to_adamw_final_vs_adamw_time"] <= 1.0 + 1e-9
    assert 0 < summary["aggregate"]["adamw"]["cpu_time_to_adamw_final_vs_adamw"] <= 1.0 + 1e-9
    for name in PLOT_FILES:
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(out / name)  # decodes: a valid PNG, not just its signature
        assert image.ndim == 3 and min(image.shape[:2]) > 100 and image.std() > 0
    assert (out / "results.md").read_text().startswith("| optimizer |")
    # `whiten plot DIR` redraws from the saved results
    for name in PLOT_FILES:
        (out / name).unlink()
    assert main(["plot", str(out)]) == 0
    assert all((out / name).read_bytes()[:8] == PNG_SIGNATURE for name in PLOT_FILES)


def test_same_seed_gives_the_same_losses_and_seeds_differ(corpus, tmp_path):
    args = ["--optimizers", "adamw,muon", "--steps", "8"]
    assert _bench(corpus, tmp_path / "a", *args, "--seeds", "0,1") == 0
    assert _bench(corpus, tmp_path / "b", *args, "--seeds", "0") == 0
    for name in ("adamw", "muon"):
        assert _train_losses(tmp_path / "a", f"{name}-s0") == _train_losses(tmp_path / "b", f"{name}-s0")
        assert _train_losses(tmp_path / "a", f"{name}-s0") != _train_losses(tmp_path / "a", f"{name}-s1")
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["aggregate"]["adamw"]["final_val_loss"]["n"] == 2
    assert summary["aggregate"]["adamw"]["final_val_loss"]["std"] > 0


def test_every_optimizer_sees_the_same_batches(corpus, tmp_path, monkeypatch):
    seen: dict[str, list[int]] = {}
    original = runner.train_batch

    def spy(tokens, *, seed, step, batch_size, ctx):
        x, y = original(tokens, seed=seed, step=step, batch_size=batch_size, ctx=ctx)
        seen.setdefault(current[0], []).append(hash(tuple(x.flatten().tolist())))
        return x, y

    current = [""]
    original_run_one = runner.run_one

    def tracking_run_one(cfg, spec, *args, **kwargs):
        current[0] = spec.label
        return original_run_one(cfg, spec, *args, **kwargs)

    monkeypatch.setattr(runner, "train_batch", spy)
    monkeypatch.setattr(runner, "run_one", tracking_run_one)
    assert _bench(corpus, tmp_path / "o", "--optimizers", "adamw,muon,htmuon", "--steps", "5") == 0
    assert seen["adamw"] == seen["muon"] == seen["htmuon"] and len(seen["adamw"]) == 5


def test_resume_equals_uninterrupted(corpus, tmp_path, capsys):
    names = [n for n in _available() if n in ("adamw", "muon", "kl-shampoo", "pro-kls-r8")]
    args = ["--optimizers", ",".join(names), "--steps", "12", "--checkpoint-every", "4", "--seeds", "0"]
    assert _bench(corpus, tmp_path / "full", *args) == 0
    interrupted = tmp_path / "cut"
    assert _bench(corpus, interrupted, *args, "--stop-after", "6") == 130
    assert "--resume" in capsys.readouterr().err
    assert (interrupted / "runs" / f"{names[0]}-s0" / "checkpoint.pt").exists()
    assert not (interrupted / "summary.json").exists()
    # a changed setting is refused on resume; the same command line continues
    assert main(["bench", "--out", str(interrupted), "--resume", "--steps", "13", "--no-progress"]) == 2
    assert main(["bench", "--out", str(interrupted), "--resume", "--no-progress"]) == 0
    for name in names:
        assert _train_losses(tmp_path / "full", f"{name}-s0") == _train_losses(interrupted, f"{name}-s0"), name
    full = json.loads((tmp_path / "full" / "summary.json").read_text())
    cut = json.loads((interrupted / "summary.json").read_text())
    for a, b in zip(full["runs"], cut["runs"], strict=True):
        assert a["final_val_loss"] == b["final_val_loss"] and a["optimizer_state_bytes"] == b["optimizer_state_bytes"]
    assert not (interrupted / "runs" / f"{names[0]}-s0" / "checkpoint.pt").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--optimizers", "adamw,sgd"], "unknown optimizer 'sgd'"),
        (["--optimizers", "adamw", "--lr", "adamw=0"], "learning rate must be a number > 0"),
        (["--optimizers", "adamw", "--lr", "muon=-1e-3"], "learning rate must be a number > 0"),
        (["--optimizers", "adamw", "--steps", "0"], "--steps 0"),
        (["--optimizers", "adamw", "--batch-size", "4000"], "fewer than one batch"),
        (["--optimizers", "adamw", "--model", "gpt-huge"], "--model 'gpt-huge'"),
        (["--optimizers", "adamw", "--seeds", "1,1"], "--seeds"),
    ],
)
def test_bad_configurations_exit_nonzero_with_one_line(corpus, tmp_path, capsys, args, message):
    assert _bench(corpus, tmp_path / "bad", *args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("whiten bench: error:")


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("muon.badkey=1", "optimizer 'muon' (Muon) has no option 'badkey'; valid options: lr, weight_decay"),
        ("muon.lr=0.1", "option 'lr' is set by --lr NAME=VALUE"),
        ("muon.weight_decay=0.1", "option 'weight_decay' is set by --weight-decay"),
        ("muon.adamw_lr=0.1", "option 'adamw_lr' is set by --embed-lr"),
        ("muon.ns_method=bogus", "optimizer 'muon': ns_method='bogus' is not valid"),
        ("pro-kls-r8.rank=4", "option 'rank' is fixed by the name (rank=8)"),
        ("adamw.betas=(0.9,0.9)", "option 'betas' is set by the bench"),
        ("nosuch.x=1", "unknown optimizer 'nosuch'"),
        ("klshampoo.x=1", "unknown optimizer 'klshampoo'; it is spelt 'kl-shampoo' now"),
        ("htmuon.power=0.2", "--option names 'htmuon', which is not in --optimizers"),
    ],
)
def test_bad_option_is_one_line_exit_2_before_the_results_folder_exists(corpus, tmp_path, capsys, option, message):
    out = tmp_path / "bad"
    assert _bench(corpus, out, "--optimizers", "adamw,muon,pro-kls-r8", "--steps", "2", "--option", option) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("whiten bench: error:"), err
    assert not out.exists()  # no half-made folder: a later --resume is not poisoned
    sweep = ["sweep", "--data", str(corpus), *TINY, "--out", str(out), "--optimizers", "adamw,muon,pro-kls-r8"]
    assert main([*sweep, "--steps", "2", "--option", option]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.startswith("whiten sweep: error:") and not out.exists()


def test_a_good_option_reaches_the_optimizer(corpus, tmp_path):
    out = tmp_path / "ok"
    assert (
        _bench(corpus, out, "--optimizers", "pro-kls-r8", "--steps", "2", "--option", "pro-kls-r8.init_factor=0.5") == 0
    )
    saved = json.loads((out / "config.json").read_text())["bench"]["options"]
    assert saved == {"pro-kls-r8": {"init_factor": 0.5}}
    cfg = BenchConfig.from_dict(json.loads((out / "config.json").read_text())["bench"])
    from whiten.bench.models import build_model, model_config

    model = build_model(model_config("gpt-tiny", vocab_size=64, ctx=16), seed=0)
    options = cfg.options["pro-kls-r8"]
    opt = build_optimizer(
        get_spec("pro-kls-r8"), model, lr=1e-3, weight_decay=0.0, embed_lr=1e-3, extra_options=options
    )
    assert {g["init_factor"] for g in opt.param_groups if g.get("use_matrix")} == {0.5}
    assert {g["rank"] for g in opt.param_groups if g.get("use_matrix")} == {8}


def test_missing_data_and_nothing_to_resume(tmp_path, capsys):
    assert main(["bench", "--data", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not exist" in err and "nope.txt" in err and len(err.splitlines()) == 1
    assert main(["bench", "--out", str(tmp_path / "o2"), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "o3")]) == 2


def test_list_names_and_the_real_entry_point(capsys):
    assert main(["bench", "--list"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert {"adamw", "muon", "htmuon", "kl-shampoo", "pro-kls-r32"} <= set(names)
    bad = subprocess.run(
        [sys.executable, "-m", "whiten", "bench", "--optimizers", "nope", "--no-progress"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "unknown optimizer 'nope'" in bad.stderr


def test_sweep_reports_best_lr_per_optimizer(corpus, tmp_path, capsys):
    out = tmp_path / "sw"
    code = main(
        [
            "sweep",
            "--data",
            str(corpus),
            *TINY,
            "--out",
            str(out),
            "--optimizers",
            "adamw,muon",
            "--steps",
            "10",
            "--grid",
            "adamw=1e-4:1e-2",
            "--factors",
            "0.1,1",
        ]
    )
    assert code == 0
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["grid"]["adamw"] == [1e-4, 1e-2]
    assert sweep["grid"]["muon"] == [pytest.approx(0.1 * get_spec("muon").default_lr), get_spec("muon").default_lr]
    rows = {r["lr"]: r["final_val_loss"] for r in sweep["results"]["adamw"]}
    assert sweep["best_lr"]["adamw"] == min(rows, key=rows.get)
    assert rows[1e-4] != rows[1e-2]  # the swept lr reaches the hidden matrices
    assert (out / "sweep.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "best lr" in capsys.readouterr().out


def test_record_hook_calls_diagnostics_outside_the_clock(corpus, tmp_path, monkeypatch):
    calls = []

    def record_spectra(optimizer, model, *, step=None):
        calls.append(("spectra", type(optimizer).__name__, step))
        return [{"layer": "x", "top": torch.tensor([1.0, 2.0])}]

    def weight_alpha(model):
        calls.append(("alpha", type(model).__name__))
        raise RuntimeError("boom")  # a failing recorder is logged, not fatal

    monkeypatch.setattr(
        runner, "find_recorders", lambda: {"record_spectra": record_spectra, "weight_alpha": weight_alpha}
    )
    out = tmp_path / "rec"
    assert _bench(corpus, out, "--optimizers", "muon", "--steps", "6", "--record-every", "3") == 0
    entries = runner.read_jsonl(out / "runs" / "muon-s0" / "diagnostics.jsonl")
    assert [e["step"] for e in entries] == [3, 6]
    assert entries[0]["record_spectra"] == [{"layer": "x", "top": [1.0, 2.0]}]
    assert "boom" in entries[0]["weight_alpha"]["error"]
    assert [c for c in calls if c[0] == "spectra"] == [("spectra", "Muon", 3), ("spectra", "Muon", 6)]


def test_schedule_shapes():
    cfg = BenchConfig(optimizers=["adamw"], steps=100, warmup=10, min_lr_ratio=0.1)
    factors = [lr_factor(s, cfg) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[-1] == pytest.approx(0.1) and all(a >= b for a, b in itertools.pairwise(factors[9:]))
    assert factors[9 + 45] == pytest.approx(0.55, abs=0.02)  # cosine midpoint
    wsd = BenchConfig(optimizers=["adamw"], steps=100, warmup=10, schedule="wsd", decay_fraction=0.2)
    w = [lr_factor(s, wsd) for s in range(100)]
    assert w[50] == 1.0 and w[79] == 1.0 and w[-1] == pytest.approx(0.1) and w[90] < 1.0


def test_time_to_target_interpolates_between_evaluations():
    vals = [
        {"step": 0, "tokens": 0, "time_s": 0.0, "cpu_s": 0.0, "val_loss": 5.0},
        {"step": 10, "tokens": 100, "time_s": 2.0, "cpu_s": 1.0, "val_loss": 3.0},
        {"step": 20, "tokens": 200, "time_s": 4.0, "cpu_s": 3.0, "val_loss": 2.0},
    ]
    hit = time_to_target(vals, 2.5)
    assert hit == {"step": 15.0, "tokens": 150.0, "seconds": 3.0, "cpu_seconds": 2.0}
    assert time_to_target(vals, 1.0) is None and time_to_target(vals, 6.0)["seconds"] == 0.0


def test_adamw_state_bytes_are_counted_exactly():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = build_optimizer(get_spec("adamw"), model, lr=1e-3, weight_decay=0.0, embed_lr=1e-3)
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    n = sum(p.numel() for p in model.parameters())
    # exp_avg and exp_avg_sq in fp32 per parameter, plus one scalar fp32 step tensor per parameter
    assert optimizer_state_bytes(opt) == 2 * 4 * n + 4 * len(list(model.parameters()))


def test_presets_are_valid_configurations():
    for name, preset in PRESETS.items():
        cfg = BenchConfig(**preset, preset=name)
        cfg.validate()
        assert cfg.warmup is not None and cfg.warmup < cfg.steps and math.isfinite(cfg.lr_for("adamw"))


def test_every_optimizer_gets_the_same_parameter_split_and_embedding_lr():
    from whiten.bench.models import build_model, model_config

    model = build_model(model_config("llama-tiny", vocab_size=64, ctx=16), seed=0)
    names = {id(p): n for n, p in model.named_parameters()}
    splits = {}
    for name in _available():
        opt = build_optimizer(get_spec(name), model, lr=0.02, weight_decay=0.1, embed_lr=0.005)
        groups = {}
        for group in opt.param_groups:
            key = "matrix" if group.get("use_matrix", group["lr"] == 0.02) else "adamw"
            groups[key] = (sorted(names[id(p)] for p in group["params"]), group["lr"], group["weight_decay"])
        splits[name] = groups
        assert groups["matrix"][1:] == (0.02, 0.1) and groups["adamw"][1:] == (0.005, 0.0), name
    reference = splits["adamw"]
    for name, groups in splits.items():
        assert groups["matrix"][0] == reference["matrix"][0] and groups["adamw"][0] == reference["adamw"][0], name


def test_first_ctrl_c_requests_a_stop_and_the_second_aborts():
    import os
    import signal

    flag = runner.StopFlag()
    previous = signal.getsignal(signal.SIGINT)
    with flag.installed():
        os.kill(os.getpid(), signal.SIGINT)
        assert flag.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is previous


def test_lr_flag_merges_with_the_preset_lrs():
    from whiten.bench.cli import build_config
    from whiten.cli import build_parser

    args = build_parser().parse_args(["bench", "--preset", "mini", "--lr", "muon=0.02"])
    cfg = build_config(args)
    assert cfg.lr_for("muon") == 0.02  # the flag wins
    assert cfg.lr_for("pro-kls-r32") == PRESETS["mini"]["lrs"]["pro-kls-r32"] != get_spec("pro-kls-r32").default_lr
    plain = build_config(build_parser().parse_args(["bench", "--lr", "muon=0.02"]))
    assert plain.lr_for("pro-kls-r16") == get_spec("pro-kls-r16").default_lr and plain.lrs == {"muon": 0.02}


def test_jobs_runs_in_parallel_processes_with_the_same_results(corpus, tmp_path, capsys):
    args = ["--optimizers", "adamw,muon", "--steps", "6", "--seeds", "0,1"]
    assert _bench(corpus, tmp_path / "serial", *args) == 0
    assert _bench(corpus, tmp_path / "parallel", *args, "--jobs", "2") == 0
    for run_id in ("adamw-s0", "adamw-s1", "muon-s0", "muon-s1"):
        serial = _train_losses(tmp_path / "serial", run_id)
        assert serial and serial == _train_losses(tmp_path / "parallel", run_id)
    summary = json.loads((tmp_path / "parallel" / "summary.json").read_text())
    assert summary["config"]["jobs"] == 2
    assert [r["label"] for r in summary["runs"]] == ["adamw", "adamw", "muon", "muon"]
    # a resumed parallel run keeps the finished runs and may change --jobs
    assert main(["bench", "--out", str(tmp_path / "parallel"), "--resume", "--jobs", "1", "--no-progress"]) == 0


def test_jobs_must_be_a_positive_integer(corpus, tmp_path, capsys):
    assert _bench(corpus, tmp_path / "o", "--optimizers", "adamw", "--steps", "2", "--jobs", "0") == 2
    assert "--jobs 0 must be an integer >= 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
