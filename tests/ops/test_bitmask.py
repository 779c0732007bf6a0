"""recipekit/ops/bitmask.py: masks kept as bits. Oracle: the mask itself, round-tripped at
byte-aligned pieces and read back from any offset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recipekit.graph.passes import mask_words
from recipekit.ops.bitmask import bit_view, pack, set_bits, unpack


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32, torch.float64, torch.bfloat16])
def test_pieces_packed_then_read_from_any_offset(dtype):
    mask = torch.rand(203, generator=torch.Generator().manual_seed(0)) < 0.4
    bits = bit_view(torch.zeros(mask_words(mask.numel()), dtype=torch.float64))
    assert bits.nbytes % 8 == 0 and bits.nbytes * 8 >= mask.numel()
    for lo in range(0, 203, 64):  # pieces that start on whole bytes
        packed = pack(mask[lo:lo + 64].to(dtype))
        bits[lo // 8:lo // 8 + len(packed)] = packed
    for start, count in [(0, 203), (3, 17), (61, 70), (200, 3), (8, 0)]:
        got = unpack(bits, start, count, torch.float32 if dtype == torch.bool else dtype)
        assert torch.equal(got, mask[start:start + count].to(got.dtype))
    assert np.unpackbits(bits)[203:].sum() == 0  # the padding stays clear


@pytest.mark.parametrize("order", ["ascending", "shuffled"])
def test_set_bits_sets_those_positions_and_keeps_the_others(order):
    """Against ``np.bitwise_or.at`` over a mask that already holds bits: positions that do
    not start or end on whole bytes, one already set, the first and the last value."""
    rng = np.random.default_rng(0)
    before = rng.random(203) < 0.3
    at = np.array([0, 5, 13, 14, 15, 16, 99, 150, 202], dtype=np.int64)
    before[13] = True
    bits = np.packbits(before)
    if order == "shuffled":
        rng.shuffle(at)
    want = bits.copy()
    np.bitwise_or.at(want, at >> 3, (0x80 >> (at & 7)).astype(np.uint8))
    set_bits(bits, at)
    assert np.array_equal(bits, want)
    set_bits(bits, np.empty(0, dtype=np.int64))  # nothing to set
    assert np.array_equal(bits, want)
