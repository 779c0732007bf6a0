"""What model and adapter inputs share: where an input lives, and its shards' headers.

An input is a local directory, a hub repo pinned to a commit or a URL on object storage
(`locate_input`); its safetensors headers come from the confined local file, or for a hub shard
that is not cached yet or a remote object from ranged reads of its header (`shard_header`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from recipekit.errors import ExtraMissingError, RecipekitError, SourceNotFoundError
from recipekit.inputs.files import check_confined, lexists
from recipekit.inputs.hub import HubSnapshot, fetch_snapshot, remote_header, snapshot_identity
from recipekit.inputs.remote import RemoteSnapshot, fetch_remote, remote_shard_header
from recipekit.io.header import FileStamp, TensorInfo, read_header

if TYPE_CHECKING:  # the recipe package (yaml, the schema) is not loaded by inspect/diff
    from recipekit.recipe import ModelRef, Recipe


class InputFiles:
    """What plan hashing, manifests and locks ask of a resolved model or adapter input: its
    files and their identity. A subclass is a dataclass with ``path``, ``weight_files``,
    ``hub`` and ``remote`` fields and names its config file in ``CONFIG_NAME``."""

    CONFIG_NAME: ClassVar[str]
    path: Path
    tensors: dict[str, TensorInfo]
    weight_files: tuple[Path, ...]
    hub: HubSnapshot | None
    remote: RemoteSnapshot | None

    @property
    def config_path(self) -> Path:
        return self.path / self.CONFIG_NAME

    def identity(self) -> dict[str, Any]:
        """What the plan hash records: a local directory's path and each file's size and mtime,
        or a hub repo's pinned commit (which fixes every byte), or a URL's objects (size, ETag,
        version id).

        A weight file's size and mtime are those of the version its header was read from (the
        tensors' `FileStamp`), not what a ``stat`` sees now: a file that changed after planning
        must not make the output claim the new version (the executor refuses to read it)."""
        if self.remote is not None:
            return self.remote.identity()
        if self.hub is not None:
            return {"hub": self.hub.repo, "commit": self.hub.commit}
        stamps = {info.file: info.stamp for info in self.tensors.values()}
        files = {}
        for p in (self.config_path, *self.weight_files):
            st = stamps.get(p) or p.stat()
            size, mtime_ns = ((st.size, st.mtime_ns) if isinstance(st, FileStamp)
                              else (st.st_size, st.st_mtime_ns))
            files[p.name] = {"size": size, "mtime_ns": mtime_ns}
        return {"path": str(self.path), "files": files}

    def manifest_entry(self) -> dict[str, Any]:
        """What the manifest records: `identity`, plus each cached hub file's blob hash."""
        if self.remote is not None:
            return self.remote.identity()
        if self.hub is not None:
            return snapshot_identity(self.hub, [self.CONFIG_NAME,
                                                *(p.name for p in self.weight_files)])
        return self.identity()


#: A factory of errors located at one input's recipe key: ``located(cls, message, hint)``.
Located = Callable[..., RecipekitError]


Snapshot = HubSnapshot | RemoteSnapshot


def locate_input(ref: ModelRef, recipe: Recipe) -> tuple[Located, Path, Snapshot | None]:
    """For one model or adapter input: a factory of errors located at its recipe key, its
    local directory, and its hub or remote snapshot (non-weight files fetched; None for a local
    path).

    Raises:
        SourceNotFoundError: the hub repo or revision cannot be resolved (located).
    """
    where = ref.key_path

    def located(cls: type[RecipekitError], message: str, hint: str | None = None
                ) -> RecipekitError:
        return cls(message, key_path=where, hint=hint, location=recipe.document.locate(where))

    if ref.url is not None:
        try:
            remote = fetch_remote(ref.url)
        except ExtraMissingError:
            raise  # one line: the install command, wherever the URL is written
        except RecipekitError as e:
            raise located(type(e), e.message, e.hint) from None
        return located, remote.path, remote
    if ref.hub is None:
        assert ref.path is not None
        return located, ref.path, None
    try:
        snap = fetch_snapshot(ref.hub, ref.revision)
    except SourceNotFoundError as e:
        raise located(SourceNotFoundError, e.message, e.hint) from None
    return located, snap.path, snap


def shard_header(path: Path, root: Path, snap: Snapshot | None) -> dict[str, TensorInfo]:
    """A shard's tensors: from the file when present, else (hub, URL) from its remote header.

    Raises:
        UnsupportedCheckpointError: the file is a symlink out of ``root`` or a special file.
        CorruptCheckpointError: a damaged header.
        SourceNotFoundError: a hub shard whose header cannot be fetched.
    """
    if lexists(path) or snap is None:
        check_confined(path, root)
        return read_header(path)
    if isinstance(snap, RemoteSnapshot):
        return remote_shard_header(snap, path.relative_to(snap.path).as_posix())
    return remote_header(snap, path.name)


def split_snapshot(snap: Snapshot | None) -> dict[str, Any]:
    """The ``hub`` and ``remote`` fields of a checkpoint resolved from ``snap``."""
    return {"hub": snap if isinstance(snap, HubSnapshot) else None,
            "remote": snap if isinstance(snap, RemoteSnapshot) else None}
