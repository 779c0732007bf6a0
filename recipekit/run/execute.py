"""Stream a plan's shards: every output tensor computed (or copied) into its place in its shard.

Tensors that are only moved (a `Load` written in its own dtype) are copied in fixed-size chunks
through one reusable buffer, never becoming torch tensors; computed tensors are evaluated on the
chosen device, brought back, written and freed. Peak memory is therefore a few tensors (or one
chunk buffer), whatever the model or shard size. This is the only module that moves tensors
between devices. Fetching hub shards before (`fetch`) and finishing the directory after
(`finish`) are `run_plan`'s other stages (`local`).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import itertools
import logging
import queue
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from recipekit.dtypes import torch_dtype
from recipekit.graph import Load, Node, expression_nodes, iter_post_order
from recipekit.graph.gather import RowGather
from recipekit.graph.passes import Reduction, Sweep
from recipekit.io.header import FileStamp
from recipekit.io.output import OutputDir
from recipekit.io.reader import FileReader
from recipekit.io.remote_output import RemoteOutput
from recipekit.plan import Plan, Shard
from recipekit.plan.cost import (
    BATCH_BYTES,
    COPY_BUFFERS,
    COPY_CHUNK,
    KEPT_HEAP,
    chunkable,
    kept_heap,
    piece_workers,
    prefetch_loads,
    row_sliced,
    rows_per_piece,
    shared_values,
    streams_from_files,
    whole_inputs,
)

log = logging.getLogger(__name__)

Progress = Callable[[int], None]


class RunEvents:
    """What a run reports besides bytes (`Progress`): the tensor it starts writing and each
    shard it finishes or finds finished. Does nothing; the Python API (`recipekit.api`)
    overrides both to name the current tensor in progress lines and to report shard hashes."""

    def tensor(self, shard: str, name: str) -> None:
        """Called before output tensor ``name`` of ``shard`` is computed or copied."""

    def shard(self, name: str, sha256: str, size: int, *, resumed: bool) -> None:
        """Called when shard ``name`` is renamed into place (``resumed``: a rerun found it
        finished by an earlier run of the same plan)."""


@dataclass(frozen=True)
class RunResult:
    output: Path | str
    already_complete: bool
    shards_written: int
    shards_resumed: int
    bytes_written: int
    non_finite: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    shards: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> sha256


class FiniteCheck:
    """Counts NaN and Inf values per tensor label (``--check-finite``)."""

    def __init__(self) -> None:
        self.found: dict[str, tuple[int, int]] = {}

    def check(self, label: str, tensor: Any) -> None:
        import torch

        if not tensor.is_floating_point() or tensor.numel() == 0:
            return
        nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
        if nan or inf:
            old = self.found.get(label, (0, 0))
            self.found[label] = (old[0] + nan, old[1] + inf)


def stream_shards(plan: Plan, out: OutputDir | RemoteOutput, dev: Any, *, fsync: bool,
                  progress: Progress | None, check_finite: bool,
                  workers: int | None, events: RunEvents | None = None
                  ) -> dict[str, tuple[int, int]]:
    """Write every shard ``out`` has not finished; returns the non-finite counts found
    (``check_finite``) by tensor label."""
    tick = progress or (lambda n: None)
    todo = [s for s in plan.shards if not out.is_finished(s.filename)]
    with open_runtime(todo, dev, workers=workers, check_finite=check_finite,
                      events=events, stamps=input_stamps(plan, todo)) as rt:
        for shard in plan.shards:
            if out.is_finished(shard.filename):
                rt.events.shard(shard.filename, out.state.finished[shard.filename]["sha256"],
                                shard.size, resumed=True)
                tick(shard.size)
                continue
            sha = write_shard(plan, shard, out, rt, fsync=fsync, progress=tick)
            out.mark_finished(shard.filename, sha, shard.size)
            rt.events.shard(shard.filename, sha, shard.size, resumed=False)
    return rt.finite.found if rt.finite else {}


def input_stamps(plan: Plan, shards: list[Shard]) -> dict[Path, FileStamp | None]:
    """Every input file ``shards`` read, with the version of it the plan's offsets come from
    (None: not a local file read by the plan, e.g. a URL input's object)."""
    files: dict[Path, FileStamp | None] = {}
    for n in {n for s in shards for t in s.tensors for n in expression_nodes(t.node)}:
        if isinstance(n, Load):
            info = plan.sources[n.source].tensors[n.name]
            files[info.file] = info.stamp
    return files


@contextlib.contextmanager
def open_runtime(shards: list[Shard], dev: Any, *, workers: int | None, check_finite: bool,
                 events: RunEvents | None = None,
                 stamps: dict[Path, FileStamp | None] | None = None,
                 inode: bool = True) -> Iterator[Runtime]:
    """What writing ``shards`` uses besides the plan (`Runtime`), closed on exit: the local
    executor opens one for a run, the Ray executor one per task (`recipekit.run.ray`).

    ``stamps``: the input files ``shards`` read (`input_stamps`); each is opened and checked
    against the version the plan read now, and read through that descriptor until the end
    (``inode``: as `FileReader`'s)."""
    _fixed_mmap_threshold()
    stamps = stamps or {}
    with FileReader({p: s for p, s in stamps.items() if s is not None},
                    inode=inode) as reader, \
            ThreadPoolExecutor(1, thread_name_prefix="recipekit-read",
                               initializer=_one_torch_thread) as prefetch, \
            contextlib.ExitStack() as stack:
        largest = max((t.nbytes for s in shards for t in s.tensors), default=1)
        n = workers if workers is not None else piece_workers()
        cpu = dev is not None and dev.type == "cpu"
        pool = (stack.enter_context(ThreadPoolExecutor(n, thread_name_prefix="recipekit-piece"))
                if n > 1 and cpu else None)
        # passes over held inputs: n + 1 threads (the one that waits for them joins in); a
        # pass that reads the files keeps the n workers (SCE's were slower on two threads)
        passes = (stack.enter_context(ThreadPoolExecutor(
            n + 1, thread_name_prefix="recipekit-pass", initializer=_one_torch_thread)), n + 1
        ) if cpu else None
        keep = shared_values(t.node for s in shards for t in s.tensors)
        computed = [t.node for s in shards for t in s.tensors if not isinstance(t.node, Load)]
        reader.open_files(sorted(stamps))
        yield Runtime(reader, dev, BufferPool(COPY_BUFFERS, max(1, min(COPY_CHUNK, largest))),
                      prefetch, FiniteCheck() if check_finite else None, pool,
                      n if pool else 1, events or RunEvents(), keep=keep,
                      kept_heap=kept_heap(computed, n), passes=passes)


@dataclass
class Runtime:
    """What writing one shard uses besides the plan: the input reader, the compute device,
    copy buffers, the read-ahead thread of chunked tensors, the optional finite check, and the
    threads that compute row pieces side by side."""

    reader: FileReader
    device: Any
    pool: BufferPool
    prefetch: ThreadPoolExecutor
    finite: FiniteCheck | None = None
    compute: ThreadPoolExecutor | None = None  # piece workers on the CPU; None: this thread
    workers: int = 1  # the size of `compute`
    events: RunEvents = dataclasses.field(default_factory=RunEvents)
    #: the last few reductions' values of `keep`: the output tensors that follow read the
    #: same one (a LoRA module's A and B factors come from one range finder)
    shared: collections.OrderedDict[Node, Any] = dataclasses.field(
        default_factory=collections.OrderedDict)
    #: the reduction and sweep values several output tensors read (`plan.cost.shared_values`)
    keep: frozenset[Node] = frozenset()
    #: the free heap kept from one chunked tensor to the next (`plan.cost.kept_heap`)
    kept_heap: int = KEPT_HEAP
    #: the threads, and how many, that run the passes of a reduction over held inputs on the
    #: CPU (`graph.passes.InMemorySource`); None: this thread
    passes: tuple[ThreadPoolExecutor, int] | None = None

    #: the next output tensor's whole inputs, being read on the read-ahead thread
    #: (`read_ahead`); `_value` takes them from here
    ahead: dict[Node, Future[Any]] = dataclasses.field(default_factory=dict)

    SHARED_KEEP: ClassVar[int] = 8

    def read_ahead(self, node: Node, plan: Plan) -> set[Node]:
        """Start reading the stored inputs the output tensor ``node`` reads whole
        (`plan.cost.prefetch_loads`) on the read-ahead thread; return what was there before
        (the current tensor's), which the caller drops once that tensor is done."""
        before = set(self.ahead)
        for x in sorted(prefetch_loads(node), key=lambda x: (x.source, x.name)):
            if x not in self.ahead:
                self.ahead[x] = self.prefetch.submit(read_tensor, x, plan, self.reader,
                                                     pin=self.pin)
        return before

    def remember(self, node: Node, value: Any) -> None:
        """Keep ``node``'s value for the tensors that follow, if several read it (`keep`)."""
        if node not in self.keep:
            return
        self.shared[node] = value
        while len(self.shared) > self.SHARED_KEEP:
            self.shared.popitem(last=False)

    @property
    def pin(self) -> bool:
        return _pinned(self.device)


class BufferPool:
    """Up to ``count`` reusable copy buffers, made on first use; a buffer goes back once the
    writer has hashed its bytes. Each is allocated without being written (numpy's `empty`;
    the allocator maps buffers this large), so only the bytes copied into it become resident:
    a computed piece (a few hundred KiB) does not touch the rest."""

    def __init__(self, count: int, size: int) -> None:
        self.size = size
        self._free: queue.Queue[Any] = queue.Queue()
        self._left = count

    def get(self) -> Any:
        import numpy

        if self._left and self._free.empty():
            self._left -= 1
            return numpy.empty(self.size, dtype=numpy.uint8)
        return self._free.get()

    def put(self, buf: Any) -> None:
        self._free.put(buf)


def write_shard(plan: Plan, shard: Shard, out: OutputDir | RemoteOutput, rt: Runtime, *,
                fsync: bool, progress: Progress) -> str:
    """Stream one shard to its output (a local file, or an object by multipart upload) and
    return its sha256."""
    reader, pool, finite = rt.reader, rt.pool, rt.finite
    writer = out.open_shard(shard.filename, shard.header, shard.size, fsync=fsync)
    batch = _Batch(pool, writer)
    try:
        progress(len(shard.header))  # a callback's exception must reach the abort below
        for i, t in enumerate(shard.tensors):
            rt.events.tensor(shard.filename, t.name)
            node = t.node
            following = shard.tensors[i + 1].node if i + 1 < len(shard.tensors) else None
            current = (rt.read_ahead(following, plan) if following is not None
                       and not isinstance(following, Load) else set(rt.ahead))
            if isinstance(node, Load):
                batch.flush()
                info = plan.sources[node.source].tensors[node.name]
                done = 0
                while done < info.nbytes:
                    buf = pool.get()
                    n = min(pool.size, info.nbytes - done)
                    view = memoryview(buf)[:n]
                    reader.read_into(info.file, info.offset + done, view)
                    if finite is not None:
                        finite.check(f"{t.name} (from {node.source}:{node.name})",
                                     _as_tensor(view, info.dtype))
                    writer.write(view, done=lambda b=buf: pool.put(b))
                    done += n
                    progress(n)
            elif chunkable(node):
                # A piece waiting in the writer's queue would outlive the next pieces'
                # temporaries and split the allocator's heap under them (its freed memory then
                # stays resident); a copy into a reused buffer lets every temporary go at once.
                for piece in evaluate_chunks(node, plan, rt):
                    if finite is not None:
                        finite.check(t.name, piece)
                    nbytes = piece.numel() * piece.element_size()
                    progress(nbytes)
                    if not batch.add(piece):
                        batch.flush()
                        writer.write(_tensor_bytes(piece), done=lambda p=piece: None)
                    del piece
                _release_heap(rt.kept_heap)
            else:
                tensor = evaluate(node, plan, rt).contiguous()
                if finite is not None:
                    finite.check(t.name, tensor)
                batch.flush()
                # Written and hashed after this returns; the closure keeps the tensor alive.
                writer.write(_tensor_bytes(tensor), done=lambda t=tensor: None)
                progress(t.nbytes)
                del tensor
            for x in current:  # read ahead for this tensor but not taken (a shared input)
                rt.ahead.pop(x, None)
        batch.flush()
        # every read of the shard is done: a file rewritten in place since it was opened may
        # have given it bytes of two versions, and it must not be kept
        reader.check_unchanged()
        return writer.finish()
    except BaseException:
        writer.abort()
        raise


class _Batch:
    """Computed pieces copied one after another into a copy buffer, handed to the writer
    together once `BATCH_BYTES` are in (or before anything else is written): one hand-over to
    the writer's thread, one ``write`` and one wake-up per batch instead of per piece."""

    def __init__(self, pool: BufferPool, writer: Any) -> None:
        self.pool, self.writer = pool, writer
        self.limit = min(pool.size, BATCH_BYTES)
        self.buf: Any = None
        self.used = 0

    def add(self, piece: Any) -> bool:
        """Copy a contiguous CPU piece in; False (nothing done) when it is empty or larger
        than a copy buffer."""
        nbytes = piece.numel() * piece.element_size()
        if not 0 < nbytes <= self.pool.size:
            return False
        if self.buf is not None and self.used + nbytes > self.pool.size:
            self.flush()
        if self.buf is None:
            self.buf, self.used = self.pool.get(), 0
        _copy_into(self.buf, piece, self.used)
        self.used += nbytes
        if self.used >= self.limit:
            self.flush()
        return True

    def flush(self) -> None:
        """Hand what is in to the writer (the buffer goes back to the pool once hashed)."""
        buf, used = self.buf, self.used
        self.buf, self.used = None, 0
        if buf is None:
            return
        if used:
            self.writer.write(memoryview(buf)[:used], done=lambda: self.pool.put(buf))
        else:
            self.pool.put(buf)


def _copy_into(buf: Any, tensor: Any, offset: int = 0) -> None:
    """Copy a contiguous CPU tensor's bytes into ``buf`` at ``offset``.

    Why numpy's copy, not torch's ``copy_``: this runs on the thread that hands pieces to
    the writer, whose torch keeps its default thread count, so ``copy_`` opened an OpenMP
    region over every core for each piece, and the idle OpenMP threads then spin, taking
    cores from the piece workers: with ``--workers 2`` on 2 cores a TinyLlama DELLA spent
    26-30 s of CPU instead of 21-22 (measured with OMP_NUM_THREADS=1 as the control)."""
    import torch

    flat = tensor.reshape(-1).view(torch.uint8).numpy()
    buf[offset:offset + flat.size] = flat  # ``buf``: a `BufferPool` array


def _tensor_bytes(tensor: Any) -> memoryview:
    """A contiguous CPU tensor's bytes, without copying them into a Python object."""
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr()))


def evaluate(node: Node, plan: Plan, rt: Runtime) -> Any:
    """Compute one output tensor's expression and return it on the CPU.

    The memo is an explicit dict cleared on return (not a recursive closure, whose reference
    cycle would keep every intermediate alive until Python's cyclic GC ran).
    """
    memo: dict[Node, Any] = {}
    try:
        return _value(node, memo, plan, rt).cpu()
    finally:
        memo.clear()


def evaluate_chunks(node: Node, plan: Plan, rt: Runtime) -> Iterator[Any]:
    """Yield ``node``'s values as contiguous CPU pieces of whole rows, in order.

    Stored inputs on the sliced paths (`plan.row_sliced`) are read piece by piece straight from
    their files on the read-ahead thread; inputs a piece needs whole (a LoRA's A factor,
    slerp's coefficients, a TIES threshold) are computed first, once per tensor, and a stored
    input they read whole anyway (a reduction over small inputs, `plan.cost.HOLD_BYTES`) is
    then sliced in memory instead of read again. Pieces are computed at one torch thread each,
    by ``rt.compute``'s workers side by side (or by this thread): a piece is too small for a
    parallel region to pay for its start, and independent pieces scale with cores instead.
    Every node's `compute_rows` equals the rows of its whole result, so the bytes are those of
    the whole-tensor evaluation, whichever thread computed a piece
    (tests/test_execute.py::TestChunkedEvaluation).
    """
    rows = rows_per_piece(node)
    gpu = rt.device is not None and rt.device.type != "cpu"
    if gpu:
        rows *= 64  # amortize kernel launches and transfers
    n_rows = node.shape[0]
    bounds = [(lo, min(lo + rows, n_rows)) for lo in range(0, n_rows, rows)]
    yield from _Pieces.over((node,), plan, rt).run(bounds, _output_piece)


def _output_piece(lo: int, hi: int, pieces: tuple[Any, ...]) -> Any:
    return pieces[0].cpu().contiguous()


class _FileSource:
    """A reduction's `RowSource` (graph/passes.py) reading row pieces of its streamed inputs
    from the files, every pass anew: memory is a few pieces whatever the tensor's size."""

    def __init__(self, node: Reduction, plan: Plan, rt: Runtime, known: dict[Node, Any]
                 ) -> None:
        self.targets = tuple(x for x, s in zip(node.inputs, node.streamed(), strict=True) if s)
        self.rows = node.stream_rows
        self.bounds = node.bounds()
        self.plan, self.rt, self.known = plan, rt, known

    reads_files = True

    def map(self, fn: Callable[[int, int, tuple[Any, ...]], Any], *, every: int = 1,
            prepare: Callable[[int, int, tuple[Any, ...]], Any] | None = None
            ) -> Iterator[Any]:
        job = _Pieces.over(self.targets, self.plan, self.rt, self.known)
        yield from job.run(self.bounds[::every], fn, prepare, ahead=self.reads_files)


class _FileSweepSource:
    """A sweep's `SweepSource` (graph/passes.py): each tensor read from the files when the
    sweep asks for it and held only as long as the sweep keeps it (one layer's weights)."""

    def __init__(self, plan: Plan, rt: Runtime) -> None:
        self.plan, self.rt = plan, rt

    def read(self, node: Node) -> Any:
        memo: dict[Node, Any] = {}
        try:
            return _value(node, memo, self.plan, self.rt).to(self.rt.device)
        finally:
            memo.clear()

    def read_rows(self, node: Node, rows: Any) -> Any:
        import torch

        if not isinstance(node, Load):
            value = self.read(node)
            return value[torch.tensor(list(rows), dtype=torch.long, device=value.device)]
        pieces = [read_rows(node, self.plan, self.rt.reader, r, r + 1) for r in rows]
        if not pieces:
            return torch.empty((0, *node.shape[1:]), dtype=torch_dtype(node.dtype))
        return torch.cat(pieces).to(self.rt.device)


#: the key of a piece's `_Pieces.prepare` result among its read rows (and "none made")
_PREPARED: Any = object()


@dataclass
class _Pieces:
    """What computing row pieces of some nodes shares: the inputs they read whole, and how one
    piece is read and computed (and handed to ``fn`` on the worker that computed it)."""

    targets: tuple[Node, ...]
    plan: Plan
    rt: Runtime
    loads: list[Node]  # stored inputs on the sliced paths, and streaming row gathers
    gpu: bool
    whole: dict[Node, Any] = dataclasses.field(default_factory=dict)
    held: dict[Node, Any] = dataclasses.field(default_factory=dict)  # sliced inputs read whole
    fn: Callable[[int, int, tuple[Any, ...]], Any] = _output_piece
    # what fn gets instead of the pieces (`graph.passes.RowSource.map`), and whether it is
    # made on the read-ahead thread (`_FileSource.reads_files`)
    prepare: Callable[[int, int, tuple[Any, ...]], Any] | None = None
    ahead: bool = True

    @classmethod
    def over(cls, targets: tuple[Node, ...], plan: Plan, rt: Runtime,
             known: dict[Node, Any] | None = None) -> _Pieces:
        """The pieces of ``targets``, with the values they read whole computed first (or
        taken from ``known``: a reduction's passes compute them once)."""
        sliced: set[Node] = set()
        whole: set[Node] = set()
        for t in targets:
            parts = row_sliced(t)
            assert parts is not None
            sliced |= parts[0]
            whole |= parts[1]
        loads: list[Node] = sorted((n for n in sliced if isinstance(n, Load)),
                                   key=lambda n: (n.source, n.name))
        loads += [n for n in sliced if isinstance(n, RowGather) and n.streams]  # rows they name
        gpu = rt.device is not None and rt.device.type != "cpu"
        job = cls(targets, plan, rt, loads, gpu)
        job.whole.update((x, known[x]) for x in whole if known and x in known)
        job.read_whole({x for x in whole if x not in job.whole})
        if known is not None:
            known.update(job.whole)
        return job

    def run(self, bounds: list[tuple[int, int]],
            fn: Callable[[int, int, tuple[Any, ...]], Any],
            prepare: Callable[[int, int, tuple[Any, ...]], Any] | None = None, *,
            ahead: bool = True) -> Iterator[Any]:
        import torch

        self.fn, self.prepare, self.ahead = fn, prepare, ahead
        threads = torch.get_num_threads()
        try:
            yield from _pipeline(self, bounds, self.rt.compute if not self.gpu else None, self.rt)
        finally:
            torch.set_num_threads(threads)
            self.whole.clear()
            self.held.clear()

    def read_whole(self, inputs: set[Node]) -> None:
        """Compute the inputs a piece needs whole, keeping the sliced stored inputs they read
        anyway (a reduction's small inputs)."""
        for x in inputs:
            seen: dict[Node, Any] = {}
            self.whole[x] = _value(x, seen, self.plan, self.rt)
            self.held.update((n, seen[n]) for n in self.loads if n in seen)
            seen.clear()

    def read(self, lo: int, hi: int) -> dict[Node, Any]:
        """The stored rows ``lo:hi`` a piece reads; with `prepare` and targets that are all
        read here (stored inputs, on the CPU), also what `prepare` makes of them, under
        `_PREPARED`: on the read-ahead thread, which is idle while a piece computes."""
        memo: dict[Any, Any] = {
            n: self.held[n][lo:hi] if n in self.held else
            gather_rows(n, self.plan, self.rt, lo, hi, self.whole)
            if isinstance(n, RowGather) and n.streams else
            read_rows(n, self.plan, self.rt.reader, lo, hi, pin=self.rt.pin)  # type: ignore[arg-type]
            for n in self.loads}
        if self.prepare is not None and self.ahead and not self.gpu \
                and all(t in memo for t in self.targets):
            memo[_PREPARED] = self.prepare(lo, hi, tuple(memo[t] for t in self.targets))
        return memo

    def compute(self, ahead: Future[dict[Node, Any]], lo: int,
                hi: int) -> tuple[dict[Node, Any], Any]:
        import torch

        memo = ahead.result()
        prepared = memo.pop(_PREPARED, _PREPARED)
        # (held inputs were checked when read whole)
        inputs = {n: v for n, v in memo.items() if n not in self.held and isinstance(n, Load)
                  } if self.rt.finite else {}
        if not self.gpu:
            torch.set_num_threads(1)  # also per worker thread: OpenMP's setting is per thread
        try:
            if prepared is _PREPARED:  # not made on the read-ahead thread: made here
                prepared = tuple(_piece(t, lo, hi, memo, self.whole, self.plan, self.rt)
                                 for t in self.targets)
                if self.prepare is not None:
                    prepared = self.prepare(lo, hi, prepared)
            return inputs, self.fn(lo, hi, prepared)
        finally:
            memo.clear()


def _pipeline(job: _Pieces, bounds: list[tuple[int, int]], workers: ThreadPoolExecutor | None,
              rt: Runtime) -> Iterator[Any]:
    """Each piece's read is queued on the read-ahead thread, and its computation on a worker;
    pieces are taken in order, with one more in flight than there are workers."""
    Job = tuple[Future[dict[Node, Any]], int, int, Future[tuple[dict[Node, Any], Any]] | None]
    inflight: collections.deque[Job] = collections.deque()
    upcoming = iter(bounds)

    in_memory = all(n in job.held for n in job.loads)

    def start(lo: int, hi: int) -> None:
        if in_memory:  # slicing held inputs: no read to overlap, no hand-over to pay for
            ahead: Future[dict[Node, Any]] = Future()
            ahead.set_result(job.read(lo, hi))
        else:
            ahead = rt.prefetch.submit(job.read, lo, hi)
        done = workers.submit(job.compute, ahead, lo, hi) if workers is not None else None
        inflight.append((ahead, lo, hi, done))

    try:
        for lo, hi in itertools.islice(upcoming, 1 + (rt.workers if workers else 1)):
            start(lo, hi)
        while inflight:
            ahead, lo, hi, done = inflight.popleft()
            inputs, piece = job.compute(ahead, lo, hi) if done is None else done.result()
            following = next(upcoming, None)
            if following is not None:
                start(*following)
            if rt.finite is not None:
                for n, value in inputs.items():
                    rt.finite.check(f"input {n.source}:{n.name}", value)  # type: ignore[attr-defined]
            del inputs
            yield piece
            del piece
    finally:
        for ahead, _, _, done in inflight:
            ahead.cancel()
            if done is not None:
                done.cancel()
        if workers is not None:  # a cancelled generator: let running pieces finish first
            for _, _, _, done in inflight:
                if done is not None and not done.cancelled():
                    with contextlib.suppress(BaseException):
                        done.result()


def _piece(n: Node, lo: int, hi: int, memo: dict[Node, Any], whole: dict[Node, Any],
           plan: Plan, rt: Runtime) -> Any:
    """Rows ``lo:hi`` of ``n`` (its stored inputs' rows are in ``memo``, the inputs it reads
    whole in ``whole``)."""
    stack = [n]  # iterative post-order: a chain of 600 steps must not exhaust Python's stack
    while stack:
        m = stack[-1]
        if m in memo:
            stack.pop()
            continue
        flags = tuple(zip(m.inputs, m.row_inputs() or (), strict=True))
        pending = [x for x, by_rows in flags if by_rows and x not in memo]
        if pending:
            stack.extend(reversed(pending))
            continue
        args = tuple((memo[x] if by_rows else whole[x]).to(rt.device, non_blocking=True)
                     for x, by_rows in flags)
        memo[m] = m.compute_rows(args, lo, hi)
        stack.pop()
    return memo[n]


#: glibc's mallopt parameters: the size above which malloc maps memory of its own, and the free
#: memory at the heap's top above which free() gives it back
_M_MMAP_THRESHOLD = -3
_M_TRIM_THRESHOLD = -1
#: ... and how many heaps (arenas) the threads share at most
_M_ARENA_MAX = -8
#: the heap's top keeps up to this much free memory while a tensor is computed: in effect
#: all of it, until `_release_heap` after the tensor (the peak is the same; what is freed in
#: between is taken again by the next pieces instead of being faulted in afresh)
_TRIM_THRESHOLD = 1024 << 20


def _fixed_mmap_threshold(size: int = 4 << 20) -> None:
    """Serve every allocation of ``size`` or more (whole tensors, large slerp pieces, copy
    buffers) with its own mapping, returned to the system when freed. glibc otherwise raises
    the threshold to the largest block freed (up to 32 MiB), after which such blocks come from
    the heaps of the reading and computing threads and their freed memory stays resident:
    measured 130 MiB above the plan's estimate for a slerp streamed from the files. Row and
    pass pieces stay below it on purpose (`plan.cost.CHUNK_ELEMS`): a mapping per temporary
    costs more in page faults than the op. 4 MiB and not 1: a piece of 128Ki values is 512 KiB
    in fp32, but its fp64 copies and a stack of a few task vectors are 1-3 MiB (SCE's variance
    took 14 ns a value with those mapped, 7 from the heap; its MLP tensors 70-100 → 66 ns a
    value in all).

    Setting the threshold also fixes glibc's trim threshold at its default of 128 KiB, after
    which every free that left more than that at the heap's top gave it back, and the next
    piece's temporaries faulted it in again: 12-34 bytes of fresh pages a value in SCE's
    passes, ~10% of its time. The top now keeps up to `_TRIM_THRESHOLD`; the heap is trimmed
    after a chunked tensor instead (`_release_heap`). 64 MiB left SCE's kept variance keys
    (46 MiB a TinyLlama MLP tensor) and the pieces beside them to be given back and faulted in
    again: 1.0 against 0.3 million page faults a run, 9.1 against 7.7 s of system time.

    Every thread allocates from one heap: glibc gives each new thread a heap of its own, and
    with the trim threshold above each of them kept what its thread freed, so the pass
    threads' and piece workers' heaps added up (a TinyLlama TIES against a light fine-tune:
    peaks of 433-756 MiB from run to run; one heap: 454-537 MiB, and no slower: 11.5-13.1
    against 12.8-16.3 s). Not measured with many workers: a piece makes a few dozen
    allocations in about a millisecond, so the heap's lock should stay a small fraction of its
    time. No-op off glibc."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, size)
        libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
        libc.mallopt(_M_ARENA_MAX, 1)


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (2.33+): the heap's totals over every arena."""

    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _release_heap(keep: int = KEPT_HEAP) -> None:
    """Give the heap's free pages back once a chunked tensor is written, when more than
    ``keep`` of it is free (`plan.cost.kept_heap`, which `plan` counts). A piece's
    temporaries (below the mapping threshold) come from the heap and stay resident after they
    are freed; past that much, the next tensor's passes could add their own peak on top
    (measured 93-101 MiB against 67-89 for a slerp of four 64 MiB tensors, when every tensor
    was followed by a trim). Below it, the next tensor's pieces take the free memory first,
    but not always: arcee_fusion over 8-16 MiB tensors peaked 20-30 MiB higher.

    Why not trim after every tensor: `malloc_trim` drops every free page, and the next
    tensor's pieces fault them in again. TinyLlama-shaped merges left 10-15 MiB free after each
    tensor, and re-faulting it was 190-320 thousand page faults a run (0.9 GB): 0.4-1.5 s of
    system time in DARE-TIES, TIES and breadcrumbs, 2.5-4 s in SCE. No-op off glibc (without
    ``mallinfo2``: trims every time, as before)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        with contextlib.suppress(AttributeError):
            libc.mallinfo2.restype = _MallInfo2
            if libc.mallinfo2().fordblks <= keep:
                return
        libc.malloc_trim(0)


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Run torch's CPU ops inside at ``n`` threads.

    Reductions' in-memory passes and whole-tensor kernels run at one (`Node.threaded` ones at
    torch's own count): a piece is too small for a parallel region to pay; a parallel
    reduction sums in an order set by the thread count, so one thread keeps the bytes the
    same on every machine and for every `--workers`; and while the other threads read ahead,
    hash and write, an OpenMP region spins waiting for a descheduled peer. Measured on 2 busy
    cores: 46 ns per value and op instead of ~1 for row pieces; SCE's whole kernel 650 → 95 ns
    per value on a 256×2048 tensor and 190 → 127 on 2048×2048."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _one_torch_thread() -> None:
    """A pass or read-ahead thread's torch runs its ops at one thread (`_torch_threads`; the
    setting is per thread): the read-ahead thread forms pieces' task vectors too
    (`_Pieces.read`), and more would open OpenMP regions whose idle threads spin."""
    import torch

    torch.set_num_threads(1)


def _pinned(device: Any) -> bool:
    """Read into page-locked memory, so host-to-GPU copies are asynchronous DMA."""
    return device is not None and device.type == "cuda"


def read_rows(node: Load, plan: Plan, reader: FileReader, lo: int, hi: int, *,
              pin: bool = False) -> Any:
    """Rows ``lo:hi`` of a stored tensor, as a CPU tensor over a fresh buffer (page-locked
    with ``pin``)."""
    import torch

    info = plan.sources[node.source].tensors[node.name]
    row = info.nbytes // info.shape[0]  # bytes per row
    # torch.empty is not zero-filled, unlike bytearray; pinned blocks come from torch's cache
    piece = torch.empty((hi - lo) * row, dtype=torch.uint8, pin_memory=pin)
    reader.read_into(info.file, info.offset + lo * row, _tensor_bytes(piece))
    return piece.view(torch_dtype(info.dtype)).reshape((hi - lo, *info.shape[1:]))


def gather_rows(node: RowGather, plan: Plan, rt: Runtime, lo: int, hi: int,
                whole: dict[Node, Any]) -> Any:
    """Rows ``lo:hi`` of a streaming row gather (graph/gather.py): only the input rows they
    name are read from the files, in contiguous runs."""
    inputs = node.inputs
    values = tuple(whole[x].cpu() for x in node.whole_inputs())
    return node.gather(lambda t, a, b: read_rows(inputs[t], plan, rt.reader, a, b),  # type: ignore[arg-type]
                       lo, hi, values)


def _value(n: Node, memo: dict[Node, Any], plan: Plan, rt: Runtime) -> Any:
    """``n``'s value, its inputs first, left to right; iterative (an explicit stack), so that
    a chain of hundreds of steps does not reach Python's recursion limit. A reduction over
    large inputs reads them by row pieces from the files (`_FileSource`) instead."""
    device = rt.device
    for m in iter_post_order(n, memo, lambda x: () if x in rt.shared else whole_inputs(x)):
        if isinstance(m, Load):
            ahead = rt.ahead.pop(m, None)
            result = (ahead.result() if ahead is not None else
                      read_tensor(m, plan, rt.reader, pin=_pinned(device)))
            if rt.finite is not None:
                rt.finite.check(f"input {m.source}:{m.name}", result)
        elif m in rt.shared:
            result = rt.shared[m]
        elif isinstance(m, Sweep):
            whole = tuple(memo[x].to(device, non_blocking=True)
                          for x, s in zip(m.inputs, m.swept(), strict=True) if not s)
            result = m.sweep(_FileSweepSource(plan, rt), whole)
        elif isinstance(m, RowGather) and m.streams:
            result = gather_rows(m, plan, rt, 0, m.shape[0], memo)
        elif streams_from_files(m):
            assert isinstance(m, Reduction)
            whole = tuple(memo[x].to(device, non_blocking=True)
                          for x, s in zip(m.inputs, m.streamed(), strict=True) if not s)
            result = m.reduce(_FileSource(m, plan, rt, memo), whole)
        elif (device is None or device.type == "cpu") and not m.threaded:
            args = tuple(memo[x] for x in m.inputs)
            with _torch_threads(1):  # see `_torch_threads`
                result = (m.compute(args, rt.passes) if isinstance(m, Reduction) else
                          m.compute(args))
        else:
            result = m.compute(tuple(memo[x].to(device, non_blocking=True) for x in m.inputs))
        if isinstance(m, (Reduction, Sweep)):
            rt.remember(m, result)
        memo[m] = result
    return memo[n]


def _as_tensor(view: memoryview, dtype: str) -> Any:
    """A tensor over a chunk of raw bytes (chunks are multiples of every item size)."""
    import torch

    return torch.frombuffer(view, dtype=torch_dtype(dtype)) if len(view) else torch.empty(0)


def read_tensor(node: Load, plan: Plan, reader: FileReader, *, pin: bool = False) -> Any:
    """A stored tensor as a CPU torch tensor over a freshly read buffer (page-locked with
    ``pin``, so that the copy to the GPU is asynchronous)."""
    import torch

    info = plan.sources[node.source].tensors[node.name]
    dtype = torch_dtype(info.dtype)
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=dtype)
    if pin:
        raw = torch.empty(info.nbytes, dtype=torch.uint8, pin_memory=True)
        reader.read_into(info.file, info.offset, _tensor_bytes(raw))
        return raw.view(dtype).reshape(info.shape)
    buf = reader.read_tensor(info)
    return torch.frombuffer(buf, dtype=dtype).reshape(info.shape)
