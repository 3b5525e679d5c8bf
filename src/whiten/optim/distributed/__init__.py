"""Scale-out of every ``whiten`` optimizer over ``torch.distributed`` (``docs/distributed.md``).

The mechanism is generic: it only needs the contract of :class:`whiten.optim.WhitenOptimizer`
subclasses (``_matrix_step(group, params, grads)`` updates full matrices in place and keeps
per-parameter state in ``self.state[p]``). It is called by ``WhitenOptimizer.step`` for every
matrix group; the AdamW fallback never comes here (it is elementwise, so it runs unchanged on
replicated tensors and on FSDP2 shards, its state being DTensors shaped like the shards).

Two modes, chosen per parameter group by the option ``distributed_mode``:

``"replicate"`` (default)
    DDP: every rank holds the same all-reduced gradient and runs the same step; nothing is
    communicated. FSDP2 (DTensor parameters): each matrix's parameter and gradient are
    all-gathered, every rank runs the step on the full matrix (full-size state on every rank),
    and keeps its own shard of the result.

``"split"`` (opt-in)
    Each matrix is owned by one rank of the process group (DDP) or of the parameter's device
    mesh (FSDP2), chosen by :func:`assign_owners` from the estimated flops of the method for that
    shape (greedy, largest first, onto the least-loaded rank). Only the owner runs the matrix
    step and holds the state of that matrix; the result is sent back:
    DDP: the owner sends the new parameter value to every rank (one ``all_to_all`` per dtype).
    FSDP2: every rank sends its shard of the parameter and of the gradient to the owner (one
    ``all_to_all``), the owner assembles the whole matrix, steps, and sends each rank its shard
    of the new value (a second ``all_to_all``), as Dion and Distributed Shampoo do.

Optimizers that split their matrix step into phases (:func:`is_phased`: Muon, HTMuon, KL-Shampoo,
Pro-KLShampoo) take a leaner FSDP2 path: the momentum stays sharded (a DTensor like the parameter,
updated on each rank's shard), only what the map needs is moved to where it runs (all ranks in
replicate mode, the owner in split mode): the direction ``U`` for Muon/HTMuon, the momentum and
the raw gradient ``(M, G)`` for the KL methods; only the update ``O`` comes back (split), and each
rank applies its shard of ``O`` to its shard of the parameter; the parameter itself does not
travel. For the other methods (SOAP, REKLS, KL-SOAP: first moment in the rotated eigenbasis) the
matrix state (momentum, factors, bases) is full-size on the owner (split) or on every rank
(replicate); the AdamW state is sharded for all.
Checkpoints go through DCP (:func:`save_checkpoint`, :func:`load_checkpoint`): sharded state is
saved shard-wise, every whole-matrix state once, keyed by the parameter's name, so a checkpoint
loads into either mode and any world size.
"""

from whiten.optim.base import MODES, PHASES, register_distributed_stepper
from whiten.optim.distributed.checkpoint import load_checkpoint, save_checkpoint
from whiten.optim.distributed.cost import assign_owners, matrix_flops
from whiten.optim.distributed.ownership import (
    CommStats,
    comm_stats,
    finite_flags,
    holds_state,
    is_sharded,
    owners_of,
    process_group_of,
)
from whiten.optim.distributed.steps import elementwise_keys, gathered_tensors, is_phased, matrix_step

__all__ = [
    "MODES",
    "PHASES",
    "CommStats",
    "assign_owners",
    "comm_stats",
    "elementwise_keys",
    "finite_flags",
    "gathered_tensors",
    "holds_state",
    "is_phased",
    "is_sharded",
    "load_checkpoint",
    "matrix_flops",
    "matrix_step",
    "owners_of",
    "process_group_of",
    "save_checkpoint",
]


class _Stepper:
    """The :class:`whiten.optim.base.DistributedStepper` this package registers on import."""

    matrix_step = staticmethod(matrix_step)
    holds_state = staticmethod(holds_state)
    finite_flags = staticmethod(finite_flags)


register_distributed_stepper(_Stepper())
