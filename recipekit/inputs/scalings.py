"""Read an X-LoRA scalings log in the original `xlora` package's `flush_log_scalings` layout.

``flush_log_scalings(path)`` (EricLBuehler/xlora, reference/adapters.md §4.4) writes the logged
gates, each (batch, seq, L, n_experts), with `numpy.save`:

* one ``path.npy`` of shape (n_logged, batch, seq, L, n) when every entry has one batch size;
* else one ``path-{batch}.npy`` per batch size plus ``path-mapping.json``,
  ``{"<path>-{batch}.npy": [positions of its entries in the log]}``. The keys carry the
  ``path`` the trainer passed, so the files are looked up by their base name beside the
  mapping file.

Arrays are read with ``numpy.load(allow_pickle=False)`` and memory-mapped, one logged entry at a
time. Every problem is a `ScalingsLogError` naming the file; the step locates it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recipekit.errors import ScalingsLogError
from recipekit.inputs.files import not_regular, read_bounded, sha256_file

MAPPING_SUFFIX = "-mapping.json"
MAX_MAPPING_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class ScalingsLog:
    """The log's arrays (memory-mapped), in mapping order, and each file's sha256 (by its name
    in ``directory``)."""

    arrays: tuple[tuple[str, Any], ...]  # (file name, array (N_f, B, S, L, n))
    sha256: dict[str, str]
    directory: Path

    @property
    def shape_tail(self) -> tuple[int, int]:
        """(L, n): modules and experts."""
        return tuple(self.arrays[0][1].shape[-2:])  # type: ignore[return-value]

    def entries(self) -> Iterator[Any]:
        """Each logged entry (B, S, L, n), file by file."""
        for _, arr in self.arrays:
            for k in range(arr.shape[0]):
                yield arr[k]


def _load_npy(path: Path) -> Any:
    import numpy as np  # here: loading a recipe imports this module and must not need numpy

    shown = path.name
    try:
        why = not_regular(os.stat(path).st_mode)  # a FIFO would block numpy.load forever
        if why is not None:
            raise ScalingsLogError(f"{shown} {why}")
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise ScalingsLogError(f"{shown}: no such file") from None
    except (ValueError, OSError, EOFError) as e:
        raise ScalingsLogError(f"{shown} is not a numpy .npy array ({e})",
                               hint="flush_log_scalings writes .npy files with numpy.save; "
                               "pickled logs are refused") from None
    if not isinstance(arr, np.ndarray):
        raise ScalingsLogError(f"{shown} is a .npz archive, not one .npy array")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ScalingsLogError(f"{shown} holds {arr.dtype} values, not floating-point gates")
    if arr.ndim != 5:
        raise ScalingsLogError(f"{shown} has shape {list(arr.shape)}, expected 5 axes "
                               "(n_logged, batch, seq, n_modules, n_adapters)")
    if 0 in arr.shape:
        raise ScalingsLogError(f"{shown} has shape {list(arr.shape)}: no logged tokens")
    return arr


def _read_mapping(path: Path) -> dict[str, list[int]]:
    shown = path.name
    try:
        raw, _ = read_bounded(path, MAX_MAPPING_BYTES)
        if raw is None:
            raise ScalingsLogError(f"{shown} is larger than {MAX_MAPPING_BYTES} bytes")
        data = json.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise ScalingsLogError(f"{shown}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ScalingsLogError(f"cannot read {shown} ({e})") from None
    except json.JSONDecodeError as e:
        raise ScalingsLogError(f"{shown} is not JSON ({e.msg}, line {e.lineno})") from None
    if not (isinstance(data, dict) and data and all(
            isinstance(k, str) and isinstance(v, list) and v and all(
                isinstance(j, int) and not isinstance(j, bool) and j >= 0 for j in v)
            for k, v in data.items())):
        raise ScalingsLogError(f"{shown} is not a scalings-log mapping "
                               '({"<path>-<n>.npy": [log positions], ...})')
    return data


def locate_log(path: Path) -> tuple[str, Path]:
    """("npy" | "mapping", file) for what the recipe wrote: a ``.npy`` file, a
    ``-mapping.json`` file, or the extension-less path given to ``flush_log_scalings``."""
    if path.suffix == ".npy":
        return "npy", path
    if path.name.endswith(".json"):
        return "mapping", path
    single = path.with_name(path.name + ".npy")
    mapping = path.with_name(path.name + MAPPING_SUFFIX)
    if single.is_file() and mapping.is_file():
        raise ScalingsLogError(f"both {single.name} and {mapping.name} exist",
                               hint="name the one to use (the .npy file or the mapping JSON)")
    if single.is_file():
        return "npy", single
    if mapping.is_file():
        return "mapping", mapping
    raise ScalingsLogError(f"no scalings log {single.name} or {mapping.name} in "
                           f"{path.parent}", hint="give the path passed to flush_log_scalings, "
                           "or the .npy / -mapping.json file it wrote")


def read_scalings_log(path: Path) -> ScalingsLog:
    """Open the log at ``path`` (see `locate_log`), checking shapes and the mapping.

    Raises:
        ScalingsLogError: missing files, non-.npy or pickled data, non-float values, shapes
            other than (N, B, S, L, n) or disagreeing on (L, n), a mapping whose positions do
            not match the arrays' entry counts or do not number the log 0..N-1 once each.
    """
    kind, file = locate_log(path)
    if kind == "npy":
        return ScalingsLog((((file.name, _load_npy(file)),)), {file.name: sha256_file(file)},
                           file.parent)
    mapping = _read_mapping(file)
    arrays: list[tuple[str, Any]] = []
    sha = {file.name: sha256_file(file)}
    positions: list[int] = []
    for key, where in mapping.items():
        part = file.parent / Path(key).name
        arr = _load_npy(part)
        if arr.shape[0] != len(where):
            raise ScalingsLogError(f"{file.name} lists {len(where)} log positions for "
                                   f"{part.name}, which holds {arr.shape[0]} entries")
        if arrays and arr.shape[-2:] != arrays[0][1].shape[-2:]:
            raise ScalingsLogError(f"{part.name} has {list(arr.shape[-2:])} modules × adapters, "
                                   f"{arrays[0][0]} {list(arrays[0][1].shape[-2:])}")
        arrays.append((part.name, arr))
        sha[part.name] = sha256_file(part)
        positions += where
    if sorted(positions) != list(range(len(positions))):
        raise ScalingsLogError(f"the positions in {file.name} do not number the log entries "
                               f"0..{len(positions) - 1} once each")
    return ScalingsLog(tuple(arrays), sha, file.parent)
