"""Every user error of ``whiten bench / sweep / plot / diagnose`` is one line ``whiten CMD: error: ...``, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from whiten.cli import main


@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "a_file"
    path.write_text("not a folder\n")
    (tmp_path / "bad.json").write_text("{bad")
    return path


@pytest.mark.parametrize(
    ("argv", "prefix", "message"),
    [
        (["bench", "--device", "bogus"], "whiten bench", "--device 'bogus' is not a device"),
        (["sweep", "--device", "bogus"], "whiten sweep", "--device 'bogus' is not a device"),
        (["bench", "--out", "{a_file}"], "whiten bench", "is a file, not a results folder"),
        (["bench", "--optimizers", "proklshampoo"], "whiten bench", "it is spelt 'pro-kls-r16' now"),
        (["sweep", "--option", "muon"], "whiten sweep", "--option expects OPTIMIZER.KEY=VALUE"),
        (["plot", "{tmp}"], "whiten plot", "summary.json' does not exist"),
        (["diagnose", "spike", "--device", "bogus"], "whiten diagnose spike", "'bogus' is not a device"),
        (["diagnose", "spike", "--out", "{a_file}"], "whiten diagnose spike", "is a file, not a folder"),
        (["diagnose", "spike", "--optimizers", "klshampoo"], "whiten diagnose spike", "spelt 'kl-shampoo' now"),
        (["diagnose", "spike", "--optimizers", "muon"], "whiten diagnose spike", "'muon' keeps no eigenbasis"),
        (["diagnose", "spike", "--option", "rekls.nope=1"], "whiten diagnose spike", "has no option 'nope'"),
        (["diagnose", "spectra", "{tmp}/bad.json"], "whiten diagnose spectra", "is not valid JSON"),
        (["diagnose", "spectra", "{a_file}", "--max-panels", "0"], "whiten diagnose spectra", "--max-panels"),
        (["diagnose", "spectra", "{a_file}"], "whiten diagnose spectra", "cannot read"),
        (["diagnose", "alpha", "x={tmp}/epoch=0-step=1.ckpt"], "whiten diagnose alpha", "read as LABEL=PATH"),
    ],
)
def test_user_errors_are_one_line_with_exit_2(tmp_path, a_file, capsys, argv, prefix, message) -> None:
    argv = [a.format(a_file=a_file, tmp=tmp_path) for a in argv]
    before = sorted(tmp_path.rglob("*"))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{prefix}: error:") and message in err and len(err.splitlines()) == 1, err
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


@pytest.mark.parametrize(
    ("argv", "prefix", "name"),
    [
        (["bench", "--device", "cuda"], "whiten bench", "--device"),
        (["sweep", "--device", "cuda:1"], "whiten sweep", "--device"),
        (["diagnose", "spike", "--device", "cuda"], "whiten diagnose spike", "device"),
    ],
)
def test_a_cuda_device_without_cuda_is_one_check_for_every_command(monkeypatch, capsys, argv, prefix, name) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    expected = f"{name} {argv[-1]!r} requested but CUDA is not available; use {name} cpu"
    assert err == f"{prefix}: error: {expected}", err
