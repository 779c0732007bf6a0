"""The output directory: lock, state file, resume, donor files, index, config and manifest.

A run takes an ``flock`` on the output directory itself (the kernel drops it if the process
dies, so a second concurrent run fails clearly and a crashed one never blocks, and no lock file
is left behind), then writes
``.recipekit-state.json`` naming the plan hash and every file it will write. Finished shards are
recorded there after their rename, so a rerun of the same plan resumes; a different plan is
refused unless ``--force``, which deletes only files a recipekit state file listed and writes
everything again (with the same plan too: the repair for a damaged output). recipekit
never deletes a file it did not write. The manifest ``recipekit.json`` is written last; then
the state file is removed, so a finished output holds no run state (``hf upload`` of the folder
publishes none), and the manifest, which names the plan hash and every file written, serves a
rerun ("already complete") and ``--force`` in its place.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recipekit.errors import OutputError, OutputPathError, display_path
from recipekit.io.names import INDEX, MANIFEST, STATE
from recipekit.io.writer import (
    PARTIAL_SUFFIX,
    ShardWriter,
    copy_file_atomic,
    fsync_dir,
    partial_path,
    sha256_path,
    stale_temp_problem,
    write_file_atomic,
)
from recipekit.units import format_size

__all__ = ["INDEX", "MANIFEST", "STATE", "OutputDir", "State", "dumps"]


def dumps(data: Any) -> bytes:
    """JSON as transformers writes it: sorted keys, 2-space indent, trailing newline."""
    return (json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)


def _state_denied(out: Path, verb: str, e: OSError) -> OutputError:
    """The state file cannot be read or written for want of permission: say that, and what to
    fix, instead of promising a resume that cannot happen until it is fixed."""
    why = "the file system is read-only" if e.errno == errno.EROFS else "permission denied"
    return OutputError(
        f"cannot {verb} the state file {STATE}: {why}", file=display_path(out),
        hint="recipekit needs to read and write the output directory; fix its owner or mode "
        "(or choose another output path) before running again")


@dataclass
class State:
    """``finished``: shards renamed into place (size, sha256); ``written``: the other files
    written so far, each recorded just before it is renamed into place (None: a state file of
    a version that did not record them), so that ``--force`` over an interrupted run can tell
    a file put there since from its own."""

    plan_hash: str
    files: list[str]
    finished: dict[str, dict[str, Any]] = field(default_factory=dict)
    complete: bool = False
    written: dict[str, dict[str, Any]] | None = field(default_factory=dict)

    def to_json(self) -> bytes:
        doc = {"plan_hash": self.plan_hash, "files": self.files, "finished": self.finished,
               "complete": self.complete}
        return dumps(doc if self.written is None else {**doc, "written": self.written})


def _stored_state(path: Path, key: str) -> Any:
    """A value an output directory's state file records (None: no readable state; a damaged
    one is `OutputDir`'s to report)."""
    try:
        return json.loads((path / STATE).read_bytes()).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def stored_plan_hash(path: Path) -> str | None:
    """The plan hash an output directory's state file records."""
    return _stored_state(path, "plan_hash")


def finished_conversion(path: Path) -> bool:
    """Whether ``path``'s state file says complete: how a `convert` output is marked finished
    (it has no manifest; a run's finished output has a manifest and no state file)."""
    return _stored_state(path, "complete") is True


class OutputDir:
    """Owns one output directory for the duration of a run (use as a context manager)."""

    def __init__(self, path: Path, *, plan_hash: str, files: list[str], force: bool = False,
                 fsync: bool = True, manifest: str | None = MANIFEST,
                 unrecorded: frozenset[str] = frozenset()) -> None:
        """``manifest``: the file written last, which a complete output has (None: none, as
        for `convert`, whose output is complete when its state file says so). ``unrecorded``:
        for a worker process of another executor, which writes into the output without
        entering it, the names its owner found taken (`unrecorded`), checked the same way."""
        self.path = path
        self._last = [manifest] if manifest else []
        self.plan_hash = plan_hash
        self.files = files
        self.force = force
        self.fsync = fsync
        self._lock_fd = -1
        self._written: dict[str, dict[str, Any]] = {}  # a finished output's small files
        self._made: list[Path] = []  # the folders __enter__ created, deepest first
        self._unrecorded = unrecorded  # a resumed run's names found taken
        self.state = State(plan_hash, files)
        self.already_complete = False

    @property
    def unrecorded(self) -> frozenset[str]:
        """The names of files a resumed run had not recorded as written where something is
        now: a file written there only replaces one holding the very bytes written
        (`_check_replaced`). Another executor's worker processes get them (`shard_target`)."""
        return self._unrecorded

    # -- opening -------------------------------------------------------------------------------
    def __enter__(self) -> OutputDir:
        path = self.path
        try:
            exists, is_dir = path.exists(), path.is_dir()
        except OSError as e:  # e.g. ENAMETOOLONG: the kernel refuses the name itself
            raise OutputPathError(f"output path {display_path(path)} cannot be used: "
                                  f"{e.strerror or e}", hint="choose a shorter or valid "
                                  "`output.path` (or --output)") from None
        if exists and not is_dir:
            raise OutputPathError(f"output path {display_path(path)} is a file",
                                  hint="set `output.path` (or --output) to a directory")
        if is_dir and not (path / STATE).exists() and self._finished_record() is None:
            self._refuse_foreign()  # before touching anything in someone else's directory
        missing = [] if exists else [q for q in (path, *path.parents) if not os.path.lexists(q)]
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create the output directory: {e.strerror or e}",
                              file=display_path(path)) from e
        self._lock()
        self._made = missing
        try:
            self._adopt_existing()
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            if exc_type is not None:
                self._remove_made()
        finally:
            self._unlock()

    def _remove_made(self) -> None:
        """After a failure (not enough free disk, Ctrl-C before the state file), remove the
        folders this run created that are still empty, deepest first, while the lock keeps
        other runs out: a failed run leaves no empty output directory behind. A folder holding
        anything (the state file, a shard) stays, so a rerun resumes; nothing else is touched.
        """
        for folder in self._made:
            try:
                folder.rmdir()  # only if empty
            except OSError:
                return
        self._made = []

    def _lock(self) -> None:
        try:
            self._lock_fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise OutputError(f"cannot open the output directory: {e.strerror or e}",
                              file=display_path(self.path)) from e
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise OutputError(f"another recipekit run is writing to {display_path(self.path)}",
                              hint="wait for it to finish or choose another output path") from None

    def _unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    def _finished_record(self) -> State | None:
        """A finished output's record of itself, read off its manifest: the state file is gone
        once a run completes (so that publishing the folder publishes no run state), and the
        manifest names the plan hash, every shard (size, sha256) and every other file written.
        None when there is no manifest (or no state file is expected), or it is not one of
        ours."""
        if not self._last or (self.path / STATE).exists():
            return None
        try:
            raw = json.loads((self.path / self._last[0]).read_bytes())
            shards = {str(k): {"sha256": v["sha256"], "size": v["size"]}
                      for k, v in raw["shards"].items()}
            written = {str(k): {"sha256": str(v["sha256"]), "size": int(v["size"])}
                       for k, v in raw.get("files", {}).items()}
            files = [*shards, *written, self._last[0]]
            self._written = written
            return State(str(raw["plan_hash"]), files, shards, True)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def _edited(self) -> frozenset[str]:
        """The small files a finished output's manifest records (a model card, config.json)
        that no longer hold what recipekit wrote there: the user edited or replaced them, so
        they are not recipekit's to delete (size first, then sha256; a few small files)."""
        out = set()
        for rel, record in self._written.items():
            p = self.path / rel
            if not _inside(p, self.path) or p.is_symlink() or not p.is_file():
                continue  # a link or a folder there is judged as foreign already
            if not _holds(p, record):
                out.add(Path(os.path.normpath(rel)).as_posix())
        return frozenset(out)

    def _adopt_existing(self) -> None:
        state_path = self.path / STATE
        finished = self._finished_record()
        if state_path.is_file() or finished is not None:
            try:
                if finished is not None:
                    old = finished
                else:
                    raw = json.loads(state_path.read_text())
                    written = raw.get("written")
                    old = State(raw["plan_hash"], list(raw["files"]), dict(raw["finished"]),
                                bool(raw.get("complete")),
                                None if written is None else dict(written))
            except OSError as e:
                if e.errno in _DENIED:
                    raise _state_denied(self.path, "read", e) from None
                raise OutputPathError(
                    f"{display_path(state_path)} is damaged",
                    hint="delete the output directory yourself and run again") from None
            except (ValueError, KeyError, TypeError):
                raise OutputPathError(
                    f"{display_path(state_path)} is damaged",
                    hint="delete the output directory yourself and run again") from None
            if old.plan_hash == self.plan_hash and not self.force:
                self.state.finished = {k: v for k, v in old.finished.items()
                                       if self._still_there(k, v)}
                self.state.written = None if old.written is None else dict(old.written)
                self._unrecorded = frozenset(
                    rel for rel in old.files if rel not in self.state.finished
                    and os.path.lexists(self.path / rel))
                self.already_complete = (
                    old.complete and len(self.state.finished) == len(old.finished)
                    and all((self.path / f).is_file() for f in [*old.files, *self._last]))
                return
            if not self.force:
                raise OutputPathError(
                    f"{display_path(self.path)} holds the output of a different plan (the recipe "
                    "or its inputs changed)",
                    hint="rerun with --force to replace it (deletes only files recipekit wrote "
                    "there), or choose another output path")
            # Refuse before deleting anything: a --force that would refuse afterwards (files
            # recipekit did not write stay there) must leave the directory as it found it.
            edited = self._edited() if finished is not None else frozenset()
            strangers = self._strangers(old) if finished is None else frozenset()
            self._refuse_foreign(keep=self._listed(old.files) - edited - strangers,
                                 edited=edited, strangers=strangers)
            # First say, durably, that nothing here is finished: a kill while deleting must not
            # leave a state that calls a half-deleted output complete. The file list stays, so a
            # rerun (with either plan) still knows what recipekit wrote.
            # The small files' records go with it (`_strangers`): from the manifest, or from
            # the interrupted run's state file.
            written = dict(self._written) if finished is not None else old.written
            write_file_atomic(state_path, State(old.plan_hash, old.files, written=written)
                              .to_json(), fsync=self.fsync)
            self._delete_listed(old.files)
        self._refuse_foreign()

    def _strangers(self, old: State) -> frozenset[str]:
        """The files at names an interrupted run listed but had not written, or had written
        and that changed since (other than shards: a shard renamed into place just before a
        kill is not recorded yet, and holds what the old plan wrote): put there by someone
        else, so not recipekit's to delete. Empty for a state file that recorded no written
        files (an older version's)."""
        if old.written is None:
            return frozenset()
        out = set()
        for rel in old.files:
            p = self.path / rel
            if rel in old.finished or rel.endswith(".safetensors") or not _inside(p, self.path) \
                    or not os.path.lexists(p):
                continue
            record = old.written.get(rel)
            if record is None or p.is_symlink() or not p.is_file() or not _holds(p, record):
                out.add(Path(os.path.normpath(rel)).as_posix())
        return frozenset(out)

    def _refuse_foreign(self, keep: frozenset[str] = frozenset(),
                        edited: frozenset[str] = frozenset(),
                        strangers: frozenset[str] = frozenset()) -> None:
        """Refuse a directory holding entries recipekit did not write (``keep``: relative paths
        of files `_delete_listed` is about to delete, judged before deleting them; ``edited``:
        files it wrote that were changed since, named as such; ``strangers``: files at names
        an interrupted run had not written, `_strangers`)."""
        # Our own temp files (a run killed mid-write) are not foreign: a rerun replaces them.
        # A temp name that is a link, a folder or another user's file is not ours.
        foreign = sorted(p.name for p in self.path.iterdir()
                         if not (p.name == STATE or _all_listed(p, p.name, keep) or (
                             p.name.endswith(PARTIAL_SUFFIX) and stale_temp_problem(p) is None)))
        if foreign:
            named = []
            for n in foreign:
                changed = sorted(e for e in edited if e == n or e.startswith(n + "/"))
                put = sorted(e for e in strangers if e == n or e.startswith(n + "/"))
                named.append(f"{', '.join(changed)} (changed since recipekit wrote it)"
                             if changed else f"{', '.join(put)} (put there or changed "
                             "after the interrupted run)" if put else n)
            shown = ", ".join(named[:4]) + (", ..." if len(named) > 4 else "")
            raise OutputPathError(
                f"output directory {display_path(self.path)} holds files recipekit did not "
                f"write ({shown})",
                hint="choose a new or empty output path; recipekit never deletes files it did "
                "not write")

    def _listed(self, files: list[str]) -> frozenset[str]:
        """The relative paths `_delete_listed` deletes for a state file listing ``files``."""
        out = set()
        for rel in [*self._last, *files]:
            target = self.path / rel
            if _inside(target, self.path):
                rel_path = Path(os.path.normpath(rel))
                out.update({rel_path.as_posix(), partial_path(rel_path).as_posix()})
        return frozenset(out)

    def _still_there(self, name: str, info: dict[str, Any]) -> bool:
        p = self.path / name
        return p.is_file() and p.stat().st_size == info.get("size")

    def _delete_listed(self, files: list[str]) -> None:
        """Delete what a state file listed, manifest first; the state file itself stays."""
        dirs: set[Path] = set()
        for rel in [*self._last, *files]:
            target = self.path / rel
            if not _inside(target, self.path):
                continue
            for p in (target, partial_path(target)):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            dirs.update(q for q in target.parents if _inside(q, self.path) and q != self.path)
        for d in sorted(dirs, key=lambda q: len(q.parts), reverse=True):
            with contextlib.suppress(OSError):
                d.rmdir()  # only if empty

    # -- writing -------------------------------------------------------------------------------
    def begin(self, bytes_needed: int) -> None:
        """Record the plan in the state file after checking free disk space."""
        free = shutil.disk_usage(self.path).free
        if bytes_needed > free:
            raise OutputError(
                f"not enough free disk: the output needs {format_size(bytes_needed)} more, "
                f"{format_size(free)} is free", file=display_path(self.path),
                hint="free space or choose another output path")
        self.save_state()

    def save_state(self) -> None:
        """Write the state file. A permission error says so and what to fix: a rerun cannot
        resume until the output directory is writable (the generic write hint would say it
        resumes)."""
        try:
            write_file_atomic(self.path / STATE, self.state.to_json(), fsync=self.fsync)
        except OutputError as e:
            if isinstance(e.__cause__, OSError) and e.__cause__.errno in _DENIED:
                raise _state_denied(self.path, "write", e.__cause__) from e
            raise

    def is_finished(self, shard: str) -> bool:
        return shard in self.state.finished

    def mark_finished(self, shard: str, sha256: str, size: int) -> None:
        self.state.finished[shard] = {"sha256": sha256, "size": size}
        if self.fsync:
            fsync_dir(self.path)
        self.save_state()

    def open_shard(self, name: str, header: bytes, size: int, *, fsync: bool = True
                   ) -> ShardWriter:
        """A writer for one shard: a temp file renamed into place by `ShardWriter.finish`
        (the interface io/remote_output.py shares for object storage). Usable without entering
        the output (a worker process of another executor), the owner calling `mark_finished`."""
        check = self._check_replaced if name in self._unrecorded else None
        return ShardWriter(self.path / name, header, size, fsync=fsync, before_rename=check)

    def _check_replaced(self, final: Path, same: Callable[[Path], bool]) -> None:
        """Before a resumed run writes a file at a name it had not recorded as written, where a
        file already is: that file is the interrupted run's own only if it holds the bytes this
        run writes (a run's files are a function of its plan, whose hash is the same). Other
        bytes are a file put there since, which recipekit must not overwrite: refuse (exit 2),
        keeping everything, so that moving it away lets a rerun finish."""
        if final.is_file() and not final.is_symlink() and same(final):
            return
        raise OutputPathError(
            f"{display_path(final)} is not a file this run wrote: it was put in the interrupted "
            "run's output, at the name of a file the run had not written yet",
            hint="recipekit never overwrites a file it did not write: move it away and run "
            "again (the finished shards are kept)")

    def _write_checked(self, rel: str, data: bytes | None, src: Path | None) -> None:
        """Check a small file's name before it is written (`_check_replaced`); ``data``: its
        bytes, or ``src``: the file it copies."""
        final = self.path / rel
        if rel not in self._unrecorded or not os.path.lexists(final):
            return
        want = data if data is not None else src.read_bytes()  # type: ignore[union-attr]
        # the bytes this run writes, or those the interrupted run recorded writing there (the
        # same plan from a recipe whose comments changed since: another model card)
        recorded = (self.state.written or {}).get(rel)
        self._check_replaced(final, lambda p: (p.stat().st_size == len(want)
                                               and p.read_bytes() == want)
                             or (recorded is not None and _holds(p, recorded)))

    def file_record(self, rel: str) -> dict[str, Any]:
        """Size and sha256 of a written file, read back from disk (what `verify` checks)."""
        p = self.path / rel
        return {"size": p.stat().st_size, "sha256": sha256_path(p)}

    def write_file(self, rel: str, data: bytes) -> None:
        self._write_checked(rel, data, None)
        self._record_written(rel, {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        write_file_atomic(self._parent_made(rel) / Path(rel).name, data, fsync=self.fsync)

    def copy_file(self, src: Path, rel: str) -> None:
        self._write_checked(rel, None, src)
        self._record_written(rel, {"size": src.stat().st_size, "sha256": sha256_path(src)})
        copy_file_atomic(src, self._parent_made(rel) / Path(rel).name, fsync=self.fsync)

    def _record_written(self, rel: str, record: dict[str, Any]) -> None:
        """Record a small file in the state file before it is renamed into place
        (`_strangers`): a kill between the two then leaves no file of the run's own unrecorded
        (recorded first, a file absent or holding other bytes is told apart by its hash). The
        manifest, written last, records them all in its stead."""
        if rel not in self._last and self.state.written is not None:
            self.state.written[rel] = record
            self.save_state()

    def _parent_made(self, rel: str) -> Path:
        """The folder of ``rel`` under the output, made if needed; a folder that is a symlink
        (planted there) is refused rather than written through."""
        folder = self.path
        for part in Path(rel).parent.parts:
            folder = folder / part
            if folder.is_symlink() or part in ("..", "/"):
                raise OutputPathError(f"{display_path(folder)} is a symlink or leaves the output "
                                      "directory; recipekit does not write through it",
                                      hint="remove it yourself and run again")
            if folder.exists() and not folder.is_dir():  # a file of the user's: kept
                raise OutputPathError(f"{display_path(folder)} is a file where the output's "
                                      f"folder {part}/ goes (the donor's files are copied "
                                      "there)", hint="move the file elsewhere and run again")
            try:
                folder.mkdir(exist_ok=True)
            except OSError as e:
                raise OutputError(f"cannot create a folder: {e.strerror or e}",
                                  file=display_path(folder)) from e
        return folder

    def complete(self) -> None:
        """Mark the output complete. With a manifest (written last, it records everything a
        rerun or ``--force`` needs: plan hash, shards, files), the state file is removed: a
        finished output holds no run state, so uploading the folder publishes none. A kill
        before the removal leaves a state file that does not say complete: a rerun rewrites
        the small files and removes it. Without a manifest (`convert`) the state says so."""
        if self._last:
            if self.fsync:
                fsync_dir(self.path)  # the manifest's rename is durable before the state goes
            with contextlib.suppress(FileNotFoundError):
                (self.path / STATE).unlink()
            if self.fsync:
                fsync_dir(self.path)
            return
        self.state.complete = True
        if self.fsync:
            fsync_dir(self.path)
        self.save_state()


def _all_listed(p: Path, rel: str, keep: frozenset[str]) -> bool:
    """Whether deleting the files in ``keep`` (and then the emptied folders) removes ``p``."""
    if p.is_symlink() or not p.is_dir():
        return rel in keep
    if not any(k.startswith(rel + "/") for k in keep):
        return False  # a folder no listed file lies in is never removed
    return all(_all_listed(q, f"{rel}/{q.name}", keep) for q in p.iterdir())


def _holds(p: Path, record: dict[str, Any]) -> bool:
    """Whether the regular file ``p`` holds what ``record`` says was written (size, then
    sha256)."""
    return p.stat().st_size == record["size"] and sha256_path(p) == record["sha256"]


def _inside(p: Path, root: Path) -> bool:
    try:
        p.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False
