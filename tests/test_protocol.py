"""The step protocol of whiten.optim.base: phases as named abstract slots, typed map inputs, the distributed hook."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

import whiten.optim.base as base
from whiten.linalg import FlopCount
from whiten.optim import KLSOAP, SOAP, HTMuon, KLShampoo, Muon, ProKLShampoo
from whiten.optim.base import MapInput, PhasedOptimizer, WhitenOptimizer
from whiten.optim.distributed import elementwise_keys, gathered_tensors, is_phased


class _Scaled(PhasedOptimizer):
    """A minimal phased method: ``W <- W - lr * 2 G`` through the three phases."""

    elementwise_state = ("step",)

    def __init__(self, params: Any, lr: float = 0.1) -> None:
        super().__init__(params, {"lr": lr, "weight_decay": 0.0})

    def _direction_phase(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> list[MapInput]:
        return [MapInput(g.clone()) for g in grads]

    def _map_phase(self, group: dict[str, Any], params: list[Tensor], inputs: list[MapInput]) -> list[Tensor]:
        return [2 * x.direction for x in inputs if x.direction is not None]

    def _apply_phase(self, group: dict[str, Any], params: list[Tensor], updates: list[Tensor]) -> None:
        for p, u in zip(params, updates, strict=True):
            p.add_(u, alpha=-group["lr"])

    def matrix_flops(self, shape: Any, group: Any) -> FlopCount:
        return FlopCount()


def test_a_misspelt_phase_cannot_be_instantiated() -> None:
    class Misspelt(PhasedOptimizer):
        elementwise_state = ("step",)

        def __init__(self, params: Any) -> None:
            super().__init__(params, {"lr": 0.1, "weight_decay": 0.0})

        def _direction_phase(self, group, params, grads):  # type: ignore[no-untyped-def]
            return [MapInput(g) for g in grads]

        def _map_phse(self, group, params, inputs):  # type: ignore[no-untyped-def]  # the typo under test
            return [x.direction for x in inputs]

        def _apply_phase(self, group, params, updates):  # type: ignore[no-untyped-def]
            pass

        def matrix_flops(self, shape, group):  # type: ignore[no-untyped-def]
            return FlopCount()

    with pytest.raises(TypeError, match=r"abstract method '?_map_phase'?$"):
        Misspelt([torch.zeros(3, 3, requires_grad=True)])


def test_a_phase_outside_the_protocol_is_refused() -> None:
    with pytest.raises(TypeError, match="PhasedOptimizer"):

        class Stray(WhitenOptimizer):
            def _matrix_step(self, group, params, grads):  # type: ignore[no-untyped-def]
                pass

            def _map_phase(self, group, params, inputs):  # type: ignore[no-untyped-def]
                return inputs


def test_a_phased_optimizer_does_not_override_the_composed_step() -> None:
    with pytest.raises(TypeError, match="_matrix_step"):

        class Override(_Scaled):
            def _matrix_step(self, group, params, grads):  # type: ignore[no-untyped-def]
                pass


def test_a_phased_optimizer_declares_its_elementwise_state() -> None:
    with pytest.raises(TypeError, match="elementwise_state"):

        class NoState(PhasedOptimizer):
            def _direction_phase(self, group, params, grads):  # type: ignore[no-untyped-def]
                return []

            def _map_phase(self, group, params, inputs):  # type: ignore[no-untyped-def]
                return []

            def _apply_phase(self, group, params, updates):  # type: ignore[no-untyped-def]
                pass


def test_the_composed_step_runs_the_three_phases() -> None:
    W = torch.ones(3, 4, requires_grad=True)
    W.grad = torch.full((3, 4), 0.5)
    _Scaled([W], lr=0.1).step()
    assert torch.equal(W.detach(), torch.full((3, 4), 0.9))


@pytest.mark.parametrize(
    ("cls", "phased", "keys", "travel"),
    [
        (Muon, True, {"momentum_buffer", "step"}, 1),
        (HTMuon, True, {"momentum_buffer", "step"}, 1),
        (KLShampoo, True, {"exp_avg", "step"}, 2),
        (ProKLShampoo, True, {"exp_avg", "step"}, 2),
        (KLSOAP, False, set(), 2),
        (SOAP, False, set(), 2),
    ],
)
def test_which_optimizers_are_phased(cls: type, phased: bool, keys: set[str], travel: int) -> None:
    optimizer = cls([torch.zeros(4, 6, requires_grad=True)], lr=0.01)
    assert is_phased(optimizer) is phased
    assert elementwise_keys(optimizer) == keys
    assert gathered_tensors(optimizer) == travel


def _grads(steps: int, shape: tuple[int, int]) -> list[Tensor]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(steps)]


@pytest.mark.parametrize("cls", [Muon, HTMuon, KLShampoo, ProKLShampoo])
def test_moved_map_inputs_give_the_composed_step(cls: type) -> None:
    """The phases run apart, with every map input rebuilt from copies (as the FSDP2 path moves them),
    follow the composed single-process step exactly, initialisation step included."""
    kwargs: dict[str, Any] = {"rank": 2, "precondition_frequency": 2} if cls is ProKLShampoo else {}
    start = torch.randn(6, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a = start.clone().requires_grad_()
    b = start.clone().requires_grad_()
    composed = cls([a], lr=0.01, **kwargs)
    phased = cls([b], lr=0.01, **kwargs)
    for g in _grads(4, (6, 8)):
        a.grad = g.clone()
        composed.step()
        group = phased.param_groups[0]
        with torch.no_grad():
            inputs = phased._direction_phase(group, [b], [g.clone()])
            moved = [x.with_tensors([t.clone() for t in x.tensors()]) for x in inputs]
            phased._apply_phase(group, [b], phased._map_phase(group, [b], moved))
    assert torch.equal(a.detach(), b.detach())
    assert not torch.equal(a.detach(), start)


def test_kl_first_step_input_has_no_direction() -> None:
    W = torch.zeros(4, 5, dtype=torch.float64)
    optimizer = KLShampoo([W.requires_grad_()])
    group = optimizer.param_groups[0]
    G = torch.ones(4, 5, dtype=torch.float64)
    (first,) = optimizer._direction_phase(group, [W], [G])
    assert first.first_step and first.tensors() == (G,)
    optimizer._map_phase(group, [W], [first])
    (second,) = optimizer._direction_phase(group, [W], [G])
    assert not second.first_step and len(second.tensors()) == 2


def test_map_input_rebuilds_its_structure() -> None:
    M, G = torch.ones(2), torch.zeros(2)
    x = MapInput(None, G)
    assert x.with_tensors([M]).gradient is M and x.with_tensors([M]).direction is None
    y = MapInput(M, G).with_tensors([G, M])
    assert y.direction is G and y.gradient is M
    with pytest.raises(ValueError, match="2 tensors"):
        MapInput(M, G).with_tensors([M])
    with pytest.raises(ValueError, match="direction or a gradient"):
        MapInput(None, None)


class _Raising:
    calls = 0

    def matrix_step(self, *args: Any) -> None:
        type(self).calls += 1
        raise AssertionError("a single-process step reached the distributed stepper")

    holds_state = finite_flags = matrix_step


@pytest.mark.parametrize("cls", [Muon, SOAP, KLShampoo])
def test_single_process_step_never_calls_the_distributed_stepper(cls: type) -> None:
    previous = base.register_distributed_stepper(_Raising())  # type: ignore[arg-type]
    try:
        W = torch.randn(4, 6, requires_grad=True)
        b = torch.randn(6, requires_grad=True)
        optimizer = cls([W, b], lr=0.01)
        for _ in range(2):
            W.grad, b.grad = torch.randn(4, 6), torch.full((6,), float("nan"))  # the skip path too
            optimizer.step()
        assert _Raising.calls == 0
    finally:
        base.register_distributed_stepper(previous)


def test_a_distributed_run_calls_the_stepper(monkeypatch: pytest.MonkeyPatch) -> None:
    """The counterpart of the test above: once distributed is in use, the matrix step goes to the stepper."""
    seen: list[str] = []

    class Recording:
        def matrix_step(self, optimizer: Any, group: Any, params: Any, grads: Any) -> None:
            seen.append("step")
            optimizer._matrix_step(group, params, grads)

        def holds_state(self, optimizer: Any, group: Any, param: Any) -> bool:
            return True

        def finite_flags(self, grads: Any) -> list[bool]:
            return [True] * len(grads)

    monkeypatch.setattr(base, "_distributed_in_use", lambda params: True)
    previous = base.register_distributed_stepper(Recording())
    try:
        W = torch.randn(4, 6, requires_grad=True)
        W.grad = torch.randn(4, 6)
        Muon([W], lr=0.01).step()
    finally:
        base.register_distributed_stepper(previous)
    assert seen == ["step"]


def test_base_does_not_import_the_distributed_package() -> None:
    tree = ast.parse(Path(inspect.getfile(base)).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
            imported.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    assert not any(name.startswith("whiten.optim.distributed") for name in imported), imported
