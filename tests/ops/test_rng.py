"""recipekit/ops/rng.py: per-tensor generators and the counter-based draw of streamed masks.

Oracles:
* `counter_draw` recomputed element by element in plain Python (murmur3's 32-bit finalizer on
  (key, row, column), reference below), so the draw is pinned: a change would silently change
  every DARE/DELLA output;
* piece independence: any split into row pieces gives the rows of the whole draw;
* statistics with fixed keys (so the tests are deterministic): the mean and keep rates within
  6σ of a uniform draw's, per bucket counts within 6σ of the binomial, and correlations of
  masks across keys, operands, rows and columns within 6/√n of 0. CPU only here (the draw is
  int32 arithmetic, which wraps the same on CUDA: tests/e2e/test_cuda.py runs ops on a GPU).
"""

from __future__ import annotations

import math

import pytest
import torch

from recipekit.ops import rng
from recipekit.ops.rng import DRAW_BITS, counter_draw, tensor_generator
from recipekit.steps.task_vectors import stream_key

M32 = 0xFFFFFFFF


def fmix32(h: int) -> int:
    """murmur3's finalizer on an unsigned 32-bit integer."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & M32
    return h ^ (h >> 16)


def draw_ref(key: int, row: int, col: int) -> int:
    """One value of the counter draw: fmix32(fmix32(fmix32(row) ^ key) + col·0x9e3779b9), top
    24 bits."""
    h = fmix32(fmix32(row) ^ (key & M32))
    return fmix32((h + col * 0x9E3779B9) & M32) >> (32 - DRAW_BITS)


class TestReference:
    """Oracle: `draw_ref`, element by element."""

    @pytest.mark.parametrize(("key", "rows", "cols"), [
        (0, 3, 5), (-1, 4, 7), (2**31 - 1, 2, 3), (-(2**31), 3, 2), (123456789, 1, 1)])
    def test_small_draws(self, key, rows, cols):
        out = counter_draw(key, 0, rows, cols)
        assert out.dtype == torch.int32 and out.shape == (rows, cols)
        assert out.tolist() == [[draw_ref(key, r, c) for c in range(cols)] for r in range(rows)]

    @pytest.mark.parametrize("key", [0, 7, -1, -(2**31), 2**31 - 1])
    def test_the_torch_path_equals_the_numpy_path(self, key):
        """The CPU draws with numpy, other devices with torch's int32: the same bits (the
        torch path runs on the CPU here; on a GPU in tests/e2e/test_cuda.py)."""
        for lo, hi, cols in [(0, 3, 5), (1000, 1064, 2048), (5, 6, 70000)]:
            assert torch.equal(rng._counter_draw_torch(key, lo, hi, cols, None),
                               counter_draw(key, lo, hi, cols))

    def test_offset_rows_and_wide_rows(self):
        """Rows far from 0 and rows wider than the internal 64Ki-value block."""
        key = stream_key(3, "model.embed_tokens.weight", 1)
        out = counter_draw(key, 1_000_000, 1_000_002, 70_001)
        for r, c in [(0, 0), (0, 65_535), (0, 65_536), (1, 70_000), (1, 12_345)]:
            assert int(out[r, c]) == draw_ref(key, 1_000_000 + r, c), (r, c)

    def test_range(self):
        out = counter_draw(7, 0, 200, 300)
        assert int(out.min()) >= 0 and int(out.max()) < 1 << DRAW_BITS


class TestPieces:
    """Any rows, asked for alone, are the rows of the whole draw."""

    @pytest.mark.parametrize("row_len", [1, 3, 64, 1000, 66_000])
    def test_any_split_gives_the_whole(self, row_len):
        rows = max(3, 4_000 // row_len)
        whole = counter_draw(11, 0, rows, row_len)
        for sizes in ([1], [2, 5, 3], [rows // 2 + 1]):
            parts, lo, i = [], 0, 0
            while lo < rows:
                hi = min(rows, lo + sizes[i % len(sizes)])
                parts.append(counter_draw(11, lo, hi, row_len))
                lo, i = hi, i + 1
            assert torch.equal(torch.cat(parts), whole), sizes

    def test_empty_rows(self):
        assert counter_draw(1, 5, 5, 8).shape == (0, 8)


def within(count: int, n: int, p: float, sigmas: float = 6.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


class TestUniformity:
    """Oracle: a uniform draw on [0, 2^24): mean, keep rates and 16 equal buckets within 6σ."""

    N_ROWS, ROW_LEN = 512, 1024

    @pytest.fixture(scope="class")
    def draw(self) -> torch.Tensor:
        return counter_draw(stream_key(0, "model.layers.0.mlp.up_proj.weight", 0), 0,
                            self.N_ROWS, self.ROW_LEN)

    def test_mean(self, draw):
        n = draw.numel()
        mean = float(draw.double().mean()) / (1 << DRAW_BITS)
        assert abs(mean - 0.5) < 6 * math.sqrt(1 / 12 / n)

    @pytest.mark.parametrize("density", [0.01, 0.1, 0.3, 0.5, 0.9, 0.99])
    def test_keep_rate(self, draw, density):
        kept = int((draw < int(density * (1 << DRAW_BITS))).sum())
        assert within(kept, draw.numel(), density)

    def test_buckets(self, draw):
        counts = torch.bincount((draw >> (DRAW_BITS - 4)).reshape(-1), minlength=16)
        assert all(within(int(c), draw.numel(), 1 / 16) for c in counts), counts.tolist()

    def test_low_bits_too(self, draw):
        counts = torch.bincount((draw & 15).reshape(-1), minlength=16)
        assert all(within(int(c), draw.numel(), 1 / 16) for c in counts), counts.tolist()

    def test_every_row_and_column_keeps_about_half(self, draw):
        """No row or column is stuck (a weak hash of the row would show here)."""
        mask = (draw < 1 << (DRAW_BITS - 1)).double()
        for rates, n in ((mask.mean(1), self.ROW_LEN), (mask.mean(0), self.N_ROWS)):
            sd = math.sqrt(0.25 / n)
            assert float((rates - 0.5).abs().max()) < 6 * sd


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


class TestIndependence:
    """Masks of different keys (operands, tensors, seeds), and neighbouring rows and columns
    of one mask, are uncorrelated: |r| < 6/√n."""

    ROWS, LEN = 256, 512

    def mask(self, key: int) -> torch.Tensor:
        return counter_draw(key, 0, self.ROWS, self.LEN) < int(0.5 * (1 << DRAW_BITS))

    @pytest.mark.parametrize(("a", "b"), [
        ((0, "w", 0), (0, "w", 1)),  # two operands of one tensor
        ((0, "w", 0), (1, "w", 0)),  # two seeds
        ((0, "layers.0.w", 0), (0, "layers.1.w", 0)),  # two tensors
        ((5, "w", 2), (5, "w", 3)),
    ])
    def test_across_keys(self, a, b):
        ka, kb = stream_key(*a), stream_key(*b)
        assert ka != kb
        n = self.ROWS * self.LEN
        assert abs(corr(self.mask(ka), self.mask(kb))) < 6 / math.sqrt(n)

    def test_adjacent_keys(self):
        """Keys one apart (not what stream_key gives, but what a bad mix would confuse)."""
        n = self.ROWS * self.LEN
        assert abs(corr(self.mask(1000), self.mask(1001))) < 6 / math.sqrt(n)

    def test_neighbours_within_a_mask(self):
        m = self.mask(stream_key(0, "w", 0))
        bound = 6 / math.sqrt(m.numel())
        assert abs(corr(m[1:], m[:-1])) < bound  # row r and r + 1
        assert abs(corr(m[:, 1:], m[:, :-1])) < bound  # column c and c + 1
        assert abs(corr(m[1:, 1:], m[:-1, :-1])) < bound  # the diagonal


class TestKeys:
    def test_stream_key_is_a_stable_int32(self):
        k = stream_key(0, "model.layers.0.mlp.up_proj.weight", 0)
        assert k == stream_key(0, "model.layers.0.mlp.up_proj.weight", 0)
        assert -(2**31) <= k < 2**31
        keys = {stream_key(s, t, i) for s in range(3) for t in ("a", "b") for i in range(3)}
        assert len(keys) == 18

    def test_tensor_generator_depends_on_seed_and_name(self):
        def draw(seed: int, name: str) -> torch.Tensor:
            return torch.rand(8, generator=tensor_generator(seed, name))

        assert torch.equal(draw(0, "a"), draw(0, "a"))
        assert not torch.equal(draw(0, "a"), draw(1, "a"))
        assert not torch.equal(draw(0, "a"), draw(0, "b"))
