"""Parse and print byte sizes ("5GB", "500MiB", 1_000_000) the way users write them."""

from __future__ import annotations

import math
import re
from decimal import Decimal

_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_size(value: int | float | str) -> int:
    """Return a byte count for ``value``; raise ``ValueError`` with the accepted spellings.

    Decimal units (KB, MB, GB, TB) are powers of 10 and binary units (KiB, MiB, GiB, TiB)
    powers of 2, as huggingface_hub's ``max_shard_size`` reads them (a fraction of a byte left
    by a unit is dropped, as there). A number of bytes is whole however it is written
    (``2e9``, ``2000000000.0``); ``2.5`` bytes is refused, not rounded.
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ValueError(f"{value!r} is not a positive size")
        _whole_bytes(value, value)
        return int(value)
    m = _SIZE.match(value)
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(
            f"{value!r} is not a size; write a number of bytes or e.g. '500MB', '5GB', '2GiB'"
        )
    if _UNITS[m.group(2).upper()] == 1:
        _whole_bytes(Decimal(m.group(1)), value)
    n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n <= 0:
        raise ValueError(f"{value!r} is not a positive size")
    return n


def _whole_bytes(n: float | Decimal, written: int | float | str) -> None:
    """Refuse a fraction of a byte (a shard holds no half byte; 2.5 was read as 2)."""
    if isinstance(n, int):
        return
    whole = n == n.to_integral_value() if isinstance(n, Decimal) else (
        not math.isfinite(n) or n.is_integer())  # (infinity: an OverflowError, below)
    if not whole:
        raise ValueError(f"{written!r} is not a whole number of bytes; write an integer, or a "
                         "size with a unit, e.g. '500MB', '5GB', '2GiB'")


def format_size(n: float) -> str:
    """Print a byte count with a binary unit, e.g. ``1.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
