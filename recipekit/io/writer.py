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
import stat
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from recipekit.errors import OutputError, OutputPathError, display_path

PARTIAL_SUFFIX = ".recipekit-partial"


def partial_path(final: Path) -> Path:
    return final.with_name(f".{final.name}{PARTIAL_SUFFIX}")


_RESUME = "finished shards are kept, and running the same command again resumes"


def _write_error(e: OSError, path: Path, *, resumable: bool = True) -> OutputError:
    """One clear message per way a write can fail; the temp file is removed by the caller.
    ``resumable``: a rerun resumes (a run's output), so the hint says so."""
    tail = f"; {_RESUME}" if resumable else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError("disk full while writing" if e.errno == errno.ENOSPC else
                           "disk quota exceeded while writing", file=display_path(path),
                           hint=f"free space (`recipekit plan` shows the bytes needed){tail}"
                           if resumable else "free space and run again")
    if e.errno == errno.EFBIG:
        return OutputError("the file size limit was reached while writing (`ulimit -f`, or the "
                           "file system's maximum file size)", file=display_path(path),
                           hint=f"raise the limit or lower `output.shard_size`{tail}"
                           if resumable else "raise the limit and run again")
    if e.errno == errno.EIO:
        return OutputError("I/O error while writing: the disk or file system reported a "
                           "failure", file=display_path(path),
                           hint=f"check the disk (dmesg) before trusting it{tail}")
    return OutputError(f"cannot write: {e.strerror or e}", file=display_path(path),
                       hint=_RESUME if resumable else None)


#: Written bytes between background flushes (when fsync is on): the final fsync then finds little
#: left to do, instead of the whole shard.
FLUSH_EVERY = 256 * 1024 * 1024
_fdatasync = getattr(os, "fdatasync", os.fsync)


class ShardWriter:
    """Writes exactly ``size`` bytes to a temp file; `finish` renames it to ``final``.

    Why a thread: writing and hashing cost about as much as computing a simple merge, so one
    worker thread writes each buffer and then hashes it, in order, while the caller computes the
    next (hashlib and os.write release the GIL). `os.write` into the page cache was ~18% of a
    DARE-TIES run's main thread, some of it waiting for the kernel's writeback throttle. With
    fsync on, written data is also flushed in the background every `FLUSH_EVERY` bytes, so disk
    writeback overlaps the run. Each `write` may pass ``done``, called once its bytes are
    written and hashed, so the caller knows when a buffer can be reused. A failed write is
    raised by the next `write` or by `finish`, after which nothing more is written.
    """

    def __init__(self, final: Path, header: bytes, size: int, *, fsync: bool = True,
                 before_rename: Callable[[Path, Callable[[Path], bool]], None] | None = None
                 ) -> None:
        """``before_rename(final, same)``: called before the rename when a file is at the
        final name, with ``same(path)`` telling whether that file holds this shard's bytes; it
        raises to keep that file (the temp file is then removed)."""
        self.final = final
        self._before_rename = before_rename
        self.temp = partial_path(final)
        self.size = size
        self.fsync = fsync
        self.written = 0
        self._sha = hashlib.sha256()
        self._jobs: queue.Queue[tuple[memoryview, Callable[[], None] | None] | None] = (
            queue.Queue(maxsize=4))
        self._flushing = threading.Semaphore(1)
        self._flush_error: OSError | None = None
        self._write_error: BaseException | None = None  # the worker's; raised by the caller
        self._unflushed = 0
        self._fd = open_exclusive(self.temp)
        self._worker = threading.Thread(target=self._io_loop, name="recipekit-write",
                                        daemon=True)
        self._worker.start()
        self.write(header)

    def _io_loop(self) -> None:
        """Write then hash each queued buffer in order; after a failure, only release them."""
        while (job := self._jobs.get()) is not None:
            view, done = job
            if self._write_error is None:
                try:
                    self._write_all(view)
                    self._sha.update(view)
                except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                    self._write_error = e
            del view
            if done is not None:
                done()

    def _write_all(self, view: memoryview) -> None:
        pos = 0
        while pos < len(view):
            pos += os.write(self._fd, view[pos:])
        if self.fsync:
            self._unflushed += len(view)
            if self._unflushed >= FLUSH_EVERY and self._flushing.acquire(blocking=False):
                self._unflushed = 0
                threading.Thread(target=self._flush, name="recipekit-flush", daemon=True).start()

    def _raise_write_error(self) -> None:
        e = self._write_error
        if e is None:
            return
        self.abort()
        if isinstance(e, OSError):
            raise _write_error(e, self.temp) from e
        raise e

    def write(self, data: bytes | bytearray | memoryview, *,
              done: Callable[[], None] | None = None) -> None:
        """Queue ``data`` to be written at the current end; ``data`` must stay unchanged until
        ``done`` runs. Raises the error of an earlier queued write that failed."""
        self._raise_write_error()
        mv = memoryview(data).cast("B")
        if self.written + len(mv) > self.size:
            raise OutputError(f"internal error: shard overflow ({self.written + len(mv)} > "
                              f"{self.size} bytes)", file=display_path(self.final))
        self.written += len(mv)
        self._jobs.put((mv, done))

    def _flush(self) -> None:
        try:
            _fdatasync(self._fd)
        except OSError as e:
            self._flush_error = e
        finally:
            self._flushing.release()

    def _stop_workers(self) -> None:
        if self._worker.is_alive():
            self._jobs.put(None)
            self._worker.join()
        self._flushing.acquire()  # wait for a background flush to finish with the fd
        self._flushing.release()

    def finish(self) -> str:
        """Check the size, fsync, rename into place; return the shard's sha256 (hex)."""
        self._stop_workers()
        self._raise_write_error()
        if self.written != self.size:
            self.abort()
            raise OutputError(f"internal error: wrote {self.written} of {self.size} bytes",
                              file=display_path(self.final))
        if self._flush_error is not None:
            self.abort()
            raise _write_error(self._flush_error, self.final) from self._flush_error
        digest = self._sha.hexdigest()
        if self._before_rename is not None and os.path.lexists(self.final):
            try:
                self._before_rename(self.final, lambda p: p.stat().st_size == self.size
                                    and sha256_path(p) == digest)
            except BaseException:
                self.abort()
                raise
        if self.fsync:  # before the check below, which must come just before the rename
            try:
                os.fsync(self._fd)
            except OSError as e:
                self.abort()
                raise _write_error(e, self.final) from e
        if not _still_ours(self._fd, self.temp):
            os.close(self._fd)  # the file at the temp name is another writer's: leave it
            self._fd = -1
            raise OutputError("another writer replaced this shard's temporary file while it was "
                              "being written", file=display_path(self.final),
                              hint="a run of the same output is still going on (a Ray task "
                              "of a driver that died, or a second machine); let it end, then "
                              "run again: finished shards are kept")
        fd, self._fd = self._fd, -1  # commit_temp's fsync now finds nothing left to write
        commit_temp(fd, self.temp, self.final, fsync=self.fsync)
        return digest

    def abort(self) -> None:
        """Close and remove the temp file if it is still ours; never touches the final name.
        A file at the temp name that is not the one this writer opened (another writer's,
        `_still_ours`, or a link put there) is left alone, as `finish` leaves it."""
        self._stop_workers()
        if self._fd < 0:
            return  # finished, or found not ours, or failed to commit (which removed it)
        ours = _still_ours(self._fd, self.temp)
        os.close(self._fd)
        self._fd = -1
        if ours:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.temp)


def _still_ours(fd: int, temp: Path) -> bool:
    """Whether ``temp`` still names the file open at ``fd``. Two writers of one shard (a Ray
    task whose driver died, still running beside the resumed run) share the deterministic temp
    name; the later one removes the earlier's file and creates its own, and the earlier must
    then not rename the later's half-written file into place."""
    try:
        a, b = os.fstat(fd), os.lstat(temp)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


# -- the one way recipekit writes a file -----------------------------------------------------
# Every file recipekit writes (shards, small files of the output folder, the state file, lock
# files, converted checkpoints, imported recipes) is created under its temp name with
# O_CREAT|O_EXCL|O_NOFOLLOW, so a link planted under that name is never followed and no existing
# file is truncated; fsynced; renamed into place (which replaces a link at the final name rather
# than writing through it); and its directory fsynced.

_EXCLUSIVE = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
              | getattr(os, "O_CLOEXEC", 0))


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symlink"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "a special file"


def stale_temp_problem(temp: Path) -> str | None:
    """Why ``temp`` (an existing temp name) is not a leftover of ours, or None if it is one
    (a regular file owned by this user: a killed run's temp file) or does not exist."""
    try:
        st = os.lstat(temp)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return f"is {_kind(st.st_mode)}"
    if st.st_uid != os.geteuid():
        return "is a file owned by another user"
    return None


def open_exclusive(temp: Path, *, resumable: bool = True) -> int:
    """A new file at ``temp`` opened for writing, never through a link or over a file we did not
    write; a leftover temp file of ours (a killed run's) is removed first.

    Raises:
        OutputPathError: ``temp`` exists and is not a regular file of ours (exit code 2).
        OutputError: the file cannot be created (permissions, disk full, ...).
    """
    for _ in range(2):
        try:
            return os.open(temp, _EXCLUSIVE, 0o644)
        except FileExistsError:
            why = stale_temp_problem(temp)
            if why is not None:
                raise OutputPathError(
                    f"{display_path(temp)}: the temporary file name {why}; recipekit creates "
                    "its temporary files itself and never writes through one it did not create",
                    hint="remove it yourself (it is not recipekit's) and run again") from None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
        except OSError as e:
            raise _write_error(e, temp, resumable=resumable) from e
    raise OutputError("the temporary file keeps reappearing", file=display_path(temp),
                      hint="another process is writing there; stop it and run again")


def commit_temp(fd: int, temp: Path, final: Path, *, fsync: bool = True,
                resumable: bool = True) -> None:
    """fsync and close ``fd`` (the temp file's), rename ``temp`` to ``final``, fsync the folder.
    On failure the temp file is removed and the error raised as OutputError."""
    try:
        if fsync:
            os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(temp, final)
    except OSError as e:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise _write_error(e, final, resumable=resumable) from e
    if fsync:
        fsync_dir(final.parent)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    mv = memoryview(data)
    pos = 0
    while pos < len(mv):
        pos += os.write(fd, mv[pos:])


def write_file_atomic(path: Path, data: bytes, *, fsync: bool = True,
                      resumable: bool = True) -> None:
    """Write a small file under a temp name and rename it into place (see above).
    ``resumable``: the file is part of a run's output (error hints say a rerun resumes)."""
    temp = partial_path(path)
    fd = open_exclusive(temp, resumable=resumable)
    try:
        _write_all(fd, data)
    except OSError as e:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise _write_error(e, path, resumable=resumable) from e
    commit_temp(fd, temp, path, fsync=fsync, resumable=resumable)


def copy_file_atomic(src: Path, path: Path, *, fsync: bool = True) -> None:
    """Copy the regular file ``src`` to ``path`` like `write_file_atomic`: at most the size it
    had when opened (a file that grows, or a device, cannot fill the disk). The caller checks
    that ``src`` may be read (confinement); a non-regular file is refused here too.

    Raises:
        OutputError: ``src`` cannot be read or is not a regular file, or the write fails.
    """
    try:
        src_fd = os.open(src, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise OutputError(f"cannot copy {display_path(src)}: {e.strerror or e}",
                          file=display_path(path)) from e
    try:
        st = os.fstat(src_fd)
        if not stat.S_ISREG(st.st_mode):
            raise OutputError(f"cannot copy {display_path(src)}: it is {_kind(st.st_mode)}, not "
                              "a regular file", file=display_path(path))
        temp = partial_path(path)
        fd = open_exclusive(temp)
        reading = True
        try:
            left = st.st_size
            while left > 0 and (chunk := os.read(src_fd, min(left, 1 << 20))):
                reading = False
                _write_all(fd, chunk)
                reading = True
                left -= len(chunk)
        except OSError as e:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temp)
            if reading:
                raise OutputError(f"cannot copy {display_path(src)}: {e.strerror or e}",
                                  file=display_path(path)) from e
            raise _write_error(e, path) from e
        commit_temp(fd, temp, path, fsync=fsync)
    finally:
        os.close(src_fd)


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


def sha256_path(path: Path) -> str:
    """The sha256 of a file recipekit wrote, read back in 1 MiB blocks (the manifest's record
    of the output's small files)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def stdout_to_devnull() -> None:
    """Point the process's stdout at /dev/null (best effort), after its reader went away
    (a broken pipe): Python's own flush at exit would report the broken pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
