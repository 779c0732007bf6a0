"""ops/init.py: chunked seeded normals and constant fills.

Oracle: torch's own one-shot ``Tensor.normal_`` from an equally seeded generator, in fp32,
rounded once to the output dtype; the chunking must not change a single value.
"""

from __future__ import annotations

import pytest
import torch

from recipekit.ops.init import chunk_bounds, fill, normal
from recipekit.ops.rng import tensor_generator


@pytest.mark.parametrize("numel", [1, 5, 15, 16, 17, 47, 48, 49, 63, 64, 65, 1000, 4097])
@pytest.mark.parametrize("chunk", [16, 32, 48, 1024])
def test_chunked_normal_is_the_one_shot_draw(numel, chunk):
    want = torch.empty(numel).normal_(0.0, 0.37, generator=tensor_generator(5, "w"))
    got = normal((numel,), std=0.37, generator=tensor_generator(5, "w"), dtype=torch.float32,
                 chunk=chunk)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_normal_is_rounded_once_from_fp32(dtype):
    shape = (33, 70)
    want = torch.empty(shape).normal_(0.0, 0.02, generator=tensor_generator(0, "x")).to(dtype)
    got = normal(shape, std=0.02, generator=tensor_generator(0, "x"), dtype=dtype, chunk=64)
    assert got.dtype == dtype and got.shape == shape
    assert torch.equal(got, want)


def test_chunk_bounds_cover_everything_with_no_short_tail():
    for numel in range(0, 200):
        spans = chunk_bounds(numel, 32)
        assert [i for a, b in spans for i in range(a, b)] == list(range(numel))
        if len(spans) > 1:
            assert all((b - a) % 16 == 0 for a, b in spans[:-1])
            assert spans[-1][1] - spans[-1][0] >= 16
    with pytest.raises(ValueError, match="multiple of 16"):
        chunk_bounds(10, 24)


def test_fill():
    t = fill((3, 4), value=1.0, dtype=torch.bfloat16)
    assert t.dtype == torch.bfloat16 and torch.equal(t, torch.ones(3, 4, dtype=torch.bfloat16))
    assert torch.equal(fill((2,), value=0.0, dtype=torch.float32), torch.zeros(2))
