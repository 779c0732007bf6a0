"""Faults for the Ray executor's tests, installed in every Ray worker of a test job by Ray's
``worker_process_setup_hook`` (tests/run/test_ray.py passes ``"tests.helpers.ray_faults.install"``
in the job's ``runtime_env``): recipekit itself has no test hooks.

Marker files in the folder ``$RECIPEKIT_TEST_FAULTS`` switch them on:

* ``kill-once``: the first worker that writes a tensor after a shard's header claims the marker
  (an atomic rename, so exactly one does) and SIGKILLs itself, leaving a half-written temp file.
* ``slow``: each shard's writer sleeps this many seconds (the file's text) before its rename,
  so that a driver can be killed while shards are running.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

ENV = "RECIPEKIT_TEST_FAULTS"


def install() -> None:
    from recipekit.io import writer

    folder = Path(os.environ[ENV])
    write, finish = writer.ShardWriter.write, writer.ShardWriter.finish

    def faulty_write(self, data, *, done=None):  # type: ignore[no-untyped-def]
        if self.written > 0:  # past the header: a tensor is being written
            try:
                os.rename(folder / "kill-once", folder / f"kill-once.taken-{os.getpid()}")
            except FileNotFoundError:
                pass
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        return write(self, data, done=done)

    def slow_finish(self):  # type: ignore[no-untyped-def]
        with contextlib.suppress(FileNotFoundError):
            time.sleep(float((folder / "slow").read_text()))
        return finish(self)

    writer.ShardWriter.write = faulty_write  # type: ignore[method-assign]
    writer.ShardWriter.finish = slow_finish  # type: ignore[method-assign]
