"""Read and build safetensors headers without reading tensor data.

The format: an 8-byte little-endian header length N, N bytes of JSON mapping each tensor name to
``{dtype, shape, data_offsets: [begin, end]}`` (offsets relative to the data section) plus an
optional ``__metadata__`` string map, then the data. Reading only headers lets `validate` and
`plan` check a 70B recipe in milliseconds; building headers up front lets the writer put every
tensor straight into its final place.

Headers are untrusted input. `read_header` accepts what the reference safetensors library (the
Rust crate behind ``safe_open``) accepts and refuses the rest with a message naming the file and
the tensor: strict UTF-8 JSON, one object, no duplicate keys, non-negative integer shapes and
offsets below 2**64, each tensor's bytes matching its shape and dtype, and the tensors tiling the
data section exactly (no gaps, no overlaps, no trailing bytes). Tensor names are opaque strings:
they are never used as paths, and messages show them with control characters escaped.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recipekit.dtypes import DTYPES, FP8_CODES
from recipekit.errors import (
    ECHO_LIMIT,
    CorruptCheckpointError,
    UnsupportedCheckpointError,
    display_path,
    echo_text,
)

MAX_HEADER = 100_000_000  # the safetensors library's own limit (MAX_HEADER_SIZE, in bytes)
METADATA = {"format": "pt"}
#: Sub-byte float codes the safetensors library knows (fp4/fp6): quantized, out of scope.
SUBBYTE_CODES = frozenset({"F4", "F6_E2M3", "F6_E3M2"})
_U64 = 1 << 64
_NOT_SAFETENSORS = "the file is damaged or not safetensors; download or convert it again"
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


@dataclass(frozen=True)
class FileStamp:
    """Which version of a local file a header was read from: its size, modification time and
    inode (``os.fstat`` of the descriptor the header was read through).

    Why: a plan's byte offsets hold only for the version whose header was read. The executor
    compares each input file it opens, and again after each shard's reads, with the stamp
    (`io.reader.FileReader`), so that another version, or a rewrite in place during the run,
    is refused instead of being read at the old offsets; the plan hash and the manifest record
    these stamps, not what a later ``stat`` sees.
    """

    size: int
    mtime_ns: int
    dev: int
    ino: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileStamp:
        return cls(st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino)

    def change(self, st: os.stat_result, *, inode: bool = True) -> str | None:
        """How the file ``st`` describes differs from this version (None: it is this one).
        ``inode``: compare device and inode numbers too (not across machines: another node's
        mount of a shared file system has its own device numbers)."""
        if st.st_size != self.size:
            return f"it has {st.st_size} bytes, the version planned from {self.size}"
        if inode and (st.st_dev, st.st_ino) != (self.dev, self.ino):
            return "it was replaced by another file"
        if st.st_mtime_ns != self.mtime_ns:
            return "its modification time moved"
        return None


@dataclass(frozen=True)
class TensorInfo:
    """Where one stored tensor lives: file, absolute byte offset, size, dtype and shape, and
    the version of the file its header was read from (``stamp``; None for a remote object,
    whose ETag says it, and a hub shard not downloaded yet)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute, in the file; -1 while the file is only known from a remote header
    nbytes: int
    stamp: FileStamp | None = field(default=None, compare=False, repr=False)


def quote_name(name: str, limit: int = ECHO_LIMIT) -> str:
    """A tensor (or file) name for a message: backquoted, shortened and escaped (`echo_text`),
    so a hostile name cannot forge lines of output."""
    return f"`{echo_text(name, limit)}`"


def kind_of(value: Any) -> str:
    """What a JSON value is, for messages: ``a list``, ``the number 5``, ``'abc'``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:40] + "...")
    text = repr(value)
    return "the number " + (text if len(text) <= 40 else text[:40] + "...")


class _JsonProblem(ValueError):
    pass


def parse_json(raw: bytes, shown: str, what: str, *, strict: bool = True,
               hint: str = _NOT_SAFETENSORS) -> Any:
    """Parse untrusted JSON bytes as the reference readers do, or raise CorruptCheckpointError.

    Always: strict UTF-8 (no UTF-16/32 guessing), no lone surrogates (they cannot be written
    back out), bounded nesting and number sizes, never a RecursionError. With ``strict`` (headers
    and indexes, read by the Rust serde_json in safetensors): no NaN/Infinity, and no duplicate
    keys, which Python's json would silently resolve to the last one.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorruptCheckpointError(f"{what} is not valid UTF-8 (byte {e.start})", file=shown,
                                     hint=hint) from None
    dups: list[tuple[str, dict]] = []

    def pairs(items: list[tuple[str, Any]]) -> dict:
        d = dict(items)
        if len(d) != len(items) and not dups:
            seen: set[str] = set()
            dups.append((next(k for k, _ in items if k in seen or seen.add(k)), d))
        return d

    def constant(c: str) -> Any:
        raise _JsonProblem(f"{c} is not a JSON value")

    kwargs: dict[str, Any] = {"object_pairs_hook": pairs, "parse_constant": constant} \
        if strict else {}
    try:
        doc = json.loads(text, **kwargs)
    except RecursionError:
        raise CorruptCheckpointError(f"{what} is nested too deeply to be JSON from a model "
                                     "checkpoint", file=shown, hint=hint) from None
    except _JsonProblem as e:
        raise CorruptCheckpointError(f"{what} is not valid JSON ({e})", file=shown,
                                     hint=hint) from None
    except ValueError as e:  # JSONDecodeError, and numbers with too many digits
        why = "a number has thousands of digits" if "integer string conversion" in str(e) \
            else str(e)
        raise CorruptCheckpointError(f"{what} is not valid JSON ({why})", file=shown,
                                     hint=hint) from None
    if dups:
        raise CorruptCheckpointError(f"{what} {_duplicate(doc, *dups[0])}; JSON readers would "
                                     "silently keep only the last", file=shown, hint=hint)
    if _SURROGATE_ESCAPE.search(raw):
        _check_surrogates(doc, shown, what, hint)
    return doc


def _check_surrogates(doc: Any, shown: str, what: str, hint: str) -> None:
    """A document whose bytes escape a surrogate must still encode as UTF-8 (no lone one)."""
    try:
        json.dumps(doc, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise CorruptCheckpointError(f"{what} holds a lone UTF-16 surrogate escape "
                                     "(\\ud800-\\udfff), which is not valid Unicode",
                                     file=shown, hint=hint) from None
    except RecursionError:
        raise CorruptCheckpointError(f"{what} is nested too deeply to be JSON from a model "
                                     "checkpoint", file=shown, hint=hint) from None


def _duplicate(doc: Any, key: str, where: dict) -> str:
    """Where a JSON document repeats ``key`` (in the object ``where``), for a message."""
    if where is doc:
        return f"lists {'' if key == '__metadata__' else 'tensor '}{quote_name(key)} twice"
    owner = next((k for k, v in doc.items() if v is where), None) if isinstance(
        doc, dict) else None
    return (f"has the key {quote_name(key)} twice in the entry for {quote_name(owner)}"
            if owner is not None else f"has the key {quote_name(key)} twice in a nested object")


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors file's header and check it against the file's size.

    Raises:
        CorruptCheckpointError: short file, header length beyond the file or above the
            safetensors limit, JSON that is not UTF-8, not an object, or has duplicate keys,
            malformed entries, offsets that do not match shapes, tensors that overlap or leave
            gaps or trailing bytes, or data that runs past the end of the file (truncated).
        UnsupportedCheckpointError: fp8, fp4/fp6 or unknown dtypes.
    """
    shown = display_path(path)
    st, n, raw = _read_raw(path, shown)
    return parse_header(raw, size=st.st_size, data_start=8 + n, file=path, shown=shown,
                        stamp=FileStamp.of(st))


def parse_header(raw: bytes, *, size: int, data_start: int, file: Path, shown: str,
                 stamp: FileStamp | None = None) -> dict[str, TensorInfo]:
    """`read_header`'s checks on header bytes already read (``size``: the file's; an object
    store's header comes from ranged reads, io/remote.py), each tensor located in ``file``
    (whose version is ``stamp``)."""
    header = parse_json(raw, shown, "header")
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"header is {kind_of(header)}, not a JSON object", file=shown,
                                     hint=_NOT_SAFETENSORS)
    data_len = size - data_start
    out: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            check_metadata(entry, shown)
            continue
        dtype, shape, (begin, end), nbytes = check_entry(name, entry, shown)
        if end > data_len:
            raise CorruptCheckpointError(
                f"file is truncated: tensor {quote_name(name)} ends at byte {data_start + end} "
                f"but the file has {size} bytes", file=shown,
                hint="download or convert the checkpoint again")
        spans.append((begin, end, name))
        out[name] = TensorInfo(name, dtype, shape, file, data_start + begin, nbytes, stamp)
    check_layout(spans, data_len, data_start, shown)
    return out


def read_raw_header(path: Path, shown: str) -> tuple[int, int, bytes]:
    """(file size, header length, header bytes) of a safetensors file, the length checked
    against the file and the format's limit (the JSON is `read_header`'s to check).

    Raises:
        CorruptCheckpointError: unreadable, too short, a length beyond the file or the limit.
    """
    st, n, raw = _read_raw(path, shown)
    return st.st_size, n, raw


def _read_raw(path: Path, shown: str) -> tuple[os.stat_result, int, bytes]:
    """`read_raw_header` with the file's ``fstat`` (taken before its first byte is read)."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            size = st.st_size
            head = f.read(8)
            if len(head) < 8:
                raise CorruptCheckpointError(
                    f"file is {size} bytes, shorter than a safetensors header", file=shown,
                    hint="the file is truncated or not safetensors; download or convert it again")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER:
                raise CorruptCheckpointError(
                    f"header length {n} exceeds the safetensors limit of {MAX_HEADER} bytes",
                    file=shown, hint=_NOT_SAFETENSORS)
            if n > size - 8:
                raise CorruptCheckpointError(
                    f"header length {n} runs beyond the end of the file ({size} bytes)",
                    file=shown,
                    hint="the file is truncated or not safetensors; download or convert it again")
            raw = f.read(n)
    except OSError as e:
        raise CorruptCheckpointError(f"cannot read: {e.strerror or e}", file=shown) from e
    if len(raw) < n:
        raise CorruptCheckpointError(f"file ended inside its {n}-byte header", file=shown,
                                     hint="the file changed while being read; run again")
    return st, n, raw


def check_metadata(meta: Any, shown: str) -> None:
    """``__metadata__``: absent, null, or an object of string values (as safetensors requires)."""
    if meta is None:
        return
    if not isinstance(meta, dict):
        raise CorruptCheckpointError(f"header `__metadata__` is {kind_of(meta)}, not an object of "
                                     "strings", file=shown, hint=_NOT_SAFETENSORS)
    for key, value in meta.items():
        if not isinstance(value, str):
            raise CorruptCheckpointError(
                f"header `__metadata__` maps {quote_name(key)} to {kind_of(value)}, not a string",
                file=shown, hint=_NOT_SAFETENSORS)


def check_entry(name: str, entry: Any, shown: str
                ) -> tuple[str, tuple[int, ...], tuple[int, int], int]:
    """Check one header entry; return its dtype, shape, data offsets and byte size.

    Shapes and offsets are unsigned 64-bit integers in the reference implementation, and the
    byte size computed from the shape must not overflow 64 bits.
    """
    label = f"tensor {quote_name(name)}"
    if not isinstance(entry, dict):
        raise CorruptCheckpointError(f"the header entry of {label} is {kind_of(entry)}, not an "
                                     "object", file=shown, hint=_NOT_SAFETENSORS)
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise CorruptCheckpointError(f"the header entry of {label} has no `{key}`",
                                         file=shown, hint=_NOT_SAFETENSORS)
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str):
        raise CorruptCheckpointError(f"{label} has the dtype {kind_of(dtype)}, not a dtype "
                                     "name", file=shown, hint=_NOT_SAFETENSORS)
    check_dtype(name, dtype, shown)
    if not isinstance(shape, list) or not all(_is_u64(d) for d in shape):
        bad = next((d for d in shape if not _is_u64(d)), None) if isinstance(shape, list) \
            else shape
        raise CorruptCheckpointError(
            f"{label} has an invalid shape: {kind_of(bad)} is not a dimension (dimensions are "
            "integers from 0 to 2**64-1)", file=shown, hint=_NOT_SAFETENSORS)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_u64, offsets))):
        raise CorruptCheckpointError(
            f"{label} has invalid `data_offsets` ({_short(offsets)}); they are two integers "
            "[begin, end] from 0 to 2**64-1", file=shown, hint=_NOT_SAFETENSORS)
    begin, end = offsets
    if end < begin:
        raise CorruptCheckpointError(f"{label} has `data_offsets` [{begin}, {end}] that end "
                                     "before they begin", file=shown, hint=_NOT_SAFETENSORS)
    nbytes = DTYPES[dtype][0]
    for d in shape:  # stop at the first overflow: a hostile shape must not build a huge int
        nbytes *= d
        if nbytes >= _U64:
            raise CorruptCheckpointError(
                f"{label} has shape {_short(shape)}, whose size in bytes overflows 64 bits",
                file=shown, hint=_NOT_SAFETENSORS)
    if end - begin != nbytes:
        raise CorruptCheckpointError(
            f"tensor {quote_name(name)} occupies {end - begin} bytes but "
            f"{dtype}{_short(shape)} needs {nbytes}", file=shown, hint="the file is damaged")
    return dtype, tuple(shape), (begin, end), nbytes


def check_layout(spans: list[tuple[int, int, str]], data_len: int, data_start: int,
                 shown: str) -> None:
    """The tensors must tile the data section exactly, as the safetensors library requires:
    sorted by offsets, each begins where the previous one ended, and the last ends at the end
    of the file. Overlaps would let two tensors alias bytes; gaps and trailing bytes hide data
    no tensor owns."""
    pos, prev = 0, None
    for begin, end, name in sorted(spans):
        if begin < pos:
            assert prev is not None
            raise CorruptCheckpointError(
                f"tensor {quote_name(name)} (data bytes {begin}-{end}) overlaps tensor "
                f"{quote_name(prev)}, which ends at data byte {pos}", file=shown,
                hint="the file is damaged or crafted; the safetensors library refuses it too")
        if begin > pos:
            after = f"after tensor {quote_name(prev)}" if prev is not None else \
                "at the start of the data section"
            raise CorruptCheckpointError(
                f"{begin - pos} bytes {after} belong to no tensor (tensor {quote_name(name)} "
                f"starts at data byte {begin}, expected {pos})", file=shown,
                hint="the file is damaged or crafted; the safetensors library refuses it too")
        pos, prev = end, name
    if pos != data_len:
        raise CorruptCheckpointError(
            f"the last {data_len - pos} bytes of the file (from byte {data_start + pos}) belong "
            "to no tensor", file=shown,
            hint="the file is damaged or has data appended; the safetensors library refuses it "
            "too")


def _is_u64(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _U64


def _short(values: Any, limit: int = 8) -> str:
    """A shape or offsets list for a message, cut after ``limit`` items."""
    if not isinstance(values, list):
        return kind_of(values)
    items = [str(v) if _is_u64(v) else kind_of(v) for v in values[:limit]]
    return "[" + ", ".join(items) + (", ..." if len(values) > limit else "") + "]"


def check_dtype(name: str, dtype: str, shown: str) -> None:
    """Refuse fp8/fp4/fp6 (out of scope, DESIGN.md §5) and dtypes recipekit does not know."""
    if dtype in FP8_CODES:
        raise UnsupportedCheckpointError(
            f"tensor {quote_name(name)} is {dtype}: fp8 checkpoints are not supported in "
            "version 1", file=shown, hint="use the unquantized (bf16/fp16/fp32) checkpoint")
    if dtype in SUBBYTE_CODES:
        raise UnsupportedCheckpointError(
            f"tensor {quote_name(name)} is {dtype}: fp4/fp6 checkpoints are not supported in "
            "version 1", file=shown, hint="use the unquantized (bf16/fp16/fp32) checkpoint")
    if dtype not in DTYPES:
        raise UnsupportedCheckpointError(
            f"tensor {quote_name(name)} has unknown dtype {dtype[:40]!r}", file=shown,
            hint="supported: " + ", ".join(DTYPES))


def build_header(entries: Sequence[tuple[str, str, tuple[int, ...]]]) -> tuple[bytes, list[int]]:
    """Build a safetensors header for tensors laid out back to back in the given order.

    Returns the header bytes (length prefix included, padded with spaces to a multiple of 8 as
    the safetensors library does) and each tensor's offset within the data section. Metadata is
    exactly ``{"format": "pt"}``, which transformers requires.
    """
    doc: dict[str, object] = {"__metadata__": METADATA}
    offsets = []
    pos = 0
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * DTYPES[dtype][0]
        doc[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        offsets.append(pos)
        pos += nbytes
    body = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body, offsets
