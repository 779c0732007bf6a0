"""Masks kept as bits between a reduction's passes and an output's row pieces.

Why: DARE and DELLA keep the random masks their L1 pass draws, and SCE the selection its energy
pass makes, so that the output pass unpacks one bit a value instead of drawing, ranking or
taking the variance again. The bits are `np.packbits` of the flat mask, padded to whole fp64
values, so they ride in the reduction's fp64 value after its rules. CPU only. Oracle: the
kept-mask tests of tests/ops/test_stream_prune.py and tests/ops/test_stream_sce.py (the same
output bytes with and without the bits).
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["bit_view", "pack", "put", "set_bits", "unpack", "unpack_rows"]


def bit_view(room: torch.Tensor) -> np.ndarray:
    """The bytes of ``room`` (a contiguous zeroed fp64 CPU tensor of
    `graph.passes.mask_words` values, the tail
    of the reduction's own value) as room for bits. Why a view: the passes fill the value in
    place, where bits made apart and joined to the rules at the end were copied twice (a
    stack and a cat: three times the bits at once, where the estimate counts two)."""
    return room.numpy().view(np.uint8)


def pack(mask: torch.Tensor) -> np.ndarray | None:
    """A bool or 0/1 mask as `np.packbits` of its flat order; None off the CPU."""
    if mask.device.type != "cpu":
        return None
    flat = mask.reshape(-1)
    if flat.dtype == torch.bool:
        return np.packbits(flat.numpy())
    if flat.dtype in (torch.float32, torch.float64):
        return np.packbits(flat.numpy() != 0)
    return np.packbits((flat != 0).numpy())


def put(bits: np.ndarray, start: int, packed: np.ndarray | None) -> bool:
    """Store a piece's `pack`ed mask at flat value ``start`` of ``bits``; False (nothing
    stored) when there is none or the piece does not start on a whole byte."""
    if packed is None or start % 8:
        return False
    bits[start // 8:start // 8 + len(packed)] = packed
    return True


def set_bits(bits: np.ndarray, at: np.ndarray) -> None:
    """Set the bits of the flat mask ``bits`` (uint8, `np.packbits` order) at the flat
    positions ``at`` (int64, any order), leaving the others as they are.

    Why not ``np.bitwise_or.at``: it costs ~15 ns a position. These positions are few among
    the values they span (SCE's kept window entries: up to 6% of a piece), so a bool mask of
    the span, packed and ORed in whole bytes, costs ~3."""
    if at.size == 0:
        return
    lo = int(at.min()) & ~7  # a whole byte
    span = np.zeros(int(at.max()) + 1 - lo, dtype=bool)
    span[at - lo] = True
    packed = np.packbits(span)
    bits[lo >> 3:(lo >> 3) + packed.size] |= packed


def unpack(bits: np.ndarray, start: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    """Values ``start:start + count`` of the flat mask in ``bits`` (uint8), as a flat 0/1
    tensor in ``dtype`` (bool: a view of the unpacked bytes)."""
    raw = bits[start // 8:-(-(start + count) // 8)]
    flags = np.unpackbits(raw, count=count + start % 8)[start % 8:]
    if dtype == torch.bool:  # 0 and 1 are numpy's bools: a view
        return torch.from_numpy(flags.view(np.bool_))
    if dtype in (torch.float32, torch.float64):  # numpy's conversion: ~0.15 ns a value
        return torch.from_numpy(flags.astype(np.float32 if dtype == torch.float32
                                             else np.float64))
    return torch.from_numpy(flags).to(dtype)


def unpack_rows(bits: torch.Tensor, lo: int, shape: torch.Size, dtype: torch.dtype
                ) -> torch.Tensor:
    """Rows ``lo:`` of a mask of ``shape`` (the piece's; dim 0 its rows) from ``bits``, the
    fp64 tail of a reduction's value that holds the whole tensor's mask, 0/1 in ``dtype``."""
    count = math.prod(shape)
    row = count // shape[0] if len(shape) else 1
    return unpack(bits.numpy().view(np.uint8), lo * row, count, dtype).reshape(shape)
