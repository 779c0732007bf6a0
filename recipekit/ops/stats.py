"""Streaming tensor statistics: one tensor's summary, and the difference of two, chunk by chunk.

`inspect` and `diff` read a tensor of any size in fixed-size chunks, so these accumulators take
one flat chunk at a time and merge exactly: every sum is kept in fp64, and mean/variance use
Chan et al.'s pairwise update ("Updating formulae and a pairwise algorithm for computing sample
variances", 1979), which stays accurate where the textbook sum-of-squares formula cancels.
Within a piece, `piece_stats` and `piece_diff` make one fp64 copy of the values and take every
statistic from a few reductions over it (no masks, no per-statistic conversions: ~1 ns per
value on one core); only a piece that holds NaN/Inf takes the masked path.
Accumulators also merge with each other, so a layer's (or the model's) summary is the exact
statistics of its concatenated values, not an average of averages.

The math is numpy's, not torch's: `inspect`, `diff` and `verify --stats` then never import torch,
whose import alone (1.2-1.6 s) took three times as long as reading a 2 GiB checkpoint from the
page cache. numpy has no bfloat16, and its float16 is slow: `bf16_values` and `f16_values` widen
the stored bits to the equal fp32 values with integer steps, and a piece is then summarised like
an fp32 one.

Conventions (oracle: tests/ops/test_stats.py compares with torch in fp64 on whole tensors):

* Floating statistics are over the finite values; NaN and Inf are counted apart (a tensor with
  one NaN still gets a useful mean). ``std`` uses Bessel's correction, as ``torch.std``.
* ``norm`` is the Frobenius (L2) norm of the finite values.
* A difference compares element pairs where both are finite; ``nonfinite`` counts the others.
  ``rel_norm = ‖a − b‖ / ‖a‖`` (relative to the first input); ``cosine = a·b / (‖a‖‖b‖)``, with
  two all-zero tensors counted as identical (1.0) and one all-zero tensor as orthogonal (0.0),
  where ``torch.cosine_similarity`` would give 0 for both.
* ``equal`` says whether every pair holds the same value: finite pairs equal as numbers
  (integers compared exactly, not through fp64, which rounds above 2^53), non-finite pairs
  equal as NaN and NaN or the same infinity. `diff`'s verdict counts on it, not on
  ``max_abs``, which cannot see a NaN pair or an integer difference lost in fp64.
* fp64 values whose squares leave fp64's range (|x| above ~1e154 or below ~1e-154: an fp64
  mask holding ``finfo.min``) are summed scaled by a power of two (``scale``, exact), so the
  norms, std, cosine and relative difference stay right instead of becoming Inf, NaN or 0.
  A statistic beyond fp64's range itself (the norm of many values near ``finfo.max``) is
  None in `summary`, as JSON has no infinity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Above this magnitude (2^400) or below its inverse, an fp64 piece is scaled before squaring.
_BIG = 2.0 ** 400


def _ldexp(x: float, e: int) -> float:
    """``x · 2^e``, Inf where that leaves fp64's range (`math.ldexp` raises there)."""
    try:
        return math.ldexp(x, e)
    except OverflowError:
        return math.copysign(math.inf, x)


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _piece_scale(m: float) -> int:
    """The power of two to divide an fp64 piece of largest magnitude ``m`` by (0: none)."""
    if m > _BIG or 0.0 < m < 1.0 / _BIG:
        return math.frexp(m)[1]
    return 0


def _scale_down(x: np.ndarray, e: int) -> None:
    """``x /= 2^e`` in place, exactly (two steps: 2^-e alone may leave fp64's range)."""
    half = -e // 2
    np.multiply(x, math.ldexp(1.0, half), out=x)
    np.multiply(x, math.ldexp(1.0, -e - half), out=x)


@dataclass
class TensorStats:
    """Running count / mean / M2 / min / max / sum of squares / NaN / Inf of a value stream.
    ``mean`` is stored divided by 2^scale, ``m2`` and ``sumsq`` by 4^scale (module docstring);
    ``min`` and ``max`` as they are."""

    count: int = 0  # finite values
    mean: float = 0.0
    m2: float = 0.0  # sum of squared deviations from the mean
    sumsq: float = 0.0
    min: float = math.inf
    max: float = -math.inf
    nan: int = 0
    inf: int = 0
    scale: int = 0

    def update(self, chunk: np.ndarray, work: np.ndarray | None = None) -> None:
        """Add a flat chunk (any real dtype; computed in fp64, see `piece_stats`)."""
        self.merge(piece_stats(chunk, work))

    def merge(self, other: TensorStats) -> None:
        """Combine with another accumulator (Chan's parallel update)."""
        self.nan += other.nan
        self.inf += other.inf
        if other.count == 0:
            return
        top = max(self.scale, other.scale) if self.count else other.scale
        d, e = self.scale - top, other.scale - top  # 0, or how far below the larger scale
        self.mean, self.m2, self.sumsq = (math.ldexp(self.mean, d), math.ldexp(self.m2, 2 * d),
                                          math.ldexp(self.sumsq, 2 * d))
        self.scale = top
        mean, m2 = math.ldexp(other.mean, e), math.ldexp(other.m2, 2 * e)
        n = self.count + other.count
        delta = mean - self.mean
        self.mean += delta * other.count / n
        self.m2 += m2 + delta * delta * self.count * other.count / n
        self.count = n
        self.sumsq += math.ldexp(other.sumsq, 2 * e)
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    @property
    def std(self) -> float:
        """Sample standard deviation (``torch.std``'s default, correction 1); NaN below 2."""
        if self.count < 2:
            return math.nan
        return _ldexp(math.sqrt(self.m2 / (self.count - 1)), self.scale)

    @property
    def norm(self) -> float:
        return _ldexp(math.sqrt(self.sumsq), self.scale)

    @property
    def average(self) -> float:
        """The mean of the finite values (``mean`` is stored scaled)."""
        return math.ldexp(self.mean, self.scale)

    def summary(self) -> dict[str, float | int | None]:
        """JSON-ready values (None where undefined: no finite values, or std of one value; or
        beyond fp64's range)."""
        empty = self.count == 0
        return {
            "mean": None if empty else self.average,
            "std": None if self.count < 2 else _finite_or_none(self.std),
            "min": None if empty else self.min,
            "max": None if empty else self.max,
            "norm": _finite_or_none(self.norm),
            "nan": self.nan,
            "inf": self.inf,
        }


@dataclass
class DiffStats:
    """Running max/mean |a − b|, ‖a − b‖², ‖a‖², ‖b‖² and a·b of two aligned value streams,
    and whether every pair is equal. The squares are stored divided by 4^scale (module
    docstring); ``max_abs`` and ``sum_abs`` as they are (a difference of 1e-300 beside values
    of 1e300 must stay visible)."""

    count: int = 0  # pairs where both values are finite
    nonfinite: int = 0
    max_abs: float = 0.0
    sum_abs: float = 0.0
    diff_sq: float = 0.0
    a_sq: float = 0.0
    b_sq: float = 0.0
    dot: float = 0.0
    equal: bool = True
    scale: int = 0

    def update(self, a: np.ndarray, b: np.ndarray, work_a: np.ndarray | None = None,
               work_b: np.ndarray | None = None) -> None:
        """Add two flat chunks of equal length (computed in fp64, see `piece_diff`)."""
        self.merge(piece_diff(a, b, work_a, work_b))

    def merge(self, other: DiffStats) -> None:
        top = (max(self.scale, other.scale) if self.count and other.count
               else other.scale if other.count else self.scale)
        d, e = self.scale - top, other.scale - top  # 0, or how far below the larger scale
        self.scale = top
        self.count += other.count
        self.nonfinite += other.nonfinite
        self.equal = self.equal and other.equal
        self.max_abs = max(self.max_abs, other.max_abs)
        self.sum_abs += other.sum_abs
        self.diff_sq = math.ldexp(self.diff_sq, 2 * d) + math.ldexp(other.diff_sq, 2 * e)
        self.a_sq = math.ldexp(self.a_sq, 2 * d) + math.ldexp(other.a_sq, 2 * e)
        self.b_sq = math.ldexp(self.b_sq, 2 * d) + math.ldexp(other.b_sq, 2 * e)
        self.dot = math.ldexp(self.dot, 2 * d) + math.ldexp(other.dot, 2 * e)

    @property
    def mean_abs(self) -> float:
        return self.sum_abs / self.count if self.count else 0.0

    @property
    def rel_norm(self) -> float:
        """‖a − b‖ / ‖a‖: 0 when equal, ∞ when a is all zero and b is not."""
        if self.a_sq == 0.0:
            return 0.0 if self.diff_sq == 0.0 else math.inf
        return math.sqrt(self.diff_sq) / math.sqrt(self.a_sq)

    @property
    def cosine(self) -> float:
        """a·b / (‖a‖‖b‖), clamped to [-1, 1]; exactly 1 for identical values (two zero
        tensors included), 0 when only one is zero."""
        if self.diff_sq == 0.0:
            return 1.0  # identical (also when both are zero)
        if self.a_sq == 0.0 or self.b_sq == 0.0:
            return 0.0
        return max(-1.0, min(1.0, self.dot / (math.sqrt(self.a_sq) * math.sqrt(self.b_sq))))

    def summary(self) -> dict[str, float | int | bool | None]:
        """JSON-ready values (``rel_norm`` None where a is zero and b is not: JSON has no ∞;
        every statistic None where no pair was finite: nothing was compared; ``max_abs`` and
        ``mean_abs`` None beyond fp64's range)."""
        if self.count == 0 and self.nonfinite:
            return {"max_abs": None, "mean_abs": None, "rel_norm": None, "cosine": None,
                    "nonfinite": self.nonfinite, "equal": self.equal}
        rel = self.rel_norm
        return {"max_abs": _finite_or_none(self.max_abs),
                "mean_abs": _finite_or_none(self.mean_abs),
                "rel_norm": None if math.isinf(rel) else rel, "cosine": self.cosine,
                "nonfinite": self.nonfinite, "equal": self.equal}


def stored_values(piece: np.ndarray, dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """A flat piece as read (`io.chunks.read_elements`: bfloat16 as its uint16 bits) as numpy
    numbers to summarise: bfloat16 and float16 widened to fp32 into ``out`` (uint32 scratch),
    other dtypes as they are. ``dtype``: the safetensors code."""
    if dtype == "BF16":
        return bf16_values(piece.view(np.uint16), out)
    if dtype == "F16":
        return f16_values(piece.view(np.uint16), out)
    return piece


def bf16_values(bits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The fp32 values of bfloat16 ``bits`` (uint16): each value's bits shifted into the top
    half of an fp32, which is the same number (bfloat16 is fp32 with the low 16 bits cut), NaN
    payloads and signs included. ``out``: uint32 scratch of at least ``bits.size`` values."""
    n = bits.size
    words = out[:n] if out is not None and out.size >= n else np.empty(n, dtype=np.uint32)
    np.copyto(words, bits)  # a widening copy, then a shift in place: 0.2 ns a value, where
    np.left_shift(words, 16, out=words)  # a shift that casts its input took 0.3
    return words.view(np.float32)


def f16_values(bits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The fp32 values of float16 ``bits`` (uint16), NaN payloads, infinities, subnormals and
    signs included. ``out``: uint32 scratch of at least ``bits.size`` values.

    Why: numpy converts float16 without SIMD here (0.9 ns a value to fp64, 1.7 to fp32) and
    its float16 minimum and maximum cost ~12 ns a value. Integer steps do it in ~0.5 ns: the
    bits go to the top of a 32-bit word, an arithmetic shift by 3 puts the 5-bit exponent and
    the mantissa where fp32 keeps them (the sign copied into the three bits above, which are
    cleared), and multiplying by 2^112 rebiases the exponent (15 → 127), exactly, subnormals
    included. Exponent 31 (Inf, NaN) would come out finite (≥ 65536, above any finite float16),
    so those entries are set apart (a NaN made quiet, as torch's and the CPU's conversions do).
    Oracle: tests/ops/test_stats.py (torch's conversion, every bit pattern)."""
    n = bits.size
    words = out[:n] if out is not None and out.size >= n else np.empty(n, dtype=np.uint32)
    np.copyto(words, bits)
    np.left_shift(words, 16, out=words)
    signed = words.view(np.int32)
    np.right_shift(signed, 3, out=signed)
    np.bitwise_and(words, np.uint32(0x8FFF_FFFF), out=words)
    values = words.view(np.float32)
    np.multiply(values, np.float32(2.0 ** 112), out=values)
    if n and not (float(values.min()) > -65536.0 and float(values.max()) < 65536.0):
        special = np.flatnonzero((bits & 0x7C00) == 0x7C00)
        top = bits[special].astype(np.uint32)
        payload = (top & 0x03FF) << 13
        payload[payload != 0] |= 0x0040_0000  # a NaN comes out quiet, as from a conversion
        words[special] = ((top & 0x8000) << 16) | 0x7F80_0000 | payload
    return values


def _scratch(work: np.ndarray | None, n: int) -> np.ndarray:
    """The first ``n`` values of an fp64 scratch buffer (a new one when none is given)."""
    if work is None or work.size < n:
        return np.empty(n, dtype=np.float64)
    return work[:n]


def piece_stats(chunk: np.ndarray, work: np.ndarray | None = None) -> TensorStats:
    """The `TensorStats` of one flat piece: the minimum and maximum, then one fp64 copy and
    two reductions over it.

    Why not a Welford pass: it costs several ns a value in numpy or torch, the rest of a pass
    ~1 ns. The variance comes instead from ``m2 = Σx² − (Σx)²/n``, which loses
    ``log2(1 + mean²/var)`` bits: at most one when mean² ≤ var (weight matrices). Otherwise
    (norm weights, offsets) the sums are taken again shifted by the piece's first value ``k``,
    ``Σ(x−k)² − (Σ(x−k))²/n``, which cancels only by ``(mean−k)²/var`` (a few units for any
    piece whose first value is a typical one), and is exactly 0 for a constant piece. Every
    bf16/fp16/fp32 value and its square are exact in fp64, so only the summation rounds, in
    fp64. The minimum and maximum of an fp32 piece (bf16 and fp16 widened by `bf16_values` and
    `f16_values`) come from the stored values (0.05 ns a value each); an integer piece takes
    them from the fp64 copy. ``Σx`` is numpy's pairwise ``sum``, ``Σx²`` a ``dot`` (BLAS, kept
    on the calling thread by `cli._blas_on_caller_threads`). A bf16 piece read cold takes ~0.8
    ns a value on one core, widening included.
    ``min``/``max`` propagate NaN, so a finite minimum and maximum prove the piece is finite;
    otherwise the piece is masked to its finite values, NaN and Inf counted apart. ``work``:
    fp64 scratch of at least ``chunk.size`` values (reused by streaming callers). Oracle:
    tests/ops/test_stats.py (torch in fp64 on the whole tensor).
    """
    flat = chunk.reshape(-1)
    n = flat.size
    if n == 0:
        return TensorStats()
    x = _scratch(work, n)
    np.copyto(x, flat, casting="unsafe")
    low = flat if flat.dtype in (np.float32, np.float64) else x
    lo, hi = float(low.min()), float(low.max())
    nan = inf = 0
    if not (math.isfinite(lo) and math.isfinite(hi)):
        nan = int(np.count_nonzero(np.isnan(x)))
        inf = int(np.count_nonzero(np.isinf(x)))
        x = x[np.isfinite(x)]
        n = x.size
        if n == 0:
            return TensorStats(nan=nan, inf=inf)
        lo, hi = float(x.min()), float(x.max())
    scale = _piece_scale(max(-lo, hi)) if flat.dtype == np.float64 else 0
    if scale:
        _scale_down(x, scale)
    s, sumsq = float(x.sum()), float(np.dot(x, x))
    if s * s > 0.5 * n * sumsq:  # mean² > var: Σx² − (Σx)²/n would cancel, shift first
        k = float(x[0])
        x -= k
        shifted, q = float(x.sum()), float(np.dot(x, x))
        return TensorStats(n, k + shifted / n, max(0.0, q - shifted * shifted / n), sumsq,
                           lo, hi, nan, inf, scale)
    return TensorStats(n, s / n, max(0.0, sumsq - s * s / n), sumsq, lo, hi, nan, inf, scale)


def piece_diff(a: np.ndarray, b: np.ndarray, work_a: np.ndarray | None = None,
               work_b: np.ndarray | None = None) -> DiffStats:
    """The `DiffStats` of two flat pieces of equal length, from two fp64 copies.

    ``a·a``, ``b·b`` and ``a·b`` are three dot products of the copies; then ``a`` becomes
    ``|a − b|`` in place for its maximum, sum and sum of squares. A non-finite value makes
    ``a·a`` or ``b·b`` non-finite, which sends the piece to the masked path (pairs where both
    are finite; the rest counted in ``nonfinite``). Oracle: tests/ops/test_stats.py.

    Pieces with the same dtype and the same bits (the layers a merge or an upscale copied, the
    norms a fine-tune froze) skip the second copy and the difference: ``a·b = b·b = a·a`` and
    every difference is 0, the numbers the general path computes for them, at about half the
    cost (`same_bits` looks at three values before it compares them all, so differing pieces
    pay next to nothing for the check).

    ``equal`` is exact (module docstring): non-finite pairs by class, integers in integer
    arithmetic (`_exact_integer_difference`, `_integer_float_difference`); an fp64 piece beyond
    the range of its squares is scaled (``scale``), its |a − b| taken unscaled.
    """
    fa, fb = a.reshape(-1), b.reshape(-1)
    n = fa.size
    if n == 0:
        return DiffStats()
    x, y = _scratch(work_a, n), _scratch(work_b, n)
    np.copyto(x, fa, casting="unsafe")
    if same_bits(fa, fb):
        aa = _dot(x, x)
        if math.isfinite(aa) and (aa > 1.0 / _BIG or fa.dtype != np.float64):
            return DiffStats(n, 0, 0.0, 0.0, 0.0, aa, aa, aa)
    np.copyto(y, fb, casting="unsafe")
    aa, bb = _dot(x, x), _dot(y, y)
    nonfinite, equal = 0, True
    if not (math.isfinite(aa) and math.isfinite(bb)):
        both = np.isfinite(x) & np.isfinite(y)
        count = int(np.count_nonzero(both))
        nonfinite = n - count
        if nonfinite:
            apart = ~both
            equal = bool(np.array_equal(x[apart], y[apart], equal_nan=True))
        if count == 0:
            return DiffStats(0, nonfinite, equal=equal)
        if nonfinite:
            x, y, n = x[both], y[both], count
            fa, fb = fa[both], fb[both]  # the integer checks below pair them with x
            aa, bb = float(np.dot(x, x)), float(np.dot(y, y))
    scale, apart = 0, None
    if np.float64 in (fa.dtype, fb.dtype) and not (_BIG ** -2 < max(aa, bb) < _BIG):
        scale = _piece_scale(max(float(np.abs(x).max()), float(np.abs(y).max())))
        if scale:  # |a − b| as it is (its small values would vanish scaled), squares scaled
            with np.errstate(over="ignore"):
                apart = np.abs(x - y)
            _scale_down(x, scale)
            _scale_down(y, scale)
            aa, bb = float(np.dot(x, x)), float(np.dot(y, y))
    ab = float(np.dot(x, y))
    np.subtract(x, y, out=x)
    np.abs(x, out=x)
    if fa.dtype.kind in "iu" and fb.dtype.kind in "iu":
        _exact_integer_difference(fa, fb, x)
    elif (fa.dtype.kind in "iu") != (fb.dtype.kind in "iu"):  # fp64 rounds ints above 2^53
        equal = _integer_float_difference(fa, fb, x) and equal
    shown = x if apart is None else apart
    largest = float(shown.max())
    return DiffStats(n, nonfinite, largest, float(shown.sum()), float(np.dot(x, x)), aa, bb, ab,
                     equal and largest == 0.0, scale)


def _dot(x: np.ndarray, y: np.ndarray) -> float:
    """``x·y`` (an fp64 sum of squares overflowing to Inf sends the piece to be scaled, with
    no warning on stderr)."""
    with np.errstate(over="ignore"):
        return float(np.dot(x, y))


def _exact_integer_difference(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    """|a − b| of two integer pieces into ``out`` (fp64), from the exact integer difference:
    fp64 copies of integers above 2^53 round, and their difference can vanish (2^53 + 1
    against 2^53). In uint64 arithmetic, modulo 2^64, the larger minus the smaller is exact
    unless it is 2^64 or more, which only a negative value against a uint64 one reaches (-1
    against 2^64 − 1: the same bits); those pairs are taken in Python integers."""
    au, bu = a.astype(np.uint64), b.astype(np.uint64)  # int64 wraps to v + 2^64: fine mod 2^64
    np.copyto(out, np.where(a >= b, au - bu, bu - au), casting="unsafe")
    if np.uint64 in (a.dtype, b.dtype) and (a.dtype.kind == "i" or b.dtype.kind == "i"):
        wide = np.flatnonzero((a < 0) | (b < 0))  # the signed side's negatives
        if wide.size:
            out[wide] = np.abs(a[wide].astype(object) - b[wide].astype(object)).astype(float)


def _integer_float_difference(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> bool:
    """Whether an integer piece and a floating one hold the same numbers, exactly, with
    ``out`` (their fp64 |a − b|) made exact where fp64 said 0 but they differ: an fp64 copy of
    2^53 + 1 equals 2.0^53. Only integral floats tie that way (beside a large integer, every
    float is integral); the differences are taken as integers, in numpy where the float fits
    the integer type, else in Python."""
    ints, floats = (a, b) if a.dtype.kind in "iu" else (b, a)
    tied = np.flatnonzero(out == 0.0)
    g = floats.astype(np.float64)[tied]
    info = np.iinfo(ints.dtype)
    top = 2.0 ** info.bits if info.min == 0 else -float(info.min)  # exclusive, exact in fp64
    fits = (g >= float(info.min)) & (g < top) & (np.trunc(g) == g)
    inside = np.flatnonzero(fits)
    apart = tied[inside[g[inside].astype(ints.dtype) != ints[tied[inside]]]]
    beyond = tied[~fits]  # a float at the type's edge (2.0^64 against 2^64 - 1)
    for idx in (apart, beyond):
        if idx.size:
            exact = [abs(int(i) - int(v)) for i, v in zip(ints[idx].tolist(),
                                                           floats[idx].tolist(), strict=True)]
            out[idx] = np.array(exact, dtype=np.float64)
    return tied.size == out.size and apart.size == 0 and beyond.size == 0


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two flat pieces hold the same dtype and bytes (``==`` of the values would call
    -0.0 and 0.0 equal, and NaN unequal to itself). The first, middle and last values are
    compared first: pieces that differ almost always differ there."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.size == 0:
        return True
    bits = np.dtype(f"u{a.dtype.itemsize}") if a.dtype.itemsize in (1, 2, 4, 8) else None
    x, y = (a.view(bits), b.view(bits)) if bits is not None else (a, b)
    probe = [0, x.size // 2, x.size - 1]
    if not np.array_equal(x[probe], y[probe]):
        return False
    return bool(np.array_equal(x, y))
