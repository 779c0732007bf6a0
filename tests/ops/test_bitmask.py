"""recipekit/ops/bitmask.py: masks kept as bits. Oracle: the mask itself, round-tripped at
byte-aligned pieces and read back from any offset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recipekit.graph.passes import mask_words
from recipekit.ops.bitmask import bit_view, pack, unpack


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
