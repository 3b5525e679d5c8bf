"""Training precision of the benchmark: ``--precision fp32`` or ``bf16`` (mixed precision).

``bf16`` is the mixed precision LLM pre-training uses: the forward pass (and so the backward
pass, whose kernels follow the forward's dtypes) runs under :func:`torch.autocast` with
``dtype=torch.bfloat16``, while the parameters, their gradients and the optimizer state stay
fp32 ("master weights"); every optimizer sees the same fp32 gradients. Evaluation runs under the
same autocast, so the validation loss measures the model as it is trained. ``fp32`` runs
everything in fp32.

The default is ``bf16`` where the device computes bf16 matrix products natively: a CUDA device
with bf16 support (``torch.cuda.is_bf16_supported``), or an x86 CPU with the AVX512-BF16 or
AMX-BF16 instructions (the ``avx512_bf16`` / ``amx_bf16`` flags of ``/proc/cpuinfo`` on Linux).
Elsewhere bf16 is emulated and slower than fp32, so the default is ``fp32``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

PRECISIONS = ("fp32", "bf16")
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
_CPUINFO = Path("/proc/cpuinfo")


def cpu_flags() -> set[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where the file does not exist: not Linux)."""
    if not sys.platform.startswith("linux") or not _CPUINFO.exists():
        return set()
    for line in _CPUINFO.read_text(errors="replace").splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def bf16_native(device: torch.device | str) -> bool:
    """Whether ``device`` runs bf16 matrix products in hardware (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(flag in cpu_flags() for flag in _CPU_BF16_FLAGS)
    return False


def default_precision(device: torch.device | str) -> str:
    """``"bf16"`` where :func:`bf16_native`, else ``"fp32"``."""
    return "bf16" if bf16_native(device) else "fp32"


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r} is not valid; use one of {', '.join(PRECISIONS)}")


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """The forward pass's context: bf16 autocast for ``"bf16"``, nothing for ``"fp32"``."""
    check_precision(precision)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        yield
