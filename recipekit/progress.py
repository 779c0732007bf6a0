"""Progress of a run, for people and programs: one update type, a tqdm bar for terminals and
notebooks, a line every few seconds for logs, JSON events for tools; one off switch each.

Why three forms: a bar is what a terminal or a notebook shows best, but piped into a log (CI,
``nohup``, a notebook's subprocess) it prints nothing until the end; there a line at a steady
interval (``RECIPEKIT_PROGRESS_INTERVAL`` seconds, default 10) says how far a long run got, and
``--json`` gives the same numbers to a program. This module formats; `cli.py` prints.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from recipekit.errors import echo_text
from recipekit.units import format_size

#: Seconds between progress lines (and JSON progress events) when stderr is not a terminal.
DEFAULT_INTERVAL = 10.0
INTERVAL_ENV = "RECIPEKIT_PROGRESS_INTERVAL"


@dataclass(frozen=True)
class ShardResult:
    """A finished output shard: its file name, size and sha256 (computed while streaming), and
    whether an earlier run of the same plan had already written it (``resumed``)."""

    name: str
    bytes: int
    sha256: str
    resumed: bool


@dataclass(frozen=True)
class ProgressUpdate:
    """What a ``progress=`` callback of the Python API receives, after every piece written.

    ``done`` only grows and ends equal to ``total`` (bytes of the output's shards; a resumed
    shard counts whole at once). ``shard_done`` is set on the update that follows a shard's
    completion; ``shard`` and ``tensor`` name what is being written.
    """

    done: int
    total: int
    elapsed: float  # seconds since writing began
    rate: float  # bytes per second written by this run (resumed shards excluded)
    shard: str | None = None
    tensor: str | None = None
    shard_done: ShardResult | None = None

    @property
    def eta(self) -> float | None:
        """Seconds left at the current rate; None before 1% is written, when the rate is
        mostly start-up (a Ray run's first line once said "ETA 10053 h" for a 2 s run)."""
        if self.done >= self.total:
            return 0.0
        if self.rate <= 0 or self.done < self.total / 100:
            return None
        return (self.total - self.done) / self.rate


ProgressCallback = Callable[[ProgressUpdate], None]


def progress_interval() -> float:
    """Seconds between progress lines: ``RECIPEKIT_PROGRESS_INTERVAL`` (0: every update), else
    `DEFAULT_INTERVAL`; a value that is not a non-negative number is ignored."""
    try:
        value = float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL))
    except ValueError:
        return DEFAULT_INTERVAL
    return value if math.isfinite(value) and value >= 0 else DEFAULT_INTERVAL


def every(interval: float, callback: ProgressCallback) -> ProgressCallback:
    """``callback`` at most once per ``interval`` seconds (the first time one interval after
    the start), and always for the update that reaches the total, so a log ends with the final
    numbers. Shard completions are not passed on: `cli.py` reports them as they come."""
    last = time.monotonic() if interval > 0 else -math.inf
    finished = False

    def call(u: ProgressUpdate) -> None:
        nonlocal last, finished
        if u.shard_done is not None or finished:
            return
        now = time.monotonic()
        if u.done >= u.total or now - last >= interval:
            last, finished = now, u.done >= u.total
            callback(u)

    return call


def format_duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def progress_line(u: ProgressUpdate) -> str:
    """One line for a log: ``progress: 1.2 GiB / 2.0 GiB (60%), 150 MiB/s, ETA 5 s,
    model-00001-of-00002.safetensors: model.layers.3.mlp.up_proj.weight``."""
    pct = 100 * u.done / u.total if u.total else 100.0
    parts = [f"progress: {format_size(u.done)} / {format_size(u.total)} ({pct:.0f}%)"]
    if u.rate > 0:
        parts.append(f"{format_size(u.rate)}/s")
    eta = u.eta
    parts.append("done" if u.done >= u.total else
                 f"ETA {format_duration(eta)}" if eta is not None else "ETA unknown")
    if u.done < u.total and u.shard is not None:
        parts.append(echo_text(u.shard) + (f": {echo_text(u.tensor)}" if u.tensor else ""))
    return ", ".join(parts)


def progress_event(u: ProgressUpdate) -> dict[str, Any]:
    """The ``progress`` event of ``run --json``."""
    eta = u.eta
    return {"event": "progress", "done": u.done, "total": u.total,
            "elapsed_s": round(u.elapsed, 3), "rate": round(u.rate, 1),
            "eta_s": None if eta is None else round(eta, 1), "shard": u.shard,
            "tensor": u.tensor}


def shard_event(d: ShardResult) -> dict[str, Any]:
    """The ``shard`` event of ``run --json``: a shard renamed into place (or found finished)."""
    return {"event": "shard", "name": d.name, "bytes": d.bytes, "sha256": d.sha256,
            "resumed": d.resumed}


def is_interactive() -> bool:
    """Whether a bar can be seen: stderr is a terminal, or this is a Jupyter/IPython kernel
    (where tqdm.auto draws a widget)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(
        ipython, "get_ipython") else None
    if shell is not None and hasattr(shell, "kernel"):
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


@contextmanager
def bar_callback(total: int, *, desc: str = "writing") -> Iterator[ProgressCallback]:
    """A `ProgressCallback` drawing a tqdm.auto bar (a widget in notebooks) in bytes, with rate
    and ETA; the bar is closed on exit."""
    from tqdm.auto import tqdm  # here: tqdm.auto imports asyncio (20 ms of every start-up)

    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
              dynamic_ncols=True, leave=False) as bar:

        def update(u: ProgressUpdate) -> None:
            bar.update(u.done - bar.n)
            if u.tensor is not None:
                bar.set_postfix_str(echo_text(u.tensor, 60), refresh=False)

        yield update


@contextmanager
def byte_progress(total: int, *, disable: bool = False, desc: str = "writing"
                  ) -> Iterator[Callable[[int], None]]:
    """Yield a callback that advances a bytes bar (on stderr) by its argument; silent when
    ``disable`` or not a TTY (`inspect` and `diff`)."""
    if disable:
        yield lambda n: None
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
              disable=disable or None, dynamic_ncols=True, leave=False) as bar:
        yield bar.update
