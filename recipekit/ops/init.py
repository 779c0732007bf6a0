"""Fresh weights: seeded normal draws generated chunk by chunk, and constant fills.

What transformers' ``_init_weights`` does to a new module (``normal_(0, std)`` for linear
weights, ones or zeros for norms and biases), computed without an fp32 copy of the whole tensor:
`normal` draws fp32 chunks of `CHUNK_ELEMENTS` values and rounds each into the result. Chunks
are multiples of 16 values and the last one is never shorter than 16, so the draw is exactly
``torch.empty(shape).normal_(0, std, generator=g)`` in one go (torch's CPU kernel works in
blocks of 16) rounded once to ``dtype``; tests/ops/test_init.py holds it to that.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where tensors are made: planning reads CHUNK_ELEMENTS
    import torch

#: Values drawn per chunk (a multiple of 16): 4 MiB of fp32 scratch at most.
CHUNK_ELEMENTS = 1 << 20


def chunk_bounds(numel: int, chunk: int = CHUNK_ELEMENTS) -> list[tuple[int, int]]:
    """``[start, stop)`` spans covering ``numel`` values: ``chunk``-sized, with a remainder
    under 16 folded into the last span (a span under 16 would take torch's scalar path)."""
    if chunk % 16:
        raise ValueError(f"chunk must be a multiple of 16, got {chunk}")
    spans = [(a, min(a + chunk, numel)) for a in range(0, numel, chunk)]
    if len(spans) > 1 and spans[-1][1] - spans[-1][0] < 16:
        last = spans.pop()
        spans[-1] = (spans[-1][0], last[1])
    return spans


def normal(shape: tuple[int, ...], *, std: float, generator: torch.Generator,
           dtype: torch.dtype, chunk: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """A ``N(0, std²)`` tensor of ``shape`` drawn on the CPU from ``generator`` in fp32,
    rounded once to ``dtype``; at most one fp32 chunk exists beside the result."""
    import torch

    out = torch.empty(shape, dtype=dtype)
    flat = out.view(-1)
    for a, b in chunk_bounds(flat.numel(), chunk):
        part = torch.empty(b - a, dtype=torch.float32).normal_(0.0, std, generator=generator)
        flat[a:b].copy_(part)
    return out


def fill(shape: tuple[int, ...], *, value: float, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of ``shape`` holding ``value`` everywhere (ones for norm weights, zeros for
    biases and for Gemma's ``(1 + w)`` RMSNorm weights)."""
    import torch

    return torch.full(shape, value, dtype=dtype)
