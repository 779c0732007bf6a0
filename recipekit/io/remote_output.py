"""An output on object storage (``output.path: s3://bucket/prefix``): the same contract as a local
output directory (io/output.py) — state first, resume, ``--force``, manifest last — on objects.

Object stores have no rename and no flock, but a multipart upload becomes visible only when it
completes (shared/reference/cluster.md §2.2). So each shard streams straight to its final key
(`RemoteShardWriter`: parts of at least 5 MiB, sha256 computed on the way), a failing attempt
aborts its upload instead of publishing a truncated object, and a killed one leaves only an
invisible incomplete upload. The state object ``.recipekit-state.json`` records the plan hash and
each finished shard (written after its upload completed); the manifest ``recipekit.json`` is
written last and then the state object is deleted: a half-written output never has a manifest,
and a rerun of the same plan resumes from the finished shards.

Limits: there is no lock, so one run per output prefix at a time (two would overwrite each
other's state). A killed run's incomplete uploads (invisible, billed) are aborted by the next run
into the prefix (S3: only those of this output's own keys), or by a bucket lifecycle rule
(``AbortIncompleteMultipartUpload``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from recipekit.errors import OutputError, OutputPathError
from recipekit.io.names import MANIFEST, STATE
from recipekit.io.output import State
from recipekit.io.remote import describe_failure, open_fs, remote_errors

#: S3's smallest part (the last may be smaller) and most parts per upload.
MIN_PART = 5 * 1024 * 1024
MAX_PARTS = 10_000
log = logging.getLogger(__name__)
_RESUME = "finished shards are kept, and running the same command again resumes"


def _io_error(verb: str, shown: str, e: BaseException, *, starting: bool = False
              ) -> OutputError | OutputPathError:
    """The error for a request that failed. A request failure (`remote_errors`) is described by
    its cause (no credentials, an endpoint that cannot be reached: `describe_failure`, which
    never quotes a credential); missing credentials or a broken configuration found while
    ``starting`` (nothing written yet) exit 2, as an input's do."""
    if isinstance(e, remote_errors()):
        failure = describe_failure(e)
        if failure.config and starting:
            return OutputPathError(f"cannot {verb}: {failure.what}", file=shown,
                                   hint=failure.hint)
        return OutputError(f"cannot {verb}: {failure.what}", file=shown,
                           hint=f"{failure.hint}; {_RESUME}")
    return OutputError(f"cannot {verb}: {e}", file=shown,
                       hint=f"check the endpoint, your credentials and the bucket; {_RESUME}")


class RemoteShardWriter:
    """Streams exactly ``size`` bytes to one object by a multipart upload; `finish` completes
    it (the object appears then) and returns the sha256 of the bytes sent.

    Why no temp name: an object store has no rename (a copy would move the bytes again), and an
    upload that never completes is never visible. Memory: one part buffer (≥ 5 MiB, and large
    enough that a shard needs at most 10,000 parts) plus the caller's chunk.
    """

    def __init__(self, fs: Any, key: str, header: bytes, size: int, *, shown: str,
                 before_complete: Callable[[str, int], None] | None = None) -> None:
        """``before_complete(sha256, size)``: called before the upload completes (and the
        object at ``key`` is replaced); it raises to keep that object (the upload is then
        aborted)."""
        self.size, self.written, self.shown = size, 0, shown
        self._before_complete = before_complete
        self._sha = hashlib.sha256()
        block = max(MIN_PART, -(-size // MAX_PARTS))
        try:
            self._f: Any = fs.open(key, "wb", block_size=block)
        except Exception as e:  # a backend error of any kind: one clear message
            raise _io_error("start the upload", shown, e) from e
        self.write(header)

    def write(self, data: bytes | bytearray | memoryview, *,
              done: Callable[[], None] | None = None) -> None:
        """Send ``data`` next (buffered into parts); ``done`` runs once it is hashed."""
        mv = memoryview(data).cast("B")
        if self.written + len(mv) > self.size:
            self.abort()
            raise OutputError(f"internal error: shard overflow ({self.written + len(mv)} > "
                              f"{self.size} bytes)", file=self.shown)
        try:
            self._f.write(mv)
        except Exception as e:
            self.abort()
            raise _io_error("upload", self.shown, e) from e
        self._sha.update(mv)
        self.written += len(mv)
        if done is not None:
            done()

    def finish(self) -> str:
        if self.written != self.size:
            self.abort()
            raise OutputError(f"internal error: wrote {self.written} of {self.size} bytes",
                              file=self.shown)
        if self._before_complete is not None:
            try:
                self._before_complete(self._sha.hexdigest(), self.size)
            except BaseException:
                self.abort()
                raise
        f, self._f = self._f, None
        try:
            f.close()  # uploads the last part and completes the upload
        except Exception as e:
            _discard(f)
            raise _io_error("complete the upload", self.shown, e) from e
        return self._sha.hexdigest()

    def abort(self) -> None:
        """Abort the upload: nothing becomes visible (never publish a truncated object)."""
        f, self._f = self._f, None
        if f is not None:
            _discard(f)


def _discard(f: Any) -> None:
    """Abort an fsspec write file without committing it: ``close()`` and ``__del__`` would
    publish what was buffered (reference §2.2), so the file is marked closed after discard."""
    with contextlib.suppress(Exception):  # best effort: the upload stays invisible anyway
        f.discard()
    f.closed = True


class RemoteOutput:
    """Owns one output prefix on object storage for a run: `OutputDir`'s interface (context
    manager, ``state``, ``already_complete``, `begin`, `is_finished`, `mark_finished`,
    `open_shard`, `write_file`, `copy_file`, `file_record`, `complete`)."""

    def __init__(self, url: str, *, plan_hash: str, files: list[str], force: bool = False,
                 fsync: bool = True, manifest: str = MANIFEST,
                 unrecorded: frozenset[str] = frozenset()) -> None:
        """``unrecorded``: as `OutputDir`'s, for a worker process writing without entering."""
        self.url = url.rstrip("/")
        self.path = self.url  # what messages and results name
        self.plan_hash, self.files, self.force = plan_hash, files, force
        self._manifest = manifest
        self.state = State(plan_hash, files)
        self.already_complete = False
        self._records: dict[str, dict[str, Any]] = {}
        self._written: dict[str, dict[str, Any]] = {}  # a finished output's small files
        self._unrecorded = unrecorded  # a resumed run's names found taken
        self.fs: Any = None
        self.root = ""

    @property
    def unrecorded(self) -> frozenset[str]:
        """The names a resumed run found taken (`OutputDir.unrecorded`)."""
        return self._unrecorded

    def _key(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def _shown(self, rel: str) -> str:
        return f"{self.url}/{rel}"

    # -- opening -------------------------------------------------------------------------------
    def __enter__(self) -> RemoteOutput:
        self.fs, self.root = open_fs(self.url)
        self._adopt(self._list())
        if not self.already_complete:
            self._abort_stale_uploads()
        return self

    def _adopt(self, listing: dict[str, dict[str, Any]]) -> None:
        """Resume, refuse, or (``force``) delete what an earlier run of ours left."""
        old = self._read_state(listing)
        if old is None:
            self._refuse_foreign(listing, frozenset())
            return
        if old.plan_hash == self.plan_hash and not self.force:
            self._refuse_foreign(listing, frozenset(old.files))
            self.state.finished = {k: v for k, v in old.finished.items()
                                   if listing.get(k, {}).get("size") == v.get("size")}
            self.state.written = None if old.written is None else dict(old.written)
            self._unrecorded = frozenset(rel for rel in old.files if rel in listing
                                         and rel not in self.state.finished)
            self.already_complete = (
                old.complete and len(self.state.finished) == len(old.finished)
                and all(f in listing for f in [*old.files, self._manifest]))
            return
        if not self.force:
            raise OutputPathError(
                f"{self.url} holds the output of a different plan (the recipe or its inputs "
                "changed)", hint="rerun with --force to replace it (deletes only objects "
                "recipekit wrote there), or choose another output path")
        # Refuse before deleting anything, as a local output does: a small file the manifest
        # records that no longer holds what recipekit wrote (a model card edited in the
        # bucket) is the user's now, and a --force that deletes only what recipekit wrote
        # must leave it, and so refuses.
        edited = self._edited(listing) if self._written else self._strangers(listing, old)
        self._refuse_foreign(listing, frozenset(old.files) - edited, edited)
        # First say that nothing here is finished (a kill while deleting must not leave a state
        # that calls a half-deleted output complete); the file list stays for the next run,
        # and so do the small files' records (`_strangers`).
        written = dict(self._written) if self._written else old.written
        self._put(STATE, State(old.plan_hash, old.files, written=written).to_json())
        doomed = [self._key(f) for f in [self._manifest, *old.files] if f in listing]
        if doomed:
            try:
                self.fs.rm(doomed)
            except Exception as e:
                raise _io_error("delete the old output", self.url, e) from e

    def __exit__(self, *exc: object) -> None:
        return None

    def _abort_stale_uploads(self) -> None:
        """Abort the incomplete multipart uploads a killed run left for this output's files
        (S3 only; never another key's, never bucket-wide): they are invisible but billed."""
        if not hasattr(self.fs, "call_s3"):
            return
        bucket, _, prefix = self.root.partition("/")
        ours = set(self.files)
        try:
            found = self.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix + "/")
            for upload in found.get("Uploads", []):
                if upload["Key"][len(prefix) + 1:] in ours:
                    self.fs.abort_mpu(bucket, upload["Key"], upload["UploadId"])
        except Exception as e:  # best effort: a lifecycle rule removes them too
            log.warning("%s: could not abort incomplete uploads of an earlier run: %s",
                        self.url, e)

    def _list(self) -> dict[str, dict[str, Any]]:
        try:
            self.fs.invalidate_cache(self.root)  # another client's objects must be seen
            found = self.fs.find(self.root, detail=True, withdirs=False)
        except FileNotFoundError:
            return {}
        except Exception as e:
            raise _io_error("list the output", self.url, e, starting=True) from e
        return {k[len(self.root) + 1:]: v for k, v in found.items()
                if k.startswith(self.root + "/")}

    def _get_json(self, rel: str) -> Any:
        try:
            return json.loads(self.fs.cat_file(self._key(rel)))
        except (ValueError, FileNotFoundError):
            return None
        except Exception as e:
            raise _io_error(f"read {rel}", self.url, e, starting=True) from e

    def _read_state(self, listing: dict[str, dict[str, Any]]) -> State | None:
        """The state object's record, or a finished output's, read off its manifest."""
        if STATE in listing:
            raw = self._get_json(STATE)
            try:
                written = raw.get("written")
                return State(raw["plan_hash"], list(raw["files"]), dict(raw["finished"]),
                             bool(raw.get("complete")),
                             None if written is None else dict(written))
            except (TypeError, KeyError):
                raise OutputPathError(f"{self._shown(STATE)} is damaged",
                                      hint="delete the output prefix yourself and run "
                                      "again") from None
        if self._manifest in listing:
            raw = self._get_json(self._manifest)
            try:
                shards = {str(k): {"sha256": v["sha256"], "size": v["size"]}
                          for k, v in raw["shards"].items()}
                written = {str(k): {"sha256": str(v["sha256"]), "size": int(v["size"])}
                           for k, v in raw.get("files", {}).items()}
                files = [*shards, *written, self._manifest]
                self._written = written
                return State(str(raw["plan_hash"]), files, shards, True)
            except (TypeError, KeyError, AttributeError, ValueError):
                return None
        return None

    def _edited(self, listing: dict[str, dict[str, Any]]) -> frozenset[str]:
        """The small files a finished output's manifest records (a model card, config.json)
        whose object no longer holds what recipekit wrote: the user edited or replaced them,
        so they are not recipekit's to delete.

        Why read them: the listing's ETag is not a sha256 (and a multipart ETag is no hash of
        the bytes at all), so each object whose size still matches is read and hashed, as
        io/output.py's `_edited` does locally; these are the few small files recipekit wrote
        itself (shards are not among them).
        """
        return frozenset(rel for rel, record in self._written.items()
                         if rel in listing and not self._holds(listing, rel, record))

    def _strangers(self, listing: dict[str, dict[str, Any]], old: State) -> frozenset[str]:
        """The objects at names an interrupted run listed but had not written, or had written
        and that changed since (shards aside: one uploaded just before a kill is not recorded
        yet, and holds what the old plan wrote): put there by someone else, so not recipekit's
        to delete. Empty for a state that recorded no written files (an older version's)."""
        if old.written is None:
            return frozenset()
        return frozenset(
            rel for rel in old.files
            if rel in listing and rel not in old.finished and not rel.endswith(".safetensors")
            and not (rel == self._manifest and self._is_manifest_of(old.plan_hash))
            and (rel not in old.written or not self._holds(listing, rel, old.written[rel])))

    def _is_manifest_of(self, plan_hash: str) -> bool:
        """Whether the manifest object is a manifest of ``plan_hash`` (the interrupted run's
        own, written just before a kill took its state object with it), not an object put at
        its name (the manifest is never recorded in the state: it is written last)."""
        raw = self._get_json(self._manifest)
        return isinstance(raw, dict) and raw.get("plan_hash") == plan_hash

    def _holds(self, listing: dict[str, dict[str, Any]], rel: str,
               record: dict[str, Any]) -> bool:
        """Whether the object ``rel`` holds the bytes ``record`` (size, sha256) describes; read
        only when the size matches (the listing's ETag is no sha256)."""
        if listing[rel].get("size") != record["size"]:
            return False
        return self._sha256(rel) in (None, record["sha256"])

    def _sha256(self, rel: str) -> str | None:
        """The sha256 of object ``rel``, read in 8 MiB pieces; None when it is gone."""
        sha = hashlib.sha256()
        try:
            with self.fs.open(self._key(rel), "rb") as f:
                while chunk := f.read(8 << 20):
                    sha.update(chunk)
        except FileNotFoundError:
            return None
        except Exception as e:
            raise _io_error(f"read {rel}", self._shown(rel), e) from e
        return sha.hexdigest()

    def _refuse_foreign(self, listing: dict[str, dict[str, Any]], ours: frozenset[str],
                        edited: frozenset[str] = frozenset()) -> None:
        """Refuse a prefix holding objects recipekit did not write (``ours``: what a state or
        manifest lists; ``edited``: objects it wrote that were changed since, named as such)."""
        foreign = sorted(k for k in listing if k not in ours and k != STATE
                         and (k != self._manifest or k in edited))
        if foreign:
            named = [f"{k} (changed since recipekit wrote it)" if k in edited else k
                     for k in foreign]
            shown = ", ".join(named[:4]) + (", ..." if len(named) > 4 else "")
            raise OutputPathError(
                f"output {self.url} holds objects recipekit did not write ({shown})",
                hint="choose a new or empty output prefix; recipekit never deletes objects it "
                "did not write")

    # -- writing -------------------------------------------------------------------------------
    def begin(self, bytes_needed: int) -> None:
        """Record the plan in the state object (an object store has no free-space check)."""
        del bytes_needed
        self.save_state()

    def save_state(self) -> None:
        self._put(STATE, self.state.to_json())

    def _put(self, rel: str, data: bytes) -> None:
        """One small object in one PUT (visible whole or not at all)."""
        try:
            self.fs.pipe_file(self._key(rel), data)
        except Exception as e:
            raise _io_error(f"write {rel}", self._shown(rel), e) from e

    def is_finished(self, shard: str) -> bool:
        return shard in self.state.finished

    def mark_finished(self, shard: str, sha256: str, size: int) -> None:
        self.state.finished[shard] = {"sha256": sha256, "size": size}
        self.save_state()

    def open_shard(self, name: str, header: bytes, size: int, *,
                   fsync: bool = True) -> RemoteShardWriter:
        """A writer for one shard. Usable without entering the output (no listing, no state):
        a worker process of another executor writes its shard so, and the process that owns
        the output records it with `mark_finished`."""
        del fsync  # an upload is durable when it completes
        if self.fs is None:
            self.fs, self.root = open_fs(self.url)
        check = ((lambda sha, _: self._check_replaced(name, sha)) if name in self._unrecorded
                 else None)
        return RemoteShardWriter(self.fs, self._key(name), header, size, shown=self._shown(name),
                                 before_complete=check)

    def _check_replaced(self, rel: str, sha256: str) -> None:
        """Before a resumed run writes an object at a name it had not recorded as written,
        where an object already is: that object is the interrupted run's own only if it holds
        the bytes this run writes (a run's files are a function of its plan). Other bytes are
        an object put there since, which recipekit must not overwrite: refuse (exit 2), as a
        local output does (io/output.py)."""
        if rel not in self._unrecorded:
            return
        found = self._sha256(rel)
        recorded = (self.state.written or {}).get(rel, {}).get("sha256")
        if found is None or found in (sha256, recorded):  # (recorded: the run's own, of a
            return  # recipe whose comments changed since: the same plan, another model card)
        raise OutputPathError(
            f"{self._shown(rel)} is not an object this run wrote: it was put in the interrupted "
            "run's output, at the name of a file the run had not written yet",
            hint="recipekit never overwrites an object it did not write: move it away and run "
            "again (the finished shards are kept)")

    def _record_written(self, rel: str, record: dict[str, Any]) -> None:
        """Check a small file's name (`_check_replaced`), then record it in the state object
        before it is written (`_strangers`); the manifest, written last, is checked only."""
        self._check_replaced(rel, record["sha256"])
        if self.state.written is not None and rel != self._manifest:
            self.state.written[rel] = record
            self.save_state()

    def write_file(self, rel: str, data: bytes) -> None:
        record = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        self._record_written(rel, record)
        self._put(rel, data)
        self._records[rel] = record

    def copy_file(self, src: Path, rel: str) -> None:
        """Upload the local regular file ``src`` (read in 1 MiB pieces, hashed on the way)."""
        try:
            fd = os.open(src, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise OutputError(f"cannot copy {src}: {e.strerror or e}",
                              file=self._shown(rel)) from e
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OutputError(f"cannot copy {src}: not a regular file", file=self._shown(rel))
            writer = RemoteShardWriter(
                self.fs, self._key(rel), b"", st.st_size, shown=self._shown(rel),
                before_complete=lambda sha, size: self._record_written(
                    rel, {"size": size, "sha256": sha}))
            left = st.st_size
            try:
                while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
                    writer.write(chunk)
                    left -= len(chunk)
            except OutputError:
                raise  # the upload failed (already aborted)
            except OSError as e:
                writer.abort()
                raise OutputError(f"cannot copy {src}: {e.strerror or e}",
                                  file=self._shown(rel)) from e
            sha = writer.finish()
        finally:
            os.close(fd)
        self._records[rel] = {"size": st.st_size, "sha256": sha}

    def file_record(self, rel: str) -> dict[str, Any]:
        """Size and sha256 of a file this run wrote (as sent: nothing is read back)."""
        return self._records[rel]

    def complete(self) -> None:
        """The manifest is in place (written last): the state object goes."""
        try:
            self.fs.rm_file(self._key(STATE))
        except FileNotFoundError:
            pass
        except Exception as e:
            raise _io_error("remove the state object", self.url, e) from e
