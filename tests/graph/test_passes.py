"""graph/passes.py: `InMemorySource` running a pass's pieces on threads.

Oracle: the same pass run on this thread alone: the results come in piece order whatever
order the threads finish in, every piece runs on the given threads, and a failing piece
raises in the caller only after the pieces in flight have finished (their inputs are the
caller's tensors).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from recipekit.graph.passes import InMemorySource


def source(threads=None):
    """Ten pieces of 4 rows."""
    x = torch.arange(40 * 3, dtype=torch.float32).reshape(40, 3)
    return x, InMemorySource([x], [(lo, lo + 4) for lo in range(0, 40, 4)], threads)


def test_pieces_on_threads_come_in_piece_order():
    x, serial = source()

    def fn(lo, hi, pieces):
        time.sleep(0.002 * ((10 - lo // 4) % 3))  # later pieces often finish first
        return lo, threading.current_thread().name, pieces[0].sum().item()

    want = [(lo, s) for lo, _, s in serial.map(fn)]
    with ThreadPoolExecutor(3, thread_name_prefix="test-pass") as pool:
        _, threaded = source((pool, 3))
        got = list(threaded.map(fn))
        assert [(lo, s) for lo, _, s in got] == want
        assert {name for _, name, _ in got} <= {f"test-pass_{i}" for i in range(3)}
        assert [lo for lo, _, _ in threaded.map(fn, every=3)] == [0, 12, 24, 36]


def test_a_failing_piece_raises_after_the_pieces_in_flight_finish():
    running = set()

    def fn(lo, hi, pieces):
        running.add(lo)
        time.sleep(0.01)
        running.discard(lo)
        if lo == 8:
            raise ValueError("piece 8")
        return lo

    with ThreadPoolExecutor(2) as pool:
        _, threaded = source((pool, 2))
        with pytest.raises(ValueError, match="piece 8"):
            list(threaded.map(fn))
        assert not running  # none still reads the pieces when the error arrives


@pytest.mark.parametrize("threaded", [False, True])
def test_prepare_gives_fn_its_result(threaded):
    """``prepare`` (what a file source runs on its read-ahead thread) is applied to each piece
    before ``fn`` here too, on the thread that runs ``fn``, sample included."""
    def prepare(lo, hi, pieces):
        return pieces[0] * 2, threading.current_thread().name

    def fn(lo, hi, prepared):
        doubled, where = prepared
        return lo, doubled.sum().item(), where == threading.current_thread().name

    x, serial = source()
    want = [(lo, 2 * x[lo:lo + 4].sum().item(), True) for lo in range(0, 40, 4)]
    assert not serial.reads_files
    if not threaded:
        assert list(serial.map(fn, prepare=prepare)) == want
        assert list(serial.map(fn, every=5, prepare=prepare)) == [want[0], want[5]]
        return
    with ThreadPoolExecutor(2, thread_name_prefix="test-pass") as pool:
        _, threads = source((pool, 2))
        assert list(threads.map(fn, prepare=prepare)) == want
