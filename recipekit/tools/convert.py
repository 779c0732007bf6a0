"""Convert pickle checkpoints (`pytorch_model*.bin`, `adapter_model.bin`) to safetensors.

Why a separate, explicit command: unpickling can run arbitrary code, so `recipekit run` never
does it. Here the user opts in with ``--allow-pickle`` and the load is still
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers.
One input shard is in memory at a time (memory-mapped when the file allows); every one is
checked before the first byte is written (tensors safetensors cannot hold, a stale index), and
each output shard is written through `OutputDir.open_shard`, the streaming writer of `run`. The
source is read like a run's inputs (every file confined to it, regular files only; other weights
and pickles are not copied) and the output directory is a run's (io/output.py: lock, state
file, temp names and renames, no file overwritten that a resumed run had not written), so a
killed conversion resumes. Oracle
(tests/tools/test_convert.py): the converted checkpoint's tensors equal the pickled ones, and
transformers / PEFT load it; tests/io/test_hostile.py::TestConvert holds the attacks.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recipekit import __version__
from recipekit.dtypes import DTYPES
from recipekit.errors import (
    OutputError,
    OutputPathError,
    SourceNotFoundError,
    TensorDataError,
    TensorNotFoundError,
    UnsupportedCheckpointError,
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
from recipekit.io.header import MAX_HEADER, build_header, quote_name, read_header
from recipekit.io.names import (
    ADAPTER_PICKLE,
    ADAPTER_WEIGHTS,
    STATE,
    WEIGHT_DIRS,
    WEIGHT_SUFFIXES,
    WEIGHTS,
)
from recipekit.io.names import INDEX as SAFE_INDEX
from recipekit.io.output import OutputDir, stored_plan_hash
from recipekit.io.writer import PARTIAL_SUFFIX, ShardWriter, stale_temp_problem
from recipekit.plan.overlap import check_output_apart
from recipekit.units import format_size

log = logging.getLogger(__name__)

#: pickle name -> safetensors name, for single-file checkpoints.
SINGLE_NAMES = {"pytorch_model.bin": WEIGHTS, ADAPTER_PICKLE: ADAPTER_WEIGHTS,
                "model.bin": WEIGHTS}
PICKLE_INDEX = "pytorch_model.bin.index.json"
#: torch dtype name -> safetensors code: every dtype recipekit's table has (tensors are only
#: copied, so any it can name is converted as it is).
_CODES = {name: code for code, (_, name, _) in DTYPES.items()}
#: The one key of a safetensors header that is not a tensor.
RESERVED = "__metadata__"
_STALE = "the index is stale or a shard is from another checkpoint"


@dataclass(frozen=True)
class Conversion:
    files: dict[str, str]  # pickle file -> safetensors file, every one of the checkpoint's
    tensors: int  # tensors written by this call
    bytes_written: int
    already_complete: bool = False  # a rerun of a finished conversion: nothing written
    written: int = 0  # safetensors files written by this call
    resumed: int = 0  # files an interrupted conversion had finished, kept as they are


def _check_source(src: Path) -> None:
    """Refuse a source that is missing or not a directory, saying which."""
    if not os.path.lexists(src):
        raise SourceNotFoundError("does not exist", file=display_path(src),
                                  hint="name the checkpoint directory to convert")
    if not src.is_dir():
        raise SourceNotFoundError("is not a directory", file=display_path(src),
                                  hint="name the checkpoint directory (the folder holding "
                                  "pytorch_model.bin or adapter_model.bin), not a file in it")


def _refuse_non_empty(dst: Path) -> None:
    """Refuse an output that exists and is neither empty nor an interrupted conversion (its
    state file, or only temp files of ours: a conversion killed while writing its state file
    for the first time, which `OutputDir` treats as `run` does: not foreign, replaced)."""
    if not dst.exists():
        return
    if dst.is_dir() and ((dst / STATE).exists() or all(
            p.name.endswith(PARTIAL_SUFFIX) and p.name.startswith(".")
            and stale_temp_problem(p) is None for p in dst.iterdir())):
        return
    raise OutputPathError(f"{display_path(dst)} exists and is not an empty directory",
                          hint="choose a new output directory")


def _refuse_two_names(src: Path, found: list[str]) -> None:
    """Two single-file pickles that become the same safetensors file (``pytorch_model.bin``
    and ``model.bin``): converting both would keep only the second's tensors."""
    for target in sorted(set(SINGLE_NAMES.values())):
        same = [old for old in found if SINGLE_NAMES[old] == target]
        if len(same) > 1:
            raise UnsupportedCheckpointError(
                f"{' and '.join(same)} would both become {target}; recipekit cannot tell which "
                "holds the checkpoint's weights", file=display_path(src),
                hint="move the one that is not this checkpoint's out of the directory and "
                "convert again")


def _plan_files(src: Path, root: Path
                ) -> tuple[dict[str, str], dict[str, Any] | None, dict[str, str] | None]:
    """Which pickle files become which safetensors files, the new index if sharded, and the
    source index's `weight_map` (tensor -> pickle file) that each shard is checked against.

    Every file is confined like `run`'s inputs (`check_confined`): no link out of ``src``, no
    FIFO or device; an index entry must name a file beside the index.
    """
    index_path = src / PICKLE_INDEX
    weight_map = None
    if os.path.lexists(index_path):
        weight_map = read_index(index_path, root)
        index = json.loads(read_small(index_path, MAX_HEADER, PICKLE_INDEX))  # checked above
        shards = sorted(set(weight_map.values()))
        n = len(shards)
        names = {old: f"model-{k:05d}-of-{n:05d}.safetensors" for k, old in enumerate(shards, 1)}
        index["weight_map"] = {t: names[f] for t, f in weight_map.items()}
    else:
        found = [old for old in SINGLE_NAMES if os.path.lexists(src / old)]
        _refuse_two_names(src, found)
        names = {old: SINGLE_NAMES[old] for old in found}
        index = None
    if not names:
        raise SourceNotFoundError(
            f"no pickle checkpoint in {display_path(src)}",
            hint=f"expected {PICKLE_INDEX} or one of: " + ", ".join(SINGLE_NAMES))
    for old in names:
        check_confined(src / old, root)
    return names, index, weight_map


def _copied_files(src: Path, root: Path, skip: set[str]) -> list[str]:
    """The non-weight files copied as they are (relative, sorted). Like a run's donor files
    (`iter_donor_files`): weights in any format and pickles (optimizer.pt, rng_state.pth,
    training_args.bin: never copied into a safetensors checkpoint) and other indexes are
    skipped, and so are links out of ``src``, broken links, FIFOs, devices and linked
    folders: their content is not the checkpoint's to hand on. Each is named in a warning."""
    out: list[str] = []
    for rel, why in walk_confined(src, root, skip_dir=lambda d: d.name in WEIGHT_DIRS
                                  or d.name.startswith(".")):
        f = rel.name
        if rel.as_posix() in skip or f.startswith("."):
            continue
        if f.endswith(WEIGHT_SUFFIXES) or f.endswith(".index.json"):
            why = ("is a weight, pickle or index file that is not the checkpoint's weights "
                   "(`convert` converts pytorch_model*.bin, model.bin or adapter_model.bin "
                   "alone; a safetensors checkpoint holds no pickles)")
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


#: A global a weights-only load refused, as torch names it ("GLOBAL posix.system").
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
#: torch's lines around the reason of a weights-only refusal: its advice, not ours to repeat.
_TORCH_ADVICE = ("Weights only load failed", "Re-running", "Check the documentation",
                 "Please file an issue", "In PyTorch")


def _first_sentence(text: str, limit: int = 300) -> str:
    """The first sentence of a library's message, for a one-paragraph error: whole, or cut at a
    word with "..." when it is longer than ``limit`` (never mid-word or mid-sentence)."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    head = line.split(". ", 1)[0].rstrip(".")
    if len(head) <= limit:
        return head
    return head[:limit].rsplit(" ", 1)[0] + "..."


def _load_error(path: Path, e: Exception) -> TensorDataError:
    """Why ``path`` cannot be loaded, in recipekit's words: a weights-only refusal names the
    global the pickle refers to (the code it would run, or the class of a whole pickled
    object); anything else is the loader's first sentence (damage, truncation)."""
    text = str(e)
    found = _GLOBAL.search(text)
    if found is not None or "Weights only load failed" in text:
        if found is not None:
            what = (f"it refers to {quote_name(found.group(1))}, which is neither a tensor nor "
                    "a plain container")
        else:
            reason = next((ln.strip() for ln in text.splitlines() if ln.strip()
                           and not ln.strip().startswith(_TORCH_ADVICE)), "")
            what = f"a weights-only load refuses it ({_first_sentence(reason)})"
        return TensorDataError(
            f"cannot load as weights-only pickle: {what}; recipekit never unpickles arbitrary "
            "code, so the file is not converted", file=display_path(path),
            hint="the file holds code or a whole pickled object, not a state dict of tensors: "
            "ask its source for safetensors, or for the state dict alone "
            "(torch.save(model.state_dict(), ...))")
    return TensorDataError(
        f"cannot load as weights-only pickle: {type(e).__name__}: {_first_sentence(text)}",
        file=display_path(path),
        hint="the file is damaged or incomplete (copy or download it again), or is not a "
        "torch checkpoint")


def _load_pickle(path: Path) -> dict[str, Any]:
    """A pickle's state dict, loaded weights-only (memory-mapped when the format allows)."""
    import torch

    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
            data = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:  # not a damaged file: one this user may not read
        raise unreadable(path, e) from None
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise _load_error(path, e) from None
    if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
        raise TensorDataError("is not a state dict of named tensors",
                                     file=display_path(path))
    return data


def _check_tensor(name: str, t: Any, path: Path) -> str:
    """The safetensors dtype code ``t`` is written with, or a refusal naming the tensor and
    its pickle: a name safetensors reserves, a tensor that is not dense and in memory (sparse,
    meta), a dtype recipekit's table has no code for (fp8, complex, quantized)."""
    import torch

    where = display_path(path)
    if name == RESERVED:
        raise UnsupportedCheckpointError(
            f"tensor {quote_name(name)} has the name safetensors reserves for a file's "
            "metadata; no safetensors file can hold it", file=where,
            hint="rename or drop that entry of the state dict and save it again")
    if t.layout != torch.strided:
        raise UnsupportedCheckpointError(
            f"tensor {quote_name(name)} is a {str(t.layout).removeprefix('torch.')} tensor; "
            "safetensors holds dense tensors only", file=where,
            hint="save it dense (t.to_dense()) and convert again")
    if t.device.type == "meta":
        raise UnsupportedCheckpointError(
            f"tensor {quote_name(name)} is a meta tensor: it has a shape but no data (saved "
            "from a model whose weights were never loaded)", file=where,
            hint="save the state dict of a model with its weights loaded")
    dtype = str(t.dtype).removeprefix("torch.")
    code = _CODES.get(dtype)
    if code is None:
        why = " (it reads no fp8 checkpoints)" if dtype.startswith("float8") else ""
        raise UnsupportedCheckpointError(
            f"tensor {quote_name(name)} has dtype {dtype}, which recipekit does not "
            f"convert{why}", file=where,
            hint="recipekit converts " + ", ".join(sorted(_CODES)) + " tensors")
    return code


def _check_index(tensors: dict[str, Any], old: str, src: Path,
                 weight_map: dict[str, str] | None) -> None:
    """Refuse a shard that disagrees with the pickle index, as `run` refuses a safetensors
    checkpoint's stale index: a converted index listing a tensor in the wrong shard, or not
    at all, would be an output recipekit itself refuses."""
    if weight_map is None:
        return
    for name in sorted(tensors):
        if weight_map.get(name) != old:
            listed = (f"maps to {weight_map[name]}" if name in weight_map else "does not list")
            raise TensorNotFoundError(f"{old} holds tensor {quote_name(name)}, which "
                                      f"{PICKLE_INDEX} {listed}",
                                      file=display_path(src / PICKLE_INDEX), hint=_STALE)
    for name, fname in sorted(weight_map.items()):
        if fname == old and name not in tensors:
            raise TensorNotFoundError(
                f"tensor {quote_name(name)} is listed in {PICKLE_INDEX} for {old} but that "
                "file does not contain it", file=display_path(src / old), hint=_STALE)


@dataclass
class _Shard:
    """One pickle loaded and checked: its tensors, and the safetensors header they become."""

    tensors: dict[str, Any]
    header: bytes
    size: int


def _load_checked(src: Path, old: str, weight_map: dict[str, str] | None) -> _Shard:
    """Load one pickle and check everything that would stop its conversion (`_check_tensor`,
    `_check_index`), before a byte of it is written."""
    path = src / old
    tensors = _load_pickle(path)
    _check_index(tensors, old, src, weight_map)
    names = sorted(tensors)
    entries = [(n, _check_tensor(n, tensors[n], path), tuple(tensors[n].shape)) for n in names]
    header, _ = build_header(entries)
    size = len(header) + sum(tensors[n].numel() * tensors[n].element_size() for n in names)
    return _Shard(tensors, header, size)


def _write_safetensors(shard: _Shard, writer: ShardWriter) -> str:
    """Stream a checked state dict into one safetensors file; tensors sharing storage are
    written as separate copies (safetensors has no aliasing), views as the values they show
    (a negated or conjugated view resolved, a strided one made contiguous)."""
    import ctypes

    try:
        for name in sorted(shard.tensors):
            t = shard.tensors[name].resolve_conj().resolve_neg().contiguous()
            nbytes = t.numel() * t.element_size()
            if nbytes:
                view = memoryview((ctypes.c_char * nbytes).from_address(t.data_ptr()))
                writer.write(view, done=lambda t=t: None)
        return writer.finish()
    except BaseException:
        writer.abort()
        raise


def _refuse_other_conversion(dst: Path, plan_hash: str) -> None:
    """`convert` has no --force: an interrupted conversion of other files is the user's to
    delete (OutputDir would suggest --force)."""
    old = stored_plan_hash(dst)
    if old is not None and old != plan_hash:
        raise OutputPathError(f"{display_path(dst)} holds a conversion of other files (the "
                              "source changed)", hint="delete it yourself and convert again, or "
                              "choose a new output directory")


def _needed_bytes(out: OutputDir, src: Path, shards: list[_Shard], copied: list[str],
                  index: dict[str, Any] | None) -> int:
    """The bytes left to write: the shards not finished yet (their exact size, from the
    checked headers), the copied files not written yet and the index. A resumed conversion
    counts only what is left, so one stopped by a full disk resumes once that much is free."""
    done = out.state.written or {}
    left = sum(os.stat(src / rel).st_size for rel in copied if rel not in done)
    index_size = os.stat(src / PICKLE_INDEX).st_size if index is not None else 0
    return sum(s.size for s in shards) + left + index_size


def _space_hint(e: OutputError, needed: int) -> None:
    """A full disk's hint for `convert` (the writer's names `recipekit plan`, which has no
    answer for a conversion): what is left to write, and that a rerun resumes."""
    cause = e.__cause__
    if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
        e.hint = (f"free space (this conversion had {format_size(needed)} left to write); "
                  "finished files are kept, and running the same command again resumes")


def convert_checkpoint(src: Path, dst: Path, *, progress: Callable[[str], None] | None = None,
                       fsync: bool = True) -> Conversion:
    """Convert the pickle checkpoint in ``src`` into a safetensors checkpoint in ``dst``.

    Non-weight files (config, tokenizer, adapter_config.json, ...) are copied. ``dst`` must not
    exist or be empty, or be an interrupted conversion of the same files, which resumes: the
    output directory is `run`'s (io/output.py: lock, state file, temp names, renames, and a
    resumed run's refusal to overwrite a file put at a name it had not written yet).

    Every pickle left to convert is loaded and checked (`_load_checked`) before the state file
    is written, so a checkpoint that cannot be converted (a whole pickled model, code, damage,
    a sparse tensor, a stale index) leaves no interrupted conversion behind that a rerun would
    only "resume" into the same refusal. Loads are memory-mapped: checking a shard reads its
    pickle, not its tensor data (a legacy non-zip pickle is read whole, one at a time).

    Raises:
        SourceNotFoundError: ``src`` is missing or holds no pickle checkpoint.
        UnsupportedCheckpointError: a weight or index file links out of ``src`` or is special;
            two pickles would become one file; a tensor safetensors or recipekit cannot hold.
        TensorNotFoundError: a shard and the pickle index disagree (a stale index).
        OutputPathError: ``dst`` overlaps ``src``, or exists and is not an empty directory
            (nor an interrupted conversion), or holds a file put at a name the interrupted
            conversion had not written yet.
        TensorDataError: a file is not a weights-only state dict (exit 1: found by reading
            its tensor data).
    """
    _check_source(src)
    root = model_root(src)
    check_output_apart(dst, [(f"the source {display_path(src)}", root)])
    _refuse_non_empty(dst)
    names, index, weight_map = _plan_files(src, root)
    copied = _copied_files(src, root, set(names) | {PICKLE_INDEX})
    read = [*names, *([PICKLE_INDEX] if index is not None else []), *copied]
    files = [*names.values(), *([SAFE_INDEX] if index is not None else []), *copied]
    plan_hash = _plan_hash(src, read)
    _refuse_other_conversion(dst, plan_hash)
    with OutputDir(dst, plan_hash=plan_hash, files=files, fsync=fsync, manifest=None) as out:
        if out.already_complete:
            return Conversion(names, 0, 0, already_complete=True)
        pending = [(old, new) for old, new in names.items() if not out.is_finished(new)]
        shards = []
        for old, _ in pending:
            shards.append(_load_checked(src, old, weight_map))
            if len(shards) > 1:  # one pickle in memory at a time: reloaded when its turn comes
                shards[-1].tensors = {}
        needed = _needed_bytes(out, src, shards, copied, index)
        out.begin(needed)
        written = count = 0
        try:
            for k, (old, new) in enumerate(pending):
                if progress:
                    progress(f"{old} -> {new}")
                shard = shards[k] if k == 0 else _load_checked(src, old, weight_map)
                count += len(shard.tensors)
                writer = out.open_shard(new, shard.header, shard.size, fsync=fsync)
                sha = _write_safetensors(shard, writer)
                shard.tensors.clear()  # the memory-mapped (or loaded) pickle is released
                out.mark_finished(new, sha, shard.size)
                written += shard.size
            if index is not None:  # the source index's metadata described the pickles
                total = sum(info.nbytes for new in names.values()
                            for info in read_header(dst / new).values())
                index["metadata"] = {"total_size": total}
                out.write_file(SAFE_INDEX, (json.dumps(index, indent=2, sort_keys=True) + "\n")
                               .encode())
            for rel in copied:
                out.copy_file(src / rel, rel)
        except OutputError as e:
            _space_hint(e, needed)
            raise
        out.complete()
    return Conversion(names, count, written, written=len(pending),
                      resumed=len(names) - len(pending))
