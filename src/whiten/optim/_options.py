"""The one place that validates optimizer options, and the defaults every class shares.

Each optimizer declares a table ``{option name: check}``; :func:`validate_group` runs it on
every parameter group at construction and in ``add_param_group``, so a bad value is refused
before any state exists, with a message naming the option and what is accepted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, TypedDict

import torch

from whiten.linalg import ns_schedule

Check = Callable[[str, Any], None]

#: the built-in AdamW's options and their defaults, the same in every class (docs/shared_behaviour.md):
#: ``adamw_lr=None`` is the group's ``lr``; ``adamw_betas`` / ``adamw_eps`` left at ``None`` take the method's
#: own Adam value where the class names one (``WhitenOptimizer.adamw_inherits``), else ``ADAMW_FALLBACK``
ADAMW_DEFAULTS: dict[str, Any] = {"adamw_lr": None, "adamw_betas": None, "adamw_eps": None, "adamw_weight_decay": 0.0}
ADAMW_FALLBACK: dict[str, Any] = {"adamw_betas": (0.9, 0.95), "adamw_eps": 1e-8}


class CommonOptions(TypedDict, total=False):
    """Options every class takes, by keyword (``**common: Unpack[CommonOptions]``); defaults in the base.

    ``adamw_*``: the built-in AdamW (:data:`ADAMW_DEFAULTS`); ``maximize``: ascend instead of descend;
    ``nonfinite``: ``"skip"`` or ``"raise"`` on a NaN/Inf gradient (see ``WhitenOptimizer``).
    """

    adamw_lr: float | None
    adamw_betas: tuple[float, float] | None
    adamw_eps: float | None
    adamw_weight_decay: float
    maximize: bool
    nonfinite: str


#: the defaults of :class:`CommonOptions` beyond the AdamW ones
COMMON_DEFAULTS: dict[str, Any] = {"maximize": False, "nonfinite": "skip"}


def constructor_options(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The options of a constructor call from its ``locals()``: its named options and its ``**common``.

    The constructor's signature is the table of the method's own options and defaults; the options of
    :class:`CommonOptions` come in ``common`` (defaults filled by ``WhitenOptimizer``). An unknown
    keyword there is a ``TypeError``, as for any named argument.
    """
    common = dict(arguments.get("common", {}))
    unknown = sorted(set(common) - set(CommonOptions.__annotations__))
    if unknown:
        raise TypeError(
            f"unexpected keyword argument(s) {unknown}; the options shared by every class are "
            f"{sorted(CommonOptions.__annotations__)}"
        )
    named = {k: v for k, v in arguments.items() if k not in ("self", "params", "common", "__class__")}
    return {**named, **common}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def nonneg(name: str, value: Any) -> None:
    if not _is_number(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def learning_rate(name: str, value: Any) -> None:
    """A number >= 0, or a 0-d floating tensor holding one (as ``torch.optim`` accepts for ``lr``)."""
    if isinstance(value, torch.Tensor):
        if value.ndim != 0 or not value.is_floating_point():
            raise ValueError(
                f"{name} as a tensor must be a 0-d floating tensor, got shape {tuple(value.shape)} {value.dtype}"
            )
        if not (math.isfinite(float(value)) and float(value) >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        return
    nonneg(name, value)


def positive(name: str, value: Any) -> None:
    if not _is_number(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def unit_interval(name: str, value: Any) -> None:
    """A decay rate ``beta`` in ``[0, 1)`` (this library's convention: beta weights the OLD value)."""
    if not _is_number(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def beta_pair(name: str, value: Any) -> None:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be a pair (beta1, beta2), got {value!r}")
    unit_interval(f"{name}[0]", value[0])
    unit_interval(f"{name}[1]", value[1])


def closed_unit_interval(name: str, value: Any) -> None:
    """A weight in ``[0, 1]`` (a shrinkage amount)."""
    if not _is_number(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def ns_coefficients(name: str, value: Any) -> None:
    """Newton–Schulz coefficients: a name, one ``(a, b, c)`` or a list of them (:func:`whiten.linalg.ns_schedule`)."""
    ns_schedule(value, 1)


def positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def nonneg_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


def boolean(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def choice(*allowed: Any) -> Check:
    def check(name: str, value: Any) -> None:
        if value not in allowed:
            raise ValueError(f"{name}={value!r} is not valid; use one of {allowed}")

    return check


def optional(inner: Check) -> Check:
    def check(name: str, value: Any) -> None:
        if value is not None:
            inner(name, value)

    return check


def either(*checks: Check, what: str) -> Check:
    def check(name: str, value: Any) -> None:
        for inner in checks:
            try:
                inner(name, value)
                return
            except ValueError:
                continue
        raise ValueError(f"{name} must be {what}, got {value!r}")

    return check


def accepts(check: Check, name: str, value: Any) -> bool:
    """Whether ``check`` accepts ``value``: an inherited AdamW default that AdamW cannot use (KL-Shampoo's
    ``eps=0``, valid for its preconditioner, would divide by zero in AdamW) leaves the fallback instead."""
    try:
        check(name, value)
    except ValueError:
        return False
    return True


def validate_group(group: Mapping[str, Any], checks: Mapping[str, Check]) -> None:
    for name, check in checks.items():
        if name in group:
            check(name, group[name])
