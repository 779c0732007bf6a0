"""Convert pickle checkpoints (`pytorch_model*.bin`, `adapter_model.bin`) to safetensors.

Why a separate, explicit command: unpickling can run arbitrary code, so `recipekit run` never
does it. Here the user opts in with ``--allow-pickle`` and the load is still
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers.
One input shard is in memory at a time (memory-mapped when the file allows); each output shard is
written with the same streaming writer as `run`. The source is read like a run's inputs (every
file confined to it, regular files only) and the output directory is a run's (io/output.py:
lock, state file, temp names and renames), so a killed conversion resumes. Oracle
(tests/tools/test_convert.py): the converted checkpoint's tensors equal the pickled ones, and
transformers / PEFT load it; tests/io/test_hostile.py::TestConvert holds the attacks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recipekit import __version__
from recipekit.errors import (
    OutputPathError,
    SourceNotFoundError,
    TensorDataError,
    display_path,
)
from recipekit.inputs.files import (
    check_confined,
    model_root,
    read_small,
    unreadable,
    walk_confined,
)
from recipekit.inputs.models import read_index
from recipekit.io.header import MAX_HEADER, build_header, read_header
from recipekit.io.names import ADAPTER_PICKLE, ADAPTER_WEIGHTS, STATE, WEIGHT_DIRS, WEIGHTS
from recipekit.io.names import INDEX as SAFE_INDEX
from recipekit.io.output import OutputDir, stored_plan_hash
from recipekit.io.writer import ShardWriter
from recipekit.plan.overlap import check_output_apart

log = logging.getLogger(__name__)

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
    already_complete: bool = False  # a rerun of a finished conversion: nothing written


def _plan_files(src: Path, root: Path) -> tuple[dict[str, str], dict[str, Any] | None]:
    """Which pickle files become which safetensors files, and the new index if sharded.

    Every file is confined like `run`'s inputs (`check_confined`): no link out of ``src``, no
    FIFO or device; an index entry must name a file beside the index.
    """
    index_path = src / PICKLE_INDEX
    if os.path.lexists(index_path):
        weight_map = read_index(index_path, root)
        index = json.loads(read_small(index_path, MAX_HEADER, PICKLE_INDEX))  # checked above
        shards = sorted(set(weight_map.values()))
        n = len(shards)
        names = {old: f"model-{k:05d}-of-{n:05d}.safetensors" for k, old in enumerate(shards, 1)}
        index["weight_map"] = {t: names[f] for t, f in weight_map.items()}
    else:
        names = {old: new for old, new in SINGLE_NAMES.items() if os.path.lexists(src / old)}
        index = None
    if not names:
        raise SourceNotFoundError(
            f"no pickle checkpoint in {display_path(src)}",
            hint=f"expected {PICKLE_INDEX} or one of: " + ", ".join(SINGLE_NAMES))
    for old in names:
        check_confined(src / old, root)
    return names, index


def _copied_files(src: Path, root: Path, skip: set[str]) -> list[str]:
    """The non-weight files copied as they are (relative, sorted). Like a run's donor files,
    links out of ``src``, broken links, FIFOs, devices and linked folders are skipped with a
    warning: their content is not the checkpoint's to hand on."""
    out: list[str] = []
    for rel, why in walk_confined(src, root, skip_dir=lambda d: d.parts[0] in WEIGHT_DIRS
                                  or d.name.startswith(".")):
        f = rel.name
        if rel.as_posix() in skip or f.startswith(".") or Path(f).suffix in (".bin",
                                                                             ".safetensors"):
            continue
        if why is not None:
            log.warning("%s: not copied to the output: it %s", display_path(src / rel), why)
            continue
        out.append(rel.as_posix())
    return out


def _plan_hash(src: Path, files: list[str]) -> str:
    """What a rerun must find unchanged to resume: each source file's size and mtime."""
    seen = {}
    for rel in files:
        st = os.stat(src / rel)
        seen[rel] = [st.st_size, st.st_mtime_ns]
    doc = {"convert": 1, "recipekit": __version__, "source": str(src.resolve()), "files": seen}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _load_pickle(path: Path) -> dict[str, Any]:
    import torch

    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
            data = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:  # not a damaged file: one this user may not read
        raise unreadable(path, e) from None
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise TensorDataError(
            f"cannot load as weights-only pickle: {type(e).__name__}: {str(e)[:200]}",
            file=display_path(path),
            hint="the file is damaged, or holds more than tensors (recipekit refuses to run "
            "arbitrary pickled code)") from None
    if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
        raise TensorDataError("is not a state dict of named tensors",
                                     file=display_path(path))
    return data


def _write_safetensors(tensors: dict[str, Any], target: Path, *,
                       fsync: bool = True) -> tuple[int, str]:
    """Stream a state dict into one safetensors file; tensors sharing storage are written as
    separate copies (safetensors has no aliasing)."""
    import ctypes

    names = sorted(tensors)
    entries = []
    for name in names:
        t = tensors[name]
        code = _CODES.get(str(t.dtype).removeprefix("torch."))
        if code is None:
            raise TensorDataError(f"tensor `{name}` has unsupported dtype {t.dtype}",
                                         file=display_path(target))
        entries.append((name, code, tuple(t.shape)))
    header, _ = build_header(entries)
    size = len(header) + sum(tensors[n].numel() * tensors[n].element_size() for n in names)
    writer = ShardWriter(target, header, size, fsync=fsync)
    try:
        for name in names:
            t = tensors[name].contiguous()
            nbytes = t.numel() * t.element_size()
            if nbytes:
                view = memoryview((ctypes.c_char * nbytes).from_address(t.data_ptr()))
                writer.write(view, done=lambda t=t: None)
        sha = writer.finish()
    except BaseException:
        writer.abort()
        raise
    return size, sha


def _refuse_other_conversion(dst: Path, plan_hash: str) -> None:
    """`convert` has no --force: an interrupted conversion of other files is the user's to
    delete (OutputDir would suggest --force)."""
    old = stored_plan_hash(dst)
    if old is not None and old != plan_hash:
        raise OutputPathError(f"{display_path(dst)} holds a conversion of other files (the "
                              "source changed)", hint="delete it yourself and convert again, or "
                              "choose a new output directory")


def convert_checkpoint(src: Path, dst: Path, *, progress: Callable[[str], None] | None = None,
                       fsync: bool = True) -> Conversion:
    """Convert the pickle checkpoint in ``src`` into a safetensors checkpoint in ``dst``.

    Non-weight files (config, tokenizer, adapter_config.json, ...) are copied. ``dst`` must not
    exist or be empty, or be an interrupted conversion of the same files, which resumes: the
    output directory is `run`'s (io/output.py: lock, state file, temp names, renames).

    Raises:
        SourceNotFoundError: ``src`` holds no pickle checkpoint.
        UnsupportedCheckpointError: a weight or index file links out of ``src`` or is special.
        OutputPathError: ``dst`` overlaps ``src``, or exists and is not an empty directory
            (nor an interrupted conversion).
        TensorDataError: a file is not a weights-only state dict (exit 1: found by reading
            its tensor data).
    """
    if not src.is_dir():
        raise SourceNotFoundError("is not a directory", file=display_path(src),
                                  hint="name the checkpoint directory")
    root = model_root(src)
    check_output_apart(dst, [(f"the source {display_path(src)}", root)])
    if dst.exists() and (not dst.is_dir() or (any(dst.iterdir()) and not (dst / STATE).exists())):
        raise OutputPathError(f"{display_path(dst)} exists and is not an empty directory",
                              hint="choose a new output directory")
    names, index = _plan_files(src, root)
    copied = _copied_files(src, root, set(names) | {PICKLE_INDEX})
    read = [*names, *([PICKLE_INDEX] if index is not None else []), *copied]
    files = [*names.values(), *([SAFE_INDEX] if index is not None else []), *copied]
    plan_hash = _plan_hash(src, read)
    _refuse_other_conversion(dst, plan_hash)
    with OutputDir(dst, plan_hash=plan_hash, files=files, fsync=fsync, manifest=None) as out:
        if out.already_complete:
            return Conversion(names, 0, 0, already_complete=True)
        pending = [(old, new) for old, new in names.items() if not out.is_finished(new)]
        # The first pickle is loaded before the state file is written, so a checkpoint that
        # cannot be converted (a whole pickled model, code, damage) leaves no interrupted
        # conversion behind that a rerun would only "resume" into the same refusal.
        first = _load_pickle(src / pending[0][0]) if pending else None
        out.begin(sum(os.stat(src / rel).st_size for rel in read))
        written = count = 0
        for old, new in pending:
            if progress:
                progress(f"{old} -> {new}")
            tensors = first if first is not None else _load_pickle(src / old)
            first = None
            count += len(tensors)
            size, sha = _write_safetensors(tensors, dst / new, fsync=fsync)
            del tensors
            out.mark_finished(new, sha, size)
            written += size
        if index is not None:  # the source index's metadata described the pickles
            total = sum(info.nbytes for new in names.values()
                        for info in read_header(dst / new).values())
            index["metadata"] = {"total_size": total}
            out.write_file(SAFE_INDEX, (json.dumps(index, indent=2, sort_keys=True) + "\n")
                           .encode())
        for rel in copied:
            out.copy_file(src / rel, rel)
        out.complete()
    return Conversion(names, count, written)
