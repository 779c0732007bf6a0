"""A moto S3 server on a free loopback port, with a log of every request it receives.

Why a helper: the object-storage tests (tests/inputs/test_remote.py) and the Ray tests (a
cluster whose worker processes upload shards, tests/run/test_ray.py) point s3fs at the same
kind of server through the environment, exactly as a user points recipekit at a bucket.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BUCKET = "recipekit-test"


class RequestLog:
    """Requests the server received: (method, path, query, Range header)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str, str, str | None]] = []

    def app(self, inner: Any) -> Any:
        def wrapped(environ: dict[str, Any], start_response: Any) -> Any:
            with self.lock:
                self.requests.append((environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""),
                                      environ.get("QUERY_STRING", ""),
                                      environ.get("HTTP_RANGE")))
            return inner(environ, start_response)
        return wrapped

    def clear(self) -> None:
        with self.lock:
            self.requests.clear()

    def gets(self, key: str) -> list[tuple[int, int]]:
        """The byte ranges [start, end) of every GET of ``key`` (a GET without Range fails)."""
        out = []
        for method, path, _, rng in self.requests:
            if method == "GET" and path == f"/{BUCKET}/{key}":
                assert rng is not None, f"unranged GET of {key}"
                a, b = re.fullmatch(r"bytes=(\d+)-(\d+)", rng).groups()  # type: ignore[union-attr]
                out.append((int(a), int(b) + 1))
        return out

    def writes(self, key: str) -> list[tuple[str, str]]:
        return [(m, q) for m, p, q, _ in self.requests
                if m in ("PUT", "POST") and p == f"/{BUCKET}/{key}"]


@contextlib.contextmanager
def moto_server(home: Path) -> Iterator[tuple[RequestLog, dict[str, str]]]:
    """Serve S3 on 127.0.0.1 until the block ends; yield the request log and the environment
    that points s3fs/botocore at it, fail-closed (config files under ``home``, no instance
    metadata). The caller sets the environment where it needs it. fsspec keeps one
    filesystem per set of arguments, whatever the environment says: those of an earlier server
    are dropped on the way in and out."""
    import s3fs
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    s3fs.S3FileSystem.clear_instance_cache()

    log = RequestLog()
    server = make_server("127.0.0.1", 0, log.app(DomainDispatcherApplication(create_backend_app)),
                         threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.server_port}",
           "AWS_CONFIG_FILE": str(home / "config"),
           "AWS_SHARED_CREDENTIALS_FILE": str(home / "credentials")}
    try:
        yield log, env
    finally:
        server.shutdown()
        thread.join()
        s3fs.S3FileSystem.clear_instance_cache()
