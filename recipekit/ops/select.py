"""Exact top-k selection by magnitude in streaming passes, with a tie rule pieces cannot change.

Why: TIES, breadcrumbs and SCE keep the k largest entries of a whole tensor. mergekit sorts the
tensor; a sort needs it whole and takes O(n log n) on one thread. Here the k-th largest value
is found exactly by counting: the magnitude's fp32 bit pattern is an integer that orders like
the magnitude (`magnitude_key`), so a histogram of its high 16 bits (pass 1) finds the bucket
holding the k-th key, and a histogram of the low 16 bits inside that bucket (pass 2) the key
itself. Memory is a few histograms; time is linear in the elements. A large tensor saves most
of both passes: a sample of its pieces places each k-th key within a few buckets first, and one
pass collects the keys of those buckets and counts the keys above them (`select_cuts`).

**Tie rule.** Keys are ranked by value, then by flat (row-major) index, lower first: when the
k-th key equals others, the equal entries with the lowest indices are kept, exactly k in all.
The boundary among equal keys is placed from the positions pass 2 collects of the keys in the
k-th key's bucket (at most `COLLECT_MAX` of them; a bucket holding more gets a third pass of
per-row counts of the equal key instead), and only when the equal keys are not all kept or all
dropped — with bf16 inputs they usually are neither, so the collection saves a whole pass.
The rule depends on nothing but the tensor: not on the pieces, the worker count or the device.
Where the k-th key is unique the kept set is mergekit's
(whose non-stable sort breaks ties arbitrarily) — tests/ops/test_select.py, and the committed
TIES/breadcrumbs goldens.

Pure tensor math over a `RowSource`-like callable; no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from recipekit.graph import passes as _passes
from recipekit.ops.precision import numpy_floats

__all__ = ["Cut", "KEEP_ALL", "keep_mask", "magnitude_key", "select_cuts", "top_k_mask"]

HIGH_BINS = 1 << 15  # the key's bits 16–30 (bit 31, the sign, is 0)
LOW_BINS = 1 << 16
# Keys of one bucket whose low bits and rows pass 2 keeps (int32 each) to place a tie without a
# third pass; a bucket this full is rare (about 0.3% of a tensor's keys fall in the bucket
# around a median), a fuller one is counted per row in a third pass instead.
COLLECT_MAX = _passes.COLLECT_MAX
#: tensors of at least this many entries place their cuts from a sample first (`select_cuts`)
SAMPLE_MIN = 32 * _passes.PASS_ELEMS
#: the sample: every this-many-th piece (at least 4 pieces of a `SAMPLE_MIN` tensor)
SAMPLE_EVERY = 8
#: the window's half-width around the sample's estimate, as a fraction of the ranks: ±1% of
#: the sample's keys (a few buckets; thousands of standard errors of a 512Ki-key sample)
WINDOW_MARGIN = 0.01
#: keys (with their rows, 8 bytes each) one query's window collects at most: 16 MiB
WINDOW_MAX = _passes.WINDOW_MAX


@dataclass(frozen=True)
class Cut:
    """Which entries the k largest are: key > ``value``, or key == ``value`` in a row before
    ``row``, or among the first ``count`` equal keys of row ``row`` (`keep_mask`)."""

    value: int
    row: int
    count: int


#: a cut that keeps every entry (k = n); `Cut(2**31 - 1, 0, 0)` keeps none
KEEP_ALL = Cut(-1, 0, 0)
KEEP_NONE = Cut(2**31 - 1, 0, 0)


def magnitude_key(x: torch.Tensor) -> torch.Tensor:
    """|x| as fp32, reinterpreted as int32: non-negative integers ordered like |x| (NaN above
    inf, as a sort puts it), one row of the piece per row of x (shape [rows, -1])."""
    rows = x.shape[0] if x.dim() else 1
    if numpy_floats(x, dtypes=(torch.float32,)):
        # the sign bit cleared is |x|'s bits (NaN included); numpy's and is ~0.12 ns a value,
        # torch's abs ~0.4
        bits = x.contiguous().numpy().view(np.int32)
        return torch.from_numpy(np.bitwise_and(bits, np.int32(0x7FFFFFFF))).reshape(rows, -1)
    return x.abs().float().reshape(rows, -1).view(torch.int32)


def keep_mask(key: torch.Tensor, lo: int, cut: Cut) -> torch.Tensor:
    """The entries of rows ``lo:lo+len(key)`` (keys [rows, L]) that ``cut`` keeps (bool)."""
    hi = lo + key.shape[0]
    if cut.row >= hi:
        return key >= cut.value
    if cut.row < lo:
        return key > cut.value
    keep = key >= cut.value
    keep[cut.row - lo + 1:] = key[cut.row - lo + 1:] > cut.value
    r = cut.row - lo
    equal = key[r] == cut.value
    keep[r] = (key[r] > cut.value) | (equal & (torch.cumsum(equal, 0) <= cut.count))
    return keep


def kept_entries(keys: torch.Tensor, rows: torch.Tensor, cut: Cut) -> torch.Tensor:
    """Which of some entries ``cut`` keeps (bool), given their keys and rows (1-D, in flat
    order): `keep_mask`'s rule for entries gathered from pieces (SCE's window entries)."""
    equal = keys == cut.value
    at_row = equal & (rows == cut.row)
    return (keys > cut.value) | (equal & (rows < cut.row)) \
        | (at_row & (torch.cumsum(at_row, 0) <= cut.count))


def top_k_mask(key: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest keys of a tensor in memory (keys [rows, L] from `magnitude_key`) by the
    tie rule, as a bool mask: `select_cuts` over in-memory pieces. The same set as the first k
    positions of a stable descending sort, which costs ~56 ns per value on one thread (4Mi
    fp32 keys) against a few for the passes."""
    rows = key.shape[0]
    source = _passes.InMemorySource([key], _passes.piece_bounds(rows, key[0].numel()))
    (cut,) = select_cuts(source.map, lambda lo, hi, pieces: pieces, [(0, k)], key.numel(), rows)
    return keep_mask(key, 0, cut)


Keys = Callable[[int, int, tuple[torch.Tensor, ...]], Sequence[torch.Tensor]]


class Ride(Protocol):
    """Work that rides on `select_cuts`' window pass, which reads every piece once knowing, for
    each query, a range of keys ``lower <= key < upper`` (``bounds``) that holds its k-th key
    whenever that pass decides the cut: a caller that needs the kept entries' values (SCE's
    energies) sums those above the range and keeps those inside, instead of a pass of its own
    once the cut is known."""

    def piece(self, lo: int, hi: int, pieces: tuple[torch.Tensor, ...],
              keys: Sequence[torch.Tensor], inside: Mapping[int, torch.Tensor],
              above: Mapping[int, torch.Tensor]) -> object:
        """One piece's part, from its keys (`Keys`), the flat positions of each query's keys
        inside its range (`key_positions`) and which keys lie above it (`keys_at_least`, bool);
        may run on worker threads."""
        ...

    def add(self, part: object) -> None:
        """Fold one piece's part, in piece order."""
        ...


#: ``ride(bounds)`` starts a `Ride` given each windowed query's key range ``(lower, upper)``
Rides = Callable[[Mapping[int, tuple[int, int]]], Ride]
#: ``map_pieces(fn)`` runs ``fn`` over every piece in order (a `RowSource.map`);
#: ``map_pieces(fn, every=s)`` over every s-th piece only (the sample)
Map = Callable[..., Iterator[object]]


def select_passes(n: int) -> int:
    """The most whole passes `select_cuts` makes over ``n`` entries (a plan's bytes read):
    a histogram and the k-th key's bucket, and a tie pass where that bucket may hold more than
    `COLLECT_MAX` keys; a sampled tensor's window pass comes first (the sample itself, an
    eighth of the pieces, is not counted). The usual count is one pass after the sample."""
    if n <= COLLECT_MAX:
        return 2
    return 3 if n < SAMPLE_MIN else 4


def select_cuts(map_pieces: Map, keys: Keys, queries: Sequence[tuple[int, int]], n: int,
                rows: int, *, k_of_nonzero: Callable[[int], int] | None = None,
                ride: Rides | None = None) -> list[Cut]:
    """The `Cut` of each query ``(stream, k)``: the k largest keys of stream ``stream``.

    ``keys(lo, hi, pieces)`` gives, for one row piece, each stream's keys ([rows, L] int32 from
    `magnitude_key`); ``map_pieces`` runs a function over the pieces (`Map`); ``n`` is each
    stream's number of entries, ``rows`` its rows. ``k_of_nonzero``, when given, replaces each
    query's k by ``k_of_nonzero(nnz)``, nnz the stream's nonzero keys counted in the histogram
    pass (SCE's k = ⌊nnz(var)·f⌋). k ≤ 0 keeps nothing, k ≥ n everything.

    Passes: a tensor of `SAMPLE_MIN` entries or more first histograms every `SAMPLE_EVERY`-th
    piece, which places each k-th key within a few buckets (`_windows`); the next pass only
    counts the keys above each window and collects the window's keys, so the k-th key is
    usually known after one pass (about 1.1 passes in all). Otherwise a histogram pass (after
    the window pass, when the k-th key fell outside its window), a second pass that reads the
    bucket's keys, and a per-row count pass that places a tie only when that bucket holds more
    keys than `COLLECT_MAX` (`select_passes`). The result never depends on the sample: it only
    decides which keys are at hand after the first pass.

    ``ride``: started when the window pass begins, and run on each piece of it (`Ride`); never
    started when there is no window pass.
    """
    cuts: dict[int, Cut] = {}
    queries = list(queries)

    def settle(candidates: Sequence[int]) -> list[int]:
        """Decide k ≤ 0 and k ≥ n at once; return the queries still open."""
        left = []
        for q in candidates:
            k = queries[q][1]
            if k <= 0:
                cuts[q] = KEEP_NONE
            elif k >= n:
                cuts[q] = KEEP_ALL
            else:
                left.append(q)
        return left

    open_ = settle(range(len(queries))) if k_of_nonzero is None else list(range(len(queries)))
    if not open_:
        return [cuts[q] for q in range(len(queries))]
    streams = sorted({queries[q][0] for q in open_})

    def histograms(ks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out = [torch.bincount((ks[s] >> 16).reshape(-1), minlength=HIGH_BINS) for s in streams]
        if k_of_nonzero is not None:  # bucket 0 also holds tiny keys: count the zeros
            out += [count_zeros(ks[s]) for s in streams]
        return out

    def fold(parts: Iterator[object], windows: dict[int, _Window],
             zero_rows: list[list[torch.Tensor]] | None = None
             ) -> tuple[list[torch.Tensor], list[int]]:
        """Sum the histograms and zero counts of a pass; collect each stream's zeros per row
        (into ``zero_rows``, when given) and the windows' keys."""
        hist = [torch.zeros(HIGH_BINS, dtype=torch.int64) for _ in streams]
        zeros = [0 for _ in streams]
        for part in parts:
            it = iter(part)  # type: ignore[call-overload]
            for h in hist:
                h += next(it).cpu()
            if k_of_nonzero is not None:
                for i in range(len(streams)):
                    zeros[i] += int(next(it))
            for acc in zero_rows or ():
                acc.append(next(it).cpu())
            for w in windows.values():
                w.add(next(it), next(it))
        return hist, zeros

    windows: dict[int, _Window] = {}
    sample = None
    if n >= SAMPLE_MIN:
        sample = fold(map_pieces(lambda lo, hi, p: histograms(keys(lo, hi, p)),
                                 every=SAMPLE_EVERY), {})
        windows = _windows(sample, queries, open_, streams, n, k_of_nonzero)
    # each open query's histogram of high bits (its stream's, or its window's: see below)
    hist: dict[int, torch.Tensor] = {}
    zeros = [0 for _ in streams]
    in_windows = bool(windows) and all(q in windows for q in open_)
    if in_windows:
        # the first pass collects each window's keys and counts the keys above it (and the
        # zeros) instead of a whole histogram (~0.3 instead of ~1 ns a key); a histogram of
        # the window, with the keys above put in the bucket past it, places a k-th key that
        # falls inside the window exactly as the whole one would
        order = sorted(windows)
        rider = ride({q: (w.first << 16, (w.last + 1) << 16) for q, w in windows.items()}) \
            if ride is not None else None

        def around(lo: int, hi: int, pieces: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
            ks = keys(lo, hi, pieces)
            out = [count_zeros(ks[s]) for s in streams] if k_of_nonzero is not None else []
            inside, above = {}, {}
            for q in order:
                key, w = ks[queries[q][0]], windows[q]
                above[q] = keys_at_least(key, (w.last + 1) << 16)
                out.append(count_true(above[q]))
                inside[q] = key_positions(key, w.first << 16, (w.last + 1) << 16)
                out += entries_at(key, lo, inside[q])
            if rider is not None:
                out.append(rider.piece(lo, hi, pieces, ks, inside, above))
            return out

        above = dict.fromkeys(order, 0)
        for part in map_pieces(around):
            it = iter(part)  # type: ignore[call-overload]
            if k_of_nonzero is not None:
                for i in range(len(streams)):
                    zeros[i] += int(next(it))
            for q in order:
                above[q] += int(next(it))
                windows[q].add(next(it), next(it))
            if rider is not None:
                rider.add(next(it))
    else:
        # each row's zeros, where a cut may fall among them (a light fine-tune's task vector is
        # mostly exact zeros): such a cut is then placed without a second pass
        by_row: list[list[torch.Tensor]] | None = (
            [[] for _ in streams] if k_of_nonzero is None
            and _zeros_may_hold_a_cut(sample, queries, open_, streams, n) else None)

        def high(lo: int, hi: int, pieces: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
            ks = keys(lo, hi, pieces)
            out = histograms(ks)
            if by_row is not None:
                out += [_zeros_by_row(ks[s], h)
                        for s, h in zip(streams, out[:len(streams)], strict=True)]
            for q, w in windows.items():
                out += bucket_entries(ks[queries[q][0]], lo, w.first, w.last)
            return out

        per_stream, zeros = fold(map_pieces(high), windows, by_row)
        if by_row is not None:
            zero_counts = [torch.cat(parts) for parts in by_row]
            for q in open_:
                s = streams.index(queries[q][0])
                cut = _cut_among_zeros(per_stream[s], queries[q][1], zero_counts[s], rows)
                if cut is not None:
                    cuts[q] = cut
            open_ = [q for q in open_ if q not in cuts]
            if not open_:
                return [cuts[q] for q in range(len(queries))]
    if k_of_nonzero is not None:
        queries = [(s, k_of_nonzero(n - zeros[streams.index(s)])) for s, _ in queries]
        open_ = settle(open_)
        if not open_:
            return [cuts[q] for q in range(len(queries))]
    for q in open_:
        if not in_windows:
            hist[q] = per_stream[streams.index(queries[q][0])]
            continue
        w = windows[q]
        if w.keys is not None and above[q] < queries[q][1] <= above[q] + w.filled:
            h = torch.bincount((w.keys[:w.filled] >> 16).long(), minlength=HIGH_BINS)
            if w.last + 1 < HIGH_BINS:
                h[w.last + 1] += above[q]
            hist[q] = h
    missed = [q for q in open_ if q not in hist]
    for q in missed:
        del windows[q]  # a window the k-th key missed: a whole histogram pass instead
    if missed:
        whole, _ = fold(map_pieces(lambda lo, hi, p: histograms(keys(lo, hi, p))), {})
        hist.update({q: whole[streams.index(queries[q][0])] for q in missed})
    # the bucket of each query's k-th key, and how many keys of that bucket it keeps
    buckets: dict[int, tuple[int, int]] = {}
    for q in open_:
        s, k = queries[q]
        above = torch.flip(torch.cumsum(torch.flip(hist[q], [0]), 0), [0])
        b = int(torch.nonzero(above >= k)[-1])  # the highest bucket with ≥ k keys at or above
        within = k - (int(above[b + 1]) if b + 1 < HIGH_BINS else 0)
        buckets[q] = (b, within)
    wanted = sorted({(queries[q][0], buckets[q][0]) for q in open_})
    # each wanted bucket's keys (low bits) and rows in flat order, when at hand: from a window
    # of pass 1 that covered it, else from pass 2 if the bucket is small enough to collect
    found: list[tuple[torch.Tensor, torch.Tensor] | None] = [
        next((w.bucket(b) for q, w in windows.items()
              if queries[q][0] == s and w.covers(b)), None) for s, b in wanted]
    windows.clear()
    fine = [torch.bincount(f[0].long(), minlength=LOW_BINS) if f is not None else None
            for f in found]
    left = [i for i, f in enumerate(found) if f is None]
    zero_rows: list[torch.Tensor | None] = [None] * len(wanted)  # per-row zeros (bucket 0)
    if left:
        count = {(queries[q][0], buckets[q][0]): int(hist[q][buckets[q][0]]) for q in open_}
        _second_pass(map_pieces, keys, [wanted[i] for i in left],
                     [count[wanted[i]] for i in left], fine, found, zero_rows, left)
    ties: dict[int, tuple[int, int]] = {}  # query -> (key value, equal keys to keep)
    for q in open_:
        s, _ = queries[q]
        b, within = buckets[q]
        i = wanted.index((s, b))
        h = fine[i]
        assert h is not None
        above = torch.flip(torch.cumsum(torch.flip(h, [0]), 0), [0])
        low_bits = int(torch.nonzero(above >= within)[-1])
        value = (b << 16) | low_bits
        keep_equal = within - (int(above[low_bits + 1]) if low_bits + 1 < LOW_BINS else 0)
        equal = int(h[low_bits])
        if keep_equal == equal:
            cuts[q] = Cut(value, rows, 0)  # every equal key is kept
        elif found[i] is not None:  # the equal keys' rows, in flat order: place it here
            bits, at_rows = found[i]  # type: ignore[misc]
            equal_rows = at_rows[bits == low_bits]
            row = int(equal_rows[keep_equal - 1])
            before = int(torch.searchsorted(equal_rows, torch.tensor(row, dtype=torch.int32)))
            cuts[q] = Cut(value, row, keep_equal - before)
        elif value == 0 and zero_rows[i] is not None:  # pass 2 counted each row's zeros
            cuts[q] = _cut_in_rows(value, keep_equal, zero_rows[i])
        else:
            ties[q] = (value, keep_equal)
    if ties:
        cuts.update(_place_ties(map_pieces, keys, queries, ties))
    return [cuts[q] for q in range(len(queries))]


def count_zeros(key: torch.Tensor) -> torch.Tensor:
    """How many keys are 0 (a one-element int64 tensor; on the CPU the keys less numpy's
    count of the nonzero ones, ~0.1 ns a key against torch's compare and sum, ~0.9)."""
    if key.device.type == "cpu":
        return torch.tensor([key.numel() - np.count_nonzero(key.numpy())])
    return (key == 0).sum().reshape(1)


def count_true(mask: torch.Tensor) -> torch.Tensor:
    """How many entries of a bool mask are set (a one-element int64 tensor; through numpy on
    the CPU, whose compare and count cost ~0.15 ns a key against torch's ~0.6)."""
    if mask.device.type == "cpu":
        return torch.tensor([np.count_nonzero(mask.numpy())])
    return mask.sum().reshape(1)


def bucket_entries(key: torch.Tensor, lo: int, first: int, last: int
                   ) -> list[torch.Tensor]:
    """The keys of one piece (rows ``lo:``, keys [rows, L]) whose buckets (high 16 bits) lie in
    ``first..last``, in flat order, and their rows (int32 each)."""
    return entries_at(key, lo, key_positions(key, first << 16, (last + 1) << 16))


def entries_at(key: torch.Tensor, lo: int, at: torch.Tensor) -> list[torch.Tensor]:
    """The keys of one piece (rows ``lo:``) at the flat positions ``at``, and their rows."""
    length = key.shape[1] if key.dim() > 1 else 1
    if key.device.type == "cpu":  # numpy's gather
        i = at.numpy()
        return [torch.from_numpy(key.reshape(-1).numpy()[i]),
                torch.from_numpy((i // length + lo).astype(np.int32))]
    return [key.reshape(-1)[at],
            torch.div(at, length, rounding_mode="floor").add_(lo).to(torch.int32)]


def keys_at_least(key: torch.Tensor, value: int) -> torch.Tensor:
    """Which keys are ≥ ``value`` (bool, the keys' shape; numpy's compare on the CPU)."""
    if value > np.iinfo(np.int32).max:
        return torch.zeros(key.shape, dtype=torch.bool, device=key.device)
    if key.device.type == "cpu":
        return torch.from_numpy(key.numpy() >= np.int32(value))
    return key >= value


def key_positions(key: torch.Tensor, lower: int, upper: int) -> torch.Tensor:
    """The flat positions (int64, ascending) of the keys ``lower <= key < upper`` in one piece's
    keys. On the CPU through numpy, whose compare and flatnonzero cost a third of torch's on a
    piece (~0.5 ns per value in all)."""
    flat = key.reshape(-1)
    if key.device.type == "cpu":
        # keys are ≥ 0 and lower < 2^31: the int32 difference cannot wrap; as unsigned, the
        # keys below lower become huge, so one compare tests both ends
        values = flat.numpy()
        inside = (values - np.int32(lower)).view(np.uint32) < np.uint32(upper - lower - 1) + 1
        return torch.from_numpy(np.flatnonzero(inside))
    return torch.nonzero((flat >= lower) & (flat < upper)).reshape(-1)


class _Window:
    """The buckets ``first..last`` of one query's keys, collected by the histogram pass into
    buffers of ``capacity`` keys sized from the sample (dropped when they would overflow)."""

    def __init__(self, first: int, last: int, capacity: int) -> None:
        self.first, self.last = first, last
        self.keys: torch.Tensor | None = torch.empty(capacity, dtype=torch.int32)
        self.rows = torch.empty(capacity, dtype=torch.int32)
        self.filled = 0

    def add(self, keys: torch.Tensor, rows: torch.Tensor) -> None:
        if self.keys is None:
            return
        end = self.filled + len(keys)
        if end > len(self.keys):  # more than the sample promised: the second pass will do
            self.keys = None
            return
        self.keys[self.filled:end] = keys.cpu()
        self.rows[self.filled:end] = rows.cpu()
        self.filled = end

    def covers(self, bucket: int) -> bool:
        return self.keys is not None and self.first <= bucket <= self.last

    def bucket(self, bucket: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The low bits and rows of the keys of ``bucket`` (in flat order)."""
        assert self.keys is not None
        keys, rows = self.keys[:self.filled], self.rows[:self.filled]
        inside = (keys >> 16) == bucket
        return keys[inside] & 0xFFFF, rows[inside]


def _windows(sample: tuple[list[torch.Tensor], list[int]], queries: Sequence[tuple[int, int]],
             open_: Sequence[int], streams: Sequence[int], n: int,
             k_of_nonzero: Callable[[int], int] | None) -> dict[int, _Window]:
    """Each open query's window: the buckets holding the sample's keys of ranks within
    `WINDOW_MARGIN`·(sample size) of where the k-th key falls, narrowed until the keys it is
    expected to collect over the whole tensor fit in `WINDOW_MAX`; none if even its one bucket
    would not."""
    hist, zeros = sample
    out = {}
    for q in open_:
        s, k = queries[q]
        h = hist[streams.index(s)]
        size = int(h.sum())
        if size == 0:
            continue
        if k_of_nonzero is not None:
            k = k_of_nonzero(round(n * (1 - zeros[streams.index(s)] / size)))
        if not 0 < k < n:
            continue
        above = torch.flip(torch.cumsum(torch.flip(h, [0]), 0), [0])
        rank = k / n * size
        margin = WINDOW_MARGIN * size
        while True:
            # a window reaching past the sample's largest (smallest) key reaches the end
            first = 0 if rank + margin >= size else _bucket_at(above, rank + margin)
            last = HIGH_BINS - 1 if rank - margin <= 1 else _bucket_at(above, rank - margin)
            expected = int(h[first:last + 1].sum()) * n / size
            if expected <= WINDOW_MAX // 2 or first == last or margin < 0.5:
                break
            margin /= 2
        if expected <= WINDOW_MAX // 2:
            out[q] = _Window(first, last, min(WINDOW_MAX, int(expected * 1.5) + (1 << 16)))
    return out


def _zeros_may_hold_a_cut(sample: tuple[list[torch.Tensor], list[int]] | None,
                          queries: Sequence[tuple[int, int]], open_: Sequence[int],
                          streams: Sequence[int], n: int) -> bool:
    """Whether the histogram pass should count each row's zeros: always without a sample (a
    small tensor), else where the sample's bucket 0 (zeros, and keys below 2^-126) holds at
    least nine tenths of the share below some k-th key. A wrong guess costs time only: a cut
    the counts cannot place goes to the second pass as before."""
    if sample is None:
        return True
    hist, _ = sample
    for q in open_:
        s, k = queries[q]
        h = hist[streams.index(s)]
        size = int(h.sum())
        if size and int(h[0]) * n >= 0.9 * (n - k) * size:
            return True
    return False


def _zeros_by_row(key: torch.Tensor, hist: torch.Tensor) -> torch.Tensor:
    """Each row's count of zero keys in a piece (int64 [rows]); no pass over a piece whose
    histogram has no key in bucket 0."""
    if int(hist[0]) == 0:
        return torch.zeros(key.shape[0], dtype=torch.int64)
    if key.device.type == "cpu":  # numpy's compare and sum: 0.4 ns a key, torch's 0.9
        return torch.from_numpy((key.numpy() == 0).sum(axis=1, dtype=np.int64))
    return (key == 0).sum(dim=1)


def _cut_among_zeros(hist: torch.Tensor, k: int, zero_rows: torch.Tensor, rows: int
                     ) -> Cut | None:
    """The cut of the k largest keys when it falls among the zeros, from the whole histogram
    and each row's zeros; None when it falls elsewhere (or among bucket 0's tiny keys)."""
    zeros = int(zero_rows.sum())
    nonzero = int(hist.sum()) - zeros  # bucket 0's tiny keys among them
    if zeros == 0 or not nonzero < k <= nonzero + zeros:
        return None
    keep_equal = k - nonzero  # every nonzero key is kept
    return Cut(0, rows, 0) if keep_equal == zeros else _cut_in_rows(0, keep_equal, zero_rows)


def _bucket_at(above: torch.Tensor, rank: float) -> int:
    """The bucket holding the key of (fractional) rank ``rank`` from the top."""
    return int(torch.nonzero(above >= rank)[-1])


def _second_pass(map_pieces: Map, keys: Keys, wanted: Sequence[tuple[int, int]],
                 counts: Sequence[int], fine: list[torch.Tensor | None],
                 found: list[tuple[torch.Tensor, torch.Tensor] | None],
                 zero_rows: list[torch.Tensor | None], slots: Sequence[int]) -> None:
    """Read the keys of the buckets ``wanted`` ((stream, bucket), ``counts`` keys each): their
    low-bit histograms into ``fine``, and, for a bucket of at most `COLLECT_MAX` keys, the keys'
    low bits and rows into ``found`` (both at ``slots``). A larger bucket 0 also puts each
    row's count of zero keys into ``zero_rows``: a cut among zeros is placed from them, without
    `_place_ties`' pass."""
    collect = [c <= COLLECT_MAX for c in counts]
    zeros = [b == 0 and not keep_rows for (_, b), keep_rows in zip(wanted, collect, strict=True)]

    def low(lo: int, hi: int, pieces: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        ks = keys(lo, hi, pieces)
        out = []
        for (s, b), keep_rows in zip(wanted, collect, strict=True):
            if keep_rows:  # the bucket's keys and rows, in flat order
                out += bucket_entries(ks[s], lo, b, b)
            elif b == 0:  # exact zeros (the weights a fine-tune left unchanged) may be most
                # of the piece: counted apart, so that only the rare tiny keys are gathered
                flat = ks[s].reshape(-1)
                zero = flat == 0
                tiny = flat[(flat < LOW_BINS) & ~zero]
                h = torch.bincount(tiny, minlength=LOW_BINS)
                per_row = zero.view(ks[s].shape).sum(dim=1)
                h[0] += per_row.sum()
                out += [h, per_row]
            else:
                flat = ks[s].reshape(-1)
                out.append(torch.bincount(flat[(flat >> 16) == b] & 0xFFFF, minlength=LOW_BINS))
        return out

    hists = [torch.zeros(LOW_BINS, dtype=torch.int64) for _ in wanted]
    # the collected keys go straight into buffers of the size pass 1 counted: per-piece parts
    # kept until the pass ends would pin the allocator's heap under every later piece
    kept = [_Window(b, b, c) if keep_rows else None
            for (_, b), c, keep_rows in zip(wanted, counts, collect, strict=True)]
    rows_zero: list[list[torch.Tensor]] = [[] for _ in wanted]
    for part in map_pieces(low):
        it = iter(part)  # type: ignore[call-overload]
        for i, window in enumerate(kept):
            if window is not None:
                window.add(next(it), next(it))
            else:
                hists[i] += next(it).cpu()
                if zeros[i]:
                    rows_zero[i].append(next(it).cpu())
    for i, slot in enumerate(slots):
        window = kept[i]
        if window is not None:
            found[slot] = window.bucket(wanted[i][1])
            fine[slot] = torch.bincount(found[slot][0].long(), minlength=LOW_BINS)
        else:
            fine[slot] = hists[i]
            if zeros[i]:
                zero_rows[slot] = torch.cat(rows_zero[i])


def _place_ties(map_pieces: Map, keys: Keys, queries: Sequence[tuple[int, int]],
                ties: dict[int, tuple[int, int]]) -> dict[int, Cut]:
    """The cut of each query whose boundary falls among equal keys: count the equal keys per
    row (one pass), keep those of the first rows, and the first ones of the row it ends in."""
    order = sorted(ties)

    def count(lo: int, hi: int, pieces: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        ks = keys(lo, hi, pieces)
        return [(ks[queries[q][0]] == ties[q][0]).sum(dim=1) for q in order]

    per_row: list[list[torch.Tensor]] = [[] for _ in order]
    for part in map_pieces(count):
        for acc, p in zip(per_row, part, strict=True):  # type: ignore[call-overload]
            acc.append(p.cpu())
    return {q: _cut_in_rows(*ties[q], torch.cat(parts))
            for q, parts in zip(order, per_row, strict=True)}


def _cut_in_rows(value: int, keep_equal: int, per_row: torch.Tensor) -> Cut:
    """The cut that keeps the first ``keep_equal`` keys equal to ``value`` in flat order, from
    each row's count of them."""
    cum = torch.cumsum(per_row, 0)
    row = int(torch.searchsorted(cum, keep_equal))  # first row where cum ≥ keep_equal
    before = int(cum[row - 1]) if row else 0
    return Cut(value, row, keep_equal - before)
