"""Statistics of stored tensors at the speed of reading them: chunks on a small thread pool.

Why: `inspect` and `diff` read every value of a checkpoint; computed one chunk at a time on one
thread, the statistics took ~20x as long as reading the bytes (a 7B diff: ~40 minutes). Here
each job covers `JOB_PIECES` chunks (`io.chunks.CHUNK_ELEMENTS` values each): a worker thread
reads the job's bytes into its own buffer with one ``preadv`` (which releases the GIL) and
summarises them piece by piece (`ops.stats.piece_stats` / `piece_diff`: one fp64 copy and a few
numpy reductions, which release the GIL too; the CLI keeps BLAS on the calling thread,
`cli._blas_on_caller_threads`). A piece is one chunk for statistics and differences alike (2 MiB
of fp64 scratch, 4 MiB for a difference's two copies): numpy takes and gives back the GIL around
each of a piece's ~15 calls, and with two workers on 2 cores pieces of 64Ki values spent their
time handing the GIL over (61,000 context switches in one TinyLlama `diff`); at 256Ki the passes
still run from the L3 cache and two workers give 1.6-1.9x one. Several pieces a job amortise the
job's reading call, future and hand-over (~30 us each, a fifth of the work at one chunk a job).
The caller folds the partials in job order, so the numbers are the same for any worker count,
and memory is a few MiB per worker whatever the tensor size. Oracle:
tests/tools/test_stream_stats.py (whole-tensor fp64 statistics, 1 and 3 workers).
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from recipekit.dtypes import itemsize
from recipekit.io import chunks
from recipekit.io.header import TensorInfo
from recipekit.io.reader import FileReader

T = TypeVar("T")

#: Chunks per job (reading call and future); the summaries are taken a piece at a time.
JOB_PIECES = 4

_local = threading.local()



def stat_workers() -> int:
    """Threads that read and summarise chunks: every usable core, at most 8. Unlike `run`,
    nothing else needs a core (no writer, no hashing), so reading happens in the workers."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def iter_tensor_stats(reader: FileReader, infos: Sequence[TensorInfo], *,
                      workers: int | None = None) -> Iterator[Any]:
    """One `ops.stats.TensorStats` per tensor of ``infos``, in order.

    Raises:
        CorruptCheckpointError: a file is shorter than its header says.
    """
    from recipekit.ops.stats import TensorStats

    def job(info: TensorInfo, lo: int, hi: int) -> Any:
        raw, scratch = _buffers(job_elements() * itemsize(info.dtype))
        return summarise(chunks.read_elements(reader, info, lo, hi, raw), info.dtype, scratch)

    jobs = [(i, (info, lo, hi)) for i, info in enumerate(infos)
            for lo, hi in chunks.chunk_bounds(info, elements=job_elements())]
    yield from _fold(jobs, job, TensorStats, workers)


def job_elements() -> int:
    """Elements one job reads: `JOB_PIECES` chunks (`CHUNK_ELEMENTS` read at call time)."""
    return JOB_PIECES * chunks.CHUNK_ELEMENTS


def summarise(values: Any, dtype: str, scratch: Scratch) -> Any:
    """The `ops.stats.TensorStats` of a flat array of safetensors dtype ``dtype`` (bfloat16
    as its bits, `io.chunks.read_elements`), one `CHUNK_ELEMENTS` piece at a time."""
    from recipekit.ops.stats import TensorStats, piece_stats

    step = chunks.CHUNK_ELEMENTS
    acc = TensorStats()
    for lo in range(0, max(1, values.size), step):
        acc.merge(piece_stats(scratch.values(values[lo:lo + step], dtype, 0), scratch.work[0]))
    return acc


def iter_diff_stats(reader: FileReader, pairs: Sequence[tuple[TensorInfo, TensorInfo]], *,
                    workers: int | None = None) -> Iterator[Any]:
    """One `ops.stats.DiffStats` per pair of same-shaped tensors, in order.

    Raises:
        CorruptCheckpointError: a file is shorter than its header says.
    """
    from recipekit.ops.stats import DiffStats, piece_diff

    def job(ia: TensorInfo, ib: TensorInfo, lo: int, hi: int) -> Any:
        n = hi - lo
        size_a = n * itemsize(ia.dtype)
        raw, scratch = _buffers(size_a + n * itemsize(ib.dtype))
        ra, rb = memoryview(raw)[:size_a], memoryview(raw)[size_a:]  # views: slicing copies
        a = chunks.read_elements(reader, ia, lo, hi, ra)
        b = chunks.read_elements(reader, ib, lo, hi, rb)
        step = chunks.CHUNK_ELEMENTS
        acc = DiffStats()
        for k in range(0, n, step):
            acc.merge(piece_diff(scratch.values(a[k:k + step], ia.dtype, 0),
                                 scratch.values(b[k:k + step], ib.dtype, 1), *scratch.work))
        return acc

    jobs = [(i, (ia, ib, lo, hi)) for i, (ia, ib) in enumerate(pairs)
            for lo, hi in chunks.chunk_bounds(ia, elements=job_elements())]
    yield from _fold(jobs, job, DiffStats, workers)


def _fold(jobs: list[tuple[int, tuple[Any, ...]]], fn: Callable[..., T],
          empty: Callable[[], Any], workers: int | None) -> Iterator[Any]:
    """Merge the chunk results of each item in chunk order; yield one accumulator per item
    once its last chunk is in (every item has at least one job)."""
    acc = None
    for k, result in enumerate(_ordered_map(fn, [args for _, args in jobs], workers)):
        item = jobs[k][0]
        acc = acc if acc is not None else empty()
        acc.merge(result)
        if k + 1 == len(jobs) or jobs[k + 1][0] != item:
            yield acc
            acc = None


def _ordered_map(fn: Callable[..., T], jobs: list[tuple[Any, ...]],
                 workers: int | None) -> Iterator[T]:
    """``fn(*job)`` for each job, results in job order; on ``workers`` threads with twice as
    many jobs in flight (so a worker never waits for the consumer), or here if ``workers`` is 1."""
    n = workers if workers is not None else stat_workers()
    if n <= 1 or len(jobs) <= 1:
        try:
            for args in jobs:
                yield fn(*args)
        finally:
            _local.__dict__.pop("buffers", None)  # this thread lives on: free its buffers
        return
    pool = ThreadPoolExecutor(n, thread_name_prefix="recipekit-stats")
    inflight: collections.deque[Future[T]] = collections.deque()
    try:
        for args in jobs:
            inflight.append(pool.submit(fn, *args))
            if len(inflight) > 2 * n:
                yield inflight.popleft().result()
        while inflight:
            yield inflight.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class Scratch:
    """A worker thread's scratch, one chunk each: two fp64 buffers (`summarise` uses one, a
    difference both) and two uint32 buffers that bfloat16 and float16 pieces are widened into
    (`ops.stats.stored_values`)."""

    def __init__(self, elements: int) -> None:
        import numpy as np

        self.elements = elements
        self.work = (np.empty(elements, dtype=np.float64), np.empty(elements, dtype=np.float64))
        self.words = (np.empty(elements, dtype=np.uint32), np.empty(elements, dtype=np.uint32))

    def values(self, piece: Any, dtype: str, k: int) -> Any:
        """``piece`` as numpy numbers (`ops.stats.stored_values`), widened into
        ``words[k]``."""
        from recipekit.ops.stats import stored_values

        return stored_values(piece, dtype, self.words[k])


def _buffers(nbytes: int) -> tuple[bytearray, Scratch]:
    """This thread's read buffer (at least ``nbytes``; grown, never shrunk, so a bf16 model
    holds 2-byte jobs) and its `Scratch`, made once per thread and chunk size."""
    elements = chunks.CHUNK_ELEMENTS
    held = getattr(_local, "buffers", None)
    if held is None or held[1].elements != elements or len(held[0]) < nbytes:
        same = held is not None and held[1].elements == elements
        held = (bytearray(max(nbytes, len(held[0]) if same else 0)),
                held[1] if same else Scratch(elements))
        _local.buffers = held
    return held


def hash_and_summarise(reader: FileReader, files: Sequence[tuple[Any, Sequence[TensorInfo]]],
                       *, workers: int | None = None) -> list[tuple[str, dict[str, Any]]]:
    """The sha256 of each file and the `ops.stats.TensorStats` of each of its floating
    tensors, from one read of its bytes.

    Why: `verify --stats` checks each shard's hash and reads every value; read apart, every
    byte is read twice (twice from the disk when the output is larger than the page cache).
    Here one thread per file (at most ``workers`` at once) reads it front to back in jobs of
    `JOB_PIECES` chunks, feeds each job's bytes to the file's sha256 and hands them to the
    statistics workers, which return the buffer when done. Files hash side by side (sha256 is
    sequential within a file, and slower than the statistics); a fixed set of buffers bounds
    memory and makes reading wait for the slower of hashing and statistics.

    ``files``: (path, its tensors); the tensors must tile the file's data section, as
    `io.header.read_header` checks; the bytes before the first tensor (the header) and any
    after the last are hashed too. Returns, per file in order, (sha256 hex digest, tensor name ->
    TensorStats of its floating tensors, in offset order). Oracle:
    tests/tools/test_stream_stats.py (hashlib on the file, whole-tensor fp64 statistics).

    Raises:
        CorruptCheckpointError: a file is shorter than its header says.
    """
    import hashlib
    import queue

    import numpy as np

    from recipekit.dtypes import is_floating, numpy_dtype
    from recipekit.ops.stats import TensorStats

    n = workers if workers is not None else stat_workers()
    hashers = max(1, min(len(files), n))
    free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
    for _ in range(2 * (n + hashers)):
        free.put(bytearray())
    stop = threading.Event()

    def summarise_job(buf: bytearray, nbytes: int, dtype: str) -> Any:
        try:
            _, scratch = _buffers(0)
            return summarise(np.frombuffer(buf, dtype=numpy_dtype(dtype),
                                           count=nbytes // itemsize(dtype)), dtype, scratch)
        finally:
            free.put(buf)

    def read_file(path: Any, infos: Sequence[TensorInfo]) -> tuple[str, list[Any]]:
        digest = hashlib.sha256()
        jobs: list[tuple[str, Future[Any] | None]] = []
        spans = [(info.offset + lo * itemsize(info.dtype), (hi - lo) * itemsize(info.dtype), info)
                 for info in sorted(infos, key=lambda i: i.offset)
                 for lo, hi in chunks.chunk_bounds(info, elements=job_elements())]
        pos = 0
        for start, nbytes, info in [*spans, (os.path.getsize(path), 0, None)]:
            while pos < start:  # the header (and any bytes outside the tensors)
                size = min(start - pos, 1 << 20)
                gap = memoryview(bytearray(size))
                reader.read_into(path, pos, gap)
                digest.update(gap)
                pos += size
            if info is None or stop.is_set():
                break
            if nbytes == 0:  # a tensor without elements: no finite value, no NaN
                if is_floating(info.dtype):
                    jobs.append((info.name, None))
                continue
            buf = free.get()
            if len(buf) < nbytes:
                buf = bytearray(nbytes)
            view = memoryview(buf)[:nbytes]
            try:
                reader.read_into(path, start, view)
            except BaseException:
                free.put(buf)
                raise
            digest.update(view)
            pos = start + nbytes
            if is_floating(info.dtype):  # integer tensors are only hashed
                jobs.append((info.name, stats.submit(summarise_job, buf, nbytes, info.dtype)))
            else:
                free.put(buf)
        return digest.hexdigest(), jobs

    stats = ThreadPoolExecutor(n, thread_name_prefix="recipekit-stats")
    readers = ThreadPoolExecutor(hashers, thread_name_prefix="recipekit-hash")
    try:
        tasks = [readers.submit(read_file, path, infos) for path, infos in files]
        results = []
        for task in tasks:
            digest, jobs = task.result()
            by_name: dict[str, Any] = {}
            for name, job in jobs:
                acc = by_name.setdefault(name, TensorStats())
                if job is not None:
                    acc.merge(job.result())
            results.append((digest, by_name))
        return results
    finally:
        stop.set()  # a failed file: the others stop reading; running jobs return their buffers
        readers.shutdown(wait=True, cancel_futures=True)
        stats.shutdown(wait=True)  # never cancelled: each job returns a buffer a reader awaits
