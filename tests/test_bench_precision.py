"""``whiten bench --precision``: bf16 autocast training with fp32 weights, its default, config and resume."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from whiten.bench import precision, runner
from whiten.bench.runner import BenchConfig
from whiten.cli import main

TINY = ["--model", "gpt-tiny", "--ctx", "16", "--batch-size", "8", "--eval-batches", "2", "--eval-every", "4"]
TINY += ["--no-progress", "--optimizers", "adamw,muon", "--seeds", "0"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rng = random.Random(0)
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis"]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 8))) for _ in range(1500)]
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def _bench(corpus: Path, out: Path, *extra: str) -> int:
    return main(["bench", "--data", str(corpus), *TINY, "--out", str(out), *extra])


def _losses(out: Path, run_id: str) -> list[float]:
    return [r["train_loss"] for r in runner.read_jsonl(out / "runs" / run_id / "log.jsonl") if "train_loss" in r]


@pytest.fixture
def cpuinfo(tmp_path, monkeypatch):
    """Point the CPU-flag reader at a fake ``/proc/cpuinfo``; returns a function that writes its flags."""
    path = tmp_path / "cpuinfo"
    monkeypatch.setattr(precision, "_CPUINFO", path)
    monkeypatch.setattr(precision.sys, "platform", "linux")

    def write(flags: str) -> None:
        path.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: {flags}\n\nprocessor\t: 1\n")

    return write


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("fpu sse2 avx2 avx512f avx512bw", "fp32"),  # AVX512 without BF16: bf16 is emulated
        ("fpu sse2 avx2 avx512f avx512_bf16", "bf16"),  # Zen4, Cooper Lake
        ("fpu sse2 avx2 amx_bf16 amx_tile", "bf16"),  # Sapphire Rapids AMX
    ],
)
def test_default_precision_follows_the_cpu_bf16_flags(cpuinfo, flags, expected):
    cpuinfo(flags)
    assert precision.default_precision("cpu") == expected
    assert BenchConfig(optimizers=["adamw"]).precision == expected


def test_default_precision_on_cuda_follows_bf16_support(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert precision.default_precision("cuda") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert precision.default_precision("cuda:1") == "fp32"


def test_no_cpuinfo_means_fp32(tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "_CPUINFO", tmp_path / "missing")
    assert precision.default_precision("cpu") == "fp32"
    monkeypatch.setattr(precision.sys, "platform", "darwin")
    assert precision.cpu_flags() == set()


def test_bf16_autocasts_the_forward_and_keeps_fp32_weights_gradients_and_state():
    model = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8)
    with precision.autocast(torch.device("cpu"), "bf16"):
        y = model(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert model.weight.dtype == model.weight.grad.dtype == torch.float32
    with precision.autocast(torch.device("cpu"), "fp32"):
        assert model(x).dtype == torch.float32
    with (
        pytest.raises(ValueError, match="--precision 'fp16' is not valid"),
        precision.autocast(torch.device("cpu"), "fp16"),
    ):
        pass


def test_a_run_at_each_precision_records_it_and_differs(corpus, tmp_path, capsys):
    for p in ("fp32", "bf16"):
        assert _bench(corpus, tmp_path / p, "--steps", "6", "--precision", p) == 0
        saved = json.loads((tmp_path / p / "config.json").read_text())
        assert saved["bench"]["precision"] == p
        assert f"precision {p};" in capsys.readouterr().err
    fp32, bf16 = _losses(tmp_path / "fp32", "muon-s0"), _losses(tmp_path / "bf16", "muon-s0")
    assert len(fp32) == len(bf16) == 6 and all(map(torch.isfinite, torch.tensor(bf16)))
    assert fp32 != bf16  # the forward really ran in bf16
    assert abs(fp32[0] - bf16[0]) < 0.05  # ... and computes the same loss up to bf16 rounding


def test_default_precision_is_recorded(corpus, tmp_path, cpuinfo):
    cpuinfo("fpu avx512_bf16")
    assert _bench(corpus, tmp_path / "auto", "--steps", "2") == 0
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["bench"]["precision"] == "bf16"


def test_resume_refuses_a_precision_mismatch_and_old_configs_mean_fp32(corpus, tmp_path, capsys):
    out = tmp_path / "cut"
    assert _bench(corpus, out, "--steps", "8", "--precision", "fp32", "--stop-after", "4") == 130
    capsys.readouterr()
    assert main(["bench", "--out", str(out), "--resume", "--precision", "bf16", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--precision bf16 differs from the saved run (fp32)" in err and len(err.strip().splitlines()) == 1
    # a results folder written before --precision existed has no such field: it trained in fp32
    config = json.loads((out / "config.json").read_text())
    del config["bench"]["precision"]
    (out / "config.json").write_text(json.dumps(config))
    assert BenchConfig.from_dict(config["bench"]).precision == "fp32"
    assert main(["bench", "--out", str(out), "--resume", "--precision", "fp32", "--no-progress"]) == 0
