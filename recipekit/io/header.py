"""Read and build safetensors headers without reading tensor data.

The format: an 8-byte little-endian header length N, N bytes of JSON mapping each tensor name to
``{dtype, shape, data_offsets: [begin, end]}`` (offsets relative to the data section) plus an
optional ``__metadata__`` string map, then the data. Reading only headers lets `validate` and
`plan` check a 70B recipe in milliseconds; building headers up front lets the writer put every
tensor straight into its final place.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from recipekit.dtypes import DTYPES, FP8_CODES
from recipekit.errors import CorruptCheckpointError, UnsupportedCheckpointError

MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit
METADATA = {"format": "pt"}


@dataclass(frozen=True)
class TensorInfo:
    """Where one stored tensor lives: file, absolute byte offset, size, dtype and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute, in the file; -1 while the file is only known from a remote header
    nbytes: int


def display_path(path: Path) -> str:
    """A path as a user wants to read it: relative to the working directory when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors file's header and check it against the file's size.

    Raises:
        CorruptCheckpointError: short file, header length beyond the file, bad JSON, offsets that
            do not match shapes, or data that runs past the end of the file (truncated).
        UnsupportedCheckpointError: fp8 or unknown dtypes.
    """
    shown = display_path(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CorruptCheckpointError(
                    f"file is {size} bytes, shorter than a safetensors header", file=shown,
                    hint="the file is truncated or not safetensors; download or convert it again")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CorruptCheckpointError(
                    f"header length {n} runs beyond the end of the file ({size} bytes)",
                    file=shown,
                    hint="the file is truncated or not safetensors; download or convert it again")
            if n > MAX_HEADER:
                raise CorruptCheckpointError(f"header length {n} exceeds {MAX_HEADER} bytes",
                                             file=shown, hint="the file is not safetensors")
            raw = f.read(n)
    except OSError as e:
        raise CorruptCheckpointError(f"cannot read: {e.strerror or e}", file=shown) from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"header is not valid JSON ({e})", file=shown,
                                     hint="the file is damaged or not safetensors") from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError("header is not a JSON object", file=shown)
    data_start = 8 + n
    data_len = size - data_start
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CorruptCheckpointError(f"header entry for `{name}` is malformed",
                                         file=shown) from None
        check_dtype(name, dtype, shown)
        if any(d < 0 for d in shape) or begin < 0 or end < begin:
            raise CorruptCheckpointError(f"tensor `{name}` has invalid shape or offsets",
                                         file=shown)
        nbytes = math.prod(shape) * DTYPES[dtype][0]
        if end - begin != nbytes:
            raise CorruptCheckpointError(
                f"tensor `{name}` occupies {end - begin} bytes but {dtype}{list(shape)} needs "
                f"{nbytes}", file=shown, hint="the file is damaged")
        if end > data_len:
            raise CorruptCheckpointError(
                f"file is truncated: tensor `{name}` ends at byte {data_start + end} but the file "
                f"has {size} bytes", file=shown, hint="download or convert the checkpoint again")
        out[name] = TensorInfo(name, dtype, shape, path, data_start + begin, nbytes)
    return out


def check_dtype(name: str, dtype: str, shown: str) -> None:
    """Refuse fp8 (out of scope, DESIGN.md §5) and dtypes recipekit does not know."""
    if dtype in FP8_CODES:
        raise UnsupportedCheckpointError(
            f"tensor `{name}` is {dtype}: fp8 checkpoints are not supported in version 1",
            file=shown, hint="use the unquantized (bf16/fp16/fp32) checkpoint")
    if dtype not in DTYPES:
        raise UnsupportedCheckpointError(
            f"tensor `{name}` has unknown dtype {dtype!r}", file=shown,
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
