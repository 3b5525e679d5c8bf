"""Matmul precision control and a CPU emulation of reduced-precision matmul operands.

On CUDA, ``torch.set_float32_matmul_precision("high")`` lets fp32 matmuls run on TF32 tensor
cores (operands rounded to a 10-bit mantissa) and ``"medium"`` allows bf16 (7-bit mantissa).
On CPU PyTorch ignores the setting, so precision effects (an eigenbasis jumping after a gradient
spike under TF32, ``docs/diagnostics/spike.md``) cannot be seen there. :func:`emulate_matmul_precision`
reproduces the operand rounding on any device: inside it, every fp32 matrix product
(``@``, ``mm``, ``bmm``, ``matmul``, ``addmm``, ``baddbmm``, ``tensordot``, two-operand ``einsum``)
first rounds its operands
to the reduced mantissa (round to nearest, ties to even) and accumulates in fp32, as tensor
cores do. An ``einsum`` of three or more operands has its inputs rounded but not its intermediate
products, so it is not emulated faithfully; nothing in ``whiten`` uses one.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

PRECISIONS = ("highest", "high", "medium")

#: explicit mantissa bits kept by each precision level's matmul operands
MANTISSA_BITS = {"highest": 23, "high": 10, "medium": 7}


def check_precision(precision: str, name: str = "precision") -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"{name}={precision!r} is not valid; use one of {PRECISIONS}")
    return precision


@contextlib.contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """Set ``torch``'s fp32 matmul precision inside the block and restore it on exit (even on error)."""
    check_precision(precision)
    previous = torch.get_float32_matmul_precision()
    if previous == precision:
        yield
        return
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def round_mantissa(x: Tensor, bits: int) -> Tensor:
    """Round fp32 values to ``bits`` explicit mantissa bits (nearest, ties to even); exponent kept.

    ``bits=10`` gives TF32 operands, ``bits=7`` gives bf16 values. Non-fp32 inputs are returned
    unchanged (the emulation only concerns fp32 matmuls). NaN and Inf pass through.
    """
    if x.dtype != torch.float32 or bits >= 23:
        return x
    if bits < 0:
        raise ValueError(f"bits must be >= 0, got {bits}")
    drop = 23 - bits
    as_int = x.contiguous().view(torch.int32)
    half = 1 << (drop - 1)
    lsb = (as_int >> drop) & 1
    rounded = ((as_int + (half - 1) + lsb) >> drop) << drop
    out = rounded.view(torch.float32)
    return torch.where(torch.isfinite(x), out, x)


_MATMUL_FUNCS = {
    torch.matmul,
    torch.mm,
    torch.bmm,
    torch.Tensor.matmul,
    torch.Tensor.mm,
    torch.Tensor.bmm,
    torch.Tensor.__matmul__,
    torch.Tensor.__rmatmul__,
    torch.linalg.matmul,
    torch.tensordot,
}
_ADD_MATMUL_FUNCS = {torch.addmm, torch.baddbmm, torch.Tensor.addmm, torch.Tensor.baddbmm}


class _OperandRounding(TorchFunctionMode):
    """Round matmul operands to ``bits``; ``bits=None`` reads torch's current fp32 matmul precision per call."""

    def __init__(self, bits: int | None) -> None:
        super().__init__()
        self.bits = bits

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        bits = self.bits
        if bits is None:
            bits = MANTISSA_BITS.get(torch.get_float32_matmul_precision(), 23)
        if bits >= 23:
            return func(*args, **kwargs)
        if func in _MATMUL_FUNCS:
            args = tuple(_round_operands(a, bits) for a in args)
        elif func in _ADD_MATMUL_FUNCS or func is torch.einsum:
            # addmm/baddbmm: the accumulator (first argument) stays fp32, only the product's operands
            # are rounded; einsum: the first argument is the equation string (operands may follow as a list)
            args = (args[0], *(_round_operands(a, bits) for a in args[1:]))
        return func(*args, **kwargs)


def _round_operands(value: object, bits: int) -> object:
    """Round a tensor operand, or each tensor of a list/tuple of operands; anything else passes through."""
    if isinstance(value, Tensor):
        return round_mantissa(value, bits)
    if isinstance(value, (list, tuple)):
        return type(value)(round_mantissa(v, bits) if isinstance(v, Tensor) else v for v in value)
    return value


@contextlib.contextmanager
def emulate_matmul_precision(precision: str) -> Iterator[None]:
    """Round fp32 matmul operands as ``precision`` would on a GPU ("high" = TF32, "medium" = bf16).

    ``"highest"`` is a no-op. Works on every device; it is slow (extra elementwise passes), so it
    is meant for studies and tests, not training.
    """
    check_precision(precision)
    if precision == "highest":
        yield
        return
    with _OperandRounding(MANTISSA_BITS[precision]):
        yield


@contextlib.contextmanager
def emulate_global_matmul_precision() -> Iterator[None]:
    """Round fp32 matmul operands as torch's CURRENT fp32 matmul precision would on a GPU.

    Unlike :func:`emulate_matmul_precision`, the precision is read at every matmul, so code that
    sets it for some blocks only (``with matmul_precision(group["fp32_matmul_prec"])``, as SOAP does
    for its factor update but not for its QR refresh) gets exactly those blocks emulated: on CPU
    this reproduces what the same code does on a GPU. Outside such blocks the global setting
    (default ``"highest"``) applies.
    """
    with _OperandRounding(None):
        yield


#: the values of every matrix optimizer's ``matmul_dtype`` option (docs/precision.md)
MATMUL_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def check_matmul_dtype(matmul_dtype: str, name: str = "matmul_dtype") -> str:
    """The user-facing check of a ``matmul_dtype`` value (the optimizers run the same check on their options
    when they are built, ``whiten/optim/_options.py``); the helpers below take validated values and only look
    them up in :data:`MATMUL_DTYPES` (a ``KeyError`` for anything else), since they run inside every step."""
    if matmul_dtype not in MATMUL_DTYPES:
        raise ValueError(f"{name}={matmul_dtype!r} is not valid; use one of {tuple(MATMUL_DTYPES)}")
    return matmul_dtype


def matmul_compute_dtype(matmul_dtype: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype the hot matmuls on ``dtype`` statistics run in: the policy's, but fp64 stays fp64."""
    return torch.float64 if dtype == torch.float64 else MATMUL_DTYPES[matmul_dtype]


#: on CPU, matrices of at most this many entries keep fp32 products under ``matmul_dtype="bfloat16"``
CPU_BF16_MIN_NUMEL = 1 << 16


def effective_matmul_dtype(matmul_dtype: str, shape: Sequence[int], device: torch.device | str) -> str:
    """The policy a matrix of ``shape`` gets: ``matmul_dtype``, except that on CPU a small matrix (at most
    :data:`CPU_BF16_MIN_NUMEL` entries) keeps fp32, where the conversions and autocast's per-call cost
    exceed what bf16 products save (the tiny preset's KL-Shampoo 27 -> 38 ms per step; docs/precision.md)."""
    if torch.device(device).type == "cpu" and math.prod(shape[-2:]) <= CPU_BF16_MIN_NUMEL:
        return "float32"
    return matmul_dtype


@contextlib.contextmanager
def matmuls_in(matmul_dtype: str, device: torch.device | str) -> Iterator[None]:
    """Run the fp32 matrix products of the block in ``matmul_dtype`` (the matrix optimizers' hot stages).

    ``"bfloat16"``: :func:`torch.autocast` with ``dtype=torch.bfloat16`` on ``device``'s type, so every
    fp32 ``mm``/``matmul``/``bmm``/``addmm``/``baddbmm``/``tensordot`` takes bf16 operands (the hardware
    accumulates in fp32) and returns bf16; fp64 tensors are never cast, and elementwise arithmetic with
    an fp32 tensor promotes back to fp32. ``"float32"``: autocast switched off, so a surrounding
    autocast region (a step called inside the forward's ``torch.autocast``) cannot lower the
    products. Decompositions belong in :func:`full_precision` blocks.
    """
    device_type = torch.device(device).type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=MATMUL_DTYPES[matmul_dtype] is torch.bfloat16):
        yield


@contextlib.contextmanager
def full_precision(device: torch.device | str) -> Iterator[None]:
    """Switch autocast off inside :func:`matmuls_in`: eigenbasis refreshes and decompositions run in fp32 (fp64)."""
    with torch.autocast(torch.device(device).type, enabled=False):
        yield
