"""Keep an entry where its draw is below a table indexed by its magnitude rank in its row,
without sorting the row: the mask of DELLA's MAGPRUNE (`ops.sparsify.della_keep_mask`).

Why: DELLA keeps each entry with a probability linear in its magnitude rank within its row,
and the rank came from sorting every row (packed 64-bit keys: 18-24 ns a value on this
project's 2-core EPYC, over half of a DELLA merge). But the table of thresholds is
non-decreasing in the rank, so an entry whose rank is only known to lie in ``[lo, hi]`` is
already decided when ``draw < table[lo]`` (kept) or ``draw ≥ table[hi]`` (dropped). Per-row
counts of a coarse bucket of the key (the fp32 key's high bits: about L/32 buckets an octave)
give every entry such an interval, a few ranks wide, at the cost of a histogram; only the
entries whose draw falls between their bucket's two thresholds (about 2ε·(bucket size)/L of
them, ~0.1% of a Gaussian-like row) need their exact rank, and only the buckets holding one
of them are sorted. DELLA's mask then costs 8-10 ns a value instead of 19-25 (TinyLlama's row
lengths 2048 and 5632, one thread, 128Ki-value pieces; half of it is now the histogram, the
two threshold gathers and the exact ranks' membership gather, a third the ~40 calls). The
result is the full sort's, entry for entry (oracle: tests/ops/test_rank_keep.py, against
ranking by a stable sort, with ties, zeros, NaN and one-bucket rows).

Exact zeros get a bin of their own (τ = ±0: the weights a fine-tune left unchanged in bf16, or
a task vector pruned before, often most of a row). Shared with the smallest keys, their bucket
spanned so many ranks that a large share of it was undecided and sorted. A row's zeros hold
its lowest ranks in column order, so a cumulative count ranks them (`_rank_zeros`), and the
exact ranking sorts with numpy's stable sort, which uses the runs the flat order already has.
A TinyLlama DELLA whose task vector is 70% zeros: 72-74 → 30 s, same bytes.

Pure tensor math on the CPU (numpy for the elementwise steps and the rare exact ranks, torch
for the histogram and the gathers); no I/O.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["MIN_ROW", "bucket_shift", "columns_by_rank", "keep_by_rank"]

#: the buckets span this many octaves below the piece's largest key; the smaller keys share
#: the lowest bucket (zeros have a bin of their own). Fewer (10) were 10% faster on Gaussian
#: deltas and up to 9x slower on heavy-tailed ones (Student t, 1.5 degrees of freedom)
OCTAVES = 16
#: bits of the packed (bucket, key, column) values the exact ranking sorts (signed int64)
PACK_BITS = 63
#: rows shorter than this are sorted whole (the histogram's bins would outnumber the entries)
MIN_ROW = 1024
#: zeros are ranked by a cumulative count (`_rank_zeros`, ~2 ns a value of the piece) once some
#: row holds this many; fewer cost less to rank with the other undecided entries
ZERO_RUN = 64


def bucket_shift(length: int) -> int:
    """The low key bits a bucket ignores for rows of ``length``: 2^(23 − shift) buckets an
    octave, about L/32, so a bucket holds a similar share of any row (measured fastest at
    L = 1024, 2048, 5632 and 14336: too fine and the bins outnumber the entries, too coarse
    and more buckets need exact ranks)."""
    return min(18, max(12, 28 - (length.bit_length() - 1)))


def keep_by_rank(key: torch.Tensor, draw: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``draw[g, j] < table[rank(g, j)]`` as a bool tensor [G, L] (CPU).

    ``key``: int32 magnitude keys ≥ 0 [G, L] (`ops.select.magnitude_key`), ranked ascending
    within each row, equal keys by column, lower first; ``draw``: [G, L] in ``table``'s dtype;
    ``table``: [L], non-decreasing (the caller's guarantee: every rounding step of DELLA's
    linear ramp is monotone). The elementwise steps run in numpy (its int32 shifts and
    compares cost ~0.12 ns a value against torch's 0.25-0.55); the gathers and the histogram
    in torch (index_select and bincount take int32 indices, numpy converts them to int64).
    """
    rows, length = key.shape
    shift = bucket_shift(length)
    buckets = OCTAVES << (23 - shift)  # fp32 keys: 23 mantissa bits
    width = buckets + 1  # a row's bins: key 0 (τ = ±0) alone in the first, then the buckets
    if length < MIN_ROW or rows * width >= 1 << 31:
        return draw < table[_ranks(key)]
    keys = key.contiguous().numpy()
    bucket = np.right_shift(keys, np.int32(shift))
    base = max(0, int(bucket.max()) - (buckets - 1))  # the lowest bucket's first shifted key
    if base > 0:
        np.maximum(bucket, np.int32(base), out=bucket)
    offsets = np.arange(rows, dtype=np.int32) * np.int32(width)  # buckets 1 .. width - 1
    if int(keys.min()) == 0:  # zeros to bin 0: no other key is below its bucket
        bucket -= np.int32(base - 1)
        np.minimum(bucket, keys, out=bucket)
        bucket += offsets[:, None]
    else:
        bucket += (offsets - np.int32(base - 1))[:, None]
    group = torch.from_numpy(bucket.reshape(-1))  # the entry's (row, bucket), one bin each
    counts = torch.bincount(group, minlength=rows * width)
    last = counts.reshape(rows, width).cumsum(1).reshape(-1)  # one past each bin's ranks
    # the thresholds at each bin's first and last rank; `padded` takes an empty bin's
    # out-of-range ranks (-1 or L; never looked up)
    padded = torch.cat([table[:1], table, table[-1:]])
    low = padded.index_select(0, last - counts + 1).index_select(0, group).numpy()
    high = padded.index_select(0, last).index_select(0, group).numpy()
    flat = draw.contiguous().reshape(-1).numpy()
    keep = np.less(flat, low)
    unsure = np.less(flat, high)
    unsure ^= keep  # low ≤ high: a kept entry is below both
    thresholds = table.numpy()
    if int(counts.reshape(rows, width)[:, 0].max()) >= ZERO_RUN:
        _rank_zeros(keep, unsure, keys, flat, thresholds)
    at = np.flatnonzero(unsure)
    if len(at):
        _settle(keep, keys.reshape(-1), flat, thresholds, group, counts.numpy(),
                (last - counts).numpy(), at, length, width)
    return torch.from_numpy(keep).reshape(rows, length)


def _rank_zeros(keep: np.ndarray, unsure: np.ndarray, keys: np.ndarray, draw: np.ndarray,
                table: np.ndarray) -> None:
    """Decide every entry whose key is 0 (τ = ±0) by its exact rank, and take it out of
    ``unsure``: 0 is the smallest key, so a row's zeros hold its ranks 0 .. Z−1, by column.

    Why: zeros are common (the weights a fine-tune left unchanged in bf16, a task vector
    already pruned), and their bin spans as many ranks as there are zeros, so a large share of
    them fall between its two thresholds; sorting them cost a row 70% zeros ~30 ns a value,
    the count ~2 (`ZERO_RUN`)."""
    zero = keys == 0  # [G, L]
    count = np.cumsum(zero, axis=1, dtype=np.int32).reshape(-1)  # 1 + the rank at each zero
    # table[rank] = shifted[count] (count 0, before a row's first zero, is never used), and
    # masks, not index lists: numpy's fancy indexing costs ~1 ns an entry, and zeros may be
    # most of the piece; torch's gather takes the int32 counts as they are
    shifted = torch.from_numpy(np.concatenate([table[:1], table]))
    below = draw < shifted.index_select(0, torch.from_numpy(count)).numpy()
    zero = zero.reshape(-1)
    # keep = where(zero, below, keep) as bit operations: numpy's masked copy (copyto's
    # ``where``) of bools took 4.2 ns a value, these three 0.1
    below ^= keep
    below &= zero
    keep ^= below
    unsure &= ~zero


def _settle(keep: np.ndarray, keys: np.ndarray, draw: np.ndarray, table: np.ndarray,
            group: torch.Tensor, counts: np.ndarray, first: np.ndarray, unsure: np.ndarray,
            length: int, width: int) -> None:
    """Decide every entry of each bin that holds an undecided one (flat positions
    ``unsure``) by its exact rank: the bins' entries sorted by (bin, key, column) in one sort
    of packed 64-bit values."""
    groups = group.numpy()
    involved = np.zeros(len(counts), dtype=bool)  # bool: numpy's nonzero is 10x faster on it
    involved[groups[unsure]] = True               # than on uint8
    # their entries, in flat order (torch's gather takes the int32 bins as they are)
    at = np.flatnonzero(torch.from_numpy(involved).index_select(0, group).numpy())
    bins = np.flatnonzero(involved)
    col_bits = max(1, (length - 1).bit_length())
    bin_bits = max(1, (len(bins) - 1).bit_length())
    if col_bits + bin_bits + 31 > PACK_BITS:  # cannot pack: rank these rows whole
        rows = np.unique(at // length)
        ranks = _ranks(torch.from_numpy(keys.reshape(-1, length)[rows])).numpy()
        keep.reshape(-1, length)[rows] = draw.reshape(-1, length)[rows] < table[ranks]
        return
    place = np.empty(len(counts), dtype=np.int64)  # a bin's place among the involved (a
    place[bins] = np.arange(len(bins))               # lookup: searchsorted cost ~15 ns each)
    packed = place[groups[at]] << (31 + col_bits)
    packed |= keys[at].astype(np.int64) << col_bits
    packed |= at % length
    # The values are unique, so every sort orders them alike. The stable one (timsort) uses
    # the runs already there: ``at`` is in flat order, each bin's entries by column, so a bin
    # of equal keys (exact zeros: the weights a fine-tune left unchanged, often most of a
    # row) is one run. A row 70% zeros: 44 → 1.1 ns an entry; a Gaussian delta's few entries
    # a bin: 15-18 → 5 ns.
    packed.sort(kind="stable")
    sizes = counts[bins]
    start = np.cumsum(sizes) - sizes  # where each bin's entries begin in the sorted order
    ordinal = packed >> (31 + col_bits)
    rank = first[bins][ordinal] + np.arange(len(packed)) - start[ordinal]
    where = (bins[ordinal] // width) * length + (packed & ((1 << col_bits) - 1))
    keep[where] = draw[where] < table[rank]


def columns_by_rank(key: torch.Tensor) -> torch.Tensor:
    """Each row's columns in ascending order of its int32 keys [G, L], equal keys by column,
    lower first: one sort of (key, column) packed into int64 values, unique per row, so the
    tie rule is built in (numpy's vectorized sort in place on the CPU)."""
    packed = key.to(torch.int64).bitwise_left_shift_(32).bitwise_or_(
        torch.arange(key.shape[1], device=key.device))
    if packed.device.type == "cpu":
        np.ndarray.sort(packed.numpy(), axis=1)  # in place: packed is this call's own
    else:
        packed = torch.sort(packed, dim=1).values
    return packed.bitwise_and_(0xFFFFFFFF)


def _ranks(key: torch.Tensor) -> torch.Tensor:
    """Each entry's ascending rank in its row (`columns_by_rank`'s order)."""
    columns = columns_by_rank(key)
    ranks = torch.empty_like(columns)
    return ranks.scatter_(1, columns, torch.arange(key.shape[1]).expand_as(columns))
