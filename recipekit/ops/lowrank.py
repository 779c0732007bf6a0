"""Randomized truncated SVD of a matrix seen only as row pieces (a randomized range finder).

Why: a full SVD of a 2048×5632 difference costs seconds and needs the whole fp32 matrix, yet a
rank-64 LoRA only wants the top 64 singular triplets. Halko, Martinsson & Tropp, "Finding
structure with randomness" (SIAM Review 2011), Alg. 4.4 (randomized subspace iteration) finds
them with a few products by thin matrices, and each product is a sum over row pieces:
Y = ΔΩ is the row pieces' ``Δ[lo:hi] @ Ω`` stacked, ΔᵀQ = Σ Δ[lo:hi]ᵀ Q[lo:hi]. So Δ is read
``2 + 2q`` times, a piece at a time, and only m×l and n×l matrices are kept (l = rank +
oversampling). Partial sums are folded in piece order, so the bytes do not depend on how many
threads computed the pieces. Oracle: tests/ops/test_lowrank.py (Eckart–Young: at the defaults
the error ‖Δ − U S Vh‖_F is within 1% of √Σ of the discarded σ² of an exact SVD).

Pure math: no files; the caller says how to visit the pieces (`MapPieces`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

import torch

T = TypeVar("T")

#: ``map_pieces(fn)`` calls ``fn(lo, hi, piece)`` for every row piece ``piece = Δ[lo:hi]``
#: (in the working dtype) and yields the results in piece order.
MapPieces = Callable[[Callable[[int, int, torch.Tensor], T]], Iterable[T]]

def randomized_svd(map_pieces: MapPieces, rows: int, cols: int, *, rank: int,
                   oversample: int, power_iters: int,
                   generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu"
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``rank`` singular triplets (U (m, k), S (k,), Vh (k, n)) of Δ (m×n), k =
    min(rank, m, n), from ``2 + 2·power_iters`` passes over its row pieces; l = min(rank +
    ``oversample``, m, n) is the sketch width.

    Ω (n×l) is drawn from ``generator`` on the CPU (the same draw on every device), then
    Y = ΔΩ, Q = qr(Y); ``power_iters`` times: Z = qr(ΔᵀQ), Q = qr(ΔZ); then B = QᵀΔ
    (= (ΔᵀQ)ᵀ) and the SVD of the small B = Ũ S Vh gives U = QŨ. QR between products keeps
    the small singular directions from drowning in rounding (Halko et al. Alg. 4.4). When
    l = min(m, n) the sketch spans all of Δ and the result is an exact SVD up to rounding.

    Example:
        >>> d = torch.outer(torch.arange(4.0), torch.ones(3))
        >>> fn = lambda f: [f(0, 2, d[:2]), f(2, 4, d[2:])]
        >>> u, s, vh = randomized_svd(fn, 4, 3, rank=1, oversample=2,
        ...                       power_iters=1, generator=torch.Generator().manual_seed(0))
        >>> torch.allclose((u * s) @ vh, d, atol=1e-5)
        True
    """
    width = min(rank + oversample, rows, cols)
    omega = torch.randn(cols, width, generator=generator, dtype=dtype).to(device)
    q = _orthonormal(_stack_rows(map_pieces, omega, rows))
    for _ in range(power_iters):
        z = _orthonormal(_transposed_product(map_pieces, q))
        q = _orthonormal(_stack_rows(map_pieces, z, rows))
    b = _transposed_product(map_pieces, q).T  # QᵀΔ, l×n
    u_small, s, vh = torch.linalg.svd(b, full_matrices=False)
    k = min(rank, rows, cols)
    return (q @ u_small[:, :k]).contiguous(), s[:k].contiguous(), vh[:k].contiguous()


def _stack_rows(map_pieces: MapPieces, right: torch.Tensor, rows: int) -> torch.Tensor:
    """Δ @ right, row piece by row piece, into one m×l matrix."""
    out = right.new_empty(rows, right.shape[1])

    def piece(lo: int, hi: int, d: torch.Tensor) -> tuple[int, int, torch.Tensor]:
        return lo, hi, d @ right

    for lo, hi, y in map_pieces(piece):
        out[lo:hi] = y
    return out


def _transposed_product(map_pieces: MapPieces, left: torch.Tensor) -> torch.Tensor:
    """Δᵀ @ left = Σ_pieces Δ[lo:hi]ᵀ left[lo:hi] (n×l), folded in piece order."""
    total: torch.Tensor | None = None

    def piece(lo: int, hi: int, d: torch.Tensor) -> torch.Tensor:
        return d.T @ left[lo:hi]

    for part in map_pieces(piece):
        total = part if total is None else total.add_(part)
    assert total is not None, "a matrix with no rows"
    return total


def _orthonormal(y: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of y's columns (the Q of a reduced QR)."""
    return torch.linalg.qr(y, mode="reduced").Q


def factors_from_svd(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, *, rank: int,
                     transposed: bool, epsilon: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors (A (rank, in), B (out, rank)) from singular triplets of the stored Δ.

    A = diag(√S)·Vh and B = U·diag(√S) (mergekit's "distribute scale"); for a transposed
    module (embeddings, `Conv1D`: Δ stored (in, out)) M = Δᵀ = Vhᵀ S Uᵀ, so A = √S·Uᵀ and
    B = Vhᵀ·√S. Components with S ≤ ``epsilon`` are zeroed and missing ones padded with zeros,
    so the shapes are fixed whatever survives.

    Example:
        >>> u, s, vh = torch.linalg.svd(torch.eye(2))
        >>> a, b = factors_from_svd(u, s, vh, rank=3, transposed=False)
        >>> a.shape, b.shape
        (torch.Size([3, 2]), torch.Size([2, 3]))
    """
    k = s.shape[0]
    s = s.clone()
    if epsilon > 0:
        s[s <= epsilon] = 0
    root = s.sqrt()
    left, right = (vh.T, u.T) if transposed else (u, vh)
    a = root[:, None] * right
    b = left * root[None, :]
    if k < rank:
        a = torch.cat([a, a.new_zeros(rank - k, a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - k)], dim=1)
    return a.contiguous(), b.contiguous()
