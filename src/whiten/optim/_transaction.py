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

Without reading anything back (:meth:`StepTransaction.run_masked`, the default ``nonfinite="skip"`` step of
parameters that have state): the whole group steps, non-finite gradients included, and each parameter keeps
its new values or its copies by ``torch.where(ok, new, old)`` on the device, ``ok`` being "finite gradient and
finite new state". The skips are counted in device tensors (:class:`PendingSkips`) that are added to the
``state`` counters, and taken off an int ``step`` the skipped steps advanced, when the state is next read
(``docs/reliability.md``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from whiten.optim._adamw import select_

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


#: entries checked by one set of multi-tensor kernels (the temporaries of :func:`_invalid_norms` stay this small)
CHECK_CHUNK_NUMEL = 1 << 22


def _invalid_norms(tensors: list[Tensor], infinite_ok: bool) -> list[Tensor]:
    """One 0-d tensor per tensor, NaN where it holds a NaN or an infinity (only ``-inf`` if ``infinite_ok``).

    Multi-tensor kernels instead of a few small ones per tensor (a small model's step is dominated by
    per-kernel overhead): ``norm(0 * t)`` is 0 for a finite ``t`` and NaN as soon as ``t`` holds a NaN or an
    infinity, and it cannot overflow; ``min(t, 0)`` first keeps a NaN and a ``-inf`` and clears a ``+inf``.
    """
    if infinite_ok:
        cleared = list(torch._foreach_clamp_max(tensors, 0.0))
        torch._foreach_mul_(cleared, 0.0)
        return list(torch._foreach_norm(cleared))
    return list(torch._foreach_norm(torch._foreach_mul(tensors, 0.0)))


def finite_state_flags(
    params: list[Tensor], states: list[Mapping[str, Any]], infinite_ok: Callable[[str], bool] = lambda key: False
) -> list[bool]:
    """:func:`finite_state_mask` read back to the host (one sync)."""
    if not params:
        return []
    return finite_state_mask(params, states, infinite_ok).tolist()


def finite_state_mask(
    params: list[Tensor], states: list[Mapping[str, Any]], infinite_ok: Callable[[str], bool] = lambda key: False
) -> Tensor:
    """Bool vector on the device: whether each parameter and every floating tensor of its state is finite.

    ``infinite_ok(key)``: state entries where ``+inf`` is a deliberate value (KL-Shampoo's eigenvalues, where
    ``+inf`` means "no gain", :func:`whiten.linalg.clamp_eigenvalues`); NaN is refused there too.
    Checked in chunks of parameters of about :data:`CHECK_CHUNK_NUMEL` entries (at least one parameter), so
    that the temporaries stay bounded.
    """
    device = params[0].device
    checks: list[tuple[list[Tensor], list[Tensor]]] = []
    for p, state in zip(params, states, strict=True):
        strict = [p.detach()]
        lenient: list[Tensor] = []
        for key, value in state.items():
            if isinstance(value, Tensor) and value.is_floating_point():
                (lenient if infinite_ok(key) else strict).append(value.detach())
        checks.append((strict, lenient))
    # a few multi-tensor kernels for a chunk of parameters (not a few small kernels per parameter), the chunks
    # bounded so that the temporaries stay small; per parameter the NaN markers are stacked and reduced
    flags: list[Tensor] = []
    chunk: list[tuple[list[Tensor], list[Tensor]]] = []
    numel = 0
    for index, (strict, lenient) in enumerate(checks):
        chunk.append((strict, lenient))
        numel += sum(t.numel() for t in strict) + sum(t.numel() for t in lenient)
        if numel < CHECK_CHUNK_NUMEL and index + 1 < len(checks):
            continue
        strict_norms = iter(_invalid_norms([t for s, _ in chunk for t in s], False))
        lenient_flat = [t for _, l in chunk for t in l]
        lenient_norms = iter(_invalid_norms(lenient_flat, True) if lenient_flat else [])
        markers = [
            [next(strict_norms) for _ in strict_part] + [next(lenient_norms) for _ in lenient_part]
            for strict_part, lenient_part in chunk
        ]
        counts = {len(m) for m in markers}
        if len(counts) == 1:  # the usual case: every parameter has the same entries, one reduction for all
            stacked = torch.stack([t.to(device, torch.float32) for m in markers for t in m])
            flags.extend(stacked.view(len(markers), -1).sum(1).unbind())
        else:
            flags.extend(torch.stack([t.to(device, torch.float32) for t in m]).sum() for m in markers)
        chunk, numel = [], 0
    return torch.stack(flags).isnan().logical_not()


#: the per-parameter skip counters (ints in ``state``), see ``docs/shared_behaviour.md``
SKIP_COUNTERS = ("nonfinite_skips", "fault_skips")


class PendingSkips:
    """Skips decided on the device and not yet added to ``state`` (so that a step reads nothing back).

    Per parameter a device tensor ``[nonfinite, fault]`` accumulates the skipped steps; :meth:`flush` reads them
    all (one host sync per device, when the optimizer's state is read: ``optimizer.state``, ``state_dict()``,
    ``nonfinite_skips()``), adds them to ``state["nonfinite_skips"]`` / ``state["fault_skips"]`` (a key appears
    with its first skip, as before) and takes them off an int ``state["step"]``: a masked step advances an
    int step counter on the host for every parameter, and a skipped one must not have advanced it
    (:meth:`StepTransaction.run_masked` commits masked steps only when the counter advanced by exactly one).
    """

    def __init__(self) -> None:
        self.counts: dict[Tensor, Tensor] = {}

    def __bool__(self) -> bool:
        return bool(self.counts)

    def add(self, params: list[Tensor], nonfinite: Tensor, fault: Tensor) -> None:
        """Count ``nonfinite[i]`` / ``fault[i]`` (bool vectors on one device) for ``params[i]``; no host read."""
        contributions = torch.stack([nonfinite, fault]).to(torch.int64)
        targets = []
        for p in params:
            total = self.counts.get(p)
            if total is None:
                total = self.counts[p] = torch.zeros(2, dtype=torch.int64, device=contributions.device)
            targets.append(total)
        torch._foreach_add_(targets, list(contributions.unbind(1)))

    def discard(self) -> None:
        self.counts.clear()

    def flush(self, state: Mapping[Tensor, dict[str, Any]]) -> None:
        """Add the pending skips to ``state`` (reads them back: one sync per device)."""
        if not self.counts:
            return
        by_device: dict[torch.device, list[Tensor]] = {}
        for p, total in self.counts.items():
            by_device.setdefault(total.device, []).append(p)
        pending = [(params, torch.stack([self.counts[p] for p in params]).tolist()) for params in by_device.values()]
        self.counts.clear()
        for params, rows in pending:
            for p, (nonfinite, fault) in zip(params, rows, strict=True):
                if not (nonfinite or fault):
                    continue
                entry = state[p]
                for key, count in zip(SKIP_COUNTERS, (nonfinite, fault), strict=True):
                    if count:
                        entry[key] = entry.get(key, 0) + count
                if type(entry.get("step")) is int:  # advanced on the host by the skipped masked steps
                    entry["step"] -= nonfinite + fault


def _masked_commit_applies(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """Whether ``torch.where(ok, new, old)`` per tensor restores ``old`` exactly: the same keys, tensors of the same
    shape, dtype and device, the same plain values, except an int ``step`` that advanced by one (taken back by
    :meth:`PendingSkips.flush` for a skipped step)."""
    if old.keys() != new.keys():
        return False
    for key, value in new.items():
        before = old[key]
        if isinstance(value, Tensor):
            if not (
                isinstance(before, Tensor)
                and value.shape == before.shape
                and value.dtype == before.dtype
                and value.device == before.device
            ):
                return False
        elif type(value) is int and type(before) is int and key == "step":
            if value != before + 1:
                return False
        elif isinstance(before, Tensor) or value != before:
            return False
    return True


class StatisticsFaultError(FloatingPointError):
    """Raised under ``nonfinite="raise"`` for non-finite new statistics; nothing was changed by that ``step()``."""


class DecompositionFaultError(torch.linalg.LinAlgError):
    """Raised under ``nonfinite="raise"`` when a decomposition failed after its fallbacks; nothing was changed."""


class StepTransaction:
    """The matrix steps of one ``step()`` call; see the module docstring."""

    def __init__(
        self,
        optimizer: Any,
        describe: Callable[[Mapping[str, Any], Tensor], str],
        pending: PendingSkips | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.describe = describe
        # under "raise" a later group's failure must undo the earlier groups too: keep their copies
        self.keep = any(group["nonfinite"] == "raise" for group in optimizer.param_groups)
        self.kept: list[_Saved] = []
        self.counts: list[tuple[Tensor, str]] = []  # skip counters, applied by commit()
        self.pending = pending if pending is not None else PendingSkips()
        self.masked_counts: list[tuple[list[Tensor], Tensor, Tensor]] = []  # device-side skips, for commit()

    def count(self, param: Tensor, key: str) -> None:
        """Count a skipped step of ``param`` in ``state[key]`` when the call completes (:meth:`commit`)."""
        self.counts.append((param, key))

    def count_masked(self, params: list[Tensor], nonfinite: Tensor, fault: Tensor) -> None:
        """Count skips decided on the device (bool vectors over ``params``) when the call completes."""
        self.masked_counts.append((params, nonfinite, fault))

    def commit(self) -> None:
        """Apply the skip counters: the call completed (a raise leaves every counter as it was too)."""
        for param, key in self.counts:
            state = self.optimizer.state[param]
            state[key] = state.get(key, 0) + 1
        self.counts.clear()
        for params, nonfinite, fault in self.masked_counts:
            self.pending.add(params, nonfinite, fault)
        self.masked_counts.clear()

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

    def run_masked(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], finite: Tensor, step: StepFn
    ) -> None:
        """``step`` over every parameter of a ``nonfinite="skip"`` group, committed per parameter on the device.

        ``finite``: whether each gradient is finite (a bool vector, on the device). Parameters with a non-finite
        gradient step too and are then restored with the ones whose new state is not finite:
        ``torch.where(ok, new, copy)`` per tensor that the step changed (a tensor the step did not touch, as its
        ``_version`` shows, is left alone), so nothing is read back. The rare cases that change the state's
        structure (a new key, a new shape, a plain value such as Pro-KLShampoo's adaptive ``rank``) or raise a
        ``LinAlgError`` are decided on the host as :meth:`run` does.
        """
        state = self.optimizer.state
        saved = self._save(params)
        # identity and version of every state tensor: an untouched one needs no selection
        compiling = torch.compiler.is_compiling()  # dynamo does not trace _version
        before = [
            {} if compiling else {k: (v, v._version) for k, v in state[p].items() if isinstance(v, Tensor)}
            for p in params
        ]
        try:
            step(group, params, grads)
        except torch.linalg.LinAlgError:
            self._restore(saved)
            self._run_finite(group, params, grads, finite.tolist(), step)
            return
        states = [state[p] for p in params]
        if not all(_masked_commit_applies(entry.state, new) for entry, new in zip(saved, states, strict=True)):
            self._decide_on_host(group, saved, list(states), finite.tolist())
            return
        state_ok = finite_state_mask(params, states, self.optimizer.infinite_state_ok)
        finite = finite.to(state_ok.device)
        ok = finite & state_ok
        for keep, entry, new, old_tensors in zip(ok.unbind(), saved, states, before, strict=True):
            select_(keep, entry.param.detach(), entry.value)
            for key, tensor in new.items():
                if not isinstance(tensor, Tensor):
                    continue
                original, version = old_tensors.get(key, (None, -1))
                if tensor is original and tensor._version == version:
                    continue  # not written by the step
                # in place, also into a new entry: it may be the view of a stacked batch (whiten.optim._stacking);
                # an expanded view (a stride 0) cannot be written and is replaced
                if any(stride == 0 and size > 1 for stride, size in zip(tensor.stride(), tensor.shape, strict=True)):
                    new[key] = torch.where(keep, tensor, entry.state[key])
                else:
                    select_(keep, tensor, entry.state[key])
        self.count_masked(params, ~finite, finite & ~state_ok)
        if self.keep:
            self.kept.extend(saved)

    def _run_finite(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], finite: list[bool], step: StepFn
    ) -> None:
        """:meth:`run` over the parameters with a finite gradient; the others are counted (host flags)."""
        kept_params, kept_grads = [], []
        for p, g, ok in zip(params, grads, finite, strict=True):
            if ok:
                kept_params.append(p)
                kept_grads.append(g)
            else:
                self.count(p, "nonfinite_skips")
        if kept_params:
            self.run(group, kept_params, kept_grads, step)

    def _decide_on_host(
        self, group: dict[str, Any], saved: list[_Saved], states: list[Mapping[str, Any]], finite: list[bool]
    ) -> None:
        """The verdict of :meth:`run_masked` read back: restore and count what failed (one sync)."""
        params = [entry.param for entry in saved]
        state_ok = finite_state_flags(params, states, self.optimizer.infinite_state_ok)
        bad_gradient = [entry for entry, ok in zip(saved, finite, strict=True) if not ok]
        bad_state = [entry for entry, g, s in zip(saved, finite, state_ok, strict=True) if g and not s]
        if self.keep:
            self.kept.extend(entry for entry, g, s in zip(saved, finite, state_ok, strict=True) if g and s)
        self._restore(bad_gradient)
        for entry in bad_gradient:
            self.count(entry.param, "nonfinite_skips")
        if bad_state:
            self._fail(group, bad_state, "non-finite statistics or update (an overflow)", None)
