#!/usr/bin/env python
"""Device check: a ``whiten`` step never waits on the host (issue 12, ``docs/reliability.md``).

Steps every optimizer of the registry (its default configuration, on a small model with matrices of a
few shapes and an AdamW half) past its initialisation step and checks the steps that are not refreshes:

* on CUDA under ``torch.cuda.set_sync_debug_mode("error")``: any synchronising CUDA call (a value read
  back, a blocking copy, ``nonzero``) raises;
* everywhere under :func:`no_host_reads`: every Python-level read of a tensor value (``.item()``,
  ``.tolist()``, ``bool``/``float``/``int`` of a tensor, ``.cpu()``, ``.numpy()``, ``nonzero``, a
  boolean-mask index) raises. This is what ``tests/test_host_sync.py`` runs on CPU.

Usage::

    python benchmarks/cuda_checks.py            # CUDA: exit 1 if a step synchronises; no CUDA: exit 0
    python benchmarks/cuda_checks.py --cpu      # the same loop on CPU with the Python-level guard only

Without CUDA (and without ``--cpu``) it prints that it skipped and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from whiten.optim.registry import OptimizerSpec, get

#: the registry optimizers checked (torch.optim.AdamW, the benchmark's baseline, is not whiten's code)
NAMES = ("muon", "htmuon", "soap", "soap-kl", "rekls", "kl-shampoo", "klsoap", "pro-kls-r8", "pro-kls-r16")
#: calls that skip the check: the initialisation step
WARMUP = 2


class HostReadError(RuntimeError):
    """A tensor value was read back to the host inside a guarded region."""


def _refuse(name: str) -> Callable[..., Any]:
    def refused(*args: Any, **kwargs: Any) -> Any:
        raise HostReadError(f"Tensor.{name} reads a value back to the host inside the optimizer step")

    return refused


def _guarded_getitem(original: Callable[..., Any]) -> Callable[..., Any]:
    def getitem(self: torch.Tensor, index: Any) -> Any:
        parts = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in parts):
            raise HostReadError("a boolean-mask index needs the number of selected entries on the host")
        return original(self, index)

    return getitem


@contextlib.contextmanager
def no_host_reads() -> Iterator[None]:
    """Make every Python-level read of a tensor value raise :class:`HostReadError` while active.

    The methods are patched on ``torch.Tensor`` (and ``torch.nonzero`` / ``torch.argwhere`` /
    ``torch.masked_select``): the kernels themselves are not affected, only Python code that asks for a value.
    """
    tensor_methods = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy", "nonzero")
    saved_methods = {name: torch.Tensor.__dict__.get(name) for name in (*tensor_methods, "__getitem__")}
    functions = ("nonzero", "argwhere", "masked_select")
    saved_functions = {name: getattr(torch, name) for name in functions}
    original_getitem = torch.Tensor.__getitem__
    try:
        for name in tensor_methods:
            setattr(torch.Tensor, name, _refuse(name))
        torch.Tensor.__getitem__ = _guarded_getitem(original_getitem)  # type: ignore[method-assign]
        for name in functions:
            setattr(torch, name, _refuse(name))
        yield
    finally:
        for name, method in saved_methods.items():
            if method is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, method)
        for name, function in saved_functions.items():
            setattr(torch, name, function)


def model(device: torch.device) -> nn.Module:
    """Matrices of a few shapes (batched stages, a wide one for Pro-KLShampoo's projection) and gains and biases."""
    torch.manual_seed(0)
    layers = [nn.Linear(12, 24), nn.LayerNorm(24), nn.Linear(24, 24), nn.Linear(24, 40), nn.Linear(40, 6)]
    return nn.Sequential(*layers).to(device)


def build(spec: OptimizerSpec, net: nn.Module) -> torch.optim.Optimizer:
    """``spec``'s optimizer in its default configuration (matrices on the method, the rest on its AdamW)."""
    return spec.build(list(net.parameters()), lr=spec.default_lr)


def _matrix_groups(opt: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [group for group in opt.param_groups if group.get("use_matrix")]


def decomposition_every_step(opt: torch.optim.Optimizer) -> str | None:
    """Why every step of ``opt`` runs a decomposition whose CUDA kernel checks its result on the host, if it does.

    ``torch.linalg.eigh`` and ``svd`` read their LAPACK ``info`` back on CUDA (there is no ``_ex`` variant of
    ``eigh``); QR does not. Those steps are checked with the Python-level guard only.
    """
    for group in _matrix_groups(opt):
        if group.get("use_eigh"):
            return "a full eigh every step (use_eigh / REKLS)"
        power_map = group.get("power", 0.0) > 0 or group.get("spectral_map", "ns") != "ns"
        if power_map and group.get("spectral_map") == "svd" and group.get("interval", 1) == 1:
            return "an SVD every step (HTMuon's spectral_map='svd')"
        if group.get("ns_method") == "spectral":
            return "an eigh every step (ns_method='spectral')"
    return None


def is_refresh(opt: torch.optim.Optimizer, call: int) -> bool:
    """Whether call ``call`` (0-based) may refresh a basis: the KL family counts its updates from the call after
    its initialisation step and refreshes when the count is a multiple of ``precondition_frequency``; SOAP
    refreshes by QR (no host read), so its frequency 1 is not a refresh here."""
    frequencies = {group.get("precondition_frequency", 0) for group in _matrix_groups(opt)}
    return any(f > 1 and call >= 1 and call % f == 0 for f in frequencies)


def run_checks(device: torch.device, names: Sequence[str] = NAMES, steps: int = 8) -> list[str]:
    """Step each optimizer ``steps`` times on ``device``; returns a failure description per optimizer that read back.

    The calls after the initialisation step that are not refreshes run under :func:`no_host_reads` and, on CUDA,
    ``torch.cuda.set_sync_debug_mode("error")`` (not for the optimizers of :func:`decomposition_every_step`).
    """
    failures = []
    cuda = device.type == "cuda"
    for name in names:
        net = model(device)
        opt = build(get(name), net)
        by_design = decomposition_every_step(opt)
        if by_design:
            print(f"{name}: {by_design}; checked for Python-level reads only")
        gen = torch.Generator(device=device).manual_seed(0)
        try:
            for call in range(steps):
                for p in net.parameters():
                    p.grad = torch.randn(p.shape, generator=gen, device=device)
                checked = call >= WARMUP and not is_refresh(opt, call)
                strict = cuda and checked and by_design is None
                with no_host_reads() if checked else contextlib.nullcontext():
                    if strict:
                        torch.cuda.synchronize()
                        torch.cuda.set_sync_debug_mode("error")
                    try:
                        opt.step()
                    finally:
                        if strict:
                            torch.cuda.set_sync_debug_mode("default")
            if not all(bool(torch.isfinite(p).all()) for p in net.parameters()):
                failures.append(f"{name}: non-finite parameters")
        except Exception as error:  # every failure is reported with its optimizer
            failures.append(f"{name}: {type(error).__name__}: {error}\n{traceback.format_exc(limit=-3)}")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run the loop on CPU (Python-level guard only)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--optimizers", default=",".join(NAMES))
    args = parser.parse_args(argv)
    if args.cpu:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("cuda_checks: no CUDA device here; skipped (run with --cpu for the CPU loop)")
        return 0
    failures = run_checks(device, args.optimizers.split(","), args.steps)
    for failure in failures:
        print(f"FAIL {failure}")
    print(f"cuda_checks on {device}: {len(failures)} of {len(args.optimizers.split(','))} optimizers read back")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
