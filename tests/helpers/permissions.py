"""A directory the test process cannot read: ``chmod 000`` where that bites, else a simulation.

Why: as root with CAP_DAC_OVERRIDE (CI containers) a mode-000 directory stays readable, so the
tests would pass without exercising anything. The simulation answers what the kernel answers a
user without permission: listing the directory, and stat of anything inside it, fail with
EACCES.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def unreadable_dir(folder: Path, monkeypatch: Any) -> Iterator[str]:
    """Make ``folder`` unreadable while the block runs; yields ``"chmod"`` or ``"simulated"``."""
    folder = Path(os.path.abspath(folder))
    folder.chmod(0)
    try:
        try:
            os.listdir(folder)
        except PermissionError:
            yield "chmod"
            return
        with monkeypatch.context() as m:
            _simulate(folder, m)
            yield "simulated"
    finally:
        folder.chmod(0o755)


def _simulate(folder: Path, m: Any) -> None:
    def denied(p: Any, *, itself: bool) -> bool:
        if isinstance(p, int) or not isinstance(p, (str, bytes, os.PathLike)):
            return False  # a file descriptor: already opened
        q = Path(os.path.abspath(os.fsdecode(p)))
        return folder in q.parents or (itself and q == folder)

    for name, itself in (("stat", False), ("lstat", False), ("listdir", True),
                         ("scandir", True)):
        real = getattr(os, name)

        def fake(p: Any = ".", *a: Any, _real: Any = real, _itself: bool = itself, **k: Any):
            if denied(p, itself=_itself):
                raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(p))
            return _real(p, *a, **k)

        m.setattr(os, name, fake)
