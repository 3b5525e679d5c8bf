"""Start and join ``torch.distributed`` process groups for the benchmark and the tests (torchrun on one node)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


# -- processes ------------------------------------------------------------------------------------------
def init_distributed(
    backend: str | None = None, device: str | torch.device | None = None, timeout_s: float | None = None
) -> tuple[int, int, torch.device]:
    """Join the process group a launcher (``torchrun`` / :func:`launch`) describes in the environment.

    Returns ``(rank, world_size, device)``. ``device``: ``"cpu"``, ``"cuda"`` (local rank ``i``
    gets ``cuda:i``) or ``None`` (CUDA when available). Backend: ``nccl`` for CUDA, ``gloo`` for
    CPU, unless ``backend`` is given. ``timeout_s`` bounds every collective (torch's default is 30
    minutes), so a mismatch between ranks fails with an error instead of hanging. Without
    ``WORLD_SIZE`` in the environment it returns ``(0, 1, device)`` and starts nothing.
    """
    import datetime

    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda' for init_distributed, got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use device='cpu' (gloo)")
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, torch.device(kind)
    if kind == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ValueError(
                f"local rank {local_rank} has no GPU: this machine has {count} CUDA device(s); start at most "
                f"{count} processes per node (--nproc / --nproc-per-node) or use device='cpu' (gloo)"
            )
        torch.cuda.set_device(local_rank)
        local = torch.device("cuda", local_rank)
    else:
        local = torch.device("cpu")
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {}
        if timeout_s is not None:
            kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend or ("nccl" if kind == "cuda" else "gloo"), **kwargs)
    return dist.get_rank(), dist.get_world_size(), local


def launch_command(nproc: int, argv: Sequence[str], *, module: bool = True) -> list[str]:
    """The ``torchrun`` command line :func:`launch` runs.

    Rendezvous through a c10d store on ``127.0.0.1`` port 0: the launcher binds a free port itself
    and passes it to the workers, so no port has to be chosen in advance (no race with other jobs).
    """
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--nnodes=1",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=127.0.0.1:0",
        "--local-addr=127.0.0.1",
        *(["-m"] if module else []),
        *argv,
    ]


def run_with_timeout(cmd: Sequence[str], env: Mapping[str, str] | None = None, timeout_s: float | None = None) -> int:
    """Run ``cmd`` and return its exit code; past ``timeout_s`` seconds stop it and raise ``TimeoutError``.

    Stopping sends SIGTERM first (torchrun forwards it to its workers, which run in their own
    sessions, and waits for them), then SIGKILL after 60 s. Interrupting the caller stops it too.
    """
    proc = subprocess.Popen(list(cmd), env=None if env is None else dict(env))
    try:
        return proc.wait(timeout=timeout_s)
    except BaseException as err:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if isinstance(err, subprocess.TimeoutExpired):
            raise TimeoutError(f"{' '.join(cmd[:6])} ... did not finish within {timeout_s} s; stopped it") from None
        raise


def launch(
    nproc: int,
    argv: Sequence[str],
    *,
    module: bool = True,
    env: Mapping[str, str] | None = None,
    timeout_s: float | None = None,
) -> int:
    """Run ``python -m <argv...>`` (or a script when ``module=False``) on ``nproc`` local processes.

    Uses ``torch.distributed.run`` (torchrun, see :func:`launch_command`); each process finds
    ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` / ``MASTER_PORT`` in its environment
    (see :func:`init_distributed`). ``OMP_NUM_THREADS`` defaults to 1. Returns the launcher's exit
    code; raises ``TimeoutError`` after ``timeout_s`` seconds (see :func:`run_with_timeout`).
    """
    cmd = launch_command(nproc, argv, module=module)
    full_env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **(env or {})}
    return run_with_timeout(cmd, full_env, timeout_s)


# -- helpers for a training script (e.g. `whiten bench --nproc N`) ---------------------------------
def launched() -> bool:
    """Whether this process was started by torchrun / :func:`launch` (``WORLD_SIZE`` is set)."""
    return "WORLD_SIZE" in os.environ


def without_flag(argv: Sequence[str], flag: str) -> list[str]:
    """``argv`` with ``flag VALUE`` and ``flag=VALUE`` removed (the command a launcher re-runs)."""
    out: list[str] = []
    skip = False
    for item in argv:
        if skip:
            skip = False
        elif item == flag:
            skip = True
        elif not item.startswith(flag + "="):
            out.append(item)
    return out


def relaunch(nproc: int, argv: Sequence[str], flag: str = "--nproc") -> int | None:
    """Run ``python -m <argv without flag>`` on ``nproc`` processes, unless that is already done.

    Returns the launcher's exit code, or ``None`` when the caller should just run (``nproc == 1``,
    or this process is one of the launched ones).
    """
    if nproc < 1:
        raise ValueError(f"{flag} must be >= 1, got {nproc}")
    if nproc == 1 or launched():
        return None
    return launch(nproc, without_flag(argv, flag))


def is_main_process() -> bool:
    """Rank 0, or no process group: the process that writes files and prints."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def rank_slice(batch: Tensor) -> Tensor:
    """This rank's equal share of a global batch (dim 0), so that the mean loss over ranks equals
    the global mean; the batch size must be divisible by the world size."""
    if not (dist.is_available() and dist.is_initialized()):
        return batch
    world, rank = dist.get_world_size(), dist.get_rank()
    if batch.shape[0] % world:
        raise ValueError(f"batch size {batch.shape[0]} is not divisible by the {world} processes; change --batch-size")
    per = batch.shape[0] // world
    return batch[rank * per : (rank + 1) * per]
