"""Models and adapters on object storage (``s3://bucket/prefix``, any fsspec URL).

Resolving a URL input lists its prefix once (each object's size, ETag and version id), copies
its small non-weight files (config, index, tokenizer, ...) into a private temporary stub
directory, and reads each shard's header by two ranged reads. Everything downstream — config
checks, layer stacks, donor files, the plan — then works on the stub directory as on a local
checkpoint, and each tensor's file is a `RemotePath`, which the reader serves by ranged reads
of exactly the bytes the plan asks for. So a URL input costs its headers at planning time and
the tensors the plan reads at run time (tests/inputs/test_remote.py counts them at the
server).

Identity (plan hash, manifest, lock): the URL and each object's size, ETag and version id —
never a credential (a URL with ``user:secret@`` is refused).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recipekit.errors import (
    OutputError,
    SourceNotFoundError,
    UnsupportedCheckpointError,
    show_as,
)
from recipekit.io.header import TensorInfo
from recipekit.io.names import WEIGHT_DIRS, WEIGHT_SUFFIXES
from recipekit.io.remote import (
    RemotePath,
    describe_failure,
    open_fs,
    read_remote_header,
    remote_errors,
)
from recipekit.io.writer import write_file_atomic

log = logging.getLogger(__name__)

#: Larger non-weight files are not copied into the stub (no config or tokenizer is this big).
MAX_SIDE_FILE = 256 * 1024 * 1024

_stub_root: Path | None = None

#: A stub root's name: this prefix, the process id, a random suffix (`tempfile.mkdtemp`).
STUB_PREFIX = "recipekit-remote-"


def _stub_dir(url: str) -> Path:
    """A fresh folder for one URL input's small files, under one private temporary directory
    removed when the process exits (and by a later process, if this one was killed)."""
    global _stub_root
    if _stub_root is None:
        sweep_stale_stubs()
        _stub_root = Path(tempfile.mkdtemp(prefix=f"{STUB_PREFIX}{os.getpid()}-"))
        atexit.register(shutil.rmtree, _stub_root, True)
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", url.split("://", 1)[-1]).strip("._")[:80] or "input"
    folder = Path(tempfile.mkdtemp(prefix=name + "-", dir=_stub_root))
    return folder


@dataclass(frozen=True)
class RemoteSnapshot:
    """A URL input, listed once: its objects (relative name -> size, ETag, version id) and the
    stub directory holding copies of its small files."""

    url: str
    path: Path
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        """What the plan hash and the manifest record: the URL and every object's identity."""
        return {"url": self.url, "files": {k: self.objects[k] for k in sorted(self.objects)}}

    def file(self, name: str) -> RemotePath:
        obj = self.objects.get(name, {})
        return RemotePath.make(self.path / name, f"{self.url}/{name}", obj.get("etag"))


def _is_weight(rel: str) -> bool:
    parts = rel.split("/")
    return rel.endswith(WEIGHT_SUFFIXES) or (len(parts) > 1 and parts[0] in WEIGHT_DIRS)


def _identity(info: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"size": int(info.get("size") or 0)}
    etag = info.get("ETag") or info.get("etag")
    if etag:
        out["etag"] = str(etag).strip('"')
    version = info.get("VersionId") or info.get("version_id")
    if version and version != "null":
        out["version_id"] = str(version)
    return out


def fetch_remote(url: str) -> RemoteSnapshot:
    """List ``url``'s objects and copy its small non-weight files into a stub directory.

    Raises:
        ExtraMissingError: the protocol's backend is not installed.
        SourceNotFoundError: nothing under the URL, or it cannot be listed (credentials,
            endpoint, network; botocore's errors for these are not OSError, and each gets
            its own message and hint, `describe_failure`).
    """
    url = url.rstrip("/")
    fs, root = open_fs(url)
    try:
        fs.invalidate_cache(root)  # another writer's new objects must be seen (reference §2.1)
        listing = fs.find(root, detail=True, withdirs=False)
    except remote_errors() as e:
        failure = describe_failure(e)
        raise SourceNotFoundError(f"cannot list {url}: {failure.what}",
                                  hint=failure.hint) from None
    objects: dict[str, dict[str, Any]] = {}
    for key, info in listing.items():
        rel = key[len(root) + 1:] if key.startswith(root + "/") else None
        if not rel or any(p.startswith(".") for p in rel.split("/")):
            continue
        objects[rel] = _identity(info)
    if not objects:
        raise SourceNotFoundError(f"{url} holds no objects",
                                  hint="check the URL (a prefix that holds config.json and "
                                  "*.safetensors), your credentials and the endpoint")
    stub = _stub_dir(url)
    show_as(stub, url)  # a message about a copied file names the object, not the copy
    for rel, obj in sorted(objects.items()):
        if _is_weight(rel):
            continue
        if obj["size"] > MAX_SIDE_FILE:
            log.warning("%s/%s: not copied (%d bytes is more than any config or tokenizer); an "
                        "output using this input as its donor will not have it", url, rel,
                        obj["size"])
            continue
        try:
            data = fs.cat_file(f"{root}/{rel}")
        except remote_errors() as e:
            failure = describe_failure(e)
            raise SourceNotFoundError(f"cannot read {url}/{rel}: {failure.what}",
                                      hint=failure.hint) from None
        if ".." in Path(rel).parts or rel.startswith("/"):
            raise UnsupportedCheckpointError(f"{url}/{rel}: an object name with '..' cannot be "
                                             "copied", hint="rename the object")
        target = stub / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            write_file_atomic(target, data, fsync=False, resumable=False)
        except OutputError as e:
            raise SourceNotFoundError(f"cannot keep a copy of {url}/{rel}: {e.message}",
                                      hint="free space in the temporary directory "
                                      "(TMPDIR)") from None
    return RemoteSnapshot(url, stub, objects)


def remote_shard_header(snap: RemoteSnapshot, filename: str) -> dict[str, TensorInfo]:
    """A remote shard's tensors (two ranged reads: the length, then the header).

    Raises:
        SourceNotFoundError: no such object under the URL.
        CorruptCheckpointError: a damaged header.
    """
    obj = snap.objects.get(filename)
    if obj is None:
        raise SourceNotFoundError(f"{snap.url}/{filename} does not exist",
                                  hint="a checkpoint prefix holds config.json and "
                                  "model.safetensors or a sharded index with its shards")
    return read_remote_header(snap.file(filename), obj["size"])


def check_unchanged(snap: RemoteSnapshot, names: list[str]) -> None:
    """Refuse to read objects that changed since the plan was made (size or ETag): the plan's
    offsets came from their headers, and a mix of two versions must never be written.

    Raises:
        TensorDataError: an object changed or disappeared, or the store cannot be reached.
        SourceNotFoundError: no credentials, or a broken configuration.
    """
    from recipekit.errors import TensorDataError

    fs, root = open_fs(snap.url)
    for name in names:
        try:
            fs.invalidate_cache(f"{root}/{name}")
            now = _identity(fs.info(f"{root}/{name}"))
        except remote_errors() as e:
            failure = describe_failure(e)
            cls = SourceNotFoundError if failure.config else TensorDataError  # exit 2 : 1
            raise cls(f"cannot read: {failure.what}", file=f"{snap.url}/{name}",
                      hint=failure.hint) from None
        was = snap.objects[name]
        if (now["size"], now.get("etag")) != (was["size"], was.get("etag")):
            raise TensorDataError("the object changed since the plan was made",
                                  file=f"{snap.url}/{name}",
                                  hint="run again to plan from the new version")


def sweep_stale_stubs() -> None:
    """Remove the stub roots of this user's recipekit processes that have ended.

    Why: a run that is killed (SIGKILL, the out-of-memory killer, a lost node) cannot remove its
    stub root at exit, and each holds its URL inputs' configs and tokenizers; the suite's kill
    test left one a run. A root is removed only when it is a real directory of this user whose
    process id (in its name) no longer exists: a live process keeps its own, a reused id keeps
    a dead one's until that process ends too.
    """
    if not hasattr(os, "getuid"):  # not POSIX: no process ids to test; the exit still cleans
        return
    pattern = re.compile(re.escape(STUB_PREFIX) + r"(\d+)-[A-Za-z0-9_]+")
    try:
        entries = list(os.scandir(tempfile.gettempdir()))
    except OSError:
        return
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or _alive(int(match.group(1))):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid():
            shutil.rmtree(entry.path, ignore_errors=True)  # never follows a link


def _alive(pid: int) -> bool:
    """Whether a process with this id exists (another user's counts)."""
    if pid <= 0:
        return True  # not a process id this module writes: leave it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OverflowError, OSError):  # no permission: another user's process
        return True
    return True


def forget_stubs() -> None:
    """Remove every stub directory now (tests; the process exit does it otherwise)."""
    global _stub_root
    if _stub_root is not None:
        with contextlib.suppress(OSError):
            shutil.rmtree(_stub_root)
        _stub_root = None
