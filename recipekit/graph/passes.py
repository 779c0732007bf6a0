"""Streaming reductions: small values computed by passes over row pieces of their inputs.

Why: a TIES threshold, slerp's angle, model_stock's cosines or a randomized range finder need
every element of a tensor, but only a few numbers (or a thin matrix) come out. Holding the
inputs whole makes memory grow with the largest tensor (~30 GiB for a 70B `lm_head` in fp32);
reading them again piece by piece, once per pass, keeps it at a few pieces. A `Reduction` says
which inputs it streams (they share dim 0) and runs its own passes over a `RowSource`; the
executor (run/execute.py) gives it one that reads pieces from the files, `compute` one over
tensors already in memory. Both cut the same pieces (`piece_bounds`), so a reduction that folds
its per-piece partials in order gives the same bytes either way, and for any worker count.
Nothing here imports torch at module level.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future
from typing import Any, ClassVar, Protocol, TypeVar

from recipekit.graph.nodes import Node, expression_nodes

T = TypeVar("T")

#: Elements per piece of a reduction's pass: 128Ki values (512 KiB in fp32), as an output
#: piece (`plan.cost.CHUNK_ELEMS`): a pass's temporaries then come from the heap instead of
#: fresh mappings, whose page faults cost more than the op (measured: 6.1 s of system time
#: for the thresholds of 60 TIES tensors with 1Mi-value pieces, 0.7-1.5 s with smaller ones).
#: Per-piece work (a 32Ki-bin histogram, a thin matmul) stays a small fraction.
PASS_ELEMS = 1 << 17
#: Keys of one histogram bucket that exact top-k selection collects in its second pass to
#: place a tie without a third (`ops.select`); here, without torch, for the plan's cost.
COLLECT_MAX = 1 << 20
#: Columns of a task vector's packed pruning rule (`ops.stream_prune`); here, without torch,
#: for the plan's shape of `steps.task_vectors.PruneStats`
PRUNE_RULE_WIDTH = 9


def mask_words(n: int) -> int:
    """The fp64 values after a reduction's rules that hold a mask of ``n`` values as bits
    (`ops.bitmask`); here, without torch, for the plan's shapes and memory."""
    return -(-n // 64)

#: Keys one top-k query collects during its histogram pass at most, around where a sample
#: puts its cut (`ops.select.select_cuts`): two int32 each
WINDOW_MAX = 1 << 21


def selection_bytes(n: int, queries: int) -> int:
    """Bytes exact top-k selection (`ops.select.select_cuts`) keeps for ``queries`` cuts over
    ``n`` entries besides its histograms: the windows its histogram pass fills (a key and a row
    per entry, at most `WINDOW_MAX` each) and one bucket taken out of them, or the bucket keys a
    second pass collects (at most `COLLECT_MAX`, widened to count them); never both at once."""
    window, collect = min(n, WINDOW_MAX), min(n, COLLECT_MAX)
    return max(queries * 8 * window + 17 * window, (8 * queries + 16) * collect)


PieceFn = Callable[[int, int, tuple[Any, ...]], T]


class RowSource(Protocol):
    """Row pieces of a reduction's streamed inputs, read afresh by every `map`."""

    #: rows (dim 0) of every streamed input
    rows: int
    #: whether pieces are read from the files on a read-ahead thread, where ``prepare`` runs
    #: (else on the thread that runs ``fn``)
    reads_files: bool

    def map(self, fn: PieceFn[T], *, every: int = 1,
            prepare: PieceFn[Any] | None = None) -> Iterator[T]:
        """``fn(lo, hi, pieces)`` for each row piece (each ``every``-th one only: a sample),
        ``pieces`` aligned with the streamed inputs; results in piece order. ``fn`` may run on
        worker threads: it must not mutate shared state (fold its results in the loop that
        consumes them). With ``prepare``, ``fn`` gets ``prepare(lo, hi, pieces)`` instead of
        the pieces, computed where the piece is read: a source that `reads_files` runs it on
        its read-ahead thread, which waits on reads most of a pass, so the thread that runs
        ``fn`` does less (SCE forming its task vectors there: TinyLlama 30.9 → 27.1 s)."""
        ...


def piece_bounds(rows: int, row_elems: int, *, row_block: int = 1, scale: int = 1
                 ) -> list[tuple[int, int]]:
    """The row pieces of a pass: about ``scale`` × `PASS_ELEMS` values each, a multiple of 64
    values so that vectorized loops start where the whole tensor's would, and of ``row_block``
    rows (a streamed node's own alignment, `Node.row_block`). Whole rows: a piece never splits
    one."""
    per = max(1, scale * PASS_ELEMS // max(1, row_elems))
    align = math.lcm(64 // math.gcd(max(1, row_elems), 64), row_block)
    per = -(-per // align) * align
    return [(lo, min(lo + per, rows)) for lo in range(0, rows, per)]


class InMemorySource:
    """A `RowSource` over tensors already in memory, cut like the executor cuts files.

    With ``threads`` (an executor whose workers run nothing else meanwhile, and how many it
    has), pieces run on them side by side, one more in flight than there are threads, and
    their results still come in piece order. Why: a pass over held inputs reads and writes
    nothing, so the cores the executor's read-ahead and writer use are free for it; run on
    the executor's thread alone, the passes of a TinyLlama DELLA (its L1 norms, which rank
    every row) left the second of 2 cores idle for three quarters of the run.
    """

    def __init__(self, tensors: Sequence[Any], bounds: list[tuple[int, int]],
                 threads: tuple[Executor, int] | None = None) -> None:
        self.tensors = tuple(tensors)
        self.rows = bounds[-1][1] if bounds else 0
        self.bounds = bounds
        self.threads = threads

    reads_files = False

    def map(self, fn: PieceFn[T], *, every: int = 1,
            prepare: PieceFn[Any] | None = None) -> Iterator[T]:
        if prepare is not None:  # on the thread that runs fn: nothing is read apart here
            fn = _prepared(fn, prepare)
        bounds = self.bounds[::every]
        if self.threads is None or len(bounds) < 2:
            for lo, hi in bounds:
                yield fn(lo, hi, self._piece(lo, hi))
            return
        pool, n = self.threads
        inflight: collections.deque[Future[T]] = collections.deque()
        upcoming = iter(bounds)
        try:
            for lo, hi in itertools.islice(upcoming, n + 1):
                inflight.append(pool.submit(fn, lo, hi, self._piece(lo, hi)))
            while inflight:
                result = inflight.popleft().result()
                following = next(upcoming, None)
                if following is not None:
                    inflight.append(pool.submit(fn, *following, self._piece(*following)))
                yield result
                del result
        finally:  # a closed or failed pass: running pieces finish before their inputs go
            for future in inflight:
                future.cancel()
            for future in inflight:
                if not future.cancelled():
                    with contextlib.suppress(BaseException):
                        future.result()

    def _piece(self, lo: int, hi: int) -> tuple[Any, ...]:
        return tuple(t[lo:hi] for t in self.tensors)


def _prepared(fn: PieceFn[T], prepare: PieceFn[Any]) -> PieceFn[T]:
    return lambda lo, hi, pieces: fn(lo, hi, prepare(lo, hi, pieces))


class Reduction(Node):
    """A node whose value comes from passes over row pieces of its `streamed` inputs.

    Subclasses are frozen dataclasses like every node and implement `reduce`. Every input is
    either streamed (``streamed()[i]`` True: an expression the executor can compute in row
    pieces, sharing dim 0 with the other streamed inputs) or whole (a small value, e.g. another
    reduction's result). `passes` is how many times `reduce` reads the streamed inputs at most
    (the plan's cost of reading them); `state_bytes` what it keeps between pieces.
    """

    __slots__ = ()

    #: Upper bound of the passes `reduce` makes over the streamed inputs (for the plan; a
    #: subclass may make it a property of its parameters).
    passes: ClassVar[int] = 1
    #: Pieces of this many times `PASS_ELEMS` values (`bounds`): a reduction whose work per
    #: piece is many small ops over a few fp32 copies pays less for its calls with larger ones.
    pass_scale: ClassVar[int] = 1

    def streamed(self) -> tuple[bool, ...]:
        """Per input: True when it is read in row pieces, False when whole."""
        return (True,) * len(self.inputs)

    def row_inputs(self) -> tuple[bool, ...] | None:
        return None  # a reduction's value is never computed by rows

    @property
    def stream_rows(self) -> int:
        """Rows (dim 0) of the streamed inputs."""
        first = next(x for x, s in zip(self.inputs, self.streamed(), strict=True) if s)
        return first.shape[0] if first.shape else 1

    @property
    def stream_row_elems(self) -> int:
        """Values per row, summed over the streamed inputs (what sizes a piece)."""
        first = next(x for x, s in zip(self.inputs, self.streamed(), strict=True) if s)
        return first.numel // max(1, self.stream_rows)

    def bounds(self) -> list[tuple[int, int]]:
        """The row pieces every pass reads, the same in memory and from files."""
        streamed = [x for x, s in zip(self.inputs, self.streamed(), strict=True) if s]
        block = math.lcm(*(n.row_block for x in streamed for n in expression_nodes(x)))
        return piece_bounds(self.stream_rows, self.stream_row_elems, row_block=block,
                            scale=self.pass_scale)

    @property
    def state_bytes(self) -> int:
        """Bytes the reduction keeps from pass to pass (histograms, partial products)."""
        return 0

    def reduce(self, source: RowSource, whole: tuple[Any, ...]) -> Any:
        """The value, from ``source`` (the streamed inputs) and ``whole`` (the other inputs,
        in input order)."""
        raise NotImplementedError(type(self).__name__)

    def compute(self, args: tuple[Any, ...],
                threads: tuple[Executor, int] | None = None) -> Any:
        """The value from inputs computed whole, its passes' pieces run on ``threads`` when
        given (`InMemorySource`)."""
        flags = self.streamed()
        streamed = [a for a, s in zip(args, flags, strict=True) if s]
        whole = tuple(a for a, s in zip(args, flags, strict=True) if not s)
        source = InMemorySource([_as_rows(a) for a in streamed], self.bounds(), threads)
        return self.reduce(source, whole)


def _as_rows(tensor: Any) -> Any:
    """A 0-D tensor as one row of one value (so every streamed input can be sliced by rows)."""
    return tensor.reshape(1) if tensor.dim() == 0 else tensor


class SweepSource(Protocol):
    """The tensors a `Sweep` reads itself, one at a time, when it asks for them."""

    def read(self, node: Node) -> Any:
        """``node``'s whole value (on the compute device)."""
        ...

    def read_rows(self, node: Node, rows: Sequence[int]) -> Any:
        """Rows ``rows`` (dim 0, in this order) of ``node``; a stored tensor reads only
        those rows from its file."""
        ...


class Sweep(Node):
    """A node that reads its large inputs itself, a few at a time, in an order it chooses.

    Why: a layer-by-layer forward pass (steps/moe_gates.py) needs every layer's weights, but
    one layer at a time; an embedding lookup needs a few rows of a table. Were they ordinary
    inputs, the executor would compute them all before the node (the whole model in memory).
    Inputs flagged in `swept` are read through a `SweepSource` inside `sweep`: the executor
    (run/execute.py) gives it one that reads from the files, `compute` one over values already
    in memory. `workspace` must bound what `sweep` holds at once (the plan's estimate). Its
    value is kept in the executor's shared values, like a reduction's, so the output tensors
    that follow (every layer's router) read one sweep.
    """

    __slots__ = ()

    def swept(self) -> tuple[bool, ...]:
        """Per input: True when `sweep` reads it through the source, False when the
        executor computes it first and passes it whole."""
        return (True,) * len(self.inputs)

    def sweep(self, source: SweepSource, whole: tuple[Any, ...]) -> Any:
        """The value, reading the swept inputs from ``source``; ``whole`` holds the other
        inputs in input order."""
        raise NotImplementedError(type(self).__name__)

    def compute(self, args: tuple[Any, ...]) -> Any:
        flags = self.swept()
        values = {x: a for x, a, s in zip(self.inputs, args, flags, strict=True) if s}
        whole = tuple(a for a, s in zip(args, flags, strict=True) if not s)
        return self.sweep(InMemorySweepSource(values), whole)


class InMemorySweepSource:
    """A `SweepSource` over values already computed (tests, small plans)."""

    def __init__(self, values: dict[Node, Any]) -> None:
        self.values = values

    def read(self, node: Node) -> Any:
        return self.values[node]

    def read_rows(self, node: Node, rows: Sequence[int]) -> Any:
        import torch

        value = self.values[node]
        return value[torch.tensor(list(rows), dtype=torch.long, device=value.device)]
