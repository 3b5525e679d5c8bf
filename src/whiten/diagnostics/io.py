"""Reading checkpoints for the diagnostics.

Accepted files (``torch.save``'d):

* an optimizer ``state_dict`` (a dict with ``"state"`` and ``"param_groups"``), or a dict holding
  one under ``"optimizer"`` (also ``"optimizer_state_dict"``, ``"optim"``, ``"opt"``);
* a model ``state_dict`` (a dict of tensors), or a dict holding one under ``"model"`` (also
  ``"model_state_dict"``, ``"state_dict"``);
* optionally ``"param_names"``: a list giving the name of each optimizer parameter index (or
  param groups carrying ``"param_names"``, as ``torch.optim`` writes for named parameters), so that
  spectra are labelled by layer name instead of ``param<i>``.

Files are loaded with ``weights_only=True`` (no code runs) unless ``trusted=True``.

Folders (:func:`run_sources`): a bench run folder (``<out>/runs/<optimizer>-s<seed>/``, holding the
``diagnostics.jsonl`` that ``whiten bench --record-every N`` writes and, while a run is unfinished,
its ``checkpoint.pt``), or a bench results folder (``<out>/``, every run under ``runs/``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

RUN_FILES = ("diagnostics.jsonl", "checkpoint.pt")
OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "optim", "opt")
MODEL_KEYS = ("model", "model_state_dict", "state_dict")


def load_checkpoint(path: str | Path, *, trusted: bool = False) -> Any:
    """``torch.load`` on CPU with a clear error for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
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
        for key in OPTIMIZER_KEYS:
            if is_optimizer_state(obj.get(key)):
                found = dict(obj[key])
                if "param_names" in obj and "param_names" not in found:
                    found["param_names"] = list(obj["param_names"])
                return found
        keys = sorted(str(k) for k in obj)[:12]
        raise ValueError(
            f"{origin} holds no optimizer state_dict (top-level keys: {keys}); save optimizer.state_dict() "
            f"itself or a dict with it under one of {OPTIMIZER_KEYS}"
        )
    raise ValueError(f"{origin} is a {type(obj).__name__}, not a dict holding an optimizer state_dict")


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
        keys = sorted(str(k) for k in obj)[:12]
        raise ValueError(
            f"{origin} holds no model state_dict (top-level keys: {keys}); save model.state_dict() itself or a "
            f"dict with it under one of {MODEL_KEYS}"
        )
    raise ValueError(f"{origin} is a {type(obj).__name__}, not a model state_dict")


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


def _run_file(folder: Path) -> Path | None:
    for name in RUN_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


def run_sources(path: str | Path) -> list[tuple[str, Path]]:
    """``(run label, file)`` pairs for a path: a file is itself; a folder is expanded (module doc).

    A run folder gives its ``diagnostics.jsonl`` (else its ``checkpoint.pt``), labelled by the folder
    name; a bench results folder gives one such pair per run folder under ``runs/`` (or directly
    under it), in name order.
    """
    path = Path(path)
    if path.is_file():
        return [(path.parent.name or path.stem, path)]
    if not path.is_dir():
        raise FileNotFoundError(f"{str(path)!r} does not exist")
    own = _run_file(path)
    if own is not None:
        return [(path.name, own)]
    root = path / "runs" if (path / "runs").is_dir() else path
    found = [(sub.name, f) for sub in sorted(root.iterdir()) if sub.is_dir() and (f := _run_file(sub)) is not None]
    if not found:
        raise ValueError(
            f"folder {str(path)!r} holds no bench run: expected {' or '.join(RUN_FILES)} in it or in its run "
            "folders (runs/<optimizer>-s<seed>/); record them with whiten bench --record-every N"
        )
    return found
