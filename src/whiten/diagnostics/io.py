"""Reading checkpoints for the diagnostics.

Accepted files (``torch.save``'d unless ``.safetensors``):

* an optimizer ``state_dict`` (a dict with ``"state"`` and ``"param_groups"``), or a dict holding
  one under ``"optimizer"`` (also ``"optimizer_state_dict"``, ``"optim"``, ``"opt"``), or a
  PyTorch Lightning checkpoint (``"optimizer_states"``: a list with one state_dict per optimizer;
  the first is read);
* a model ``state_dict`` (a dict of tensors), or a dict holding one under ``"model"`` (also
  ``"model_state_dict"``, ``"state_dict"``, which is where Lightning keeps the weights);
* ``.safetensors`` weights (Hugging Face ``model.safetensors``), read when the ``safetensors``
  package is importable;
* optionally ``"param_names"``: a list giving the name of each optimizer parameter index (or
  param groups carrying ``"param_names"``, as ``torch.optim`` writes for named parameters), so that
  spectra are labelled by layer name instead of ``param<i>``.

Files are loaded with ``weights_only=True`` (no code runs) unless ``trusted=True``.

Folders (:func:`run_sources`): a bench run folder (``<out>/runs/<optimizer>-s<seed>/``, holding the
``diagnostics.jsonl`` that ``whiten bench --record-every N`` writes and, while a run is unfinished,
its ``checkpoint.pt``), a Hugging Face Trainer checkpoint folder (``checkpoint-<step>/`` with
``optimizer.pt`` and ``model.safetensors`` or ``pytorch_model.bin``), or a folder of such run or
checkpoint folders (a bench results folder, every run under ``runs/``; a Trainer ``output_dir``).

Command-line inputs may carry a label, ``LABEL=PATH`` (:func:`split_label`): a string that is an
existing path is always a path (Lightning names checkpoints ``epoch=0-step=10.ckpt``); otherwise
the text before the first ``=`` is the label and the rest the path.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

RUN_FILES = ("diagnostics.jsonl", "checkpoint.pt")  # a bench run folder, in order of preference
OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "optim", "opt")
LIGHTNING_OPTIMIZERS = "optimizer_states"
MODEL_KEYS = ("model", "model_state_dict", "state_dict")
# a Hugging Face Trainer checkpoint folder: which file holds what (weights in order of preference)
HF_FILES = {"optimizer": ("optimizer.pt",), "model": ("model.safetensors", "pytorch_model.bin")}
STEP_KEYS = ("step", "global_step")  # whiten bench / Lightning


def read_json(path: str | Path) -> Any:
    """The value of a JSON file, with a clear error for a missing or malformed one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(path)!r} is not valid JSON: {err}") from None


def read_jsonl(path: str | Path, *, missing_ok: bool = False) -> list[Any]:
    """The records of a JSON-lines file (one value per line, blank lines skipped): the bench's ``log.jsonl``
    and ``diagnostics.jsonl``. A missing file is ``[]`` when ``missing_ok`` (a run that has not logged yet),
    else a ``FileNotFoundError``; a malformed line a ``ValueError`` naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        if missing_ok:
            return []
        raise FileNotFoundError(f"{str(path)!r} does not exist")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{str(path)!r} is not valid JSON lines (line {number}): {err}") from None
    return records


def load_checkpoint(path: str | Path, *, trusted: bool = False) -> Any:
    """``torch.load`` on CPU with a clear error for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ValueError(f"reading {str(path)!r} needs the safetensors package (pip install safetensors)") from None
        return load_file(path, device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trusted)
    except Exception as err:  # torch raises several types (UnpicklingError, RuntimeError, ...)
        hint = "" if trusted else " (if you trust the file and it pickles custom objects, pass --trusted)"
        raise ValueError(f"cannot read {str(path)!r} as a torch checkpoint: {err.__class__.__name__}{hint}") from err


def is_optimizer_state(obj: Any) -> bool:
    return isinstance(obj, Mapping) and "state" in obj and "param_groups" in obj


def find_optimizer_state(obj: Any, origin: str = "checkpoint") -> dict[str, Any]:
    """The optimizer ``state_dict`` inside a loaded checkpoint (format in the module doc)."""
    if is_optimizer_state(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        lightning = obj.get(LIGHTNING_OPTIMIZERS)
        candidates = [obj.get(key) for key in OPTIMIZER_KEYS]
        if isinstance(lightning, list | tuple) and lightning:
            candidates.append(lightning[0])
        for found in candidates:
            if is_optimizer_state(found):
                found = dict(found)
                if "param_names" in obj and "param_names" not in found:
                    found["param_names"] = list(obj["param_names"])
                return found
    raise _not_found(obj, origin, "optimizer", (*OPTIMIZER_KEYS, LIGHTNING_OPTIMIZERS))


def find_model_state(obj: Any, origin: str = "checkpoint") -> dict[str, Tensor]:
    """The model ``state_dict`` (name -> tensor) inside a loaded checkpoint."""
    if isinstance(obj, Mapping):
        for key in MODEL_KEYS:
            value = obj.get(key)
            if isinstance(value, Mapping) and any(isinstance(v, Tensor) for v in value.values()):
                return {str(k): v for k, v in value.items() if isinstance(v, Tensor)}
        tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
        if tensors and not is_optimizer_state(obj):
            return tensors
    raise _not_found(obj, origin, "model", MODEL_KEYS)


def _not_found(obj: Any, origin: str, what: str, keys: tuple[str, ...]) -> ValueError:
    """The error for a checkpoint without the ``what`` (``"model"`` / ``"optimizer"``) state_dict."""
    if not isinstance(obj, Mapping):
        return ValueError(f"{origin} is a {type(obj).__name__}, not a dict holding a {what} state_dict")
    top = sorted(str(k) for k in obj)[:12]
    return ValueError(
        f"{origin} holds no {what} state_dict (top-level keys: {top}); save {what}.state_dict() itself or a "
        f"dict with it under one of {keys}"
    )


def checkpoint_step(path: Path, checkpoint: Any) -> int | None:
    """The training step of a checkpoint: its ``step`` / ``global_step`` entry, else a Trainer folder's."""
    if isinstance(checkpoint, Mapping):
        for key in STEP_KEYS:
            if isinstance(checkpoint.get(key), int):
                return int(checkpoint[key])
    trainer_state = path.parent / "trainer_state.json"
    if trainer_state.is_file():
        step = json.loads(trainer_state.read_text()).get("global_step")
        if isinstance(step, int):
            return step
    match = re.fullmatch(r"checkpoint-(\d+)", path.parent.name)
    return int(match.group(1)) if match else None


def optimizer_param_names(state_dict: Mapping[str, Any]) -> dict[int, str]:
    """Index -> name from ``"param_names"`` (top level or per group); missing ones are ``param<i>``."""
    names: dict[int, str] = {}
    top = state_dict.get("param_names")
    groups = state_dict.get("param_groups", [])
    for group in groups:
        ids = group.get("params", [])
        group_names = group.get("param_names")
        for pos, index in enumerate(ids):
            if group_names is not None and pos < len(group_names):
                names[int(index)] = str(group_names[pos])
    if top is not None:
        for index, name in enumerate(top):
            names.setdefault(index, str(name))
    for group in groups:
        for index in group.get("params", []):
            names.setdefault(int(index), f"param{int(index)}")
    return names


def _run_file(folder: Path, kind: str) -> Path | None:
    for name in (*RUN_FILES, *HF_FILES[kind]):
        if (folder / name).is_file():
            return folder / name
    return None


def run_sources(path: str | Path, kind: str = "optimizer") -> list[tuple[str, Path]]:
    """``(run label, file)`` pairs for a path: a file is itself; a folder is expanded (module doc).

    ``kind`` (``"optimizer"`` or ``"model"``) picks the file of a Trainer checkpoint folder. A run
    or checkpoint folder gives its file (a bench run: ``diagnostics.jsonl``, else ``checkpoint.pt``),
    labelled by the folder name; a folder of them gives one pair per sub-folder (under ``runs/`` for a
    bench results folder), in name order (Trainer checkpoints in step order).
    """
    if kind not in HF_FILES:
        raise ValueError(f"kind must be one of {tuple(HF_FILES)}, got {kind!r}")
    path = Path(path)
    if path.is_file():
        return [(path.parent.name or path.stem, path)]
    if not path.is_dir():
        raise FileNotFoundError(f"{str(path)!r} does not exist")
    own = _run_file(path, kind)
    if own is not None:
        return [(path.name, own)]
    root = path / "runs" if (path / "runs").is_dir() else path

    def order(sub: Path) -> tuple[int, str]:
        match = re.fullmatch(r"checkpoint-(\d+)", sub.name)
        return (int(match.group(1)) if match else -1, sub.name)

    subs = sorted((sub for sub in root.iterdir() if sub.is_dir()), key=order)
    found = [(sub.name, f) for sub in subs if (f := _run_file(sub, kind)) is not None]
    if not found:
        files = " or ".join((*RUN_FILES, *HF_FILES[kind]))
        raise ValueError(
            f"folder {str(path)!r} holds no bench run or Trainer checkpoint: expected {files} in it or in its "
            "sub-folders (runs/<optimizer>-s<seed>/, checkpoint-<step>/); record bench runs with "
            "whiten bench --record-every N"
        )
    return found


def split_label(item: str) -> tuple[str, str]:
    """``"LABEL=PATH"`` -> ``(LABEL, PATH)``; ``PATH`` -> ``("", PATH)`` (the rule in the module doc)."""
    if "=" not in item or Path(item).exists():
        return "", item
    label, _, path = item.partition("=")
    if not Path(path).exists():
        raise FileNotFoundError(
            f"{item!r} does not exist, and read as LABEL=PATH (split at the first '='), neither does {path!r}"
        )
    return label, path


def labelled_sources(item: str, kind: str) -> list[tuple[str, Path]]:
    """:func:`run_sources` of a command-line input, the runs named ``LABEL`` or ``LABEL/run`` if labelled."""
    label, raw = split_label(item)
    sources = run_sources(raw, kind)
    if not label:
        return sources
    if len(sources) == 1:
        return [(label, sources[0][1])]
    return [(f"{label}/{run}", path) for run, path in sources]
