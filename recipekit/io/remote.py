"""Object storage through fsspec: which strings are URLs, the filesystem for one, ranged reads.

Why fsspec: one interface reaches S3 (s3fs), GCS, Azure and others, each with its provider's own
credential chain (environment variables, config files, instance roles), so recipekit never
handles a credential itself. fsspec and its backends are imported only when a recipe names a URL:
local recipes, ``import recipekit`` and the CLI's start-up never load them.

Reads are ``cat_file(path, start, end)``: one ranged GET each, no HEAD and no read-ahead block
(`fs.open` would fetch a 50 MiB block, or the whole file, for an 8-byte read; measured in
shared/reference/cluster.md §2.1).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from recipekit.errors import (
    CorruptCheckpointError,
    ExtraMissingError,
    SourceNotFoundError,
    UsageError,
)
from recipekit.io.header import MAX_HEADER, TensorInfo, parse_header
from recipekit.io.urls import EXTRAS, protocol, redact, url_problem


def open_fs(url: str) -> tuple[Any, str]:
    """(the fsspec filesystem for ``url``, the path within it, without a trailing slash).

    Raises:
        ExtraMissingError: fsspec or the protocol's backend (s3fs) is not installed (exit 2).
        SourceNotFoundError: fsspec does not know the protocol.
        UsageError: the URL holds credentials or names no bucket (`url_problem`; exit 2).
            Every URL recipekit opens passes here, so a secret in one that no earlier check
            saw (`verify`, an API call) is refused, shown as ``***@``, before a backend can
            put it into an error message.
    """
    problem = url_problem(url)
    if problem is not None:
        raise UsageError(f"the URL {redact(url)} {problem}",
                         hint="write it as proto://bucket/prefix")
    proto = protocol(url)
    extra = EXTRAS.get(proto, "s3")
    try:
        import fsspec
    except ImportError:
        raise ExtraMissingError(
            f"{url} is a URL, and reading or writing URLs needs fsspec, which is not installed",
            hint=f"pip install 'recipekit[{extra}]'") from None
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except ImportError as e:
        if proto in EXTRAS:
            raise ExtraMissingError(f"{proto}:// URLs need s3fs, which is not installed",
                                    hint=f"pip install 'recipekit[{extra}]'") from None
        raise ExtraMissingError(f"{proto}:// URLs need an fsspec backend that is not installed "
                                f"({e})", hint="install the backend fsspec names") from None
    except ValueError as e:
        raise SourceNotFoundError(f"{url}: {e}", hint="check the URL's protocol") from None
    return fs, str(path).rstrip("/")


class RemotePath(type(Path())):  # type: ignore[misc]
    """A placeholder local path (the stub directory of a remote input) that also says where the
    bytes are: ``url`` and the object's ``etag``.

    Why a Path: every message, plan and manifest names a tensor's file by a Path, and only the
    reader needs to know the bytes are remote (`FileReader` dispatches on this type), so the
    executor, the plan and its Ray tasks (which pickle it) stay unchanged.
    """

    url: str
    etag: str | None

    @classmethod
    def make(cls, local: Path, url: str, etag: str | None) -> RemotePath:
        p = cls(local)
        p.url, p.etag = url, etag
        return p

    def __reduce__(self) -> tuple[Any, ...]:
        return (_remote_path, (str(self), self.url, self.etag))


def _remote_path(local: str, url: str, etag: str | None) -> RemotePath:
    return RemotePath.make(Path(local), url, etag)


def is_remote(path: Path) -> bool:
    return isinstance(path, RemotePath) and hasattr(path, "url")


def cat_range(url: str, start: int, end: int) -> bytes:
    """Bytes ``start:end`` of the object at ``url`` (one ranged GET).

    Raises:
        TensorDataError / CorruptCheckpointError are the caller's: this raises OSError.
    """
    fs, path = open_fs(url)
    # keywords: s3fs takes a version id as the second positional argument
    return fs.cat_file(path, start=start, end=end)  # type: ignore[no-any-return]


def read_remote_header(file: RemotePath, size: int) -> dict[str, TensorInfo]:
    """A remote safetensors object's tensors from two ranged reads: the 8-byte header length,
    then the header alone. Offsets are absolute, so the executor reads each tensor by range.

    Raises:
        CorruptCheckpointError: the header is damaged (the same checks as a local file).
        SourceNotFoundError: the object cannot be read.
    """
    shown = file.url
    if size < 8:
        raise CorruptCheckpointError(f"file is {size} bytes, shorter than a safetensors header",
                                     file=shown, hint="the object is truncated or not "
                                     "safetensors; upload it again")
    try:
        (n,) = struct.unpack("<Q", cat_range(file.url, 0, 8))
        if n > MAX_HEADER:
            raise CorruptCheckpointError(
                f"header length {n} exceeds the safetensors limit of {MAX_HEADER} bytes",
                file=shown, hint="the object is damaged or not safetensors")
        if n > size - 8:
            raise CorruptCheckpointError(
                f"header length {n} runs beyond the end of the file ({size} bytes)", file=shown,
                hint="the object is truncated or not safetensors; upload it again")
        raw = cat_range(file.url, 8, 8 + n)
    except OSError as e:
        raise SourceNotFoundError(f"cannot read the header: {e}", file=shown,
                                  hint="check the URL, your credentials and the endpoint "
                                  "(AWS_ENDPOINT_URL)") from None
    return parse_header(raw, size=size, data_start=8 + n, file=file, shown=shown)
