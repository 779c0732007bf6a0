"""Read tensor bytes out of safetensors files with positioned reads into reusable buffers.

Why not ``safe_open``: it memory-maps the file, and every page a run touches stays in its RSS
until the mapping goes, so peak RSS grows with the bytes read. Positioned reads (``preadv``)
into buffers we own keep RSS at the working set, and release the GIL, so reads overlap compute.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

from recipekit.errors import TensorDataError, display_path
from recipekit.io import remote
from recipekit.io.header import FileStamp, TensorInfo
from recipekit.io.remote import (
    RemotePath,
    cat_range,
    describe_failure,
    is_remote,
    remote_errors,
)

_HAS_PREADV = hasattr(os, "preadv")


#: whole-tensor reads of at most this many bytes go into reused buffers (`FileReader`)
REUSE_BYTES = 64 * 1024 * 1024
#: bytes of such buffers the reader keeps between reads at most
KEEP_BYTES = 96 * 1024 * 1024


class FileReader:
    """Keeps input files open (one descriptor each) and reads byte ranges from them.

    Whole tensors of at most `REUSE_BYTES` are read into buffers it keeps (at most
    `KEEP_BYTES`) and hands out again once nothing refers to them. Why: a fresh buffer is a
    fresh mapping, and faulting its pages in costs about four times the copy from the page
    cache (measured: 1.9 against 9 GB/s); a TIES merge reads two such inputs per tensor.

    ``stamps``: the version of each file whose header gave the offsets read (`FileStamp`). A
    file is refused when it is opened if it is not that version, and `check_unchanged` refuses
    one rewritten in place since (``inode``: whether replacing the file counts; not when the
    stamps come from another machine). A file is read through one descriptor for as long as
    the reader is open, so a file replaced by a rename after it was opened goes on being read
    from the version it was planned from.

    A remote input's object (io/remote.py `RemotePath`) has no descriptor to hold: on S3 each
    ranged read is conditional on the ETag the plan read (`remote.cat_range`), and on a
    backend that cannot do that, `check_unchanged` asks for each object's ETag again.
    """

    def __init__(self, stamps: Mapping[Path, FileStamp] | None = None, *,
                 inode: bool = True) -> None:
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        self._kept: list[bytearray] = []
        self._stamps = dict(stamps or {})
        self._inode = inode
        self._remote: set[RemotePath] = set()  # remote objects read since the last check

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            with self._lock:
                fd = self._fds.get(path)
                if fd is None:
                    try:
                        fd = os.open(path, os.O_RDONLY)
                    except OSError as e:
                        raise TensorDataError(
                            f"cannot open: {e.strerror or e}", file=display_path(path)) from e
                    try:
                        self._check(path, fd)
                    except BaseException:
                        os.close(fd)
                        raise
                    self._fds[path] = fd
        return fd

    def open_files(self, paths: Iterable[Path]) -> None:
        """Open (and check) every local file of ``paths`` now, before anything is read: a file
        replaced later in the run is still read from the version the plan describes."""
        for path in paths:
            if not is_remote(path):
                self._fd(path)

    def check_unchanged(self) -> None:
        """Refuse if a file opened with a stamp has changed since (one ``fstat`` each): it was
        rewritten in place, and bytes read from it may mix two versions. Called once a shard's
        reads are done, before it is kept. A remote object read without an ETag condition
        (a backend other than S3) is asked for its ETag again (one HEAD each), for the same
        reason: a ranged read names no version, and a re-upload between two of them would mix
        two versions into the shard.

        Raises:
            TensorDataError: a file or object changed during the run.
        """
        with self._lock:
            opened = list(self._fds.items())
            read, self._remote = self._remote, set()
        for path, fd in opened:
            self._check(path, fd, during=True)
        for obj in sorted(read, key=str):
            _check_remote(obj)

    def _check(self, path: Path, fd: int, *, during: bool = False) -> None:
        stamp = self._stamps.get(path)
        if stamp is None:
            return
        try:
            why = stamp.change(os.fstat(fd), inode=self._inode)
        except OSError as e:
            raise TensorDataError(f"cannot stat: {e.strerror or e}",
                                  file=display_path(path)) from e
        if why is None:
            return
        raise TensorDataError(
            f"the file changed during the run ({why}): the shard being written may mix bytes "
            "of two versions, so it was discarded" if during else
            f"the file changed since the plan read its header ({why}): the plan's byte offsets "
            "may not hold for it, so nothing was read from it", file=display_path(path),
            hint="finished shards are kept; run again once nothing writes to the file, to plan "
            "from its current version (an output begun from the old one then needs --force)")

    def read_into(self, path: Path, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the bytes at ``offset``; a short file is a corrupt checkpoint.
        A remote input's file (io/remote.py) is read by one ranged GET of exactly these bytes."""
        if is_remote(path):
            with self._lock:
                self._remote.add(path)  # type: ignore[arg-type]
            _read_remote(path, offset, buf)  # type: ignore[arg-type]
            return
        fd = self._fd(path)
        done = 0
        want = len(buf)
        while done < want:
            try:
                if _HAS_PREADV:
                    n = os.preadv(fd, [buf[done:]], offset + done)
                else:  # pragma: no cover - platforms without preadv
                    data = os.pread(fd, want - done, offset + done)
                    buf.cast("B")[done:done + len(data)] = data
                    n = len(data)
            except OSError as e:
                raise TensorDataError(f"read failed: {e.strerror or e}",
                                      file=display_path(path)) from e
            if n == 0:
                raise TensorDataError(
                    f"file ended at byte {offset + done} while reading {want} bytes",
                    file=display_path(path),
                    hint="the file changed or was truncated during the run")
            done += n

    def read_tensor(self, info: TensorInfo) -> memoryview:
        """The raw bytes of one stored tensor, in a buffer no one else refers to."""
        buf = self._buffer(info.nbytes)
        if info.nbytes:
            self.read_into(info.file, info.offset, buf)
        return buf

    def _buffer(self, nbytes: int) -> memoryview:
        """``nbytes`` of memory: a kept buffer nothing refers to any more (the smallest large
        enough), else a new one, kept if it fits in `KEEP_BYTES` with the free ones."""
        if nbytes > REUSE_BYTES:
            return memoryview(bytearray(nbytes))
        with self._lock:
            free = _unreferenced(self._kept)
            fits = [b for b in free if len(b) >= nbytes]
            if fits:
                return memoryview(min(fits, key=len))[:nbytes]
            buf = bytearray(nbytes)
            free.sort(key=len)
            held = sum(map(len, self._kept))
            while free and held + nbytes > KEEP_BYTES:  # drop the smallest free ones
                victim = free.pop(0)
                held -= len(victim)
                # by identity: `list.remove` would compare contents and could drop a
                # buffer in use that holds the same bytes
                self._kept = [b for b in self._kept if b is not victim]
            if held + nbytes <= KEEP_BYTES:
                self._kept.append(buf)
            return memoryview(buf)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self._kept.clear()

    def __enter__(self) -> FileReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unreferenced(kept: list[bytearray]) -> list[bytearray]:
    """The buffers of ``kept`` that nothing else refers to. A tensor over a buffer
    (`torch.frombuffer`, through a memoryview) and every view of it hold a reference until
    they are freed. Each count is compared with that of a probe held the same way (by one
    list), so the interpreter's own temporary references cancel out."""
    owners = [bytearray()]  # the probe, held by this list as each buffer is by ``kept``
    probe, *counts = [sys.getrefcount(b) for b in owners + kept]
    return [b for b, c in zip(kept, counts, strict=True) if c <= probe]


def _read_remote(path: RemotePath, offset: int, buf: memoryview) -> None:
    """``buf`` filled from the object at ``path.url`` (bytes ``offset:offset+len(buf)``), by
    one ranged read pinned to the ETag the plan read (`remote.cat_range`).

    ``buf`` may be any writable contiguous buffer: a row piece's is a ctypes ``c_char`` array
    over a torch tensor (`execute._tensor_bytes`, format ``<c``), which refuses slice
    assignment from bytes (preadv, the local path, takes any buffer), so it is written
    through a byte view of itself.

    Raises:
        TensorDataError: the read failed (network, endpoint, credentials), the object is
            shorter than the plan says, or it changed since the plan read it.
    """
    want = len(buf)
    if not want:
        return
    try:
        data = cat_range(path.url, offset, offset + want, etag=path.etag)
    except remote_errors() as e:
        failure = describe_failure(e)
        raise TensorDataError(f"ranged read failed: {failure.what}", file=path.url,
                              hint=f"{failure.hint}; finished shards are kept, and running the "
                              "same command again resumes") from e
    if len(data) != want:
        raise TensorDataError(f"object ended at byte {offset + len(data)} while reading {want} "
                              "bytes", file=path.url,
                              hint="the object changed or was truncated during the run")
    buf.cast("B")[:] = data


def _check_remote(path: RemotePath) -> None:
    """Refuse an object read without an ETag condition that is no longer the version its
    ETag names (`FileReader.check_unchanged`).

    Raises:
        TensorDataError: it changed, or its ETag cannot be asked for.
    """
    if not path.etag:
        return
    fs, _ = remote.open_fs(path.url)
    if remote.is_pinnable(fs):  # every read was conditional on the ETag already
        return
    try:
        why = remote.object_changed(path)
    except remote_errors() as e:
        failure = describe_failure(e)
        raise TensorDataError(f"cannot check that the object is unchanged: {failure.what}",
                              file=path.url, hint=f"{failure.hint}; finished shards are kept, "
                              "and running the same command again resumes") from e
    if why is not None:
        raise TensorDataError(
            f"the object changed during the run ({why}): the shard being written may mix bytes "
            "of two versions, so it was discarded", file=path.url,
            hint="finished shards are kept; run again once nothing writes to the object, to "
            "plan from its current version (an output begun from the old one then needs "
            "--force)")


#: Bytes compared at a time by `is_same_data`: two buffers of this size are all it holds.
COMPARE_CHUNK = 4 << 20


def is_same_data(a: TensorInfo, b: TensorInfo, *, chunk: int = COMPARE_CHUNK) -> bool:
    """Whether two stored tensors have the same dtype, shape and bytes.

    Why: a fine-tune leaves some tensors untouched (frozen embeddings, norms), and two equal
    tensors from two files are different plan nodes; `extract_lora` asks this at compile time
    so that it writes no all-zero module for them. Memory is two ``chunk`` buffers whatever the
    tensor size, and a tensor that changed almost always differs in its first chunk, so the
    cost is the bytes of the tensors that are equal. A tensor only known from a remote header
    (offset -1) is never called equal.

    Raises:
        TensorDataError: a file cannot be read or is shorter than its header says.
    """
    if (a.dtype, a.shape, a.nbytes) != (b.dtype, b.shape, b.nbytes) or min(a.offset,
                                                                            b.offset) < 0:
        return False
    if (a.file, a.offset) == (b.file, b.offset):
        return True
    left, right = bytearray(min(chunk, a.nbytes)), bytearray(min(chunk, a.nbytes))
    with FileReader() as reader:
        for start in range(0, a.nbytes, chunk):
            n = min(chunk, a.nbytes - start)
            if n < len(left):  # the last, shorter chunk: compare only what was read
                del left[n:], right[n:]
            reader.read_into(a.file, a.offset + start, memoryview(left))
            reader.read_into(b.file, b.offset + start, memoryview(right))
            if left != right:  # bytearray equality is a memcmp (memoryview's is 10× slower)
                return False
    return True
