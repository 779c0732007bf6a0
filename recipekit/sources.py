"""Resolve the recipe's `models:` into checkpoints: configs and safetensors headers, no tensor data.

A checkpoint is a directory with ``config.json`` and either ``model.safetensors`` or a sharded
``model.safetensors.index.json``. Everything `validate` needs (tensor names, shapes, dtypes,
layer counts) comes from headers, so resolving a 70B model reads kilobytes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recipekit.arch import LayerStack, LayerStackError, find_layer_stack
from recipekit.errors import (
    CorruptCheckpointError,
    RecipekitError,
    SourceNotFoundError,
    TensorNotFoundError,
    UnsupportedCheckpointError,
)
from recipekit.hub import HubSnapshot, fetch_snapshot, remote_header, snapshot_identity
from recipekit.io.header import TensorInfo, display_path, read_header
from recipekit.recipe import ModelRef, Recipe

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.bin",
                "adapter_model.bin")
#: Files that hold weights (never copied from a donor) and recipekit's own bookkeeping.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx",
                   ".onnx_data", ".gguf", ".ot", ".tflite", ".mlmodel", ".npz")
WEIGHT_DIRS = ("onnx", "openvino", "coreml", ".git", ".cache")


@dataclass(frozen=True)
class Checkpoint:
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

    def identity(self) -> dict[str, Any]:
        """What the plan hash records: a local directory's path and each file's size and mtime,
        or a hub repo's pinned commit (which fixes every byte)."""
        if self.hub is not None:
            return {"hub": self.hub.repo, "commit": self.hub.commit}
        files = {}
        for p in (self.path / "config.json", *self.weight_files):
            st = p.stat()
            files[p.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        return {"path": str(self.path), "files": files}

    def manifest_entry(self) -> dict[str, Any]:
        """What the manifest records: `identity`, plus each cached hub file's blob hash."""
        if self.hub is not None:
            return snapshot_identity(self.hub, ["config.json",
                                                *(p.name for p in self.weight_files)])
        return self.identity()


def is_peft_adapter_dir(path: Path) -> bool:
    """A PEFT adapter directory (``adapter_config.json``), as opposed to a full checkpoint."""
    return (path / "adapter_config.json").is_file()


def resolve_model(ref: ModelRef, recipe: Recipe) -> Checkpoint:
    """Read one model's config and headers and find its layer stack.

    Raises:
        SourceNotFoundError: no such directory, or no config.json / weights in it.
        UnsupportedCheckpointError: pickle-only, quantized, adapter directory, several stacks.
        CorruptCheckpointError, TensorNotFoundError: damaged or inconsistent files.
    """
    where = ref.key_path

    def located(cls: type[RecipekitError], message: str, hint: str | None = None):
        return cls(message, key_path=where, hint=hint, location=recipe.document.locate(where))

    snap = None
    if ref.hub is not None:
        try:
            snap = fetch_snapshot(ref.hub, ref.revision)
        except SourceNotFoundError as e:
            raise located(SourceNotFoundError, e.message, e.hint) from None
        path = snap.path
    else:
        assert ref.path is not None
        path = ref.path
    if not path.exists():
        hint = "check the path (relative paths are relative to the recipe file)"
        if "/" in ref.written and not ref.written.startswith((".", "/", "~")) and (
                ref.written.count("/") == 1):
            hint += (f"; if {ref.written!r} is a Hugging Face Hub repo, write "
                     f"`{{hub: {ref.written}}}`")
        raise located(SourceNotFoundError, f"model directory {ref.written!r} does not exist "
                      f"({display_path(path)})", hint)
    if not path.is_dir():
        raise located(SourceNotFoundError, f"{ref.written!r} is a file, not a checkpoint "
                      "directory", "name the directory that holds config.json")
    if is_peft_adapter_dir(path) and not (path / "config.json").is_file():
        raise located(UnsupportedCheckpointError,
                      f"{ref.written!r} is a PEFT adapter directory (adapter_config.json), not a "
                      "model checkpoint", "`models:` entries need a full checkpoint "
                      "(config.json + *.safetensors)")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise located(SourceNotFoundError, f"no config.json in {ref.written!r}",
                      "a checkpoint directory holds config.json and model*.safetensors")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"config.json is not valid JSON ({e})",
                                     file=display_path(config_path)) from None
    if not isinstance(config, dict):
        raise CorruptCheckpointError("config.json is not a JSON object",
                                     file=display_path(config_path))
    if "quantization_config" in config:
        method = config["quantization_config"].get("quant_method", "?") if isinstance(
            config["quantization_config"], dict) else "?"
        raise located(UnsupportedCheckpointError,
                      f"{ref.written!r} is a quantized checkpoint (quantization_config, "
                      f"quant_method {method!r}); version 1 does not merge quantized weights",
                      "use the unquantized (bf16/fp16/fp32) checkpoint")

    tensors, files = _read_tensors(path, ref, located, snap)
    try:
        stack = find_layer_stack(config, tensors, layer_prefix=ref.layer_prefix)
    except LayerStackError as e:
        cls = UnsupportedCheckpointError
        raise located(cls, f"model {ref.name!r} ({ref.written}) {e.message}"
                      if e.message.startswith("has ") else f"model {ref.name!r}: {e.message}",
                      e.hint) from None
    return Checkpoint(ref.name, path, config, tensors, files, stack, snap)


def _header(path: Path, snap: HubSnapshot | None) -> dict[str, TensorInfo]:
    """A shard's tensors: from the file when present, else (hub) from its remote header."""
    if path.is_file() or snap is None:
        return read_header(path)
    return remote_header(snap, path.name)


def _read_tensors(path: Path, ref: ModelRef, located, snap: HubSnapshot | None
                  ) -> tuple[dict[str, TensorInfo], tuple[Path, ...]]:
    single = path / SINGLE
    index = path / INDEX
    if single.is_file() or (snap is not None and not index.is_file()):
        return _header(single, snap), (single,)
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            raise CorruptCheckpointError(f"{INDEX} has no valid `weight_map`",
                                         file=display_path(index)) from None
        headers: dict[str, dict[str, TensorInfo]] = {}
        tensors: dict[str, TensorInfo] = {}
        for name, fname in weight_map.items():
            if not isinstance(fname, str) or "/" in fname or fname.startswith(".."):
                raise CorruptCheckpointError(f"`{name}` maps to an invalid file name {fname!r}",
                                             file=display_path(index))
            if fname not in headers:
                shard = path / fname
                if not shard.is_file() and snap is None:
                    raise SourceNotFoundError(
                        f"shard {fname!r} listed in {INDEX} is missing",
                        file=display_path(shard), hint="the checkpoint download is incomplete")
                headers[fname] = _header(shard, snap)
            info = headers[fname].get(name)
            if info is None:
                raise TensorNotFoundError(
                    f"tensor `{name}` is listed in {INDEX} for {fname} but that file does not "
                    "contain it", file=display_path(path / fname),
                    hint="the index is stale or the shard is from another checkpoint")
            tensors[name] = info
        return tensors, tuple(path / f for f in headers)
    pickles = [n for n in PICKLE_NAMES if (path / n).is_file()]
    if pickles:
        raise located(UnsupportedCheckpointError,
                      f"{ref.written!r} holds only pickle weights ({pickles[0]}); `run` does "
                      "not load pickles, which can run code",
                      "if you trust it, convert it once with `recipekit convert --allow-pickle "
                      f"{ref.written} <new dir>` and use the new directory")
    others = sorted(p.name for p in path.glob("*.safetensors"))
    raise located(SourceNotFoundError,
                  f"no {SINGLE} or {INDEX} in {ref.written!r}" + (
                      f" (found {', '.join(others[:3])})" if others else ""),
                  "a checkpoint directory holds model.safetensors or a sharded index")


def resolve_sources(recipe: Recipe, names: list[str] | None = None) -> dict[str, Checkpoint]:
    """Resolve the named models (default: all), collecting every problem before raising."""
    from recipekit.errors import RecipeErrors

    out: dict[str, Checkpoint] = {}
    errors: list[RecipekitError] = []
    for name, ref in recipe.models.items():
        if names is not None and name not in names:
            continue
        try:
            out[name] = resolve_model(ref, recipe)
        except RecipekitError as e:
            errors.append(e)
    if errors:
        if len(errors) == 1:
            raise errors[0]
        if all(e.exit_code == 2 for e in errors):
            raise RecipeErrors(errors)
        raise next(e for e in errors if e.exit_code != 2)
    return out


def iter_donor_files(path: Path) -> list[Path]:
    """Non-weight files of a checkpoint directory, relative, sorted: what the output inherits.

    Skips weights (and weight-only folders such as ``onnx/``), indexes, hidden files, the donor's
    README.md (the output gets its own model card) and recipekit's own bookkeeping.
    """
    out: list[Path] = []
    for root, dirs, files in os.walk(path):
        rel_root = Path(root).relative_to(path)
        dirs[:] = sorted(d for d in dirs if d not in WEIGHT_DIRS and not d.startswith("."))
        for f in sorted(files):
            rel = rel_root / f
            if f.startswith(".") or f.endswith(WEIGHT_SUFFIXES) or f.endswith(".index.json"):
                continue
            if rel in (Path("README.md"), Path("recipekit.json"), Path("config.json")):
                continue
            out.append(rel)
    return out
