"""Row gathers: a vocabulary table rebuilt row by row from other tables (vocabulary alignment).

Why: merging models whose vocabularies differ first permutes each model's embedding and
LM-head rows into the output vocabulary (mergekit 0.1.5 `PermutedVocabulary`, reference
tokenizers.md §3). Output row i is a copy of one input row, the mean of a few (a token several
models share without the base), zeros, or the mean of all real rows (padding). Those rows are
not rows i of the inputs, so the usual row slicing (`Node.row_inputs`) cannot express them;
instead a `GatherRows` whose tables are stored tensors is read by the executor itself, piece
by piece (`gather`): output rows lo..hi read only the input rows they name, in contiguous runs,
so memory stays a few pieces whatever the vocabulary size (plan/cost.py `row_sliced`,
run/execute.py). Over computed tables (an earlier step's merge) it is computed whole.
The padding mean is a `RowMean` reduction over the unpadded gather: it streams row pieces too.
Oracle: tests/steps/test_vocab.py against mergekit 0.1.5, row by row in fp32.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from recipekit.dtypes import torch_dtype
from recipekit.graph.nodes import Load, Node
from recipekit.graph.passes import Reduction

#: One run of output rows: rows ``lo..hi`` are the mean of the rows ``start + (i - lo)`` of each
#: ``(table index, start)`` in ``sources`` (one source: a copy; none: zeros); ``sources`` None:
#: the fill row (the mean of the real rows, for padding).
Segment = tuple[int, int, tuple[tuple[int, int], ...] | None]


def segments_of(rows: list[tuple[tuple[int, int], ...]]) -> tuple[Segment, ...]:
    """Runs of consecutive output rows whose sources advance together (an identity map of 150k
    rows is one segment)."""
    out: list[Segment] = []
    for i, srcs in enumerate(rows):
        if out:
            lo, hi, prev = out[-1]
            if prev is not None and hi == i and len(prev) == len(srcs) and all(
                    t == pt and r == ps + (i - lo) for (t, r), (pt, ps) in zip(srcs, prev,
                                                                                  strict=True)):
                out[-1] = (lo, i + 1, prev)
                continue
        out.append((i, i + 1, srcs))
    return tuple(out)


class RowGather(Node):
    """A node whose output rows ``lo..hi`` are computed from rows of stored inputs that are
    not rows ``lo..hi`` (a vocabulary permutation, a coalescing map along dim 0): when it
    `streams`, the executor hands `gather` a reader of input rows instead of the inputs, so a
    piece reads only the rows it names (plan/cost.py `row_sliced`, run/execute.py
    `gather_rows`); otherwise it is computed whole like any node."""

    @property
    def streams(self) -> bool:
        """The inputs it reads by rows are stored tensors (`Load`s)."""
        raise NotImplementedError

    def read_tables(self) -> tuple[Node, ...]:
        """The stored inputs some row is read from."""
        raise NotImplementedError

    def whole_inputs(self) -> tuple[Node, ...]:
        """The inputs computed whole first; their values are `gather`'s ``whole``."""
        return ()

    def gather(self, read: Callable[[int, int, int], Any], lo: int, hi: int,
               whole: tuple[Any, ...]) -> Any:
        """Rows ``lo:hi``, reading rows ``a:b`` of input ``t`` (an index into `inputs`) with
        ``read(t, a, b)``."""
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class GatherRows(RowGather):
    """Rows of a new table, each taken from rows of ``tables`` (see `Segment`); dim 0 is the
    vocabulary, the other dims are the tables'. Means are computed in fp32 in table order and
    rounded once to ``dtype``; copies are bit-exact when the dtypes agree."""

    tables: tuple[Node, ...]
    segments: tuple[Segment, ...]
    rows: int
    dtype: str
    fill: Node | None = None  # a RowMean: the value of padding rows

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return (self.rows, *self.tables[0].shape[1:])

    @property
    def inputs(self) -> tuple[Node, ...]:
        return self.tables + ((self.fill,) if self.fill is not None else ())

    @property
    def streams(self) -> bool:
        """The tables are stored tensors: the executor reads the rows a piece names."""
        return all(isinstance(t, Load) for t in self.tables)

    @property
    def workspace(self) -> int:
        return 4 * self.numel  # fp32 sums of the mean rows, at most the table

    def read_tables(self) -> tuple[Node, ...]:
        """The tables some row is read from (a model's own table, and those of the few
        tokens it takes from others)."""
        used = {t for _, _, srcs in self.segments if srcs for t, _ in srcs}
        return tuple(self.tables[t] for t in sorted(used))

    def whole_inputs(self) -> tuple[Node, ...]:
        return (self.fill,) if self.fill is not None else ()

    def gather(self, read: Callable[[int, int, int], Any], lo: int, hi: int,
               whole: tuple[Any, ...] = ()) -> Any:
        """Rows ``lo:hi``, reading rows ``a:b`` of table ``t`` with ``read(t, a, b)``;
        ``whole``: the fill row, when there is one."""
        import torch

        fill = whole[0] if whole else None
        dtype = torch_dtype(self.dtype)
        starts = self.__dict__.get("_starts")
        if starts is None:  # segments are sorted and tile the rows: find a piece's by bisection
            starts = self.__dict__["_starts"] = [seg[0] for seg in self.segments]
        first = max(0, bisect.bisect_right(starts, lo) - 1)
        last = bisect.bisect_left(starts, hi)
        s_lo, s_hi, sources = self.segments[first]
        if hi <= s_hi and sources is not None and len(sources) == 1:  # one run of copies
            t, start = sources[0]
            piece = read(t, start + lo - s_lo, start + hi - s_lo)
            return piece if piece.dtype == dtype else piece.to(dtype)
        out = torch.empty((hi - lo, *self.shape[1:]), dtype=dtype)
        for s_lo, s_hi, sources in self.segments[first:last]:
            a, b = max(lo, s_lo), min(hi, s_hi)
            if a >= b:
                continue
            dest = out[a - lo:b - lo]
            if sources is None:
                dest.copy_(fill.to(dtype).expand_as(dest))
            elif not sources:
                dest.zero_()
            elif len(sources) == 1:
                t, start = sources[0]
                dest.copy_(read(t, start + a - s_lo, start + b - s_lo))
            else:
                acc: Any = None
                for t, start in sources:
                    part = read(t, start + a - s_lo, start + b - s_lo)
                    acc = part.to(torch.float64 if dtype == torch.float64 else torch.float32
                                  ).clone() if acc is None else acc.add_(part)
                dest.copy_(acc.div_(len(sources)))
        return out

    def compute(self, args: tuple[Any, ...]) -> Any:
        n = len(self.tables)
        return self.gather(lambda t, a, b: args[t][a:b], 0, self.rows, tuple(args[n:]))


@dataclass(frozen=True, eq=False)
class RowMean(Reduction):
    """The mean over dim 0 of ``table`` (one row), summed in fp64 over row pieces in order and
    rounded to ``table``'s dtype: mergekit fills padding rows with ``torch.mean`` of the real
    rows (equal within fp32 rounding, not bit for bit: torch sums pairwise)."""

    table: Node

    passes: ClassVar[int] = 1

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return tuple(self.table.shape[1:])

    @property
    def dtype(self) -> str:  # type: ignore[override]
        return self.table.dtype

    @property
    def state_bytes(self) -> int:
        return 8 * (self.table.numel // max(1, self.table.shape[0]))

    def reduce(self, source: Any, whole: tuple[Any, ...]) -> Any:
        import torch

        total: Any = None
        for part in source.map(lambda lo, hi, p: p[0].to(torch.float64).sum(dim=0)):
            total = part if total is None else total + part.to(total.device)
        rows = max(1, self.table.shape[0])
        if total is None:
            return torch.zeros(self.shape, dtype=torch_dtype(self.dtype))
        return (total / rows).to(torch_dtype(self.dtype))
