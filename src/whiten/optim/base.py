"""Shared machinery of every ``whiten`` optimizer (SPEC §6).

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
  ``"raise"`` raises ``FloatingPointError`` before any parameter or state is modified;
* restores state dtypes on ``load_state_dict`` (PyTorch casts floating state to the parameter
  dtype, which would silently drop fp32 statistics of bf16 weights to bf16);
* runs under ``torch.distributed`` (DDP, FSDP2 DTensor parameters) with the option
  ``distributed_mode``: ``"replicate"`` (default) or ``"split"`` (each matrix stepped by one
  owner rank); the mechanism lives in :mod:`whiten.optim.distributed`, see ``docs/distributed.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from whiten.optim import _options as opt
from whiten.optim import distributed
from whiten.optim._adamw import adamw_foreach_

COMMON_CHECKS: dict[str, opt.Check] = {
    "lr": opt.nonneg,
    "weight_decay": opt.nonneg,
    "use_matrix": opt.optional(opt.boolean),
    "adamw_lr": opt.optional(opt.nonneg),
    "adamw_betas": opt.beta_pair,
    "adamw_eps": opt.nonneg,
    "adamw_weight_decay": opt.nonneg,
    "maximize": opt.boolean,
    "nonfinite": opt.choice("skip", "raise"),
    "distributed_mode": opt.choice(*distributed.MODES),
}


def stat_dtype(param: Tensor) -> torch.dtype:
    """Statistics dtype for a parameter: fp64 for fp64 weights, fp32 otherwise."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def as_matrix(t: Tensor) -> Tensor:
    """View a parameter as a matrix: conv weights ``(out, in, kh, kw)`` -> ``(out, in*kh*kw)``."""
    return t if t.ndim == 2 else t.reshape(t.shape[0], -1)


class WhitenOptimizer(Optimizer):
    """Base class: parameter routing, option validation, AdamW fallback, non-finite policy.

    Subclasses set ``option_checks`` and implement :meth:`_matrix_step`. A subclass whose step splits
    into elementwise and whole-matrix parts may also provide the three phases of
    :func:`whiten.optim.distributed.is_phased`, so that FSDP2 keeps its elementwise state sharded.
    """

    option_checks: ClassVar[Mapping[str, opt.Check]] = {}

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], defaults: dict[str, Any]) -> None:
        full = {
            "use_matrix": None,
            "adamw_lr": None,
            "adamw_betas": (0.9, 0.95),
            "adamw_eps": 1e-8,
            "adamw_weight_decay": 0.0,
            "maximize": False,
            "nonfinite": "skip",
            "distributed_mode": "replicate",
            **defaults,
        }
        self._validate(full)
        #: process group that splits the work of plain (DDP) parameters; ``None`` = the default group
        self.process_group: Any = None
        super().__init__(params, full)

    def set_distributed_mode(self, mode: str, process_group: Any = None) -> None:
        """Set ``distributed_mode`` (``"replicate"`` or ``"split"``) of every group and of the defaults.

        ``process_group`` splits the work of replicated (DDP) parameters; FSDP2 parameters use their
        device mesh. Call it before the first step: switching later leaves state on former owners.
        """
        opt.choice(*distributed.MODES)("distributed_mode", mode)
        self.defaults["distributed_mode"] = mode
        for group in self.param_groups:
            group["distributed_mode"] = mode
        self.process_group = process_group

    # -- construction ---------------------------------------------------------------------------
    def _validate(self, group: Mapping[str, Any]) -> None:
        opt.validate_group(group, {**COMMON_CHECKS, **self.option_checks})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Validate and route a group; ``params`` may be tensors or ``(name, tensor)`` pairs (``named_parameters``)."""
        params = param_group["params"]
        if isinstance(params, set):
            raise TypeError("optimizer params must be an ordered collection (a list), not a set")
        params = [params] if isinstance(params, Tensor) else list(params)
        names: list[str] | None = None
        if any(isinstance(p, tuple) for p in params):
            if not all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[1], Tensor) for p in params):
                raise TypeError(
                    "optimizer params must be all tensors or all (name, tensor) pairs as model.named_parameters() gives"
                )
            names = [str(name) for name, _ in params]
            params = [p for _, p in params]
            param_group = {**param_group, "param_names": names}
        for p in params:
            if not isinstance(p, Tensor):
                raise TypeError(f"optimizer params must be Tensors, got {type(p).__name__}")
            if p.is_sparse or p.layout != torch.strided:
                raise ValueError(
                    f"{type(self).__name__} does not support sparse parameters (shape {tuple(p.shape)}); "
                    "use torch.optim.SparseAdam for sparse embeddings"
                )
            if p.is_complex():
                raise ValueError(
                    f"{type(self).__name__} does not support complex parameters (shape {tuple(p.shape)}); "
                    "pass torch.view_as_real(p) as a real parameter instead"
                )
            if not p.is_floating_point():
                raise ValueError(f"parameters must be floating point, got {p.dtype}")
        merged = {**self.defaults, **param_group}
        use_matrix = merged["use_matrix"]
        if use_matrix is None:
            is_matrix = [p.ndim >= 2 for p in params]
            matrices = [p for p, ok in zip(params, is_matrix, strict=True) if ok]
            others = [p for p, ok in zip(params, is_matrix, strict=True) if not ok]

            def named(flag: bool) -> dict[str, Any]:
                if names is None:
                    return {}
                return {"param_names": [n for n, ok in zip(names, is_matrix, strict=True) if ok == flag]}

            if matrices:
                self._add_routed({**param_group, "params": matrices, "use_matrix": True, **named(True)})
            if others:
                adamw_lr = merged["adamw_lr"] if merged["adamw_lr"] is not None else merged["lr"]
                self._add_routed(
                    {
                        **param_group,
                        **named(False),
                        "params": others,
                        "use_matrix": False,
                        "lr": adamw_lr,
                        "weight_decay": merged["adamw_weight_decay"],
                    }
                )
            if not params:
                self._add_routed({**param_group, "params": [], "use_matrix": True})
            return
        if not use_matrix:
            # an explicit AdamW group takes the AdamW options unless it sets lr / weight_decay itself
            param_group = {
                "lr": merged["adamw_lr"] if merged["adamw_lr"] is not None else merged["lr"],
                "weight_decay": merged["adamw_weight_decay"],
                **param_group,
            }
        else:
            for p in params:
                if p.ndim < 2:
                    raise ValueError(
                        f"use_matrix=True needs parameters with >= 2 dims, got shape {tuple(p.shape)}; "
                        "put vectors and scalars in a group with use_matrix=False (AdamW) or leave use_matrix=None"
                    )
        self._add_routed({**param_group, "params": params})

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
        work = [(group, *self._gather(group)) for group in self.param_groups]
        for group, params, _grads, finite in work:
            if group["nonfinite"] == "raise" and not all(finite):
                bad = [tuple(p.shape) for p, ok in zip(params, finite, strict=True) if not ok]
                raise FloatingPointError(
                    f"non-finite gradient for parameter(s) of shape {bad}; no parameter or state was changed "
                    "(set nonfinite='skip' to skip such parameters and count them instead)"
                )
        for group, params, grads, finite in work:
            kept_params, kept_grads = [], []
            for p, g, ok in zip(params, grads, finite, strict=True):
                if ok:
                    kept_params.append(p)
                    kept_grads.append(g)
                elif distributed.holds_state(self, group, p):  # split mode: only the owner counts
                    state = self.state[p]
                    state["nonfinite_skips"] = state.get("nonfinite_skips", 0) + 1
            if not kept_params:
                continue
            if group["use_matrix"]:
                distributed.matrix_step(self, group, kept_params, kept_grads)
            else:
                self._adamw_step(group, kept_params, kept_grads)
        return loss

    def _gather(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor], list[bool]]:
        params, grads = [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise ValueError(f"{type(self).__name__} does not support sparse gradients (shape {tuple(p.shape)})")
            params.append(p)
            grads.append(-p.grad if group["maximize"] else p.grad)
        if not grads:
            return params, grads, []
        if any(distributed.is_sharded(g) for g in grads):
            return params, grads, distributed.finite_flags(grads)
        # one reduction and one host sync for the whole group instead of one per parameter
        device = grads[0].device
        norms = torch.stack(
            [torch.linalg.vector_norm(g.detach(), dtype=stat_dtype(g)).to(device, torch.float64) for g in grads]
        )
        finite = torch.isfinite(norms).tolist()
        return params, grads, finite

    def _adamw_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        adamw_foreach_(
            params,
            grads,
            [self.state[p] for p in params],
            lr=group["lr"],
            betas=group["adamw_betas"],
            eps=group["adamw_eps"],
            weight_decay=group["weight_decay"],
            stat_dtype=stat_dtype,
        )

    def _matrix_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        raise NotImplementedError

    # -- accounting and checkpoints ------------------------------------------------------------
    def nonfinite_skips(self) -> int:
        """Total number of (parameter, step) updates skipped for a non-finite gradient."""
        return sum(int(s.get("nonfinite_skips", 0)) for s in self.state.values())

    def state_bytes(self) -> int:
        """Exact bytes held in optimizer state tensors (the number the benchmark reports)."""
        total = 0
        for state in self.state.values():
            for value in state.values():
                if isinstance(value, Tensor):
                    local = value.to_local() if distributed.is_sharded(value) else value  # this rank's shard
                    total += local.numel() * local.element_size()
        return total

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # keep the saved tensors: PyTorch would cast floating state to the parameter dtype
        saved = {
            index: {k: v for k, v in entry.items() if isinstance(v, Tensor) and v.is_floating_point()}
            for index, entry in state_dict["state"].items()
        }
        # distributed_mode belongs to this run (how its ranks share the work, and so where state lives),
        # not to the algorithm: keep it rather than the saving run's
        modes = [group["distributed_mode"] for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, mode in zip(self.param_groups, modes, strict=True):
            group["distributed_mode"] = mode
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
            if state is None:
                continue
            for key, value in tensors.items():
                if isinstance(state.get(key), Tensor) and state[key].dtype != value.dtype:
                    state[key] = value.to(device=param.device, copy=True)
