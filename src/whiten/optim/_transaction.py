"""All-or-nothing matrix steps: a parameter commits all its new state and its update, or nothing.

:class:`StepTransaction` wraps the matrix steps of one ``optimizer.step()`` call (single process; see
``docs/shared_behaviour.md`` for the distributed case). Before a group steps it keeps a copy of each
parameter and of its state; after the step it checks, with one stacked reduction and one host sync
per group, that every new state tensor and the parameter are finite. A parameter fails when

* a decomposition raises ``torch.linalg.LinAlgError`` after its fallbacks
  (:func:`whiten.linalg.with_fallbacks`: fp64, then growing jitter): the whole group is restored
  and retried one parameter at a time, so that only the failing ones are left out; or
* its new statistics (factors, eigenvalues, moments) or its new value are non-finite (an overflow
  of a finite but huge gradient, e.g. a 1e15 gradient after tiny ones).

A failed parameter is restored exactly (parameter, momentum, factors, step counter) and counted in
``state["fault_skips"]``; under ``nonfinite="raise"`` every parameter stepped so far in this call is
restored and the error is raised, so that a retried ``step()`` equals an unfaulted one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

StepFn = Callable[[dict[str, Any], list[Tensor], list[Tensor]], None]


@dataclass
class _Saved:
    param: Tensor
    value: Tensor
    state: dict[str, Any]


def param_label(param: Tensor, name: str | None = None) -> str:
    """How messages name a parameter: ``'blocks.0.attn.weight' (shape (64, 64))``, or its shape alone."""
    shape = f"shape {tuple(param.shape)}"
    return f"{name!r} ({shape})" if name is not None else shape


def group_label(group: Mapping[str, Any], param: Tensor) -> str:
    """:func:`param_label` with the name kept in the group's ``param_names`` (when it has them)."""
    names = group.get("param_names")
    if names:
        for p, name in zip(group["params"], names, strict=False):
            if p is param:
                return param_label(param, name)
    return param_label(param)


def square_fits(tensors: list[Tensor], stat_dtype: Callable[[Tensor], torch.dtype]) -> Tensor:
    """Bool vector: whether ``t^2`` of each tensor fits its statistics dtype (AdamW keeps ``g^2``), with headroom
    for the EMA: ``|t| <= 0.5 sqrt(max)`` (about 9e18 in fp32). NaN gives ``False``."""
    device = tensors[0].device
    limits = [0.5 * torch.finfo(stat_dtype(t)).max ** 0.5 for t in tensors]
    return torch.stack([(t.detach().abs() <= limit).all().to(device) for t, limit in zip(tensors, limits, strict=True)])


def _copy_state(state: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v.clone() if isinstance(v, Tensor) else v for k, v in state.items()}


def _invalid(tensors: list[Tensor], infinite_ok: bool) -> Tensor:
    """0-d bool: whether any of ``tensors`` holds a NaN, or an infinity (``-inf`` only, if ``infinite_ok``).

    Strict checks use two multi-tensor kernels instead of a few small ones per tensor (a small model's step
    is dominated by per-kernel overhead): ``norm(0 * t)`` is 0 for a finite ``t`` and NaN as soon as ``t``
    holds a NaN or an infinity, and it cannot overflow.
    """
    if infinite_ok:
        return torch.stack([(torch.isnan(t) | (t == -torch.inf)).any() for t in tensors]).any()
    return torch.stack(torch._foreach_norm(torch._foreach_mul(tensors, 0.0))).isnan().any()


def finite_state_flags(
    params: list[Tensor], states: list[Mapping[str, Any]], infinite_ok: Callable[[str], bool] = lambda key: False
) -> list[bool]:
    """Whether each parameter and every floating tensor of its state is finite (one host sync).

    ``infinite_ok(key)``: state entries where ``+inf`` is a deliberate value (KL-Shampoo's eigenvalues, where
    ``+inf`` means "no gain", :func:`whiten.linalg.clamp_eigenvalues`); NaN is refused there too.
    Checked one parameter at a time, so the temporaries never exceed one parameter's state.
    """
    if not params:
        return []
    device = params[0].device
    flags = []
    for p, state in zip(params, states, strict=True):
        strict = [p.detach()]
        lenient: list[Tensor] = []
        for key, value in state.items():
            if isinstance(value, Tensor) and value.is_floating_point():
                (lenient if infinite_ok(key) else strict).append(value.detach())
        bad = _invalid(strict, False)
        if lenient:
            bad = bad | _invalid(lenient, True).to(device)
        flags.append(bad.to(device))
    return torch.stack(flags).logical_not().tolist()


class StatisticsFaultError(FloatingPointError):
    """Raised under ``nonfinite="raise"`` for non-finite new statistics; nothing was changed by that ``step()``."""


class DecompositionFaultError(torch.linalg.LinAlgError):
    """Raised under ``nonfinite="raise"`` when a decomposition failed after its fallbacks; nothing was changed."""


class StepTransaction:
    """The matrix steps of one ``step()`` call; see the module docstring."""

    def __init__(self, optimizer: Any, describe: Callable[[Mapping[str, Any], Tensor], str]) -> None:
        self.optimizer = optimizer
        self.describe = describe
        # under "raise" a later group's failure must undo the earlier groups too: keep their copies
        self.keep = any(group["nonfinite"] == "raise" for group in optimizer.param_groups)
        self.kept: list[_Saved] = []
        self.counts: list[tuple[Tensor, str]] = []  # skip counters, applied by commit()

    def count(self, param: Tensor, key: str) -> None:
        """Count a skipped step of ``param`` in ``state[key]`` when the call completes (:meth:`commit`)."""
        self.counts.append((param, key))

    def commit(self) -> None:
        """Apply the skip counters: the call completed (a raise leaves every counter as it was too)."""
        for param, key in self.counts:
            state = self.optimizer.state[param]
            state[key] = state.get(key, 0) + 1
        self.counts.clear()

    def _save(self, params: list[Tensor]) -> list[_Saved]:
        state = self.optimizer.state
        return [_Saved(p, p.detach().clone(), _copy_state(state[p])) for p in params]

    def _restore(self, saved: list[_Saved]) -> None:
        for entry in saved:
            state = self.optimizer.state[entry.param]
            state.clear()
            state.update(entry.state)
            entry.param.detach().copy_(entry.value)

    def _fail(self, group: dict[str, Any], saved: list[_Saved], reason: str, error: Exception | None) -> None:
        """Restore ``saved``; count them, or (policy "raise") undo the whole call and raise."""
        self._restore(saved)
        if group["nonfinite"] == "raise":
            self._restore(self.kept)
            names = [self.describe(group, entry.param) for entry in saved]
            kind = StatisticsFaultError if error is None else DecompositionFaultError
            raise kind(
                f"{reason} for parameter(s) {names}; no parameter or state was changed by this step "
                "(set nonfinite='skip' to skip such parameters and count them in state['fault_skips'])"
            ) from error
        for entry in saved:
            self.count(entry.param, "fault_skips")

    def run(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], step: StepFn) -> None:
        """``step(group, params, grads)`` with the guarantees of the module docstring."""
        saved = self._save(params)
        try:
            step(group, params, grads)
        except torch.linalg.LinAlgError as error:
            self._restore(saved)
            if len(params) == 1:
                self._fail(group, saved, "a decomposition failed after its fallbacks", error)
                return
            for p, g in zip(params, grads, strict=True):  # find the parameters that fail on their own
                self.run(group, [p], [g], step)
            return
        states = [self.optimizer.state[p] for p in params]
        flags = finite_state_flags(params, states, self.optimizer.infinite_state_ok)
        bad = [entry for entry, ok in zip(saved, flags, strict=True) if not ok]
        good = [entry for entry, ok in zip(saved, flags, strict=True) if ok]
        if self.keep:
            self.kept.extend(good)
        if bad:
            self._fail(group, bad, "non-finite statistics or update (an overflow)", None)
