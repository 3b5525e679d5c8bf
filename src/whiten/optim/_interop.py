"""Conventions of other optimizer code that a ``whiten`` optimizer accepts (issue 14).

* Keller-style groups: ``use_muon=True/False`` (KellerJordan/Muon ``MuonWithAuxAdam``, pytorch-optimizer)
  is this library's ``use_matrix``; in a ``use_muon=False`` group ``eps`` is the Adam epsilon.
* Param-group keys: every option of the class, ``torch.optim``'s standard keys and the keys LR schedulers
  add are known; any other key gets a warning naming it (a misspelt option would otherwise be ignored).
* ``torch.optim`` state dicts (``torch.optim.Muon``, ``torch.optim.AdamW``, ...): their groups have no
  routing (``use_matrix``) of their own, so routing and algorithm options stay the loading optimizer's; ``lr`` (the
  schedule's position) and keys this optimizer lacks are taken from the saved group, and saved state is
  kept only where it means the same here (see :func:`adopt_foreign_groups`).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Collection, Mapping
from types import FrameType
from typing import Any

import torch
from torch import Tensor

#: keys of torch.optim's own optimizers and of its LR schedulers; never warned about
TORCH_GROUP_KEYS = frozenset(
    {
        # torch.optim optimizers
        "params",
        "param_names",
        "lr",
        "betas",
        "eps",
        "weight_decay",
        "amsgrad",
        "maximize",
        "foreach",
        "capturable",
        "differentiable",
        "fused",
        "decoupled_weight_decay",
        "momentum",
        "dampening",
        "nesterov",
        "ns_coefficients",
        "ns_steps",
        "adjust_lr_fn",
        # torch.optim.lr_scheduler (OneCycleLR, CyclicLR, warm restarts, ...)
        "initial_lr",
        "max_lr",
        "min_lr",
        "base_lr",
        "max_momentum",
        "base_momentum",
    }
)

#: the Keller-style routing key
KELLER_ROUTING_KEY = "use_muon"


def translate_keller_group(group: dict[str, Any]) -> dict[str, Any]:
    """Map ``use_muon`` to ``use_matrix`` (and a ``use_muon=False`` group's ``eps`` to ``adamw_eps``).

    A group that sets both ``use_muon`` and a different non-``None`` ``use_matrix`` is refused.
    """
    if KELLER_ROUTING_KEY not in group:
        return group
    group = dict(group)
    use_muon = group.pop(KELLER_ROUTING_KEY)
    if not isinstance(use_muon, bool):
        raise ValueError(f"use_muon must be True or False, got {use_muon!r}")
    use_matrix = group.get("use_matrix")
    if use_matrix is not None and use_matrix != use_muon:
        raise ValueError(
            f"a param group sets use_muon={use_muon} and use_matrix={use_matrix}: they say the same thing "
            "(use_muon is the Keller-style spelling of use_matrix); set one of them"
        )
    group["use_matrix"] = use_muon
    if not use_muon and "eps" in group and "adamw_eps" not in group:
        group["adamw_eps"] = group.pop("eps")  # Keller's auxiliary Adam group: eps is Adam's
    return group


def warn_unknown_keys(group: Mapping[str, Any], known: Collection[str], owner: str) -> None:
    """Warn once per group about keys that neither ``owner`` nor ``torch.optim`` knows."""
    unknown = sorted(k for k in group if k not in known and k not in TORCH_GROUP_KEYS and k != KELLER_ROUTING_KEY)
    if unknown:
        warnings.warn(
            f"{owner} param group has keys it does not use: {unknown} (a misspelt option? the options are "
            f"the constructor's arguments); they are kept in the group but have no effect",
            UserWarning,
            stacklevel=_caller_stacklevel(),
        )


#: keys every whiten param group has (the AdamW half's options); a saved group without them is foreign
WHITEN_GROUP_KEYS = ("adamw_lr", "adamw_betas", "adamw_eps", "adamw_weight_decay")


def is_foreign_group(saved_group: Mapping[str, Any]) -> bool:
    """Whether a saved param group comes from another library (``torch.optim``): it lacks the AdamW-half options.

    (A ``use_matrix`` key alone proves nothing: ``torch.optim`` keeps the extra keys of the groups it is given.)
    """
    return not any(key in saved_group for key in WHITEN_GROUP_KEYS)


def adopt_foreign_groups(
    param_groups: list[dict[str, Any]],
    own_groups: list[dict[str, Any]],
    foreign: list[bool],
) -> None:
    """Restore this optimizer's options in groups loaded from a ``torch.optim`` state dict.

    ``own_groups`` are the groups as they were before the load. Each foreign group keeps its saved ``lr``
    and the saved keys this optimizer does not have (scheduler keys such as ``initial_lr``); every other
    option, the routing ``use_matrix`` included, is the loading optimizer's.
    """
    for group, own, is_foreign in zip(param_groups, own_groups, foreign, strict=True):
        if not is_foreign:
            continue
        saved_lr = group.get("lr", own["lr"])
        group.update({k: v for k, v in own.items() if k not in ("params", "param_names")})
        group["lr"] = saved_lr


def adopt_foreign_state(
    state: dict[Tensor, dict[str, Any]],
    group: Mapping[str, Any],
    matrix_state_keys: Collection[str],
    stat_dtype: Any,
) -> list[str]:
    """Keep the saved state of a foreign group's parameters only where it means the same here.

    AdamW-half parameters keep ``exp_avg``/``exp_avg_sq`` (``torch.optim.AdamW``'s moments, the same EMA)
    with the step count as an int; matrix parameters keep the entries named in ``matrix_state_keys``
    (Muon: ``torch.optim.Muon``'s ``momentum_buffer``) with ``step = 0``. Everything else is dropped, so the
    method starts its own statistics. Returns the dropped ``"key (shape)"`` descriptions.
    """
    dropped: list[str] = []
    for p in group["params"]:
        entry = state.get(p)
        if not entry:
            continue
        if group["use_matrix"]:
            keep = {k: v.to(stat_dtype(p)) for k, v in entry.items() if k in matrix_state_keys and _same_shape(v, p)}
            if keep:
                keep.setdefault("step", 0)
        elif _same_shape(entry.get("exp_avg"), p) and _same_shape(entry.get("exp_avg_sq"), p):
            step = entry.get("step", 0)
            keep = {
                "exp_avg": entry["exp_avg"].to(stat_dtype(p)),
                "exp_avg_sq": entry["exp_avg_sq"].to(stat_dtype(p)),
                "step": int(step.item() if isinstance(step, Tensor) else step),
            }
        else:
            keep = {}
        dropped += [
            f"{k} {tuple(v.shape) if isinstance(v, Tensor) else ''}".strip() for k, v in entry.items() if k not in keep
        ]
        state[p] = keep
    return dropped


def _same_shape(value: Any, param: Tensor) -> bool:
    return isinstance(value, Tensor) and value.shape == param.shape and value.is_floating_point()


def warn_dropped(owner: str, dropped: list[str]) -> None:
    if dropped:
        warnings.warn(
            f"{owner}.load_state_dict: state from a torch.optim optimizer that has no meaning here was "
            f"dropped ({len(dropped)} entries, e.g. {sorted(set(dropped))[:4]}); those parameters start "
            "this method's statistics afresh",
            UserWarning,
            stacklevel=_caller_stacklevel(),
        )


def _caller_stacklevel() -> int:
    """``stacklevel`` of the first frame outside ``whiten.optim`` and ``torch.optim``: the user's call."""
    inside = (os.path.dirname(__file__), os.path.dirname(torch.optim.__file__))
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


def tensor_lr_copy(lr: Any) -> Any:
    """A tensor ``lr`` shared by the two halves of a split group is copied (a scheduler updates each in place)."""
    return lr.clone() if isinstance(lr, torch.Tensor) else lr
