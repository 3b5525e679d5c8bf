"""``whiten diagnose`` on checkpoints of other training stacks: Lightning ``.ckpt`` (paths with ``=``),
Hugging Face Trainer checkpoint folders; built here with plain ``torch.save`` (no lightning/transformers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from whiten import KLShampoo
from whiten.cli import main
from whiten.diagnostics.io import split_label


def _trained() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 60), nn.Tanh(), nn.Linear(60, 30))
    opt = KLShampoo(model.parameters(), lr=1e-3, precondition_frequency=1)
    x = torch.randn(32, 40)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return model, opt


def _lightning_checkpoint(folder: Path, step: int) -> Path:
    """The layout ``Trainer.save_checkpoint`` writes: weights under ``state_dict``, optimizers in a list."""
    model, opt = _trained()
    path = folder / f"epoch=0-step={step}.ckpt"
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save(
        {
            "epoch": 0,
            "global_step": step,
            "state_dict": state,
            "optimizer_states": [opt.state_dict()],
            "lr_schedulers": [],
        },
        path,
    )
    return path


def _trainer_checkpoint(output_dir: Path, step: int) -> Path:
    """A Hugging Face Trainer ``checkpoint-<step>/`` folder (``save_safetensors=False`` layout)."""
    model, opt = _trained()
    folder = output_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    torch.save(opt.state_dict(), folder / "optimizer.pt")
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    return folder


def test_alpha_and_spectra_read_a_lightning_checkpoint_whose_name_holds_equals_signs(tmp_path, capsys) -> None:
    ckpt = _lightning_checkpoint(tmp_path, 10)
    assert main(["diagnose", "alpha", str(ckpt), "--xmin", "median", "--out", str(tmp_path / "a"), "--no-plots"]) == 0
    out = json.loads((tmp_path / "a" / "alpha.json").read_text())
    assert [layer["name"] for layer in next(iter(out.values()))["layers"]] == ["model.0.weight", "model.2.weight"]
    # with a label: split at the first '=' only, the rest is the path
    assert (
        main(["diagnose", "alpha", f"kls={ckpt}", "--xmin", "median", "--out", str(tmp_path / "b"), "--no-plots"]) == 0
    )
    assert set(json.loads((tmp_path / "b" / "alpha.json").read_text())) == {"kls"}
    assert main(["diagnose", "spectra", str(ckpt), "--rank", "4", "--out", str(tmp_path / "s"), "--no-plots"]) == 0
    records = json.loads((tmp_path / "s" / "spectra.json").read_text())
    assert records[0]["step"] == 10 and {f["side"] for f in records[0]["factors"]} == {"L", "R"}
    capsys.readouterr()
    assert main(["diagnose", "alpha", f"kls={tmp_path / 'epoch=1-step=99.ckpt'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("whiten diagnose alpha: error:") and "epoch=1-step=99.ckpt" in err and len(err.splitlines()) == 1
    )


def test_split_label_rule(tmp_path) -> None:
    odd = tmp_path / "a=b"
    odd.mkdir()
    assert split_label(str(odd)) == ("", str(odd))  # an existing path is never split
    assert split_label(f"run={odd}") == ("run", str(odd))  # first '=' only
    assert split_label(str(tmp_path)) == ("", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="LABEL=PATH"):
        split_label(f"{tmp_path}/x=y")


def test_diagnose_reads_hugging_face_trainer_checkpoints(tmp_path) -> None:
    for step in (4, 12):
        _trainer_checkpoint(tmp_path / "out", step)
    folder = tmp_path / "out" / "checkpoint-4"
    assert main(["diagnose", "spectra", str(folder), "--rank", "4", "--out", str(tmp_path / "s1"), "--no-plots"]) == 0
    records = json.loads((tmp_path / "s1" / "spectra.json").read_text())
    assert [(r["run"], r["step"]) for r in records] == [("checkpoint-4", 4)] and records[0]["factors"]
    # the output_dir: every checkpoint, in step order (12 after 4, not by name)
    assert main(["diagnose", "spectra", str(tmp_path / "out"), "--out", str(tmp_path / "s2"), "--no-plots"]) == 0
    assert [r["step"] for r in json.loads((tmp_path / "s2" / "spectra.json").read_text())] == [4, 12]
    assert main(["diagnose", "alpha", str(tmp_path / "out"), "--xmin", "median", "--out", str(tmp_path / "a")]) == 0
    assert set(json.loads((tmp_path / "a" / "alpha.json").read_text())) == {"checkpoint-4", "checkpoint-12"}


def test_diagnose_alpha_reads_model_safetensors(tmp_path) -> None:
    safetensors = pytest.importorskip("safetensors.torch")
    model, _ = _trained()
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    safetensors.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    assert main(["diagnose", "alpha", str(folder), "--xmin", "median", "--out", str(tmp_path / "a"), "--no-plots"]) == 0
    layers = json.loads((tmp_path / "a" / "alpha.json").read_text())["checkpoint-3"]["layers"]
    assert [layer["name"] for layer in layers] == ["0.weight", "2.weight"]


def test_one_json_lines_reader_for_the_bench_and_the_diagnostics(tmp_path, capsys) -> None:
    from whiten.bench import report, runner
    from whiten.diagnostics import claims
    from whiten.diagnostics.io import read_json, read_jsonl

    assert runner.read_jsonl is report.read_jsonl is claims.read_jsonl is read_jsonl
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n\n{"step": 2, "val_loss": 3.5}\n')
    assert read_jsonl(log) == [{"step": 1}, {"step": 2, "val_loss": 3.5}]
    assert read_jsonl(tmp_path / "missing.jsonl", missing_ok=True) == []
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl' does not exist"):
        read_jsonl(tmp_path / "missing.jsonl")
    log.write_text('{"step": 1}\n{"step": 2, "val_lo\n')  # a run killed while writing its last line
    with pytest.raises(ValueError, match=r"log\.jsonl' is not valid JSON lines \(line 2\)"):
        read_jsonl(log)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match=r"bad\.json' is not valid JSON"):
        read_json(tmp_path / "bad.json")
    # the diagnose CLI reports it as a usage error naming the file and the line
    assert main(["diagnose", "alpha", str(log)]) != 0
    assert "is not valid JSON lines (line 2)" in capsys.readouterr().err
