"""The benchmark's optimizer registry: names, lazy imports, default learning rates, construction.

Every optimizer sees the same split (:func:`whiten.split_parameters`): hidden matrices get the
named method at its own lr and the weight decay; embeddings, output head, gains and biases get
AdamW with betas ``(0.9, 0.95)``, lr ``embed_lr`` and no decay. For the matrix methods that AdamW
is their built-in one (:func:`whiten.param_groups`); the ``adamw`` baseline is
``torch.optim.AdamW`` with the same two groups. So only the optimizer of the hidden matrices
differs between runs, and the lr being compared (and swept) is that of the hidden matrices.

Classes are looked up on the ``whiten`` package root when an optimizer is requested, so an
optimizer that has not been written yet is reported as unavailable instead of breaking the CLI.

Default learning rates come from ``whiten sweep`` on the ``default`` preset (docs/bench.md).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

ADAMW_BETAS = (0.9, 0.95)
_MODULES = {
    "SOAP": "whiten.optim.soap",
    "REKLS": "whiten.optim.soap",
    "KLShampoo": "whiten.optim.kl_shampoo",
    "KLSOAP": "whiten.optim.kl_shampoo",
    "ProKLShampoo": "whiten.optim.pro_kl_shampoo",
}


@dataclass(frozen=True)
class OptimizerSpec:
    """How the benchmark builds one named optimizer."""

    name: str
    class_name: str  # attribute of the ``whiten`` package (or "AdamW" for torch.optim.AdamW)
    default_lr: float
    description: str
    options: dict[str, Any] = field(default_factory=dict)  # constructor keywords beyond lr / weight_decay

    @property
    def is_matrix_method(self) -> bool:
        return self.class_name != "AdamW"


# lr defaults: best final validation loss of the lr sweep recorded in docs/bench.md (default preset,
# 1 seed); rekls and klsoap were not swept
_SPECS = [
    OptimizerSpec("adamw", "AdamW", 1e-3, "torch.optim.AdamW (the baseline)"),
    OptimizerSpec("muon", "Muon", 4e-2, "Muon: Newton-Schulz orthogonalised Nesterov momentum"),
    OptimizerSpec("htmuon", "HTMuon", 1.2e-1, "HTMuon: singular values mapped to s^0.125 (SVD)"),
    OptimizerSpec("soap", "SOAP", 1e-2, "SOAP: Adam in Shampoo's eigenbasis"),
    OptimizerSpec("rekls", "REKLS", 1e-2, "REKLS: KL-SOAP with a full eigh every step (lr not swept)"),
    OptimizerSpec("kl-shampoo", "KLShampoo", 3e-2, "KL-Shampoo (full left and right factors)"),
    OptimizerSpec("klsoap", "KLSOAP", 1e-2, "KL-SOAP: Adam in KL-Shampoo's eigenbasis (lr not swept)"),
]
_PRO_KLS_RANKS = (8, 16, 32, 64)
# best lr per rank on the default preset: with complement_scale="sqrt_m" the lr that suits the
# tracked subspace grows with the rank (at rank >= n a matrix is plain KL-Shampoo, best at 3e-2)
_PRO_KLS_RANK_LRS = ((16, 3e-3), (32, 1e-2), (64, 3e-2))


def _pro_kls_default_lr(rank: int) -> float:
    """Swept lr of the nearest swept rank at or above ``rank`` (the largest one beyond)."""
    for swept_rank, lr in _PRO_KLS_RANK_LRS:
        if rank <= swept_rank:
            return lr
    return _PRO_KLS_RANK_LRS[-1][1]


_PRO_KLS_PATTERN = re.compile(r"pro-kls-r(\d+)$")


def _pro_kls_spec(name: str, rank: int) -> OptimizerSpec:
    return OptimizerSpec(
        name,
        "ProKLShampoo",
        _pro_kls_default_lr(rank),
        f"Pro-KLShampoo, tracked subspace rank {rank}",
        {"rank": rank},
    )


def known_names() -> list[str]:
    """Names ``--optimizers`` accepts (any ``pro-kls-rN`` with N >= 1 is accepted too)."""
    return [s.name for s in _SPECS] + [f"pro-kls-r{r}" for r in _PRO_KLS_RANKS]


def get_spec(name: str) -> OptimizerSpec:
    for spec in _SPECS:
        if spec.name == name:
            return spec
    match = _PRO_KLS_PATTERN.match(name)
    if match and int(match.group(1)) >= 1:
        return _pro_kls_spec(name, int(match.group(1)))
    raise ValueError(f"unknown optimizer {name!r}; `whiten bench --list` shows the accepted names")


def optimizer_class(spec: OptimizerSpec) -> type[torch.optim.Optimizer]:
    """The class behind ``spec``; raises ``ImportError`` with the reason when it is unavailable."""
    if spec.class_name == "AdamW":
        return torch.optim.AdamW
    # the package root first; the defining module while an optimizer is not exported there yet
    for module_name in ("whiten", "whiten.optim", _MODULES.get(spec.class_name)):
        if module_name is None:
            continue
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        cls = getattr(module, spec.class_name, None)
        if cls is not None:
            return cls
    raise ImportError(f"whiten.{spec.class_name} does not exist (yet) in this checkout")


def availability() -> dict[str, str | None]:
    """``{name: None if available else the reason}`` for every listed name."""
    out: dict[str, str | None] = {}
    for name in known_names():
        try:
            optimizer_class(get_spec(name))
            out[name] = None
        except ImportError as err:
            out[name] = str(err)
    return out


def build_optimizer(
    spec: OptimizerSpec,
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    embed_lr: float,
    extra_options: dict[str, Any] | None = None,
) -> torch.optim.Optimizer:
    """Construct the optimizer for ``model``; ``embed_lr`` is the lr of the AdamW half."""
    cls = optimizer_class(spec)
    options = {**spec.options, **(extra_options or {})}
    if not spec.is_matrix_method:
        from whiten import split_parameters

        # the same split as the matrix methods: only the optimizer of the hidden matrices differs
        matrix, rest = split_parameters(model, embeddings_and_head="adamw")
        groups = [
            {"params": [p for _, p in matrix], "lr": lr, "weight_decay": weight_decay},
            {"params": [p for _, p in rest], "lr": embed_lr, "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        return cls(groups, lr=lr, betas=ADAMW_BETAS, eps=1e-8, **options)
    from whiten import param_groups

    groups = param_groups(model, embeddings_and_head="adamw", adamw_options={"lr": embed_lr, "weight_decay": 0.0})
    return cls(groups, lr=lr, weight_decay=weight_decay, adamw_betas=ADAMW_BETAS, **options)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Exact bytes of every tensor held in optimizer state (``state_bytes()`` where provided)."""
    method: Callable[[], int] | None = getattr(optimizer, "state_bytes", None)
    if callable(method):
        return int(method())
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, Tensor):
                total += value.numel() * value.element_size()
    return total
