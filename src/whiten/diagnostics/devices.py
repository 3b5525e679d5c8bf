"""The device a command runs on: one check for ``whiten bench`` / ``whiten sweep`` and ``whiten diagnose spike``.

It lives in the diagnostics (the lower of the two consumer layers, ``docs/architecture.md``) so that the
bench can import it and both commands give the same messages.
"""

from __future__ import annotations

import torch


def check_device(device: str, name: str = "--device") -> torch.device:
    """``torch.device(device)``, or a ``ValueError`` naming ``name`` for a string that is no device or a CUDA
    device on a machine without CUDA."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name} {device!r} is not a device; use cpu or cuda[:i]") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name} {device!r} requested but CUDA is not available; use {name} cpu")
    return parsed
