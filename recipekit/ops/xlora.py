"""X-LoRA gate math: the per-token gate transform and its mean over a scalings log.

An X-LoRA model gates each LoRA-wrapped module l with per-token expert weights g[t, l, i]
(the classifier's softmax, which is what its scalings log holds). In the forward pass PEFT's
`XLoraLayer.get_maybe_topk_scalings` first keeps the ``top_k`` largest entries of each row
(zeroing the rest, no renormalisation) and, with ``softmax_topk``, applies a softmax over the
non-zero entries. A static merge can only use one gate per module and expert: the mean of the
transformed gates over the logged tokens (reference/adapters.md §4.5 (b)); it equals the X-LoRA
forward exactly when the gates are constant. Pure numpy, float64; no I/O.
Oracle: tests/ops/test_xlora.py (PEFT's own transform on the same rows).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def transform_gates(gates: np.ndarray, *, top_k: int | None = None,
                    softmax_topk: bool = False) -> np.ndarray:
    """PEFT's per-token top-k / softmax-over-top-k on gate rows (last axis: the experts).

    Ties in the top-k pick the lower expert index (torch.topk leaves them unspecified).

    Example:
        >>> transform_gates(np.array([[0.5, 0.2, 0.3]]), top_k=2).tolist()
        [[0.5, 0.0, 0.3]]
    """
    g = np.asarray(gates, dtype=np.float64)
    if top_k is not None and top_k < g.shape[-1]:
        order = np.argsort(-g, axis=-1, kind="stable")
        keep = np.zeros(g.shape, dtype=bool)
        np.put_along_axis(keep, order[..., :top_k], True, axis=-1)
        g = np.where(keep, g, 0.0)
    if softmax_topk:
        kept = g != 0
        shifted = np.where(kept, g - np.max(np.where(kept, g, -np.inf), axis=-1,
                                             keepdims=True, initial=-np.inf), -np.inf)
        with np.errstate(invalid="ignore"):  # a row with nothing kept stays zero
            e = np.where(kept, np.exp(shifted), 0.0)
            total = e.sum(axis=-1, keepdims=True)
            g = np.divide(e, total, out=np.zeros_like(e), where=total > 0)
    return g


def mean_gates(chunks: Iterable[np.ndarray], *, top_k: int | None = None,
               softmax_topk: bool = False) -> tuple[np.ndarray, int]:
    """(ḡ (L, n), token count): the mean of the transformed gates over every token of
    ``chunks``, each (..., L, n) (a log entry (batch, seq, L, n) or a block of entries), every
    token weighted equally, accumulated in float64.

    Example:
        >>> g, n = mean_gates([np.array([[[1.0, 0.0]], [[0.0, 1.0]]])])
        >>> g.tolist(), n
        ([[0.5, 0.5]], 2)
    """
    total: np.ndarray | None = None
    count = 0
    for chunk in chunks:
        rows = np.asarray(chunk, dtype=np.float64)
        rows = rows.reshape(-1, *rows.shape[-2:])
        part = transform_gates(rows, top_k=top_k, softmax_topk=softmax_topk).sum(axis=0)
        total = part if total is None else total + part
        count += rows.shape[0]
    if total is None or count == 0:
        raise ValueError("no logged tokens")
    return total / count, count
