"""Shared machinery of every ``whiten`` optimizer (``docs/shared_behaviour.md``, ``docs/architecture.md``).

:class:`WhitenOptimizer` is a thin ``torch.optim.Optimizer`` that

* routes parameters: groups with ``use_matrix=True`` get the subclass's matrix method, groups
  with ``use_matrix=False`` get the built-in AdamW (:mod:`whiten.optim._adamw`); a group left
  at ``use_matrix=None`` is split at construction by dimension (``ndim >= 2`` -> matrix), the
  AdamW half taking ``lr=adamw_lr`` and ``weight_decay=adamw_weight_decay`` so that LR
  schedulers scale both halves alike;
* validates every option of every group through one table (:mod:`whiten.optim._options`);
* keeps statistics in fp32 (fp64 for fp64 parameters) and never modifies ``p.grad``;
* handles non-finite gradients by policy ``nonfinite``: ``"skip"`` (default) leaves that
  parameter and its state untouched for the step and counts it in ``state["nonfinite_skips"]``,
  ``"raise"`` raises ``FloatingPointError`` before any parameter or state is modified; under
  ``"skip"`` a step of parameters that have state decides this on the device (masked commits, the
  counters added when the state is read), so it never waits on the host (``docs/reliability.md``);
* restores state dtypes on ``load_state_dict`` (PyTorch casts floating state to the parameter
  dtype, which would silently drop fp32 statistics of bf16 weights to bf16);
* runs under ``torch.distributed`` (DDP, FSDP2 DTensor parameters) with the option
  ``distributed_mode``: ``"replicate"`` (default) or ``"split"`` (each matrix stepped by one
  owner rank); the mechanism lives in :mod:`whiten.optim.distributed`, see ``docs/distributed.md``.

The step protocol. Every optimizer implements ``_matrix_step(group, params, grads)`` (the whole
update of a list of matrices). An optimizer whose step splits into an elementwise part and a
whole-matrix part subclasses :class:`PhasedOptimizer` instead, which declares the three phases
as abstract methods and composes ``_matrix_step`` from them once; the distributed code detects
it with ``isinstance`` and runs the elementwise phases on FSDP2 shards (``docs/architecture.md``).

This module never imports :mod:`whiten.optim.distributed`: that package imports this one and
registers itself with :func:`register_distributed_stepper`; a step calls it only when
``torch.distributed`` is initialised or a parameter is a DTensor.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, cast, final

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from whiten.linalg.flops import FlopCount
from whiten.optim import _interop
from whiten.optim import _options as opt
from whiten.optim._adamw import adamw_foreach_
from whiten.optim._options import (
    ADAMW_DEFAULTS,
    ADAMW_FALLBACK,
    COMMON_DEFAULTS,
    CommonOptions,
)
from whiten.optim._routing import route_group
from whiten.optim._stacking import compact_state
from whiten.optim._transaction import (
    SKIP_COUNTERS,
    PendingSkips,
    StatisticsFaultError,
    StepTransaction,
    group_label,
    square_fits,
)

try:  # DTensor is part of every torch >= 2.4 build that has torch.distributed
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - builds without distributed support
    DTensor = None  # type: ignore[assignment,misc]

#: values of the option ``distributed_mode`` (see ``docs/distributed.md``)
MODES = ("replicate", "split")
#: the phase methods of :class:`PhasedOptimizer`, in the order a step runs them
PHASES = ("_direction_phase", "_map_phase", "_apply_phase")

COMMON_CHECKS: dict[str, opt.Check] = {
    "lr": opt.learning_rate,
    "weight_decay": opt.nonneg,
    "use_matrix": opt.optional(opt.boolean),
    "adamw_lr": opt.optional(opt.learning_rate),
    "betas": opt.beta_pair,  # an AdamW group's (and SOAP's, KL-Shampoo's) betas
    "adamw_betas": opt.beta_pair,
    "adamw_eps": opt.positive,  # divides: m / (sqrt(v) + eps), and v = 0 where g = 0
    "adamw_weight_decay": opt.nonneg,
    "maximize": opt.boolean,
    "nonfinite": opt.choice("skip", "raise"),
    "distributed_mode": opt.choice(*MODES),
}


def stat_dtype(param: Tensor) -> torch.dtype:
    """Statistics dtype for a parameter: fp64 for fp64 weights, fp32 otherwise."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def as_matrix(t: Tensor) -> Tensor:
    """View a parameter as a matrix: conv weights ``(out, in, kh, kw)`` -> ``(out, in*kh*kw)``."""
    return t if t.ndim == 2 else t.reshape(t.shape[0], -1)


def is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2 parameter, its gradient or a state entry shaped like it)."""
    return DTensor is not None and isinstance(t, DTensor)


def local_tensor(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor; any other tensor itself."""
    return cast("DTensor", t).to_local() if is_sharded(t) else t


def local_finite(tensors: Sequence[Tensor]) -> Tensor:
    """Bool vector: whether each of ``tensors`` (this rank's shard for DTensors) is finite, one stack.

    The finiteness check of a step, ``isfinite(t).all()`` per tensor: never a norm, which overflows in
    fp32 once ``sum(t^2) > 3.4e38`` although every entry is finite (a 64 x 64 gradient of 1e18).
    Only the host path of a step reads the vector back (``nonfinite="raise"``, initialisation steps); the
    default step selects with it on the device (:meth:`StepTransaction.run_masked`).
    """
    local = [local_tensor(t) for t in tensors]
    device = local[0].device
    return torch.stack([torch.isfinite(t.detach()).all().to(device) for t in local])


@dataclass
class GradientFlags:
    """What :meth:`WhitenOptimizer._gather` found about a group's gradients.

    ``finite``: whether each gradient is finite; ``fits`` (AdamW groups): whether its square fits the statistics
    dtype. Bool vectors on the device, or host lists where the verdict had to be reduced over ranks (DTensors).
    :meth:`host` reads them back (the host path of a step); the default step never does.
    """

    finite: Tensor | list[bool]
    fits: Tensor | list[bool] | None = None
    _host: tuple[list[bool], list[bool]] | None = None

    @property
    def on_device(self) -> bool:
        return isinstance(self.finite, Tensor)

    def host(self) -> tuple[list[bool], list[bool]]:
        """``(finite, overflow)`` as lists (one host sync, once): ``overflow`` = finite but its square does not fit."""
        if self._host is None:
            finite, fits = self.finite, self.fits
            if isinstance(finite, Tensor):
                if isinstance(fits, Tensor):
                    finite, fits = torch.stack([finite, fits]).tolist()
                else:
                    finite = finite.tolist()
            fits = fits if fits is not None else [True] * len(finite)
            self._host = (list(finite), [ok and not fit for ok, fit in zip(finite, fits, strict=True)])
        return self._host


@dataclass(frozen=True)
class MapInput:
    """What :meth:`PhasedOptimizer._direction_phase` hands to the map for one parameter.

    ``direction``: the tensor the map transforms (Muon: ``U``; KL-Shampoo: the momentum ``M``), or
    ``None`` on a parameter's first step when the method only initialises its statistics then
    (KL-Shampoo). ``gradient``: the raw gradient, for methods whose map also updates statistics from
    it (the KL family), else ``None``. Both are shaped like the parameter (whole tensors, local shards
    or DTensors) and share one dtype; the distributed code moves :meth:`tensors` and rebuilds the
    input with :meth:`with_tensors`.
    """

    direction: Tensor | None
    gradient: Tensor | None = None

    def __post_init__(self) -> None:
        if self.direction is None and self.gradient is None:
            raise ValueError("MapInput needs a direction or a gradient")

    @property
    def first_step(self) -> bool:
        """Whether this is the initialisation step (no direction: the map only builds statistics)."""
        return self.direction is None

    def tensors(self) -> tuple[Tensor, ...]:
        """The tensors present, ``direction`` first."""
        return tuple(t for t in (self.direction, self.gradient) if t is not None)

    def with_tensors(self, tensors: Sequence[Tensor]) -> MapInput:
        """The same structure with ``tensors`` (in the order of :meth:`tensors`) in place of these."""
        if len(tensors) != len(self.tensors()):
            raise ValueError(f"MapInput holds {len(self.tensors())} tensors, got {len(tensors)}")
        rest = iter(tensors)
        direction = next(rest) if self.direction is not None else None
        gradient = next(rest) if self.gradient is not None else None
        return MapInput(direction, gradient)


class DistributedStepper(Protocol):
    """What :mod:`whiten.optim.distributed` provides to :class:`WhitenOptimizer` (registered, not imported)."""

    def matrix_step(
        self, optimizer: WhitenOptimizer, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]
    ) -> None: ...

    def holds_state(self, optimizer: WhitenOptimizer, group: Mapping[str, Any], param: Tensor) -> bool: ...

    def finite_flags(self, grads: Sequence[Tensor]) -> list[bool]: ...


_distributed_stepper: DistributedStepper | None = None


def register_distributed_stepper(stepper: DistributedStepper | None) -> DistributedStepper | None:
    """Install the stepper that runs matrix groups under ``torch.distributed``; returns the previous one."""
    global _distributed_stepper
    previous, _distributed_stepper = _distributed_stepper, stepper
    return previous


def _distributed_in_use(params: Sequence[Tensor]) -> bool:
    return (dist.is_available() and dist.is_initialized()) or any(is_sharded(p) for p in params)


class WhitenOptimizer(Optimizer, ABC):
    """Base class: parameter routing, option validation, AdamW fallback, non-finite policy.

    Subclasses set ``option_checks`` and implement :meth:`_matrix_step`. A subclass whose step splits
    into elementwise and whole-matrix parts derives from :class:`PhasedOptimizer` instead, so that
    FSDP2 keeps its elementwise state sharded. Defining a phase method (:data:`PHASES`) without
    deriving from :class:`PhasedOptimizer` is refused when the class is created: such a method would
    never be called.
    """

    option_checks: ClassVar[Mapping[str, opt.Check]] = {}
    #: AdamW options that default to one of the method's own options when left at ``None``
    #: (SOAP: ``{"adamw_betas": "betas", "adamw_eps": "eps"}``); the others take ``ADAMW_FALLBACK``
    adamw_inherits: ClassVar[Mapping[str, str]] = {}
    #: parent-class options this class fixes and refuses (REKLS: ``use_eigh``, ``use_kl_shampoo``)
    fixed_options: ClassVar[tuple[str, ...]] = ()
    #: older spellings of options, kept so that old code and checkpoints work (Muon: ``ns_dtype``)
    option_aliases: ClassVar[Mapping[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        stray = [name for name in PHASES if name in vars(cls)]
        phased = globals().get("PhasedOptimizer")  # None while PhasedOptimizer itself is being created
        if stray and phased is not None and not issubclass(cls, phased):
            raise TypeError(
                f"{cls.__name__} defines {stray} but does not derive from PhasedOptimizer, so they would never "
                "run; derive from whiten.optim.base.PhasedOptimizer (or rename them)"
            )

    #: state entries of the matrix method that a ``torch.optim`` optimizer's state means the same
    #: (Muon: ``torch.optim.Muon``'s ``momentum_buffer``); other foreign matrix state is dropped on load
    foreign_matrix_state: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], defaults: dict[str, Any]) -> None:
        full = {
            "use_matrix": None,
            **ADAMW_DEFAULTS,
            **COMMON_DEFAULTS,
            "distributed_mode": "replicate",
            **defaults,
        }
        for key, fallback in ADAMW_FALLBACK.items():
            if full[key] is None:
                source = self.adamw_inherits.get(key)
                full[key] = (
                    full[source]
                    if source is not None and opt.accepts(COMMON_CHECKS[key], key, full[source])
                    else fallback
                )
        if isinstance(full["adamw_betas"], (list, tuple)):  # anything else is refused as one value below
            full["adamw_betas"] = tuple(full["adamw_betas"])
        self._validate(full)
        #: process group that splits the work of plain (DDP) parameters; ``None`` = the default group
        self.process_group: Any = None
        #: skips decided on the device, added to ``state`` when it is next read (outside a step)
        self._pending_skips = PendingSkips()
        self._in_step = False
        super().__init__(params, full)

    # the per-parameter state: reading it outside a step first adds the skips that steps decided on the device
    @property
    def state(self) -> Any:
        state = self.__dict__["_state"]
        pending = getattr(self, "_pending_skips", None)
        if pending and not getattr(self, "_in_step", False):
            pending.flush(state)
        return state

    @state.setter
    def state(self, value: Any) -> None:
        self.__dict__["_state"] = value

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        if "state" in state:  # torch.optim sets it through __dict__, which the property above would shadow
            state["_state"] = state.pop("state")
        super().__setstate__(state)
        self.__dict__.setdefault("_pending_skips", PendingSkips())
        self.__dict__.setdefault("_in_step", False)

    @classmethod
    def constructor_option_names(cls) -> tuple[str, ...]:
        """Every keyword option the constructor accepts (``lr`` included), following ``**options`` of a
        subclass to its parent's constructor and ``**common`` to :class:`CommonOptions`."""
        names: list[str] = []
        for klass in cls.__mro__:
            init = vars(klass).get("__init__")
            if init is None:
                continue
            parameters = list(inspect.signature(init).parameters.values())
            names += [
                p.name
                for p in parameters
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in ("self", "params")
            ]
            var_keyword = [p for p in parameters if p.kind == p.VAR_KEYWORD]
            if not var_keyword:
                break
            if var_keyword[0].name == "common":
                names += list(CommonOptions.__annotations__)
                break
        return tuple(name for name in dict.fromkeys(names) if name not in cls.fixed_options)

    def set_distributed_mode(self, mode: str, process_group: Any = None) -> None:
        """Set ``distributed_mode`` (``"replicate"`` or ``"split"``) of every group and of the defaults.

        ``process_group`` splits the work of replicated (DDP) parameters; FSDP2 parameters use their
        device mesh. Call it before the first step: switching later leaves state on former owners.
        """
        opt.choice(*MODES)("distributed_mode", mode)
        self.defaults["distributed_mode"] = mode
        for group in self.param_groups:
            group["distributed_mode"] = mode
        self.process_group = process_group

    # -- construction ---------------------------------------------------------------------------
    def _validate(self, group: Mapping[str, Any]) -> None:
        # the optimizer's own options first: SOAP derives adamw_betas / adamw_eps from betas / eps, and a bad
        # value must be reported under the name the user passed
        opt.validate_group(group, {**self.option_checks, **COMMON_CHECKS})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Validate and route a group; ``params`` may be tensors or ``(name, tensor)`` pairs (``named_parameters``).

        Keller-style ``use_muon`` is read as ``use_matrix``; keys no option or ``torch.optim`` convention
        knows get a warning naming them; a ``use_matrix=None`` group is split by dimension
        (:func:`whiten.optim._routing.route_group`).
        """
        param_group = self._unalias(param_group)  # an older option name (Muon's ns_dtype -> matmul_dtype)
        known = {*self.defaults, *COMMON_CHECKS, *self.option_checks}
        for group in route_group(param_group, self.defaults, known, type(self).__name__):
            self._add_routed(group)

    def _unalias(self, group: dict[str, Any]) -> dict[str, Any]:
        """``group`` with its :attr:`option_aliases` renamed (checked under the alias's name first)."""
        aliased = [key for key in self.option_aliases if key in group]
        if not aliased:
            return group
        checks = {**COMMON_CHECKS, **self.option_checks}
        group = dict(group)
        for alias in aliased:
            target = self.option_aliases[alias]
            value = group.pop(alias)
            checks[target](alias, value)
            if target in group and group[target] != value:
                raise ValueError(
                    f"{alias}={value!r} (the older name of {target}) contradicts {target}={group[target]!r}"
                )
            group[target] = value
        return group

    def _add_routed(self, group: dict[str, Any]) -> None:
        self._validate({**self.defaults, **group})
        if group.get("use_matrix"):
            self._check_matrix_params(group["params"], {**self.defaults, **group})
        super().add_param_group(group)

    def _check_matrix_params(self, params: list[Tensor], group: Mapping[str, Any]) -> None:
        """Hook for subclasses that accept only some matrix shapes."""

    # -- stepping -------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> Any:
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._in_step = True
        try:
            self._step_groups()
        finally:
            self._in_step = False
        return loss

    def _step_groups(self) -> None:
        """Every group's step. A ``nonfinite="skip"`` group whose parameters all have state steps without reading
        anything back (:meth:`_masked_group_step`); the others (``"raise"``, initialisation steps, DTensors,
        the distributed stepper) read the gradient flags and leave out the parameters they refuse."""
        work = [(group, *self._gather(group)) for group in self.param_groups]
        for group, params, _grads, flags in work:
            if group["nonfinite"] != "raise" or not params:
                continue
            finite, overflow = flags.host()
            if not all(finite):
                bad = [group_label(group, p) for p, ok in zip(params, finite, strict=True) if not ok]
                raise FloatingPointError(
                    f"non-finite gradient for parameter(s) {bad}; no parameter or state was changed "
                    "(set nonfinite='skip' to skip such parameters and count them instead)"
                )
            if any(overflow):
                bad = [group_label(group, p) for p, over in zip(params, overflow, strict=True) if over]
                raise StatisticsFaultError(
                    f"gradient too large for AdamW's second moment (g^2 overflows) for parameter(s) {bad}; "
                    "no parameter or state was changed (set nonfinite='skip' to skip and count them instead)"
                )
        transaction = StepTransaction(self, group_label, self._pending_skips)
        # matrix groups first: they may fail (and under "raise" undo the call); AdamW groups were checked above
        for group, params, grads, flags in sorted(work, key=lambda w: not w[0]["use_matrix"]):
            if not params:
                continue
            # a single-process step never reaches the distributed code
            stepper = self._stepper(params) if group["use_matrix"] else None
            if (
                stepper is None
                and flags.on_device
                and group["nonfinite"] == "skip"
                and all(self._has_state(group, p) for p in params)
            ):
                self._masked_group_step(transaction, group, params, grads, flags)
                continue
            finite, overflow = flags.host()
            kept_params, kept_grads = [], []
            for p, g, ok, over in zip(params, grads, finite, overflow, strict=True):
                if ok and not over:
                    kept_params.append(p)
                    kept_grads.append(g)
                elif stepper is None or stepper.holds_state(self, group, p):  # split mode: only the owner counts
                    transaction.count(p, "nonfinite_skips" if not ok else "fault_skips")
            if not kept_params:
                continue
            if not group["use_matrix"]:
                self._adamw_step(group, kept_params, kept_grads)
            elif stepper is None:
                transaction.run(group, kept_params, kept_grads, self._matrix_step)
            else:  # under torch.distributed the step is not transactional (docs/shared_behaviour.md)
                stepper.matrix_step(self, group, kept_params, kept_grads)
        transaction.commit()  # the skip counters, once nothing can fail any more

    def _masked_group_step(
        self,
        transaction: StepTransaction,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        flags: GradientFlags,
    ) -> None:
        """The step of a ``"skip"`` group whose parameters have state, decided on the device (no host read).

        Matrix groups: :meth:`StepTransaction.run_masked` (every parameter steps, each one keeps its new values
        or its copies). AdamW groups: a parameter whose gradient is non-finite or too large for ``g^2`` is
        skipped inside the fused kernel (its ``found_inf``) and its step counter is not advanced.
        """
        finite = cast(Tensor, flags.finite)
        if group["use_matrix"]:
            if self.needs_exact_counts(group, params):  # a refresh is due: its schedule reads the step counters
                self._pending_skips.flush(self.__dict__["_state"])
            # a parameter with a non-finite gradient steps too (its result is discarded); where that makes a
            # decomposition fail (an eigh of a NaN matrix), the LinAlgError sends the group to the host path
            transaction.run_masked(group, params, grads, finite, self._matrix_step)
            return
        fits = cast(Tensor, flags.fits)
        self._adamw_step(group, params, grads, ok=finite & fits)
        transaction.count_masked(params, ~finite, finite & ~fits)

    def _has_state(self, group: Mapping[str, Any], param: Tensor) -> bool:
        """Whether ``param``'s step can be decided on the device: it has state beyond its skip counters (an
        AdamW parameter: moments and a step-count tensor on its device)."""
        state = self.__dict__["_state"].get(param)
        if not state:
            return False
        if group["use_matrix"]:
            return any(key not in SKIP_COUNTERS for key in state)
        step = state.get("step")
        return "exp_avg" in state and isinstance(step, Tensor) and step.device == param.device

    def needs_exact_counts(self, group: Mapping[str, Any], params: Sequence[Tensor]) -> bool:
        """Whether this step of ``group`` reads its int step counters for a decision (a refresh is due).

        A masked step (:meth:`StepTransaction.run_masked`) advances an int ``step`` on the host and a skip takes
        it back only when the counters are next read; a method whose schedule follows ``step`` says here on which
        steps it must be exact, and those steps read the pending skips first (one host sync, on a refresh step).
        """
        return False

    def pending_lag(self, params: Sequence[Tensor]) -> Tensor | None:
        """How far each parameter's int ``step`` is ahead of its committed steps (the skips of masked steps not yet
        read back), as a float64 vector on the first parameter's device; ``None`` when nothing is pending for
        them. A method whose arithmetic uses the step count (SOAP's bias corrections) corrects by it on the device.
        """
        counts = self._pending_skips.counts
        if not any(p in counts for p in params):
            return None
        device = params[0].device
        lags = [
            counts[p].sum().to(device) if p in counts else torch.zeros((), dtype=torch.int64, device=device)
            for p in params
        ]
        return torch.stack(lags).to(torch.float64)

    @staticmethod
    def _stepper(params: Sequence[Tensor]) -> DistributedStepper | None:
        """The registered distributed stepper when ``params`` need it, else ``None`` (single process)."""
        if not _distributed_in_use(params):
            return None
        if _distributed_stepper is None:
            raise RuntimeError(
                "torch.distributed is initialised or the parameters are DTensors, but no distributed stepper is "
                "registered; import whiten.optim (it registers whiten.optim.distributed)"
            )
        return _distributed_stepper

    def _gather(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor], GradientFlags]:
        """The group's parameters with a gradient, their gradients, and whether each is finite and (AdamW groups)
        whether its square fits AdamW's second moment, on the device (nothing is read back here)."""
        params, grads = [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise ValueError(f"{type(self).__name__} does not support sparse gradients ({group_label(group, p)})")
            params.append(p)
            grads.append(-p.grad if group["maximize"] else p.grad)
        if not grads:
            return params, grads, GradientFlags([])
        if any(is_sharded(g) for g in grads):  # the verdict must be global: the stepper reduces it over ranks
            stepper = self._stepper(grads)
            assert stepper is not None  # DTensors always need it
            return params, grads, GradientFlags(stepper.finite_flags(grads))
        # one flag per gradient, one stack for the whole group
        finite = local_finite(grads)
        if group["use_matrix"]:
            return params, grads, GradientFlags(finite)
        # AdamW keeps g^2: a finite gradient above sqrt(max) of the statistics dtype would make it inf
        return params, grads, GradientFlags(finite, square_fits(grads, stat_dtype))

    def _adamw_step(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], ok: Tensor | None = None
    ) -> None:
        adamw_foreach_(
            params,
            grads,
            [self.state[p] for p in params],
            lr=group["lr"],
            betas=group["betas"],
            eps=group["adamw_eps"],
            weight_decay=group["weight_decay"],
            stat_dtype=stat_dtype,
            ok=ok,
        )

    @abstractmethod
    def _matrix_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        """Update the whole matrices ``params`` in place from ``grads``; state in ``self.state[p]``."""

    @abstractmethod
    def matrix_flops(self, shape: Sequence[int], group: Mapping[str, Any]) -> FlopCount:
        """FLOPs of one step of a matrix parameter of ``shape`` in ``group`` (refreshes amortised).

        Declared by each method next to its math from the kernels' counts (:mod:`whiten.linalg.flops`);
        the matmul part equals what ``torch.utils.flop_counter`` measures over a step (``tests/test_flops.py``).
        The owner assignment of ``whiten.optim.distributed`` and ``benchmarks/step_flops.py`` use it.
        """

    # -- accounting and checkpoints ------------------------------------------------------------
    @staticmethod
    def infinite_state_ok(key: str) -> bool:
        """Whether ``+inf`` is a deliberate value of state entry ``key`` (never, unless a subclass says so)."""
        return False

    def nonfinite_skips(self) -> int:
        """Total number of (parameter, step) updates skipped for a non-finite gradient."""
        return sum(int(s.get("nonfinite_skips", 0)) for s in self.state.values())

    def fault_skips(self) -> int:
        """Total number of (parameter, step) updates skipped for a failed decomposition or non-finite statistics
        (:mod:`whiten.optim._transaction`)."""
        return sum(int(s.get("fault_skips", 0)) for s in self.state.values())

    def state_bytes(self) -> int:
        """Exact bytes held in optimizer state tensors (the number the benchmark reports); a step counter (AdamW's
        is a 0-d tensor, so that it advances on the device) is a counter, not state memory, and is not counted."""
        total = 0
        for state in self.state.values():
            for key, value in state.items():
                if isinstance(value, Tensor) and key != "step":
                    local = local_tensor(value)  # this rank's shard
                    total += local.numel() * local.element_size()
        return total

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Optimizer.state_dict``, with compact copies of state entries that are views of a stacked
        batch (:mod:`whiten.optim._stacking`), so that a saved entry never drags its whole batch along."""
        state_dict = super().state_dict()
        state_dict["state"] = compact_state(state_dict["state"])
        return state_dict

    def _check_saved_state(self, state_dict: Mapping[str, Any]) -> None:
        """Hook: refuse a state dict whose per-parameter state this optimizer cannot step (before loading it)."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._check_saved_state(state_dict)
        self._pending_skips.discard()  # skips of the state being replaced
        # keep the saved tensors: PyTorch would cast floating state to the parameter dtype
        saved = {
            index: {k: v for k, v in entry.items() if isinstance(v, Tensor) and v.is_floating_point()}
            for index, entry in state_dict["state"].items()
        }
        # distributed_mode belongs to this run (how its ranks share the work, and so where state lives),
        # not to the algorithm: keep it rather than the saving run's
        modes = [group["distributed_mode"] for group in self.param_groups]
        # so does the routing (use_matrix): a torch.optim state dict has none, and its other options have
        # other meanings; such groups keep this optimizer's options (lr and unknown keys come from the dict)
        own_groups = [dict(group) for group in self.param_groups]
        foreign = [_interop.is_foreign_group(group) for group in state_dict["param_groups"]]
        super().load_state_dict(state_dict)
        _interop.adopt_foreign_groups(self.param_groups, own_groups, foreign)
        for group, own, mode in zip(self.param_groups, own_groups, modes, strict=True):
            resolved = self._unalias(group)  # an old spelling in the checkpoint (Muon's ns_dtype -> matmul_dtype)
            if resolved is not group:
                group.clear()
                group.update(resolved)
            group["distributed_mode"] = mode
            group["use_matrix"] = own["use_matrix"]
            if not group["use_matrix"] and "betas" not in group:  # a checkpoint from before AdamW groups had betas
                group["betas"] = tuple(group.get("adamw_betas", own.get("betas", self.defaults["adamw_betas"])))
        dropped = []
        for group, is_foreign in zip(self.param_groups, foreign, strict=True):
            if is_foreign:
                dropped += _interop.adopt_foreign_state(self.state, group, self.foreign_matrix_state, stat_dtype)
        _interop.warn_dropped(type(self).__name__, dropped)
        # a checkpoint written before an option existed lacks its key: take this optimizer's default for it,
        # then check the loaded groups as a constructor would (a bad value must not reach a step)
        options = {**COMMON_CHECKS, **self.option_checks}
        for group in self.param_groups:
            for key, value in self.defaults.items():
                if key in options:
                    group.setdefault(key, value)
            self._validate(group)
        # saved ids are indices, or parameter names when the dict comes from torch.distributed.checkpoint
        saved_ids = [key for group in state_dict["param_groups"] for key in group["params"]]
        params = dict(zip(saved_ids, (p for group in self.param_groups for p in group["params"]), strict=False))
        for key_id, tensors in saved.items():
            param = params.get(key_id)
            state = self.state.get(param) if param is not None else None
            if param is None or state is None:
                continue
            for key, value in tensors.items():
                if isinstance(state.get(key), Tensor) and state[key].dtype != value.dtype:
                    state[key] = value.to(device=param.device, copy=True)
            step = state.get("step")
            if isinstance(step, Tensor) and step.device != param.device:  # AdamW's count lives with its parameter
                state["step"] = step.to(device=param.device, copy=True)


class PhasedOptimizer(WhitenOptimizer):
    """The step protocol of a method whose matrix step is elementwise -> whole-matrix -> elementwise.

    A step of a matrix group is ``_apply_phase(_map_phase(_direction_phase(G)))``, composed once by
    :meth:`_matrix_step` (final). The phases:

    * :meth:`_direction_phase` (elementwise, per parameter): momentum and counters; returns one
      :class:`MapInput` per parameter. Runs unchanged on whole tensors, local shards or DTensors.
    * :meth:`_map_phase` (whole matrix): the matrix function and the whole-matrix statistics; returns
      one update per parameter, shaped like it and no wider in dtype than its inputs. ``params`` only
      key the state.
    * :meth:`_apply_phase` (elementwise): decay and update of the parameters.

    The state entries named in ``elementwise_state`` belong to the elementwise phases (under FSDP2 they
    are DTensors sharded like the parameter, on every rank); all other state is the map's, whole, on
    the rank(s) that run it. ``map_inputs``: tensors per :class:`MapInput` after the first step (the
    traffic model of ``whiten.optim.distributed``). A class whose groups are phased only under some
    options says so in :meth:`phased_group` and steps the other groups in :meth:`_unphased_step`.
    """

    #: state keys owned by the elementwise phases (each concrete class must declare them)
    elementwise_state: ClassVar[tuple[str, ...]]
    #: tensors per map input (1: Muon's ``U``; 2: KL-Shampoo's ``(M, G)``)
    map_inputs: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "_matrix_step" in vars(cls):
            raise TypeError(f"{cls.__name__} overrides _matrix_step; a PhasedOptimizer implements the three phases")
        if not isinstance(getattr(cls, "elementwise_state", None), tuple):
            raise TypeError(f"{cls.__name__} must declare elementwise_state: a tuple of state keys")

    @abstractmethod
    def _direction_phase(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> list[MapInput]:
        """Elementwise: update the elementwise state, return what the map needs per parameter."""

    @abstractmethod
    def _map_phase(self, group: dict[str, Any], params: list[Tensor], inputs: list[MapInput]) -> list[Tensor]:
        """Whole-matrix: the update of every parameter from its whole :class:`MapInput`."""

    @abstractmethod
    def _apply_phase(self, group: dict[str, Any], params: list[Tensor], updates: list[Tensor]) -> None:
        """Elementwise: apply ``updates`` (laid out like ``params``) with the decay."""

    def phased_group(self, group: Mapping[str, Any]) -> bool:
        """Whether ``group`` runs as the three phases (default: every group)."""
        return True

    def _unphased_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        """The matrix step of a group that :meth:`phased_group` does not phase."""
        raise NotImplementedError(f"{type(self).__name__} phases every group; phased_group returned False")

    @final
    def _matrix_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        if not self.phased_group(group):
            self._unphased_step(group, params, grads)
            return
        inputs = self._direction_phase(group, params, grads)
        self._apply_phase(group, params, self._map_phase(group, params, inputs))
