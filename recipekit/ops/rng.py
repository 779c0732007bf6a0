"""Per-tensor random generators, so a tensor's random draw is reproducible on its own.

A random method (DARE, DELLA, ...) or a random initializer seeds one CPU generator per output
tensor from (``seed``, tensor name): the draw does not depend on which other tensors the recipe
touches, nor on the order they are computed in (DESIGN.md §2).
"""

from __future__ import annotations

import hashlib

import torch


def tensor_generator(seed: int, tensor: str) -> torch.Generator:
    """A CPU generator seeded by (``seed``, ``tensor``) through sha256."""
    digest = hashlib.sha256(f"{seed}\0{tensor}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


#: bits of a counter draw: uniform integers in [0, 2^24), exact in fp32
DRAW_BITS = 24
#: entries hashed at once: 64Ki int32 stay in the CPU's L2 cache through the mixing rounds
_DRAW_BLOCK = 1 << 16


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's finalizer on int32 (wrapping multiplies, logical shifts by masking), in place:
    every input bit flips each output bit with probability about 1/2."""
    t = torch.empty_like(h)
    torch.bitwise_right_shift(h, 16, out=t).bitwise_and_(0xFFFF)
    h.bitwise_xor_(t).mul_(-2048144789)  # 0x85ebca6b
    torch.bitwise_right_shift(h, 13, out=t).bitwise_and_(0x7FFFF)
    h.bitwise_xor_(t).mul_(-1028477387)  # 0xc2b2ae35
    torch.bitwise_right_shift(h, 16, out=t).bitwise_and_(0xFFFF)
    return h.bitwise_xor_(t)


def counter_draw(key: int, lo: int, hi: int, row_len: int, device: torch.device | None = None
                 ) -> torch.Tensor:
    """Uniform integers in [0, 2^24) for rows ``lo:hi`` of a tensor with ``row_len`` values
    per row: a hash of (``key``, row, column), so any rows give the same values whoever asks,
    whole or in pieces, on any device (int32 arithmetic wraps the same on CPU and CUDA).

    Why not torch's generators: their streams cannot start at an arbitrary element, so a mask
    drawn in pieces would differ from the whole tensor's (and `torch.bernoulli` costs ~18 ns
    per value on one CPU thread; this ~2.5). Oracle: tests/ops/test_rng.py (piece
    independence, uniformity, independence across keys).

    Returns:
        int32 [hi − lo, row_len].
    """
    if device is None or torch.device(device).type == "cpu":
        return _counter_draw_numpy(key, lo, hi, row_len)
    return _counter_draw_torch(key, lo, hi, row_len, device)


def _counter_draw_torch(key: int, lo: int, hi: int, row_len: int, device: torch.device | None
                        ) -> torch.Tensor:
    """`counter_draw` in torch's int32 (arithmetic shifts masked to logical ones), on any
    device."""
    golden = -1640531527  # 0x9e3779b9
    rows = torch.arange(lo, hi, dtype=torch.int32, device=device)
    rows = _fmix32(_fmix32(rows).bitwise_xor_(key))
    cols = torch.arange(row_len, dtype=torch.int32, device=device).mul_(golden)
    out = torch.empty((hi - lo, row_len), dtype=torch.int32, device=device)
    step = max(1, _DRAW_BLOCK // max(1, row_len))
    width = min(row_len, _DRAW_BLOCK)
    for r in range(0, hi - lo, step):
        for c in range(0, row_len, width):
            block = out[r:r + step, c:c + width]
            torch.add(rows[r:r + step, None], cols[None, c:c + width], out=block)
            _fmix32(block)
    return out.bitwise_right_shift_(32 - DRAW_BITS).bitwise_and_((1 << DRAW_BITS) - 1)


def _counter_draw_numpy(key: int, lo: int, hi: int, row_len: int) -> torch.Tensor:
    """`counter_draw` on the CPU, bit for bit: numpy's uint32 has logical shifts and wrapping
    multiplies, so murmur3's finalizer takes six ops instead of nine (no masks), at a lower
    cost per op; 1.2 against 1.85 ns per value on a 128Ki-value piece."""
    import numpy as np

    def fmix(h: np.ndarray) -> np.ndarray:
        h ^= h >> np.uint32(16)
        h *= np.uint32(0x85EBCA6B)
        h ^= h >> np.uint32(13)
        h *= np.uint32(0xC2B2AE35)
        h ^= h >> np.uint32(16)
        return h

    rows = fmix(fmix(np.arange(lo, hi, dtype=np.uint32)) ^ np.uint32(key & 0xFFFFFFFF))
    cols = np.arange(row_len, dtype=np.uint32) * np.uint32(0x9E3779B9)
    out = fmix(np.add(rows[:, None], cols[None, :]))
    out >>= np.uint32(32 - DRAW_BITS)
    return torch.from_numpy(out.view(np.int32))
