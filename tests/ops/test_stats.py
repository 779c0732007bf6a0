"""ops/stats.py: streaming statistics against torch on the whole tensor, in fp64.

Oracle: torch's mean / std (correction 1) / amin / amax / vector_norm over the finite values,
|a - b| and cosine_similarity; the accumulators (numpy, bfloat16 widened by `bf16_values`) are
fed in uneven chunks so that merging is exercised at every boundary.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from recipekit.ops.stats import (
    DiffStats,
    TensorStats,
    bf16_values,
    f16_values,
    piece_diff,
    stored_values,
)

CODES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32",
         torch.float64: "F64"}


def values(t: torch.Tensor) -> np.ndarray:
    """What the statistics see of a stored tensor: numpy values, bfloat16 and float16 widened
    from their bits (as `io.chunks.read_elements` gives them)."""
    flat = t.reshape(-1)
    raw = flat.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else flat.numpy()
    return stored_values(raw, CODES.get(t.dtype, "I64"))


def chunks(t: torch.Tensor, sizes=(1, 7, 100, 3)):
    flat, i, k = values(t), 0, 0
    while i < flat.size:
        n = sizes[k % len(sizes)]
        yield flat[i:i + n]
        i, k = i + n, k + 1


@pytest.mark.parametrize(("dtype", "widen"), [(torch.bfloat16, bf16_values),
                                               (torch.float16, f16_values)])
def test_widening_is_torch_conversion_for_every_bit_pattern(dtype, widen):
    """Oracle: torch's conversion to float32, all 65536 patterns (subnormals, infinities, NaN
    payloads and signed zeros compared as bits)."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    want = bits.view(dtype).float().view(torch.int32).numpy()
    got = widen(bits.numpy().view(np.uint16), np.empty(70000, dtype=np.uint32))
    assert np.array_equal(got.view(np.int32), want)


@pytest.mark.parametrize("widen", [bf16_values, f16_values])
def test_widening_an_empty_piece(widen):
    """An empty float16 tensor made `inspect` fail (the infinity check took the minimum of
    nothing); found by a black-box check."""
    assert widen(np.empty(0, dtype=np.uint16)).size == 0


class TestTensorStats:
    """Oracle: torch in fp64 on the finite values of the whole tensor."""

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16,
                                       torch.float64])
    def test_equals_torch_with_planted_nan_inf(self, dtype):
        g = torch.Generator().manual_seed(0)
        t = (torch.randn(37, 29, generator=g) * 3 + 1000).to(dtype)  # large mean: no cancellation
        t[3, 4], t[10, 0], t[36, 28] = float("nan"), float("inf"), float("-inf")
        t[0, 0] = float("nan")
        acc = TensorStats()
        for c in chunks(t):
            acc.update(c)
        x = t.double().reshape(-1)
        x = x[torch.isfinite(x)]
        s = acc.summary()
        assert (s["nan"], s["inf"]) == (2, 2)
        assert s["mean"] == pytest.approx(float(x.mean()), rel=1e-12)
        assert s["std"] == pytest.approx(float(x.std()), rel=1e-9)
        assert (s["min"], s["max"]) == (float(x.min()), float(x.max()))
        assert s["norm"] == pytest.approx(float(torch.linalg.vector_norm(x)), rel=1e-12)

    def test_merge_equals_concatenation(self):
        g = torch.Generator().manual_seed(1)
        a, b = torch.randn(1000, generator=g), torch.randn(10, generator=g) + 5
        left, right, whole = TensorStats(), TensorStats(), TensorStats()
        left.update(values(a))
        right.update(values(b))
        whole.update(values(torch.cat([a, b])))
        left.merge(right)
        for key, value in whole.summary().items():
            assert left.summary()[key] == pytest.approx(value, rel=1e-12), key

    def test_integer_and_degenerate(self):
        acc = TensorStats()
        acc.update(np.arange(512).reshape(1, 512))
        assert acc.summary()["mean"] == 255.5
        expected = float(torch.arange(512, dtype=torch.float64).std())
        assert acc.summary()["std"] == pytest.approx(expected, rel=1e-12)
        one = TensorStats()
        one.update(np.array([2.0]))
        assert one.summary()["std"] is None and one.summary()["norm"] == 2.0
        nothing = TensorStats()
        nothing.update(np.array([np.nan], dtype=np.float32))
        assert nothing.summary() == {"mean": None, "std": None, "min": None, "max": None,
                                     "norm": 0.0, "nan": 1, "inf": 0}


    def test_scaled_pieces_merge_like_one(self):
        """fp64 pieces beyond the range of their squares are summed at a power-of-two scale;
        merging them with ordinary pieces gives the statistics of the concatenation. Oracle:
        Python's exact decimal arithmetic."""
        from decimal import Decimal, getcontext

        getcontext().prec = 60
        top = np.finfo(np.float64).max
        parts = [np.array([1e-200, -3e-201, 2e-200]), np.array([0.5, -1.5, 2.0]),
                 np.array([1e200, -2e200, 4e199]), np.array([-top, 0.0, -top])]
        acc = TensorStats()
        for part in parts[:3]:
            acc.update(part)
        values = [Decimal(float(v)) for part in parts[:3] for v in part]
        n = len(values)
        mean = sum(values) / n
        std = (sum((v - mean) ** 2 for v in values) / (n - 1)).sqrt()
        norm = sum(v * v for v in values).sqrt()
        s = acc.summary()
        assert s["mean"] == pytest.approx(float(mean), rel=1e-12)
        assert s["std"] == pytest.approx(float(std), rel=1e-12)
        assert s["norm"] == pytest.approx(float(norm), rel=1e-12)
        acc.update(parts[3])  # the norm of values near fp64's largest is beyond its range
        assert acc.summary()["norm"] is None and acc.summary()["std"] is not None


class TestDiffStats:
    """Oracle: torch's formulas on the whole tensors, fp64."""

    def test_equals_formulas(self):
        g = torch.Generator().manual_seed(2)
        a = torch.randn(64, 33, generator=g)
        b = (a + 0.1 * torch.randn(64, 33, generator=g)).to(torch.bfloat16)
        acc = DiffStats()
        for ca, cb in zip(chunks(a), chunks(b), strict=True):
            acc.update(ca, cb)
        x, y = a.double().reshape(-1), b.double().reshape(-1)
        d = (x - y).abs()
        s = acc.summary()
        assert s["max_abs"] == float(d.max())
        assert s["mean_abs"] == pytest.approx(float(d.mean()), rel=1e-12)
        assert s["rel_norm"] == pytest.approx(float((x - y).norm() / x.norm()), rel=1e-12)
        assert s["cosine"] == pytest.approx(
            float(torch.nn.functional.cosine_similarity(x, y, dim=0)), rel=1e-12)
        assert s["nonfinite"] == 0

    def test_identical_is_exactly_zero_and_one(self):
        t = torch.randn(1000)
        acc = DiffStats()
        acc.update(values(t), values(t.clone()))
        assert acc.summary() == {"max_abs": 0.0, "mean_abs": 0.0, "rel_norm": 0.0,
                                 "cosine": 1.0, "nonfinite": 0, "equal": True}
        zeros = DiffStats()
        zeros.update(np.zeros(4), np.zeros(4))
        assert zeros.cosine == 1.0 and zeros.rel_norm == 0.0

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
    def test_same_bits_path_equals_general_path(self, dtype):
        """Pieces with equal bytes take a shortcut; -0.0 against 0.0 (equal values, other
        bits) takes the general path: both must give the same numbers."""
        g = torch.Generator().manual_seed(3)
        a = torch.randn(3000, generator=g).to(dtype)
        a[::7] = 0.0
        flipped = a.clone()
        flipped[::7] = -0.0
        assert not torch.equal(a.view(torch.int8), flipped.view(torch.int8))
        fast, general = piece_diff(values(a), values(a)), piece_diff(values(a), values(flipped))
        assert dataclasses.asdict(fast) == dataclasses.asdict(general)
        assert (fast.max_abs, fast.diff_sq, fast.a_sq == fast.dot == fast.b_sq) == (0.0, 0.0, True)
        with_nan = a.clone()
        with_nan[5] = float("nan")
        same = piece_diff(values(with_nan), values(with_nan))  # NaN: not finite, the masked path
        assert same.nonfinite == 1 and same.count == 2999 and same.diff_sq == 0.0

    def test_scaled_and_zero_and_nonfinite(self):
        a = np.array([1.0, -2.0, 3.0, np.nan])
        acc = DiffStats()
        acc.update(a, 2 * a)
        assert (acc.max_abs, acc.rel_norm, acc.nonfinite) == (3.0, 1.0, 1)
        assert acc.cosine == pytest.approx(1.0, abs=1e-15)
        assert acc.mean_abs == 2.0
        one_zero = DiffStats()
        one_zero.update(np.zeros(3), np.ones(3))
        assert one_zero.cosine == 0.0 and math.isinf(one_zero.rel_norm)
        assert one_zero.summary()["rel_norm"] is None
        nothing = DiffStats()  # no pair finite: nothing compared, not "identical"
        nothing.update(np.full(4, np.nan), np.ones(4))
        assert nothing.summary() == {"max_abs": None, "mean_abs": None, "rel_norm": None,
                                     "cosine": None, "nonfinite": 4, "equal": False}

    def test_small_differences_beside_huge_fp64_values(self):
        """Pieces scaled for their huge values (`finfo.min` masks) made differences of ordinary
        values vanish: [min, 1.0] against [min, 1.0 + ulp] was "equal" with max |a−b| 0 (found
        by a black-box check of the scaling fix). |a − b| is taken unscaled; only the squares
        are scaled. Oracle: the differences by hand."""
        top = np.finfo(np.float64).max
        cases = [([-top, 1.0, 0.25], [-top, np.nextafter(1.0, 2.0), 0.25], 2.0 ** -52),
                 ([1e300, 1e-300], [1e300, 2e-300], 1e-300)]
        for a, b, largest in cases:
            acc = DiffStats()
            acc.update(np.array(a), np.array(b))
            assert acc.summary()["equal"] is False and acc.summary()["max_abs"] == largest
        split = DiffStats()  # the huge value and the small difference in different pieces
        split.update(np.array([1e300, 1.0]), np.array([1e300, 1.0]))
        split.update(np.array([1e-300]), np.array([3e-300]))
        assert split.summary()["max_abs"] == 3e-300 - 1e-300 and split.summary()["equal"] is False

    def test_64_bit_integers_of_either_signedness(self):
        """-1 (int64) against 2^64 − 1 (uint64) hold the same bits: the modulo-2^64 difference
        was 0, "equal" (found by a black-box check). Oracle: Python integers."""
        acc = DiffStats()
        acc.update(np.array([-1, 5], dtype=np.int64), np.array([2**64 - 1, 5], dtype=np.uint64))
        assert acc.summary()["equal"] is False and acc.summary()["max_abs"] == float(2**64)

    @pytest.mark.parametrize(("ints", "floats", "largest"), [
        (np.array([2**53 + 1], dtype=np.int64), np.array([2.0**53]), 1.0),
        (np.array([2**64 - 1], dtype=np.uint64), np.array([2.0**64]), 1.0),
        (np.array([2**63 - 1], dtype=np.int64), np.array([2.0**63]), 1.0),
        (np.array([-2**63, 7], dtype=np.int64), np.array([-2.0**63, 7.0]), 0.0),
        (np.array([3, -4], dtype=np.int8), np.array([3.0, -4.0], dtype=np.float32), 0.0),
        (np.array([3], dtype=np.int32), np.array([3.5]), 0.5),
    ])
    def test_integers_against_floats_exactly(self, ints, floats, largest):
        """An integer tensor against a floating one was compared through fp64 copies, where
        2^53 + 1 equals 2.0^53 (found by a black-box check): the verdict and max |a − b| are
        exact. Oracle: Python integers."""
        for a, b in ((ints, floats), (floats, ints)):
            acc = DiffStats()
            acc.update(a, b)
            assert acc.summary()["equal"] is (largest == 0.0)
            assert acc.summary()["max_abs"] == largest
        if floats.dtype == np.float64:  # beside a NaN pair (the masked path)
            acc = DiffStats()
            acc.update(np.concatenate([ints, np.array([7], dtype=ints.dtype)]),
                       np.append(floats, np.nan))
            assert (acc.summary()["max_abs"], acc.summary()["nonfinite"]) == (largest, 1)

