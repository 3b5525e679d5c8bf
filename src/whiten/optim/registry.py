"""Every optimizer by name: class, default learning rate, fixed options, what the diagnostics read.

One table serves every consumer: ``whiten bench`` / ``whiten sweep`` (names, default lrs,
construction), ``whiten diagnose spike`` (which eigenbases it records, which of its knobs a class
takes) and ``benchmarks/step_bench.py`` (the ``whiten`` rows). A name is spelt one way everywhere
(``kl-shampoo``, ``pro-kls-r16``, ...); an old spelling is refused with the right one suggested.

Options. :meth:`OptimizerSpec.check_options` refuses an option the class's constructor does not
take (naming the optimizer, the option and the valid ones), an option the consumer sets itself
(``lr``, ``weight_decay``, ...; the message says which flag sets it) and an option the name fixes
(``pro-kls-r16.rank``), then constructs the optimizer once on a ``2 x 2`` parameter so that the
class's own validation of the values runs before any work starts. Nothing is dropped silently.

Default learning rates: best final validation loss of the ``whiten sweep`` on the ``default``
preset recorded in ``docs/bench.md`` (1 seed); ``rekls``, ``soap-kl`` and ``klsoap`` were not swept.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from whiten.optim.base import WhitenOptimizer
from whiten.optim.kl_shampoo import KLSOAP, KLShampoo
from whiten.optim.muon import HTMuon, Muon
from whiten.optim.pro_kl_shampoo import ProKLShampoo
from whiten.optim.soap import REKLS, SOAP


@dataclass(frozen=True)
class OptimizerSpec:
    """One named optimizer: how to build it and what the diagnostics read from its state."""

    name: str
    cls: type[torch.optim.Optimizer]
    default_lr: float
    description: str
    options: Mapping[str, Any] = field(default_factory=dict)  # constructor keywords the name fixes
    bases: tuple[str, ...] = ()  # state keys of the orthonormal eigenbases ``diagnose spike`` records
    factors: tuple[str, ...] = ()  # state keys of the Kronecker factors ``diagnose spectra`` reads
    kl_init: bool = False  # takes ``kl_init="safe"|"peer"`` (SOAP, REKLS)
    own_precision: bool = False  # takes ``fp32_matmul_prec`` (sets the matmul precision of its own blocks)

    @property
    def is_matrix_method(self) -> bool:
        """A whiten optimizer (hidden matrices get the method, the rest its built-in AdamW)."""
        return self.cls is not torch.optim.AdamW

    def option_names(self) -> tuple[str, ...]:
        """Keyword options of the constructor (``params`` excluded)."""
        if issubclass(self.cls, WhitenOptimizer):
            return self.cls.constructor_option_names()
        params = inspect.signature(self.cls.__init__).parameters.values()
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return tuple(p.name for p in params if p.kind in kinds and p.name not in ("self", "params"))

    def check_options(self, options: Mapping[str, Any], set_by: Mapping[str, str] | None = None) -> None:
        """Raise ``ValueError`` for an unknown, consumer-set or name-fixed option, or a bad value.

        ``set_by`` maps the options the consumer passes itself to how a user sets them
        (e.g. ``{"lr": "--lr NAME=VALUE"}``).
        """
        valid = self.option_names()
        for key in options:
            if key in self.options:
                raise ValueError(
                    f"optimizer {self.name!r}: option {key!r} is fixed by the name ({key}={self.options[key]!r})"
                    + ("; name the rank instead, e.g. pro-kls-r32" if key == "rank" else "")
                )
            if set_by and key in set_by:
                raise ValueError(f"optimizer {self.name!r}: option {key!r} is set by {set_by[key]}, not as an option")
            if key not in valid and key in getattr(self.cls, "fixed_options", ()):
                continue  # the constructor below says which value the class fixes
            if key not in valid:
                raise ValueError(
                    f"optimizer {self.name!r} ({self.cls.__name__}) has no option {key!r}; "
                    f"valid options: {', '.join(k for k in valid if k not in self.options)}"
                )
        try:  # the class validates the values (one place); a 2 x 2 parameter costs nothing
            self.build([torch.nn.Parameter(torch.zeros(2, 2))], lr=self.default_lr, **options)
        except (TypeError, ValueError) as err:
            raise ValueError(f"optimizer {self.name!r}: {err}") from None

    def build(self, params: Iterable[Any], **kwargs: Any) -> torch.optim.Optimizer:
        """``cls(params, **options, **kwargs)``; an option the class does not take raises ``TypeError``."""
        return self.cls(params, **{**self.options, **kwargs})


_KL_FACTORS = ("L", "R")
# SOAP's family (SOAP, REKLS): one eigenbasis and two factors, both KL inits, its own matmul precision
_SOAP_FAMILY: dict[str, Any] = {"bases": ("Q_L",), "factors": _KL_FACTORS, "kl_init": True, "own_precision": True}
_SPECS = (
    OptimizerSpec("adamw", torch.optim.AdamW, 1e-3, "torch.optim.AdamW (the baseline)"),
    OptimizerSpec("muon", Muon, 4e-2, "Muon: Newton-Schulz orthogonalised Nesterov momentum"),
    OptimizerSpec("htmuon", HTMuon, 1.2e-1, "HTMuon: singular values mapped to s^0.125 (SVD)"),
    OptimizerSpec(
        "soap",
        SOAP,
        1e-2,
        "SOAP: Adam in Shampoo's eigenbasis",
        **_SOAP_FAMILY,
    ),
    OptimizerSpec(
        "soap-kl",
        SOAP,
        1e-2,
        "SOAP with KL-Shampoo factor statistics (use_kl_shampoo=True), QR refresh (lr not swept)",
        {"use_kl_shampoo": True},
        **_SOAP_FAMILY,
    ),
    OptimizerSpec(
        "rekls",
        REKLS,
        1e-2,
        "REKLS: KL-SOAP with a full eigh every step (lr not swept)",
        **_SOAP_FAMILY,
    ),
    OptimizerSpec(
        "kl-shampoo",
        KLShampoo,
        1e-2,  # with betas (0.95, 0.95) and init_factor "grad_rms" (docs/kl_shampoo.md); 3e-2 before
        "KL-Shampoo (full left and right factors)",
        bases=("Q_L",),
        factors=_KL_FACTORS,
    ),
    OptimizerSpec(
        "klsoap",
        KLSOAP,
        1e-2,
        "KL-SOAP: Adam in KL-Shampoo's eigenbasis (lr not swept)",
        bases=("Q_L",),
        factors=_KL_FACTORS,
    ),
)
PRO_KLS_RANKS = (8, 16, 32, 64)  # listed by `whiten bench --list`; any rank N >= 1 is accepted
# best lr per rank on the default preset: with complement_scale="sqrt_m" the lr that suits the
# tracked subspace grows with the rank (at rank >= n a matrix is plain KL-Shampoo, best at 3e-2)
_PRO_KLS_RANK_LRS = ((16, 3e-3), (32, 1e-2), (64, 3e-2))
_PRO_KLS_PATTERN = re.compile(r"pro-kls-r(\d+)$")
# spellings used before the names were unified, and what they are now
OLD_SPELLINGS = {
    "klshampoo": "kl-shampoo",
    "kl_shampoo": "kl-shampoo",
    "proklshampoo": "pro-kls-r16",
    "pro-klshampoo": "pro-kls-r16",
    "kl-soap": "klsoap",
}


def _pro_kls_default_lr(rank: int) -> float:
    """Swept lr of the nearest swept rank at or above ``rank`` (the largest one beyond)."""
    for swept_rank, lr in _PRO_KLS_RANK_LRS:
        if rank <= swept_rank:
            return lr
    return _PRO_KLS_RANK_LRS[-1][1]


def _pro_kls_spec(rank: int) -> OptimizerSpec:
    return OptimizerSpec(
        f"pro-kls-r{rank}",
        ProKLShampoo,
        _pro_kls_default_lr(rank),
        f"Pro-KLShampoo, tracked subspace rank {rank}",
        {"rank": rank},
        bases=("Q_L", "U"),
        factors=("L", "U", "Lam", "sigma"),
    )


def names() -> list[str]:
    """The listed names (any ``pro-kls-rN`` with N >= 1 is accepted too)."""
    return [s.name for s in _SPECS] + [f"pro-kls-r{r}" for r in PRO_KLS_RANKS]


def get(name: str) -> OptimizerSpec:
    """The spec of ``name``; ``ValueError`` naming the right spelling for an old or mistyped one."""
    for spec in _SPECS:
        if spec.name == name:
            return spec
    match = _PRO_KLS_PATTERN.match(name)
    if match and int(match.group(1)) >= 1:
        return _pro_kls_spec(int(match.group(1)))
    if name in OLD_SPELLINGS:
        hint = f"; it is spelt {OLD_SPELLINGS[name]!r} now"
        if OLD_SPELLINGS[name].startswith("pro-kls-r"):
            hint += " (pro-kls-rN: Pro-KLShampoo at rank N)"
    else:
        close = difflib.get_close_matches(name, names(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown optimizer {name!r}{hint} (known: {', '.join(names())}, pro-kls-rN)")


def parse_option(text: str) -> tuple[str, str, Any]:
    """``"pro-kls-r32.complement_scale=kl_norm"`` -> ``("pro-kls-r32", "complement_scale", "kl_norm")``.

    The value is a Python literal (``1e-3``, ``True``, ``(0.9, 0.99)``); a bare word is a string.
    """
    target, sep, value = text.partition("=")
    name, dot, key = target.partition(".")
    if not sep or not dot or not name or not key:
        raise ValueError(f"--option expects OPTIMIZER.KEY=VALUE, got {text!r}")
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
    return name, key, parsed


def parse_options(items: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Repeated ``--option NAME.KEY=VALUE`` -> ``{name: {key: value}}`` (names and keys checked later)."""
    options: dict[str, dict[str, Any]] = {}
    for item in items:
        name, key, value = parse_option(item)
        options.setdefault(name, {})[key] = value
    return options
