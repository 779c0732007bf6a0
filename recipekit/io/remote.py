"""Object storage through fsspec: which strings are URLs, the filesystem for one, ranged reads.

Why fsspec: one interface reaches S3 (s3fs), GCS, Azure and others, each with its provider's own
credential chain (environment variables, config files, instance roles), so recipekit never
handles a credential itself. fsspec and its backends are imported only when a recipe names a URL:
local recipes, ``import recipekit`` and the CLI's start-up never load them.

Reads are ``cat_file(path, start, end)``: one ranged GET each, no HEAD and no read-ahead block
(`fs.open` would fetch a 50 MiB block, or the whole file, for an 8-byte read; measured in
shared/reference/cluster.md §2.1). On S3 each ranged read of an input is pinned to the ETag the
plan was made from (``If-Match``), so an object replaced during a run is refused by the server
instead of being read (`cat_range`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from recipekit.errors import (
    CorruptCheckpointError,
    ExtraMissingError,
    SourceNotFoundError,
    TensorDataError,
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


#: The hint for a missing credential or a broken configuration (never the credentials).
CREDENTIALS_HINT = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE (a profile "
                    "in ~/.aws/credentials), or run where an instance role applies; for an "
                    "S3-compatible store also set AWS_ENDPOINT_URL")
#: The hint for an endpoint that cannot be reached.
ENDPOINT_HINT = ("check that the endpoint is up and reachable from here, and AWS_ENDPOINT_URL "
                 "(or endpoint_url in the AWS config file) for an S3-compatible store")
#: The hint for any other failure of a request.
REQUEST_HINT = "check the URL, your credentials and the endpoint (AWS_ENDPOINT_URL)"

#: botocore's errors that mean credentials or configuration are missing or wrong, by class
#: name (subclasses included): nothing can be read until the environment is fixed.
_CONFIG_ERRORS = frozenset({
    "NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
    "UnknownCredentialError", "ProfileNotFound", "ConfigNotFound", "ConfigParseError",
    "InvalidConfigError", "NoRegionError", "InvalidRegionError"})
#: botocore's errors that mean the endpoint could not be reached or stopped answering (and
#: every aiohttp error: its requests are s3fs's transport).
_CONNECTION_ERRORS = frozenset({
    "EndpointConnectionError", "ConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
    "ConnectionClosedError", "HTTPClientError", "ResponseStreamingError"})


def remote_errors() -> tuple[type[BaseException], ...]:
    """What an fsspec call on object storage raises when the store cannot be used: OSError
    (s3fs turns the server's error responses into it: 403, 404, 412) and, not OSError,
    botocore's own errors (no credentials, a profile that does not exist, an endpoint that
    cannot be reached, timeouts) and aiohttp's (a connection dropped in a response body).

    Why a list and not ``Exception``: anything else is a bug of ours or of a backend and keeps
    its traceback (the CLI reports it as an internal error).
    """
    found: list[type[BaseException]] = [OSError]
    try:
        from botocore.exceptions import BotoCoreError
        found.append(BotoCoreError)
    except ImportError:  # another protocol's backend: its errors are OSError
        pass
    try:
        from aiohttp import ClientError
        found.append(ClientError)
    except ImportError:
        pass
    return tuple(found)


@dataclass(frozen=True)
class RemoteFailure:
    """Why a request to object storage failed, in words for a message (no credential is ever
    quoted): ``what`` follows "cannot read URL: ", ``hint`` says what to do, ``config`` is
    True for missing credentials or a broken configuration (exit 2 where the caller is
    starting: nothing can be read until the environment is fixed), False for the network or
    the server (exit 1 during a run)."""

    what: str
    hint: str
    config: bool


def describe_failure(e: BaseException) -> RemoteFailure:
    """``e`` (one of `remote_errors`) as a `RemoteFailure`."""
    names = {c.__name__ for c in type(e).__mro__}
    if names & _CONFIG_ERRORS:
        what = "no credentials were found" if "NoCredentialsError" in names else str(e)
        return RemoteFailure(what, CREDENTIALS_HINT, True)
    if names & _CONNECTION_ERRORS or type(e).__module__.startswith("aiohttp"):
        endpoint = getattr(e, "kwargs", {}).get("endpoint_url")
        if isinstance(endpoint, str) and "://" in endpoint:
            parts = urlsplit(endpoint)  # the scheme and host only: never a query or user info
            host = parts.hostname or ""
            if parts.port is not None:
                host += f":{parts.port}"
            return RemoteFailure(f"could not connect to the endpoint {parts.scheme}://{host}",
                                 ENDPOINT_HINT, False)
        return RemoteFailure(f"the connection to the endpoint failed ({type(e).__name__}: "
                             f"{e})", ENDPOINT_HINT, False)
    return RemoteFailure(str(e) or type(e).__name__, REQUEST_HINT, False)


def is_pinnable(fs: Any) -> bool:
    """Whether ranged reads through ``fs`` can be made conditional on an ETag (s3fs: GetObject
    takes ``IfMatch``). Other backends are checked after each shard instead
    (`FileReader.check_unchanged`)."""
    return hasattr(fs, "_call_s3") and hasattr(fs, "loop")


def cat_range(url: str, start: int, end: int, *, etag: str | None = None) -> bytes:
    """Bytes ``start:end`` of the object at ``url`` (one ranged GET).

    ``etag``: the version of the object the plan was made from. On S3 the read is conditional
    on it (``If-Match``), so a version uploaded since is refused by the server and never read:
    a ranged read carries no version otherwise, and an object re-uploaded during a run (same
    size) would give the rest of the run bytes of the new version at the old version's offsets.

    Raises:
        TensorDataError: the object is no longer the version ``etag`` names.
        OSError and the rest of `remote_errors`: the request failed (the caller says which
            input, and how that ends).
    """
    fs, path = open_fs(url)
    if etag and is_pinnable(fs):
        return _cat_if_match(fs, path, start, end, etag, url)
    # keywords: s3fs takes a version id as the second positional argument
    return fs.cat_file(path, start=start, end=end)  # type: ignore[no-any-return]


def _cat_if_match(fs: Any, path: str, start: int, end: int, etag: str, url: str) -> bytes:
    """One ranged GetObject with ``IfMatch``, through s3fs's own client, session and retries.

    Why not ``fs.cat_file``: s3fs passes no extra request parameters to GetObject (a version
    id only, which unversioned buckets do not have); ``_call_s3`` takes any."""
    from fsspec.asyn import sync

    bucket, key, _ = fs.split_path(path)

    async def get() -> bytes:
        import asyncio

        for attempt in range(BODY_TRIES):
            resp = await fs._call_s3("get_object", Bucket=bucket, Key=key,
                                     Range=f"bytes={start}-{end - 1}", IfMatch=f'"{etag}"')
            try:
                return await resp["Body"].read()  # type: ignore[no-any-return]
            except _body_errors():
                if attempt == BODY_TRIES - 1:
                    raise
            finally:
                resp["Body"].close()
            await asyncio.sleep(0.2 * 2 ** attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    try:
        return sync(fs.loop, get)  # type: ignore[no-any-return]
    except OSError as e:
        if _error_code(e) != "PreconditionFailed":
            raise
    raise TensorDataError(
        f"the object changed during the run (its ETag is no longer {etag}, the version the "
        "plan read): nothing more is read from it, and a shard being written, which could mix "
        "bytes of two versions, is discarded", file=url,
        hint="finished shards are kept; run again once nothing writes to the object, to plan "
        "from its current version (an output begun from the old one then needs --force)")


#: Reads of one ranged GET's body: a connection dropped mid-body is tried again (the request
#: itself is retried by s3fs's client; its body is not, where s3fs's own `cat_file` retries
#: it). Safe: every try is pinned to the same ETag, so it reads the same bytes or is refused.
BODY_TRIES = 4


def _body_errors() -> tuple[type[BaseException], ...]:
    """What a response body's read raises when the connection drops or stalls mid-body."""
    import asyncio

    found: list[type[BaseException]] = [ConnectionError, asyncio.TimeoutError]
    try:
        from aiohttp import ClientPayloadError, ServerDisconnectedError
        found += [ClientPayloadError, ServerDisconnectedError]
    except ImportError:  # pragma: no cover - s3fs depends on aiohttp
        pass
    try:
        from botocore.exceptions import ResponseStreamingError
        found.append(ResponseStreamingError)
    except ImportError:  # pragma: no cover - older botocore
        pass
    return tuple(found)


def _error_code(e: BaseException) -> str | None:
    """The S3 error code behind an OSError s3fs raised from botocore's ClientError."""
    cause = e.__cause__ or e.__context__
    response = getattr(cause, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        return str(code) if code is not None else None
    return None


def object_changed(path: RemotePath) -> str | None:
    """Why the object behind ``path`` is no longer the version its ETag names (one HEAD), or
    None when it is the same.

    Raises:
        OSError and the rest of `remote_errors`: the request failed.
    """
    if not path.etag:
        return None
    fs, key = open_fs(path.url)
    fs.invalidate_cache(key)
    info = fs.info(key)
    now = str(info.get("ETag") or info.get("etag") or "").strip('"')
    return None if now == path.etag else f"ETag {now or 'none'}, planned {path.etag}"


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
        (n,) = struct.unpack("<Q", cat_range(file.url, 0, 8, etag=file.etag))
        if n > MAX_HEADER:
            raise CorruptCheckpointError(
                f"header length {n} exceeds the safetensors limit of {MAX_HEADER} bytes",
                file=shown, hint="the object is damaged or not safetensors")
        if n > size - 8:
            raise CorruptCheckpointError(
                f"header length {n} runs beyond the end of the file ({size} bytes)", file=shown,
                hint="the object is truncated or not safetensors; upload it again")
        raw = cat_range(file.url, 8, 8 + n, etag=file.etag)
    except remote_errors() as e:
        failure = describe_failure(e)
        raise SourceNotFoundError(f"cannot read the header: {failure.what}", file=shown,
                                  hint=failure.hint) from None
    return parse_header(raw, size=size, data_start=8 + n, file=file, shown=shown)
