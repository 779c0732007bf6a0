"""Stream one output shard to disk: header first, then each tensor in place, hashed on the way.

A shard is written under a temporary name in the output directory, fsynced and renamed when every
byte is there, so a file under a final name is never partial. The sha256 is computed while
streaming (the manifest records it) instead of re-reading the file afterwards.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path

from recipekit.errors import OutputError, display_path

PARTIAL_SUFFIX = ".recipekit-partial"


def partial_path(final: Path) -> Path:
    return final.with_name(f".{final.name}{PARTIAL_SUFFIX}")


_RESUME = "finished shards are kept, and running the same command again resumes"


def _write_error(e: OSError, path: Path) -> OutputError:
    """One clear message per way a write can fail; the temp file is removed by the caller."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError("disk full while writing" if e.errno == errno.ENOSPC else
                           "disk quota exceeded while writing", file=display_path(path),
                           hint=f"free space (`recipekit plan` shows the bytes needed); {_RESUME}")
    if e.errno == errno.EFBIG:
        return OutputError("the file size limit was reached while writing (`ulimit -f`, or the "
                           "file system's maximum file size)", file=display_path(path),
                           hint=f"raise the limit or lower `output.shard_size`; {_RESUME}")
    if e.errno == errno.EIO:
        return OutputError("I/O error while writing: the disk or file system reported a "
                           "failure", file=display_path(path),
                           hint=f"check the disk (dmesg) before trusting it; {_RESUME}")
    return OutputError(f"cannot write: {e.strerror or e}", file=display_path(path),
                       hint=_RESUME)


#: Written bytes between background flushes (when fsync is on): the final fsync then finds little
#: left to do, instead of the whole shard.
FLUSH_EVERY = 256 * 1024 * 1024
_fdatasync = getattr(os, "fdatasync", os.fsync)


class ShardWriter:
    """Writes exactly ``size`` bytes to a temp file; `finish` renames it to ``final``.

    Why threads: hashing costs about as much as writing, so the sha256 runs on a worker thread in
    write order while the caller goes on writing (hashlib, os.write and preadv release the GIL).
    With fsync on, written data is also flushed in the background every `FLUSH_EVERY` bytes, so
    disk writeback overlaps the run. Each `write` may pass ``done``, called once its bytes are
    hashed, so the caller knows when a buffer can be reused.
    """

    def __init__(self, final: Path, header: bytes, size: int, *, fsync: bool = True) -> None:
        self.final = final
        self.temp = partial_path(final)
        self.size = size
        self.fsync = fsync
        self.written = 0
        self._sha = hashlib.sha256()
        self._jobs: queue.Queue[tuple[memoryview, Callable[[], None] | None] | None] = (
            queue.Queue(maxsize=4))
        self._flushing = threading.Semaphore(1)
        self._flush_error: OSError | None = None
        self._unflushed = 0
        try:
            self._fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as e:
            raise _write_error(e, self.temp) from e
        self._hasher = threading.Thread(target=self._hash_loop, name="recipekit-sha256",
                                        daemon=True)
        self._hasher.start()
        self.write(header)

    def _hash_loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            view, done = job
            self._sha.update(view)
            del view
            if done is not None:
                done()

    def write(self, data: bytes | bytearray | memoryview, *,
              done: Callable[[], None] | None = None) -> None:
        """Write ``data`` at the current end; ``data`` must stay unchanged until ``done`` runs."""
        mv = memoryview(data).cast("B")
        if self.written + len(mv) > self.size:
            raise OutputError(f"internal error: shard overflow ({self.written + len(mv)} > "
                              f"{self.size} bytes)", file=display_path(self.final))
        pos = 0
        try:
            while pos < len(mv):
                pos += os.write(self._fd, mv[pos:])
        except OSError as e:
            self.abort()
            raise _write_error(e, self.temp) from e
        self.written += len(mv)
        self._jobs.put((mv, done))
        if self.fsync:
            self._unflushed += len(mv)
            if self._unflushed >= FLUSH_EVERY and self._flushing.acquire(blocking=False):
                self._unflushed = 0
                threading.Thread(target=self._flush, name="recipekit-flush", daemon=True).start()

    def _flush(self) -> None:
        try:
            _fdatasync(self._fd)
        except OSError as e:
            self._flush_error = e
        finally:
            self._flushing.release()

    def _stop_workers(self) -> None:
        if self._hasher.is_alive():
            self._jobs.put(None)
            self._hasher.join()
        self._flushing.acquire()  # wait for a background flush to finish with the fd
        self._flushing.release()

    def finish(self) -> str:
        """Check the size, fsync, rename into place; return the shard's sha256 (hex)."""
        self._stop_workers()
        if self.written != self.size:
            self.abort()
            raise OutputError(f"internal error: wrote {self.written} of {self.size} bytes",
                              file=display_path(self.final))
        try:
            if self._flush_error is not None:
                raise self._flush_error
            if self.fsync:
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            os.replace(self.temp, self.final)
        except OSError as e:
            self.abort()
            raise _write_error(e, self.final) from e
        return self._sha.hexdigest()

    def abort(self) -> None:
        """Close and remove the temp file (ours); never touches the final name."""
        self._stop_workers()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.temp)


def write_file_atomic(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """Write a small file under a temp name and rename it into place."""
    temp = partial_path(path)
    try:
        with open(temp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(temp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise _write_error(e, path) from e


def fsync_dir(path: Path) -> None:
    """Make renames in ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
