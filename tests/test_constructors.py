"""One constructor convention: keyword-only after ``lr``, the same built-in AdamW defaults in every class."""

from __future__ import annotations

import inspect

import pytest
import torch

from whiten.optim import KLSOAP, REKLS, SOAP, HTMuon, KLShampoo, Muon, ProKLShampoo
from whiten.optim._options import ADAMW_DEFAULTS

CLASSES = [Muon, HTMuon, SOAP, REKLS, KLShampoo, KLSOAP, ProKLShampoo]


@pytest.mark.parametrize("cls", CLASSES)
def test_everything_after_lr_is_keyword_only(cls: type) -> None:
    parameters = list(inspect.signature(cls.__init__).parameters.values())
    assert [p.name for p in parameters[:3]] == ["self", "params", "lr"]
    assert all(p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD) for p in parameters[3:])
    with pytest.raises(TypeError):
        cls([torch.zeros(2, 2, requires_grad=True)], 0.01, 0.5)


@pytest.mark.parametrize("cls", CLASSES)
def test_adamw_defaults_are_shared(cls: type) -> None:
    """The shared options come in ``**common`` (base.CommonOptions) with the base's defaults; a typo is an error."""
    assert "adamw_lr" not in inspect.signature(cls.__init__).parameters
    group = cls([torch.zeros(2, 2, requires_grad=True)], lr=0.01).defaults
    assert group["adamw_weight_decay"] == ADAMW_DEFAULTS["adamw_weight_decay"] and group["nonfinite"] == "skip"
    with pytest.raises(TypeError, match="adamw_lrr"):
        cls([torch.zeros(2, 2, requires_grad=True)], lr=0.01, adamw_lrr=1e-3)


@pytest.mark.parametrize(
    ("cls", "options", "expected"),
    [
        (Muon, {"lr": 0.02}, (0.02, (0.9, 0.95), 1e-8)),
        (HTMuon, {"lr": 0.05}, (0.05, (0.9, 0.95), 1e-8)),
        (SOAP, {"lr": 0.01, "betas": (0.8, 0.9), "eps": 1e-6}, (0.01, (0.8, 0.9), 1e-6)),  # SOAP's own Adam
        (KLShampoo, {"lr": 3e-3, "eps": 1e-7}, (3e-3, (0.9, 0.95), 1e-7)),  # betas[1] is the factor rate too
        (ProKLShampoo, {"lr": 3e-3}, (3e-3, (0.9, 0.95), 1e-8)),
    ],
)
def test_adamw_defaults_resolve_in_one_place(cls: type, options: dict, expected: tuple) -> None:
    W, b = torch.zeros(3, 4, requires_grad=True), torch.zeros(4, requires_grad=True)
    adamw_group = cls([W, b], **options).param_groups[1]
    assert (adamw_group["lr"], adamw_group["adamw_betas"], adamw_group["adamw_eps"]) == expected
    explicit = cls([W, b], **options, adamw_lr=1e-4, adamw_betas=(0.5, 0.6), adamw_eps=1e-3).param_groups[1]
    assert (explicit["lr"], explicit["adamw_betas"], explicit["adamw_eps"]) == (1e-4, (0.5, 0.6), 1e-3)


@pytest.mark.parametrize("cls", CLASSES)
def test_constructor_option_names_are_what_the_constructor_takes(cls: type) -> None:
    names = cls.constructor_option_names()
    assert names[0] == "lr" and {"adamw_lr", "adamw_eps", "maximize", "nonfinite"} <= set(names)
    W = torch.zeros(3, 3, requires_grad=True)
    defaults = cls([W], lr=0.01).defaults
    # every accepted option is stored in the groups (an older spelling under its current name)
    assert set(names) - set(cls.option_aliases) <= set(defaults)
    with pytest.raises(TypeError):
        cls([W], lr=0.01, **{"not_an_option": 1})
    rekls = REKLS.constructor_option_names()  # followed through **options to SOAP, less what REKLS fixes
    assert "power_iter_steps" in rekls and "use_eigh" not in rekls


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_param_groups_hold_only_checked_options(cls: type) -> None:
    """A constructor's helper locals must not leak into the groups (Muon once stored ``muon_map``)."""
    from whiten.optim.base import COMMON_CHECKS

    opt = cls([torch.nn.Parameter(torch.zeros(4, 4)), torch.nn.Parameter(torch.zeros(4))], lr=0.02)
    for group in opt.param_groups:
        unchecked = set(group) - set(opt.option_checks) - set(COMMON_CHECKS) - {"params", "param_names"}
        assert not unchecked, f"{cls.__name__} group keys without a check: {sorted(unchecked)}"
