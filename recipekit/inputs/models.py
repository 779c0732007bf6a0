"""Resolve the recipe's `models:` into checkpoints: configs and safetensors headers, no tensor data.

A checkpoint is a directory with ``config.json`` and either ``model.safetensors`` or a sharded
``model.safetensors.index.json``. Everything `validate` needs (tensor names, shapes, dtypes,
layer counts) comes from headers, so resolving a 70B model reads kilobytes.

Checkpoint directories are untrusted: every file read must resolve inside the model directory
(for a huggingface_hub snapshot, inside the repo's cache folder, where its links point) and be a
regular file; the index may only name shard files beside it; `config.json` must be a small JSON
object whose layer counts are integers; donor files that fail these rules are not copied.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from recipekit.arch import COUNT_KEYS, LayerStack, LayerStackError, find_layer_stack
from recipekit.errors import (
    CorruptCheckpointError,
    SourceNotFoundError,
    TensorNotFoundError,
    UnsupportedCheckpointError,
    display_path,
)
from recipekit.inputs.files import (
    check_confined,
    check_readable_dir,
    is_file,
    lexists,
    model_root,
    read_small,
    relative_paths,
    walk_confined,
)
from recipekit.inputs.hub import HubSnapshot
from recipekit.inputs.remote import RemoteSnapshot
from recipekit.inputs.source import (
    InputFiles,
    Located,
    Snapshot,
    locate_input,
    shard_header,
    split_snapshot,
)
from recipekit.io.header import MAX_HEADER, TensorInfo, kind_of, parse_json, quote_name
from recipekit.io.names import (
    ADAPTER_CONFIG,
    CONFIG,
    INDEX,
    MANIFEST,
    MODEL_CARD,
    PICKLE_NAMES,
    WEIGHT_DIRS,
    WEIGHT_SUFFIXES,
    WEIGHTS,
)

if TYPE_CHECKING:  # the recipe package (yaml, the schema) is not loaded by inspect/diff
    from recipekit.recipe import ModelRef, Recipe

log = logging.getLogger(__name__)

#: A model config is kilobytes (a few MB with a large label map); anything bigger is not one.
MAX_CONFIG = 16 * 1024 * 1024
#: Nesting deeper than this is not a model config (and would strain JSON writers).
MAX_CONFIG_DEPTH = 64
_DAMAGED = "the checkpoint is damaged; download or convert it again"


@dataclass(frozen=True)
class Checkpoint(InputFiles):
    """A resolved model input: its config, every tensor's location, and its layer stack.

    ``path`` is the directory holding config.json (a hub model's cached snapshot); a hub
    model's shards may not be there yet (their tensors' offsets are -1 until downloaded).
    """

    name: str
    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    weight_files: tuple[Path, ...]
    stack: LayerStack
    hub: HubSnapshot | None = None
    remote: RemoteSnapshot | None = None
    CONFIG_NAME: ClassVar[str] = CONFIG


def is_peft_adapter_dir(path: Path) -> bool:
    """A PEFT adapter directory (``adapter_config.json``), as opposed to a full checkpoint."""
    return is_file(path / ADAPTER_CONFIG)


def resolve_model(ref: ModelRef, recipe: Recipe) -> Checkpoint:
    """Read one model's config and headers and find its layer stack.

    Raises:
        SourceNotFoundError: no such directory, or no config.json / weights in it.
        SourceUnreadableError: a directory that cannot be listed or searched.
        UnsupportedCheckpointError: pickle-only, quantized, adapter directory, several stacks,
            files that are symlinks out of the model directory, unusable config values.
        CorruptCheckpointError, TensorNotFoundError: damaged or inconsistent files.
    """
    located, path, snap = locate_input(ref, recipe)
    _check_directory(ref, path, located, relative_paths(recipe))
    root = model_root(path)
    config_path = path / CONFIG
    if is_peft_adapter_dir(path) and not lexists(config_path):
        raise located(UnsupportedCheckpointError,
                      f"{ref.written!r} is a PEFT adapter directory (adapter_config.json), not a "
                      "model checkpoint", "`models:` entries need a full checkpoint "
                      "(config.json + *.safetensors)")
    if not lexists(config_path):
        raise located(SourceNotFoundError, f"no config.json in {ref.written!r}",
                      "a checkpoint directory holds config.json and model*.safetensors")
    config = read_config(config_path, root)
    if "quantization_config" in config:
        method = config["quantization_config"].get("quant_method", "?") if isinstance(
            config["quantization_config"], dict) else "?"
        raise located(UnsupportedCheckpointError,
                      f"{ref.written!r} is a quantized checkpoint (quantization_config, "
                      f"quant_method {str(method)[:40]!r}); version 1 does not merge quantized "
                      "weights", "use the unquantized (bf16/fp16/fp32) checkpoint")
    _check_config_values(config, config_path)

    tensors, files = _read_tensors(path, root, ref, located, snap)
    try:
        stack = find_layer_stack(config, tensors, layer_prefix=ref.layer_prefix)
    except LayerStackError as e:
        cls = UnsupportedCheckpointError
        err = located(cls, f"model {ref.name!r} ({ref.written}) {e.message}"
                      if e.message.startswith("has ") else f"model {ref.name!r}: {e.message}",
                      e.hint)
        err.stacks = e.stacks  # type: ignore[attr-defined]  # several stacks: import-mergekit
        raise err from None
    _check_layer_names(stack, tensors)
    return Checkpoint(ref.name, path, config, tensors, files, stack, **split_snapshot(snap))


def _check_directory(ref: ModelRef, path: Path, located: Located, relative: str) -> None:
    """The model path must name an existing directory (with a hint for a hub id written as a
    path)."""
    try:
        exists = path.exists()
    except OSError as e:  # e.g. ENAMETOOLONG: the kernel refuses the name itself
        raise located(SourceNotFoundError, f"model path {ref.written[:80]!r} cannot be used: "
                      f"{e.strerror or e}", "check the path") from None
    if not exists:
        hint = f"check the path ({relative})"
        if "/" in ref.written and not ref.written.startswith((".", "/", "~")) and (
                ref.written.count("/") == 1):
            hint += (f"; if {ref.written!r} is a Hugging Face Hub repo, write "
                     f"`{{hub: {ref.written}}}`")
        raise located(SourceNotFoundError, f"model directory {ref.written!r} does not exist "
                      f"({display_path(path)})", hint)
    if not path.is_dir():
        raise located(SourceNotFoundError, f"{ref.written!r} is a file, not a checkpoint "
                      "directory", "name the directory that holds config.json")
    check_readable_dir(path)


def read_config(config_path: Path, root: Path) -> dict[str, Any]:
    """config.json as transformers reads it (Python's json: NaN and duplicate keys pass, the
    last key wins), but refusing what cannot be a config: huge files, non-UTF-8, non-objects,
    deep nesting and lone surrogates (which could not be written back out).

    Raises:
        UnsupportedCheckpointError: a symlink out of the model directory or a special file.
        CorruptCheckpointError: the file is not a model config.
    """
    check_confined(config_path, root)
    shown = display_path(config_path)
    raw = read_small(config_path, MAX_CONFIG, CONFIG)
    config = parse_json(raw, shown, CONFIG, strict=False, hint=_DAMAGED)
    if not isinstance(config, dict):
        raise CorruptCheckpointError(f"config.json is {kind_of(config)}, not a JSON "
                                     "object", file=shown, hint=_DAMAGED)
    todo: list[tuple[Any, int]] = [(config, 1)]
    while todo:
        value, depth = todo.pop()
        if depth > MAX_CONFIG_DEPTH:
            raise CorruptCheckpointError(
                f"config.json nests objects or lists more than {MAX_CONFIG_DEPTH} levels deep",
                file=shown, hint=_DAMAGED)
        if isinstance(value, dict):
            todo.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            todo.extend((v, depth + 1) for v in value)
    return config


def _check_config_values(config: dict[str, Any], config_path: Path) -> None:
    """The config values recipekit reads must have the types transformers gives them."""
    shown = display_path(config_path)
    archs = config.get("architectures")
    if archs is not None and not (isinstance(archs, list)
                                  and all(isinstance(a, str) for a in archs)):
        raise UnsupportedCheckpointError(
            f"`architectures` is {kind_of(archs)}, not a list of class names", file=shown,
            hint="fix config.json (e.g. [\"LlamaForCausalLM\"])")
    model_type = config.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise UnsupportedCheckpointError(
            f"`model_type` is {kind_of(model_type)}, not a string", file=shown,
            hint="fix config.json (e.g. \"llama\")")
    subs = [(k, v) for k, v in config.items() if isinstance(v, dict)]
    for prefix, cfg in [("", config), *((f"{k}.", v) for k, v in subs)]:
        for key in COUNT_KEYS:
            value = cfg.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < 0):
                raise UnsupportedCheckpointError(
                    f"`{prefix}{key}` is {kind_of(value)}, not a layer count",
                    file=shown, hint="write the number of layers as a JSON integer")


def _check_layer_names(stack: LayerStack, tensors: dict[str, TensorInfo]) -> None:
    """Refuse layer indices that are not plain decimal numbers (``03``, non-ASCII digits): they
    would alias another layer's tensors or fail to renumber."""
    for name in tensors:
        if not name.startswith(stack.prefix):
            continue
        index, sep, _ = name[len(stack.prefix):].partition(".")
        if sep and index.isdigit() and not (index.isascii() and str(int(index)) == index):
            raise UnsupportedCheckpointError(
                f"tensor {quote_name(name)} has the layer index {index!r}, which is not a plain "
                "decimal number", file=display_path(tensors[name].file),
                hint="layer indices are written 0, 1, 2, ... without leading zeros; rename the "
                "tensors")


def _plain_file_name(name: str) -> bool:
    """A name that stays in the model directory: no separators, no NUL, not '.' or '..'."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name \
        and (os.altsep is None or os.altsep not in name)


def read_index(index: Path, root: Path) -> dict[str, str]:
    """The `weight_map` of a sharded checkpoint's index: tensor name -> shard file name.

    Raises:
        UnsupportedCheckpointError: the index is a symlink out of the model directory.
        CorruptCheckpointError: not UTF-8 JSON, duplicate keys, no object `weight_map`, values
            that are not plain file names beside the index (``../x``, ``/abs``, NUL).
    """
    check_confined(index, root)
    shown = display_path(index)
    doc = parse_json(read_small(index, MAX_HEADER, INDEX), shown, INDEX, hint=_DAMAGED)
    if not isinstance(doc, dict):
        raise CorruptCheckpointError(f"the index is {kind_of(doc)}, not a JSON object",
                                     file=shown, hint=_DAMAGED)
    if "weight_map" not in doc:
        raise CorruptCheckpointError("the index has no `weight_map`", file=shown, hint=_DAMAGED)
    weight_map = doc["weight_map"]
    if not isinstance(weight_map, dict):
        raise CorruptCheckpointError(
            f"`weight_map` is {kind_of(weight_map)}, not an object mapping tensor names "
            "to shard files", file=shown, hint=_DAMAGED)
    for name, fname in weight_map.items():
        if not isinstance(fname, str):
            raise CorruptCheckpointError(
                f"`weight_map` maps tensor {quote_name(name)} to {kind_of(fname)}, not a "
                "file name", file=shown, hint=_DAMAGED)
        if not _plain_file_name(fname):
            raise CorruptCheckpointError(
                f"`weight_map` maps tensor {quote_name(name)} to {quote_name(fname)}, which is "
                "not a file beside the index", file=shown,
                hint="shard names cannot contain '/' or NUL or be '.' or '..'; the index is "
                "damaged or crafted")
    return weight_map


def _read_tensors(path: Path, root: Path, ref: ModelRef, located: Located, snap: Snapshot | None
                  ) -> tuple[dict[str, TensorInfo], tuple[Path, ...]]:
    single = path / WEIGHTS
    index = path / INDEX
    if lexists(single) or (snap is not None and not lexists(index)):
        return shard_header(single, root, snap), (single,)
    if lexists(index):
        weight_map, headers = read_shard_headers(
            path, root, snap, lambda shard: shard_header(shard, root, snap))
        return index_tensors(path, weight_map, headers), tuple(path / f for f in headers)
    pickles = [n for n in PICKLE_NAMES if is_file(path / n)]
    if pickles:
        raise located(UnsupportedCheckpointError,
                      f"{ref.written!r} holds only pickle weights ({pickles[0]}); `run` does "
                      "not load pickles, which can run code",
                      "if you trust it, convert it once with `recipekit convert --allow-pickle "
                      f"{ref.written} <new dir>` and use the new directory")
    others = sorted(p.name for p in path.glob("*.safetensors"))
    raise located(SourceNotFoundError,
                  f"no {WEIGHTS} or {INDEX} in {ref.written!r}" + (
                      f" (found {', '.join(others[:3])})" if others else ""),
                  "a checkpoint directory holds model.safetensors or a sharded index")


_STALE = "the index is stale or the shard is from another checkpoint"


def read_shard_headers(path: Path, root: Path, snap: Snapshot | None,
                       read_one: Callable[[Path], dict[str, TensorInfo]]
                       ) -> tuple[dict[str, str], dict[str, dict[str, TensorInfo]]]:
    """A sharded checkpoint's weight map and each listed shard's header (``read_one``), a
    missing shard refused (exit 2) unless a hub snapshot will fetch it: one walk for `run`,
    `validate` and `inspect`."""
    weight_map = read_index(path / INDEX, root)
    headers: dict[str, dict[str, TensorInfo]] = {}
    for fname in dict.fromkeys(weight_map.values()):
        shard = path / fname
        if not lexists(shard) and snap is None:
            raise SourceNotFoundError(
                f"shard {fname!r} listed in {INDEX} is missing",
                file=display_path(shard), hint="the checkpoint download is incomplete")
        headers[fname] = read_one(shard)
    return weight_map, headers


def index_tensors(path: Path, weight_map: dict[str, str],
                  headers: dict[str, dict[str, TensorInfo]]) -> dict[str, TensorInfo]:
    """A sharded checkpoint's tensors (in index order), its index checked against the shards'
    headers both ways: a listed tensor its shard lacks, or a shard tensor the index does not list
    or maps elsewhere, is a stale index (exit 2: headers alone show it). One check, so `run`,
    `validate` and `inspect` give the same verdict (tests/inputs/test_models.py)."""
    tensors: dict[str, TensorInfo] = {}
    for name, fname in weight_map.items():
        info = headers[fname].get(name)
        if info is None:
            raise TensorNotFoundError(
                f"tensor {quote_name(name)} is listed in {INDEX} for {fname} but that file "
                "does not contain it", file=display_path(path / fname), hint=_STALE)
        tensors[name] = info
    for fname, header in headers.items():
        for name in header:
            if weight_map.get(name) != fname:
                listed = f"maps to {weight_map[name]}" if name in weight_map else "does not list"
                raise TensorNotFoundError(
                    f"{fname} holds tensor {quote_name(name)}, which {INDEX} {listed}",
                    file=display_path(path / INDEX), hint=_STALE)
    return tensors


def iter_donor_files(path: Path, *, warn: bool = True) -> list[Path]:
    """Non-weight files of a checkpoint directory, relative, sorted: what the output inherits.

    Skips weights (and weight-only folders such as ``onnx/``), indexes, hidden files, the donor's
    README.md (the output gets its own model card) and recipekit's own bookkeeping. Files that
    are symlinks resolving outside the model directory (a hub cache snapshot's links into its own
    ``blobs/`` are fine), broken links, special files and symlinked directories are skipped with
    a warning (unless ``warn`` is false: the plan hash and the lock list them again): their
    content is not the donor's to hand on.
    """
    out: list[Path] = []
    skip = {Path(MODEL_CARD), Path(MANIFEST), Path(CONFIG)}
    for rel, why in walk_confined(path, model_root(path), skip_dir=lambda d: d.name in WEIGHT_DIRS
                                  or d.name.startswith(".")):
        f = rel.name
        if f.startswith(".") or f.endswith(WEIGHT_SUFFIXES) or f.endswith(".index.json") \
                or rel in skip:
            continue
        if why == "is a symlinked directory":
            why += " (recipekit copies only the donor's own files)"
        if why is not None:
            if warn:
                _skip_warning(path / rel, why)
            continue
        out.append(rel)
    return out


def donor_files_identity(path: Path) -> dict[str, dict[str, int]]:
    """Size and mtime of every file `iter_donor_files` hands on, by relative path: what the plan
    hash records of a local donor beyond its config and weights, so that a swapped
    ``tokenizer_config.json`` makes a finished output stale (issue 17 item 9)."""
    out = {}
    for rel in iter_donor_files(path, warn=False):
        st = (path / rel).stat()
        out[rel.as_posix()] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return out


def read_donor_json(donor: Path, rel: Path) -> Any:
    """A donor's small JSON side file (e.g. ``1_Pooling/config.json``) parsed, or None when it
    cannot be read or parsed: such files are copied as they are, never a reason to stop."""
    try:
        return json.loads(read_small(donor / rel, MAX_CONFIG, rel.as_posix()))
    except (CorruptCheckpointError, UnicodeDecodeError, ValueError):
        return None


def _skip_warning(p: Path, why: str) -> None:
    log.warning("%s: not copied to the output: it %s", display_path(p), why)
