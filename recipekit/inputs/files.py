"""Safe access to the files a recipe names: confinement, bounded reads and content hashes.

Checkpoint directories and recipe side files are untrusted. Every read of one goes through
here, once each:

* `check_confined`: the file must resolve inside its directory (for a huggingface_hub snapshot,
  inside the repo's cache folder, `model_root`) and be a regular file — a FIFO would block a
  read forever, a device would never end;
* `read_small` / `read_bounded`: JSON documents are read whole, but only up to a cap far above
  any real one, so that a crafted multi-gigabyte "config" cannot exhaust memory;
* `sha256_file`: the one content hash of a file (locks, manifests of hub blobs, scalings logs);
* `check_readable_dir`, `lexists`, `is_file`: the probes that discover a checkpoint's files,
  which report a directory they may not look into instead of calling its files missing (or
  letting ``PermissionError`` escape, as `os.path.lexists` and `Path.is_file` do).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from recipekit.errors import (
    CorruptCheckpointError,
    SourceUnreadableError,
    UnsupportedCheckpointError,
    display_path,
)
from recipekit.units import format_size

#: Bytes per read while hashing a file.
HASH_CHUNK = 1 << 20


def model_root(path: Path) -> Path:
    """The directory a checkpoint's files may resolve into: the model directory itself, or, for
    a huggingface_hub cache snapshot (``models--org--name/snapshots/<commit>``), the repo's cache
    folder, whose ``blobs/`` the snapshot's links point to."""
    real = path.resolve()
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith(
            ("models--", "datasets--", "spaces--")):
        return real.parent.parent
    return real


def escape_reason(p: Path, root: Path) -> str | None:
    """Why reading ``p`` would leave ``root`` or is not a plain file read, or None if it is fine."""
    try:
        target = p.resolve(strict=False)
    except (OSError, RuntimeError):
        return "is a symlink loop"
    try:
        target.relative_to(root)
    except ValueError:
        return (f"is a symlink to {target}, outside the model directory "
                f"{display_path(root)}")
    try:
        mode = os.stat(p).st_mode
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            return "has a name longer than the file system allows"
        return f"is a broken symlink (to {target})" if os.path.islink(p) else "cannot be read"
    return not_regular(mode)


#: What a probe may answer "nothing there" to: a missing entry or a file in a path's middle.
_ABSENT = (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG)


def unreadable(p: Path, e: OSError) -> SourceUnreadableError:
    """The error for an input file or directory that exists but cannot be read."""
    hint = None
    if e.errno in (errno.EACCES, errno.EPERM):
        hint = ("give the user running recipekit read and search permission on it (chmod u+rx)"
                if os.path.isdir(p) else "give the user running recipekit read permission on it")
    return SourceUnreadableError(f"cannot read: {e.strerror or e}", file=display_path(p),
                                 hint=hint)


def check_readable_dir(path: Path) -> None:
    """Refuse a checkpoint directory whose entries cannot be listed or looked at (mode 000,
    another user's folder), naming the directory.

    Raises:
        SourceUnreadableError: exit code 2.
    """
    try:
        os.listdir(path)  # needs read permission
        os.lstat(path / ".")  # needs search permission, like every file probe below
    except OSError as e:
        raise unreadable(path, e) from None


def _probe(p: Path, *, follow: bool) -> os.stat_result | None:
    try:
        return os.stat(p) if follow else os.lstat(p)
    except OSError as e:
        if e.errno in _ABSENT or (follow and e.errno == errno.ELOOP):
            return None  # a broken link or a loop is no file, as for `Path.is_file`
        try:
            os.lstat(p)
        except OSError:
            raise unreadable(p.parent, e) from None  # the directory cannot be searched
        raise unreadable(p, e) from None  # a link whose target cannot be reached


def lexists(p: Path) -> bool:
    """Whether anything (a broken link included) is at ``p``: `os.path.lexists`, except that a
    directory that cannot be searched is an error naming it, not a missing file.

    Raises:
        SourceUnreadableError: ``p``'s directory cannot be searched (exit code 2).
    """
    return _probe(p, follow=False) is not None


def is_file(p: Path) -> bool:
    """Whether ``p`` is (or links to) a regular file: `Path.is_file`, except that a directory
    that cannot be searched is an error naming it instead of a ``PermissionError``.

    Raises:
        SourceUnreadableError: ``p``'s directory cannot be searched (exit code 2).
    """
    st = _probe(p, follow=True)
    return st is not None and stat.S_ISREG(st.st_mode)


def not_regular(mode: int) -> str | None:
    """What a file of this ``st_mode`` is when it is not a regular file (None for a file)."""
    if stat.S_ISREG(mode):
        return None
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return f"is {name}, not a regular file"
    return "is a special file, not a regular file"


def check_confined(p: Path, root: Path) -> None:
    """Refuse to read ``p`` when it resolves outside the model directory or is not a regular
    file (a FIFO would block, a device would never end).

    Raises:
        UnsupportedCheckpointError: a symlink out of the model directory, a loop, a broken link
            or a special file (exit code 2: the files may be fine, the layout is refused).
    """
    why = escape_reason(p, root)
    if why is None:
        return
    if why.startswith("is a symlink to"):
        hint = ("recipekit does not follow links out of a checkpoint directory; copy the file "
                "into it, or name the directory that holds the real files")
    else:
        hint = "a checkpoint directory holds regular files (or hub cache links)"
    raise UnsupportedCheckpointError(why, file=display_path(p), hint=hint)


def walk_confined(path: Path, root: Path, *, skip_dir: Callable[[Path], bool]
                  ) -> Iterator[tuple[Path, str | None]]:
    """Every file below ``path`` as (path relative to it, why it cannot be handed on or None),
    in sorted order, for the commands that copy a checkpoint's other files (a run's donor files,
    `convert`).

    Folders for which ``skip_dir(relative path)`` holds are not entered; a symlinked folder is
    not entered either and is yielded with its reason; a file gets `escape_reason`'s verdict
    (links out of ``root``, loops, broken links, FIFOs, devices).
    """
    for dirpath, dirs, files in os.walk(path):
        here = Path(dirpath)
        rel_root = here.relative_to(path)
        keep = []
        for d in sorted(dirs):
            if skip_dir(rel_root / d):
                continue
            if (here / d).is_symlink():
                yield rel_root / d, "is a symlinked directory"
                continue
            keep.append(d)
        dirs[:] = keep
        for f in sorted(files):
            yield rel_root / f, escape_reason(here / f, root)


def read_bounded(p: Path, limit: int) -> tuple[bytes | None, int]:
    """(the bytes of ``p``, its size), or (None, its size) when it is larger than ``limit``:
    the caller says why that cannot be the file it expects.

    A named pipe, socket or device is refused before it is opened (reading one could block
    forever or never end); a directory fails to open as it always does.

    Raises:
        OSError: the file cannot be opened or read, or is a special file.
    """
    mode = os.stat(p).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise OSError(errno.EINVAL, f"the file {not_regular(mode)}", str(p))
    with open(p, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            return None, size
        return f.read(limit + 1), size


def read_small(p: Path, limit: int, what: str) -> bytes:
    """The bytes of a small JSON file of a checkpoint or output (``what`` names it: config.json,
    the index, the manifest), refusing files far larger than any real one.

    Raises:
        CorruptCheckpointError: larger than ``limit``, or unreadable.
    """
    shown = display_path(p)
    try:
        data, size = read_bounded(p, limit)
    except OSError as e:
        raise CorruptCheckpointError(f"cannot read: {e.strerror or e}", file=shown) from e
    if data is None:
        raise CorruptCheckpointError(
            f"{what} is {format_size(size)}, larger than the {format_size(limit)} any "
            f"real {what} stays under", file=shown, hint="the file is damaged or not a "
            f"{what}; download the checkpoint again")
    return data


def sha256_file(path: Path) -> str:
    """The sha256 of a file's content, read in `HASH_CHUNK` blocks.

    Raises:
        OSError: the file cannot be read.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def relative_paths(recipe: Any) -> str:
    """Where ``recipe``'s relative input paths are looked up, for the hint of a path that does
    not exist: beside a recipe file, or in ``base_dir`` for recipe text or data (the API)."""
    if recipe.document.file in ("<string>", "<dict>"):
        return f"relative paths are relative to base_dir ({display_path(recipe.file.parent)})"
    return "relative paths are relative to the recipe file"
