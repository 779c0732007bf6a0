"""Convert pickle checkpoints (`pytorch_model*.bin`, `adapter_model.bin`) to safetensors.

Why a separate, explicit command: unpickling can run arbitrary code, so `recipekit run` never
does it. Here the user opts in with ``--allow-pickle`` and the load is still
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers.
One input shard is in memory at a time (memory-mapped when the file allows); each output shard is
written with the same streaming writer as `run`. Oracle (tests/test_convert.py): the converted
checkpoint's tensors equal the pickled ones, and transformers / PEFT load it.
"""

from __future__ import annotations

import ctypes
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recipekit.errors import (
    CorruptCheckpointError,
    OutputPathError,
    SourceNotFoundError,
    display_path,
)
from recipekit.inputs.files import read_bounded
from recipekit.io.header import MAX_HEADER, build_header
from recipekit.io.names import ADAPTER_PICKLE, ADAPTER_WEIGHTS, WEIGHT_DIRS, WEIGHTS
from recipekit.io.names import INDEX as SAFE_INDEX
from recipekit.io.writer import ShardWriter, write_file_atomic

#: pickle name -> safetensors name, for single-file checkpoints.
SINGLE_NAMES = {"pytorch_model.bin": WEIGHTS, ADAPTER_PICKLE: ADAPTER_WEIGHTS,
                "model.bin": WEIGHTS}
PICKLE_INDEX = "pytorch_model.bin.index.json"
_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
          "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
          "bool": "BOOL"}


@dataclass(frozen=True)
class Conversion:
    files: dict[str, str]  # pickle file -> safetensors file written
    tensors: int
    bytes_written: int


def _plan_files(src: Path) -> tuple[dict[str, str], dict[str, str] | None]:
    """Which pickle files become which safetensors files, and the new weight map if sharded."""
    if (src / PICKLE_INDEX).is_file():
        try:
            weight_map = _read_pickle_index(src)["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise CorruptCheckpointError(f"{PICKLE_INDEX} has no valid `weight_map` ({e})",
                                         file=display_path(src / PICKLE_INDEX)) from None
        shards = sorted(set(weight_map.values()))
        n = len(shards)
        names = {old: f"model-{k:05d}-of-{n:05d}.safetensors" for k, old in enumerate(shards, 1)}
        return names, {t: names[f] for t, f in weight_map.items()}
    found = {old: new for old, new in SINGLE_NAMES.items() if (src / old).is_file()}
    if not found:
        raise SourceNotFoundError(
            f"no pickle checkpoint in {display_path(src)}",
            hint=f"expected {PICKLE_INDEX} or one of: " + ", ".join(SINGLE_NAMES))
    return found, None


def _read_pickle_index(src: Path) -> Any:
    """The JSON document of a sharded pickle checkpoint's index.

    Raises:
        OSError: unreadable; ValueError: larger than any index, not UTF-8 or not JSON.
    """
    raw, size = read_bounded(src / PICKLE_INDEX, MAX_HEADER)
    if raw is None:
        raise ValueError(f"{size} bytes, larger than any index")
    return json.loads(raw.decode("utf-8"))


def _load_pickle(path: Path) -> dict[str, Any]:
    import torch  # only `convert` needs torch; importing this module stays light

    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise CorruptCheckpointError(
            f"cannot load as weights-only pickle: {type(e).__name__}: {str(e)[:200]}",
            file=display_path(path),
            hint="the file is damaged, or holds more than tensors (recipekit refuses to run "
            "arbitrary pickled code)") from None
    if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
        raise CorruptCheckpointError("is not a state dict of named tensors",
                                     file=display_path(path))
    return data


def _write_safetensors(tensors: dict[str, Any], target: Path) -> int:
    """Stream a state dict into one safetensors file; tensors sharing storage are written as
    separate copies (safetensors has no aliasing)."""
    names = sorted(tensors)
    entries = []
    for name in names:
        t = tensors[name]
        code = _CODES.get(str(t.dtype).removeprefix("torch."))
        if code is None:
            raise CorruptCheckpointError(f"tensor `{name}` has unsupported dtype {t.dtype}",
                                         file=display_path(target))
        entries.append((name, code, tuple(t.shape)))
    header, _ = build_header(entries)
    size = len(header) + sum(tensors[n].numel() * tensors[n].element_size() for n in names)
    writer = ShardWriter(target, header, size)
    try:
        for name in names:
            t = tensors[name].contiguous()
            nbytes = t.numel() * t.element_size()
            if nbytes:
                view = memoryview((ctypes.c_char * nbytes).from_address(t.data_ptr()))
                writer.write(view, done=lambda t=t: None)
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    return size


def convert_checkpoint(src: Path, dst: Path, *,
                       progress: Callable[[str], None] | None = None) -> Conversion:
    """Convert the pickle checkpoint in ``src`` into a safetensors checkpoint in ``dst``.

    Non-weight files (config, tokenizer, adapter_config.json, ...) are copied. ``dst`` must not
    exist or be empty: conversion never overwrites.

    Raises:
        SourceNotFoundError: ``src`` holds no pickle checkpoint.
        OutputPathError: ``dst`` exists and is not an empty directory.
        CorruptCheckpointError: a file is not a weights-only state dict.
    """
    if not src.is_dir():
        raise SourceNotFoundError("is not a directory", file=display_path(src),
                                  hint="name the checkpoint directory")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise OutputPathError(f"{display_path(dst)} exists and is not an empty directory",
                              hint="choose a new output directory")
    names, weight_map = _plan_files(src)
    dst.mkdir(parents=True, exist_ok=True)
    written = count = 0
    for old, new in names.items():
        if progress:
            progress(f"{old} -> {new}")
        tensors = _load_pickle(src / old)
        count += len(tensors)
        written += _write_safetensors(tensors, dst / new)
        del tensors
    if weight_map is not None:
        index = _read_pickle_index(src)
        index["weight_map"] = weight_map
        write_file_atomic(dst / SAFE_INDEX,
                          (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
    skip = set(names) | {PICKLE_INDEX}
    for item in sorted(src.rglob("*")):
        rel = item.relative_to(src)
        if (item.is_dir() or str(rel) in skip or rel.parts[0] in WEIGHT_DIRS
                or rel.name.startswith(".") or rel.suffix in (".bin", ".safetensors")):
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(item, dst / rel)
    return Conversion(names, count, written)
