"""Run one command and measure it the way DESIGN.md section 7 asks: wall time of the whole
process (start-up included) and peak memory of its process tree, sampled from /proc.

Why our own sampler instead of ``/usr/bin/time`` or psutil: ``time`` reports only ``ru_maxrss``
(one process's high-water mark, no RssAnon), psutil is not a dependency, and we want the same
numbers for every tool. Every ``interval`` seconds (20 ms by default, DESIGN asks <= 50 ms) the
sampler walks the tree under the child and reads ``VmRSS``, ``RssAnon`` and ``VmHWM`` from each
``/proc/<pid>/status``. The tree's total at one instant is what a user's machine must hold, so
the peaks reported are the maxima over time of the per-instant sums (for a single-process tool,
as all three tools here are, that is simply the process's own value). ``VmHWM`` (the kernel's
own RSS high-water mark, which also catches peaks between two samples) and ``ru_maxrss`` from
``wait4`` are kept as cross-checks.

Descendants come from ``/proc/<pid>/task/<tid>/children`` where the kernel has it
(CONFIG_PROC_CHILDREN), otherwise from the parent field of every ``/proc/<pid>/stat``.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
HAS_CHILDREN_FILE = (PROC / "self" / "task" / str(os.getpid()) / "children").exists()


@dataclass(frozen=True)
class Measurement:
    """What one measured run produced; sizes are bytes."""

    argv: list[str]
    returncode: int
    wall_s: float
    peak_rss: int
    peak_rss_anon: int
    peak_hwm: int
    ru_maxrss: int
    samples: int
    max_processes: int
    cpu_s: float = 0.0  # user + system CPU seconds of the process and its waited-for children


def _children_via_task_files(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for task in (PROC / str(pid) / "task").iterdir():
            try:
                kids += [int(x) for x in (task / "children").read_text().split()]
            except OSError:
                continue
    except OSError:
        pass
    return kids


def _parent_map() -> dict[int, list[int]]:
    """parent pid -> child pids, from every /proc/<pid>/stat."""
    tree: dict[int, list[int]] = {}
    for entry in os.scandir(PROC):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: the fields after the last ')'.
        fields = stat[stat.rindex(b")") + 2:].split()
        tree.setdefault(int(fields[1]), []).append(int(entry.name))
    return tree


def process_tree(root: int) -> list[int]:
    """``root`` and all its live descendants."""
    if HAS_CHILDREN_FILE:
        def kids(p: int) -> list[int]:
            return _children_via_task_files(p)
    else:
        parents = _parent_map()

        def kids(p: int) -> list[int]:
            return parents.get(p, [])
    seen: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        seen.append(pid)
        todo += kids(pid)
    return seen


def read_memory(pid: int) -> tuple[int, int, int] | None:
    """(VmRSS, RssAnon, VmHWM) in bytes, or None once the process is gone (or a zombie)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            text = f.read()
    except OSError:
        return None
    values: dict[bytes, int] = {}
    for line in text.splitlines():  # e.g. b"VmRSS:\t   57216 kB"
        key, _, rest = line.partition(b":")
        if key in (b"VmRSS", b"RssAnon", b"VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    if b"VmRSS" not in values:  # kernel threads and zombies have no Vm* lines
        return None
    return values[b"VmRSS"], values.get(b"RssAnon", 0), values.get(b"VmHWM", 0)


class _Sampler(threading.Thread):
    def __init__(self, root: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.interval = interval
        self.stop = threading.Event()
        self.peak_rss = self.peak_anon = self.peak_hwm = 0
        self.samples = 0
        self.max_processes = 0

    def sample(self) -> None:
        rss = anon = 0
        n = 0
        for pid in process_tree(self.root):
            mem = read_memory(pid)
            if mem is None:
                continue
            n += 1
            rss += mem[0]
            anon += mem[1]
            self.peak_hwm = max(self.peak_hwm, mem[2])
        if n:
            self.samples += 1
            self.max_processes = max(self.max_processes, n)
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_anon = max(self.peak_anon, anon)

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.interval)


def run_measured(argv: list[str], *, env: dict[str, str] | None = None,
                 cwd: Path | None = None, log: Path | None = None,
                 interval: float = 0.02) -> Measurement:
    """Run ``argv`` to completion, sampling its process tree's memory every ``interval`` s.

    stdout and stderr go to ``log`` (never a pipe, which could block the child and skew its
    time). The wall clock starts just before the fork and stops when ``wait4`` returns.
    """
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    try:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        sampler = _Sampler(proc.pid, interval)
        sampler.start()
        _, status, rusage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # wait4 reaped it, tell Popen
        sampler.stop.set()
        sampler.join()
    finally:
        if log:
            out.close()  # type: ignore[union-attr]
    return Measurement(argv=argv, returncode=proc.returncode, wall_s=wall,
                       peak_rss=sampler.peak_rss, peak_rss_anon=sampler.peak_anon,
                       peak_hwm=sampler.peak_hwm, ru_maxrss=rusage.ru_maxrss * 1024,
                       samples=sampler.samples, max_processes=sampler.max_processes,
                       cpu_s=rusage.ru_utime + rusage.ru_stime)
