"""Build parameter groups from a model: matrix method for hidden matrices, AdamW for the rest."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

DEFAULT_HEAD_NAMES = ("lm_head", "head", "output", "classifier", "unembed")


def split_parameters(
    model: nn.Module,
    *,
    embeddings_and_head: str = "adamw",
    head_names: Iterable[str] = DEFAULT_HEAD_NAMES,
) -> tuple[list[tuple[str, Tensor]], list[tuple[str, Tensor]]]:
    """Split ``model``'s trainable parameters into ``(matrix, adamw)`` lists of ``(name, tensor)``.

    Matrices are parameters with ``ndim >= 2`` (conv kernels included). With
    ``embeddings_and_head="adamw"`` (Keller Jordan's split, the default) the weights of every
    ``nn.Embedding`` and of modules named in ``head_names`` (the output projection; a head tied
    to the embedding is the same tensor) go to AdamW; with ``"matrix"`` they stay on the matrix
    method (HTMuon's released setup). Gains, biases and scalars always go to AdamW.
    """
    if embeddings_and_head not in ("adamw", "matrix"):
        raise ValueError(f"embeddings_and_head={embeddings_and_head!r} is not valid; use 'adamw' or 'matrix'")
    heads = set(head_names)
    special: set[int] = set()
    if embeddings_and_head == "adamw":
        for module_name, module in model.named_modules():
            leaf = module_name.rsplit(".", 1)[-1]
            if isinstance(module, nn.Embedding) or (leaf in heads and isinstance(module, nn.Linear)):
                special.add(id(module.weight))
    matrix: list[tuple[str, Tensor]] = []
    adamw: list[tuple[str, Tensor]] = []
    for name, param in model.named_parameters():  # named_parameters de-duplicates tied weights
        if not param.requires_grad:
            continue
        if param.ndim >= 2 and id(param) not in special:
            matrix.append((name, param))
        else:
            adamw.append((name, param))
    return matrix, adamw


def param_groups(
    model: nn.Module,
    *,
    embeddings_and_head: str = "adamw",
    head_names: Iterable[str] = DEFAULT_HEAD_NAMES,
    matrix_options: dict[str, Any] | None = None,
    adamw_options: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Parameter groups for any ``whiten`` optimizer: ``[matrix group, AdamW group]``.

    The AdamW group takes the optimizer's ``adamw_lr`` / ``adamw_weight_decay`` unless
    ``adamw_options`` sets ``lr`` / ``weight_decay``. Empty groups are left out.
    """
    matrix, adamw = split_parameters(model, embeddings_and_head=embeddings_and_head, head_names=head_names)
    groups = []
    for named, use_matrix, options in ((matrix, True, matrix_options), (adamw, False, adamw_options)):
        if named:
            groups.append(
                {
                    "params": [p for _, p in named],
                    "param_names": [name for name, _ in named],  # for messages and state_dict()
                    "use_matrix": use_matrix,
                    **(options or {}),
                }
            )
    return groups
