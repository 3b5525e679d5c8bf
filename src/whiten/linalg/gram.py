"""Symmetric Gram products ``X X^T`` computed from their upper block triangle.

A Gram matrix is symmetric, so half of a plain ``X @ X.mT`` is wasted work. Splitting the ``d`` rows
of ``X`` (``d x k``) into ``b`` blocks, the blocks ``X_i X_j^T`` with ``j >= i`` are computed
(``b (b + 1) / 2`` of the ``b^2`` products) and the blocks below the diagonal are filled with
their transposes. For GPT-2's 3072-row Grams (``b = 4``) that is 10/16 of the multiply-adds
(timings in ``docs/performance.md``). Every entry is the same dot product as in ``X @ X.mT`` (only
BLAS's summation order may differ), so results agree to round-off.

The Kronecker factor statistics of SOAP and KL-Shampoo (``G G^T``, ``G^T G`` and their whitened
forms ``(G Q_R) diag(1/lam_R) (G Q_R)^T``) are Grams of this kind.
"""

from __future__ import annotations

from torch import Tensor

#: rows per block below which a Gram is left to one plain product (small blocks run far below peak)
GRAM_BLOCK_ROWS = 768


def gram(X: Tensor, *, block_rows: int = GRAM_BLOCK_ROWS) -> Tensor:
    """``X @ X.mT`` for ``X`` of shape ``(..., d, k)`` (batched), from its upper block triangle.

    ``X`` may be a strided view (``G.mT`` gives ``G^T G``). With fewer than ``2 * block_rows`` rows
    it is one plain product (bit-identical to ``X @ X.mT``).
    """
    if X.ndim < 2:
        raise ValueError(f"gram needs a matrix (..., d, k), got shape {tuple(X.shape)}")
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    d = X.size(-2)
    blocks = d // block_rows
    if blocks < 2:
        return X @ X.mT
    edges = [round(i * d / blocks) for i in range(blocks + 1)]
    out = X.new_empty((*X.shape[:-1], d))
    for i in range(blocks):
        rows_i = X[..., edges[i] : edges[i + 1], :]
        for j in range(i, blocks):
            block = rows_i @ X[..., edges[j] : edges[j + 1], :].mT
            out[..., edges[i] : edges[i + 1], edges[j] : edges[j + 1]] = block
            if j > i:
                out[..., edges[j] : edges[j + 1], edges[i] : edges[i + 1]] = block.mT
    return out
