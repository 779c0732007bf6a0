"""Which recipe strings are object-storage URLs (``s3://bucket/prefix``): text rules only.

Kept apart from io/remote.py so that the recipe loader (which imports neither torch nor fsspec,
and runs in the pre-commit hook's bare environment) can tell a URL from a path.
"""

from __future__ import annotations

import re

from recipekit.errors import hide_credentials, holds_credentials

#: ``proto://rest``: what a recipe writes for an object-storage input or output.
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", re.S)
#: Protocols that name local files: the path after ``proto://`` is used as a local path.
_LOCAL = {"file", "local"}
#: The pip extra that brings each protocol's backend.
EXTRAS = {"s3": "s3", "s3a": "s3"}
#: Protocols fsspec serves with another's backend (``s3a://b/k`` is the object ``s3://b/k``):
#: compared as that one.
ALIASES = {"s3a": "s3", "gcs": "gs", "az": "abfs"}


def is_url(text: str) -> bool:
    """Whether a recipe string names object storage (``s3://bucket/prefix``) rather than a
    local path. ``file://`` and plain paths are local."""
    m = _URL.match(text)
    return m is not None and m.group(1).lower() not in _LOCAL


def local_path_text(text: str) -> str:
    """The local path a ``file://`` (or ``local://``) URL names, as text (``file:///tmp/x`` ->
    ``/tmp/x``; ``file://models/a`` -> ``models/a``, relative as fsspec reads it); any other text
    unchanged.

    Why: fsspec protocols work wherever a path goes (README), and ``file`` is fsspec's local
    file system, so ``file:///tmp/x`` must name ``/tmp/x``. Used as a path as written it named
    a folder ``file:`` beside the recipe (``Path`` folds the ``//``), silently.
    """
    m = _URL.match(text)
    if m is not None and m.group(1).lower() in _LOCAL:
        return m.group(2)
    return text


def redact(text: str) -> str:
    """``text`` with the user and secret of a URL (``proto://user:secret@host/...``) replaced by
    ``***``, for messages about a refused URL: an error must never repeat a secret
    (`errors.hide_credentials`, which every message goes through too)."""
    return hide_credentials(text)


def url_location(url: str) -> tuple[str, tuple[str, ...]]:
    """(protocol, path segments) of ``url``, to compare two URLs by the objects they name.

    The protocol is lower-cased and an alias is read as its backend's (``s3a`` is ``s3``);
    empty segments (a trailing ``/``, a doubled ``//``) are dropped. s3fs keeps a doubled
    slash in a key, so ``s3://b/a//k`` and ``s3://b/a/k`` may be two objects; they compare
    equal here on purpose: the comparison decides what a run refuses to write, and a refusal
    there costs a retyped URL, whereas a miss writes into an input.
    """
    m = _URL.match(url)
    if m is None:
        return "file", tuple(s for s in url.split("/") if s)
    proto = m.group(1).lower()
    return ALIASES.get(proto, proto), tuple(s for s in m.group(2).split("/") if s)


def url_relation(a: str, b: str) -> str | None:
    """Whether the URL ``a`` "is", "lies inside" or "contains" the URL ``b`` (as
    `url_location` reads them), or None when they name apart objects."""
    (pa, sa), (pb, sb) = url_location(a), url_location(b)
    if pa != pb:
        return None
    if sa == sb:
        return "is"
    if sa[:len(sb)] == sb:
        return "lies inside"
    if sb[:len(sa)] == sa:
        return "contains"
    return None


def url_problem(text: str) -> str | None:
    """Why a URL cannot be used as written, or None. Credentials written into the URL
    (``proto://user:secret@host``) are refused: recipes, plans and manifests record URLs, and a
    secret must never land there. Configure them where the provider's tools look instead."""
    m = _URL.match(text)
    if m is None:
        return "is not a URL"
    host = m.group(2).split("/", 1)[0]
    if "@" in host or holds_credentials(text):  # a secret may hold "/" (AWS keys do)
        return ("holds credentials (user:secret@, or a token in its query); recipekit records "
                "URLs in plans and manifests, so secrets belong in the provider's environment "
                "variables or config files")
    if not m.group(2).strip("/"):
        return "names no bucket or path"
    return None


def protocol(url: str) -> str:
    m = _URL.match(url)
    return m.group(1).lower() if m else "file"
