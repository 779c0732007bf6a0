"""Statistics of stored tensors at the speed of reading them: chunks on a small thread pool.

Why: `inspect` and `diff` read every value of a checkpoint; computed one chunk at a time on
one thread, the statistics took ~20x as long as reading the bytes (a 7B diff: ~40 minutes).
Here each chunk (`io.chunks.CHUNK_ELEMENTS` values) is one job: a worker thread reads its bytes
into the worker's own buffer (``preadv`` releases the GIL) and computes its partial statistics
with one fused pass (`ops.stats.piece_stats` / `piece_diff`, torch releases the GIL too), with
torch's intra-op threads at 1. The caller folds the partials in chunk order, so the numbers
are the same for any worker count, and memory is a few chunks per worker whatever the tensor
size. Oracle: tests/tools/test_stream_stats.py (whole-tensor fp64 statistics, 1 and 3 workers).
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from recipekit.io import chunks
from recipekit.io.header import TensorInfo
from recipekit.io.reader import FileReader

T = TypeVar("T")

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
    from recipekit.ops.stats import TensorStats, piece_stats

    def job(info: TensorInfo, lo: int, hi: int) -> Any:
        raw, work_a, _ = _buffers()
        return piece_stats(chunks.read_elements(reader, info, lo, hi, raw), work_a)

    jobs = [(i, (info, lo, hi)) for i, info in enumerate(infos)
            for lo, hi in chunks.chunk_bounds(info)]
    yield from _fold(jobs, job, TensorStats, workers)


def iter_diff_stats(reader: FileReader, pairs: Sequence[tuple[TensorInfo, TensorInfo]], *,
                    workers: int | None = None) -> Iterator[Any]:
    """One `ops.stats.DiffStats` per pair of same-shaped tensors, in order.

    Raises:
        CorruptCheckpointError: a file is shorter than its header says.
    """
    from recipekit.ops.stats import DiffStats, piece_diff

    def job(ia: TensorInfo, ib: TensorInfo, lo: int, hi: int) -> Any:
        raw, work_a, work_b = _buffers()
        half = len(raw) // 2
        ra, rb = memoryview(raw)[:half], memoryview(raw)[half:]  # views: slicing copies
        return piece_diff(chunks.read_elements(reader, ia, lo, hi, ra),
                          chunks.read_elements(reader, ib, lo, hi, rb), work_a, work_b)

    jobs = [(i, (ia, ib, lo, hi)) for i, (ia, ib) in enumerate(pairs)
            for lo, hi in chunks.chunk_bounds(ia)]
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


def _buffers() -> tuple[bytearray, Any, Any]:
    """This thread's read buffer (room for two chunks of 8-byte values) and two fp64 scratch
    tensors of one chunk each, made once per thread and chunk size."""
    import torch

    elements = chunks.CHUNK_ELEMENTS
    held = getattr(_local, "buffers", None)
    if held is None or held[0] != elements:
        scratch = [torch.empty(elements, dtype=torch.float64) for _ in range(2)]
        held = (elements, bytearray(2 * 8 * elements), *scratch)
        _local.buffers = held
    return held[1], held[2], held[3]
