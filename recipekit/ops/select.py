"""Exact top-k selection by magnitude in streaming passes, with a tie rule pieces cannot change.

Why: TIES, breadcrumbs and SCE keep the k largest entries of a whole tensor. mergekit sorts the
tensor; a sort needs it whole and takes O(n log n) on one thread. Here the k-th largest value
is found exactly by counting: the magnitude's fp32 bit pattern is an integer that orders like
the magnitude (`magnitude_key`), so a histogram of its high 16 bits (pass 1) finds the bucket
holding the k-th key, and a histogram of the low 16 bits inside that bucket (pass 2) the key
itself. Memory is a few histograms; time is linear in the elements.

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

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from recipekit.graph import passes as _passes

__all__ = ["Cut", "KEEP_ALL", "keep_mask", "magnitude_key", "select_cuts"]

HIGH_BINS = 1 << 15  # the key's bits 16–30 (bit 31, the sign, is 0)
LOW_BINS = 1 << 16
# Keys of one bucket whose low bits and rows pass 2 keeps (int32 each) to place a tie without a
# third pass; a bucket this full is rare (about 0.3% of a tensor's keys fall in the bucket
# around a median), a fuller one is counted per row in a third pass instead.
COLLECT_MAX = _passes.COLLECT_MAX


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


Keys = Callable[[int, int, tuple[torch.Tensor, ...]], Sequence[torch.Tensor]]
Map = Callable[[Callable[[int, int, tuple[torch.Tensor, ...]], object]], Iterator[object]]


def select_cuts(map_pieces: Map, keys: Keys, queries: Sequence[tuple[int, int]], n: int,
                rows: int, *, k_of_nonzero: Callable[[int], int] | None = None) -> list[Cut]:
    """The `Cut` of each query ``(stream, k)``: the k largest keys of stream ``stream``.

    ``keys(lo, hi, pieces)`` gives, for one row piece, each stream's keys ([rows, L] int32 from
    `magnitude_key`); ``map_pieces(fn)`` runs ``fn`` over every piece in order (a
    `RowSource.map`); ``n`` is each stream's number of entries, ``rows`` its rows.
    ``k_of_nonzero``, when given, replaces each query's k by ``k_of_nonzero(nnz)``, nnz the
    stream's nonzero keys counted in the histogram pass (SCE's k = ⌊nnz(var)·f⌋).
    Passes: one histogram pass, one inside the buckets found, and a per-row count only for
    queries whose boundary falls among equal keys. k ≤ 0 keeps nothing, k ≥ n everything.
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

    def high(lo: int, hi: int, pieces: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        ks = keys(lo, hi, pieces)
        out = [torch.bincount((ks[s] >> 16).reshape(-1), minlength=HIGH_BINS) for s in streams]
        if k_of_nonzero is not None:  # bucket 0 also holds tiny keys: count the zeros
            out += [(ks[s] == 0).sum().reshape(1) for s in streams]
        return out

    hist = [torch.zeros(HIGH_BINS, dtype=torch.int64) for _ in streams]
    zeros = [0 for _ in streams]
    for part in map_pieces(high):
        for i, p in enumerate(part):  # type: ignore[arg-type]
            if i < len(streams):
                hist[i] += p.cpu()
            else:
                zeros[i - len(streams)] += int(p)
    if k_of_nonzero is not None:
        queries = [(s, k_of_nonzero(n - zeros[streams.index(s)])) for s, _ in queries]
        open_ = settle(open_)
        if not open_:
            return [cuts[q] for q in range(len(queries))]
    # the bucket of each query's k-th key, and how many keys of that bucket it keeps
    buckets: dict[int, tuple[int, int]] = {}
    for q in open_:
        s, k = queries[q]
        above = torch.flip(torch.cumsum(torch.flip(hist[streams.index(s)], [0]), 0), [0])
        b = int(torch.nonzero(above >= k)[-1])  # the highest bucket with ≥ k keys at or above
        within = k - (int(above[b + 1]) if b + 1 < HIGH_BINS else 0)
        buckets[q] = (b, within)
    wanted = sorted({(queries[q][0], buckets[q][0]) for q in open_})
    collect = [int(hist[streams.index(s)][b]) <= COLLECT_MAX for s, b in wanted]

    def low(lo: int, hi: int, pieces: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        ks = keys(lo, hi, pieces)
        out = []
        for (s, b), keep_rows in zip(wanted, collect, strict=True):
            flat = ks[s].reshape(-1)
            inside = (flat >> 16) == b
            if keep_rows:  # the bucket's keys' low bits and rows, in flat order
                at = torch.nonzero(inside).reshape(-1)
                out += [flat[at] & 0xFFFF, torch.div(
                    at, ks[s].shape[1], rounding_mode="floor").add_(lo).to(torch.int32)]
            else:
                out.append(torch.bincount(flat[inside] & 0xFFFF, minlength=LOW_BINS))
        return out

    fine = [torch.zeros(LOW_BINS, dtype=torch.int64) for _ in wanted]
    # the collected keys go straight into buffers of the size pass 1 counted: per-piece parts
    # kept until the pass ends would pin the allocator's heap under every later piece
    kept = [(torch.empty(int(hist[streams.index(s)][b]), dtype=torch.int32),
             torch.empty(int(hist[streams.index(s)][b]), dtype=torch.int32)) if keep_rows
            else None for (s, b), keep_rows in zip(wanted, collect, strict=True)]
    filled = [0] * len(wanted)
    for part in map_pieces(low):
        it = iter(part)  # type: ignore[call-overload]
        for i, buffers in enumerate(kept):
            if buffers is not None:
                bits, at = next(it), next(it)
                buffers[0][filled[i]:filled[i] + len(bits)] = bits
                buffers[1][filled[i]:filled[i] + len(at)] = at
                filled[i] += len(bits)
            else:
                fine[i] += next(it).cpu()
    found: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(wanted)
    for i, buffers in enumerate(kept):
        if buffers is not None:
            fine[i] = torch.bincount(buffers[0].long(), minlength=LOW_BINS)
            found[i] = buffers
    del kept
    ties: dict[int, tuple[int, int]] = {}  # query -> (key value, equal keys to keep)
    for q in open_:
        s, _ = queries[q]
        b, within = buckets[q]
        i = wanted.index((s, b))
        h = fine[i]
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
        else:
            ties[q] = (value, keep_equal)
    if ties:
        cuts.update(_place_ties(map_pieces, keys, queries, ties))
    return [cuts[q] for q in range(len(queries))]


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
    out = {}
    for q, parts in zip(order, per_row, strict=True):
        counts = torch.cat(parts)
        cum = torch.cumsum(counts, 0)
        value, keep_equal = ties[q]
        row = int(torch.searchsorted(cum, keep_equal))  # first row where cum ≥ keep_equal
        before = int(cum[row - 1]) if row else 0
        out[q] = Cut(value, row, keep_equal - before)
    return out
