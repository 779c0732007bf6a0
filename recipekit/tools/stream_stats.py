"""Statistics of stored tensors at the speed of reading them: chunks on a small thread pool.

Why: `inspect` and `diff` read every value of a checkpoint; computed one chunk at a time on
one thread, the statistics took ~20x as long as reading the bytes (a 7B diff: ~40 minutes).
Here each job covers `JOB_PIECES` chunks (`io.chunks.CHUNK_ELEMENTS` values each): a worker
thread reads the job's bytes into its own buffer with one ``preadv`` (which releases the GIL)
and summarises them piece by piece (`ops.stats.piece_stats` / `piece_diff`: one fp64 copy and a
few reductions, torch releases the GIL too), with torch's intra-op threads at 1. Pieces are
sized for a core's L2 cache: a statistics piece is one chunk (1 MiB of fp64 scratch), a
difference piece half a chunk (two scratch copies, 1 MiB together; a whole chunk each spilled
L2 and cost ~1.5x per pair). Several pieces a job amortise the job's reading call, future and
hand-over (~30 us each, a fifth of the work at one chunk a job). The caller folds the partials
in job order, so the numbers are the same for any worker count, and memory is a few MiB per
worker whatever the tensor size. Oracle: tests/tools/test_stream_stats.py (whole-tensor fp64
statistics, 1 and 3 workers).
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
        raw, work_a, _ = _buffers(job_elements() * itemsize(info.dtype))
        return summarise(chunks.read_elements(reader, info, lo, hi, raw), work_a)

    jobs = [(i, (info, lo, hi)) for i, info in enumerate(infos)
            for lo, hi in chunks.chunk_bounds(info, elements=job_elements())]
    yield from _fold(jobs, job, TensorStats, workers)


def job_elements() -> int:
    """Elements one job reads: `JOB_PIECES` chunks (`CHUNK_ELEMENTS` read at call time)."""
    return JOB_PIECES * chunks.CHUNK_ELEMENTS


def summarise(values: Any, work: Any) -> Any:
    """The `ops.stats.TensorStats` of a flat tensor, one `CHUNK_ELEMENTS` piece at a time
    (``work``: fp64 scratch of one chunk)."""
    from recipekit.ops.stats import TensorStats, piece_stats

    step = chunks.CHUNK_ELEMENTS
    if values.numel() <= step:
        return piece_stats(values, work)
    acc = TensorStats()
    for lo in range(0, values.numel(), step):
        acc.merge(piece_stats(values[lo:lo + step], work))
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
        raw, work_a, work_b = _buffers(size_a + n * itemsize(ib.dtype))
        ra, rb = memoryview(raw)[:size_a], memoryview(raw)[size_a:]  # views: slicing copies
        a = chunks.read_elements(reader, ia, lo, hi, ra)
        b = chunks.read_elements(reader, ib, lo, hi, rb)
        step = max(1, chunks.CHUNK_ELEMENTS // 2)  # two scratch copies: one chunk's worth
        acc = DiffStats()
        for k in range(0, n, step):
            acc.merge(piece_diff(a[k:k + step], b[k:k + step], work_a, work_b))
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
        threads = _one_thread()
        try:
            for args in jobs:
                yield fn(*args)
        finally:
            _restore_threads(threads)
            _local.__dict__.pop("buffers", None)  # this thread lives on: free its buffers
        return
    pool = ThreadPoolExecutor(n, thread_name_prefix="recipekit-stats", initializer=_one_thread)
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


def _one_thread() -> int:
    """Set torch's intra-op threads to 1 for this thread (OpenMP's setting is per thread);
    return the old value. Our workers are the parallelism; nested pools would oversubscribe."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    return old


def _restore_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _buffers(nbytes: int) -> tuple[bytearray, Any, Any]:
    """This thread's read buffer (at least ``nbytes``; grown, never shrunk, so a bf16 model
    holds 2-byte jobs) and two fp64 scratch tensors of one chunk each (`summarise` uses one;
    a difference piece is half a chunk, two copies), made once per thread and chunk size."""
    import torch

    elements = chunks.CHUNK_ELEMENTS
    held = getattr(_local, "buffers", None)
    if held is None or held[0] != elements or len(held[1]) < nbytes:
        scratch = [torch.empty(elements, dtype=torch.float64) for _ in range(2)]
        size = max(nbytes, len(held[1]) if held is not None and held[0] == elements else 0)
        held = (elements, bytearray(size), *scratch)
        _local.buffers = held
    return held[1], held[2], held[3]


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

    from recipekit.dtypes import is_floating, torch_dtype
    from recipekit.ops.stats import TensorStats

    n = workers if workers is not None else stat_workers()
    hashers = max(1, min(len(files), n))
    free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
    for _ in range(2 * (n + hashers)):
        free.put(bytearray())
    stop = threading.Event()

    def summarise_job(buf: bytearray, nbytes: int, dtype: str) -> Any:
        try:
            import torch

            _, work, _ = _buffers(0)
            return summarise(torch.frombuffer(buf, dtype=torch_dtype(dtype),
                                              count=nbytes // itemsize(dtype)), work)
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

    stats = ThreadPoolExecutor(n, thread_name_prefix="recipekit-stats", initializer=_one_thread)
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
