"""Open a checkpoint named on the command line (`inspect`, `diff`): headers and config only.

A command-line argument is a local model directory, a PEFT adapter directory, a single
``.safetensors`` file, or a Hugging Face Hub repo written ``org/name`` or ``org/name@revision``
(as `transformers.from_pretrained` reads a string that is not a local path). Unlike a recipe's
``models:``, no architecture or layer stack is required: `inspect` must work on any
safetensors checkpoint. The same hostile-input rules apply as for recipe inputs (sources.py):
files must resolve inside the directory, headers are checked in full, pickles are never loaded.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from recipekit.errors import (
    CorruptCheckpointError,
    SourceNotFoundError,
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
)
from recipekit.inputs.hub import HubSnapshot, download, fetch_snapshot
from recipekit.inputs.models import index_tensors, read_config, read_shard_headers
from recipekit.inputs.source import shard_header
from recipekit.io.header import (
    MAX_HEADER,
    TensorInfo,
    kind_of,
    parse_json,
)
from recipekit.io.names import (
    ADAPTER_CONFIG,
    ADAPTER_PICKLE,
    ADAPTER_WEIGHTS,
    CONFIG,
    INDEX,
    PICKLE_NAMES,
    WEIGHTS,
)

_HUB = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


@dataclass(frozen=True)
class OpenCheckpoint:
    """A checkpoint's config (config.json or adapter_config.json; {} when absent) and every
    tensor's location, in file order."""

    written: str
    path: Path
    kind: Literal["model", "adapter", "file"]
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    files: tuple[Path, ...]
    hub: HubSnapshot | None = None


def open_checkpoint(spec: str, *, data: bool = True) -> OpenCheckpoint:
    """Resolve ``spec`` and read its headers.

    ``data`` (the default) makes every tensor readable: hub shards are downloaded into the cache.
    Without it a hub repo's headers come from ranged reads of the headers alone.

    Raises:
        SourceNotFoundError: no such path, not a checkpoint, an unknown or unreachable hub repo.
        SourceUnreadableError: a directory that cannot be listed or searched.
        UnsupportedCheckpointError: pickle-only weights, links out of the directory, fp8 tensors.
        CorruptCheckpointError: damaged headers, index or config.
    """
    path = Path(os.path.expanduser(spec))
    try:
        exists = path.exists()
    except OSError as e:
        raise SourceNotFoundError(f"{spec[:80]!r} cannot be used: {e.strerror or e}") from None
    snap = None
    if not exists:
        if not _HUB.match(spec) or spec.startswith((".", "/", "~")):
            raise SourceNotFoundError(f"{spec!r} does not exist",
                                      hint="name a checkpoint directory, a .safetensors file or "
                                      "a hub repo (org/name or org/name@revision)")
        repo, _, revision = spec.partition("@")
        try:
            snap = fetch_snapshot(repo, revision or "main")
        except SourceNotFoundError as e:
            folder = Path(repo).parent
            if not folder.is_dir():
                raise
            raise SourceNotFoundError(  # a mistyped local path, far likelier than a hub id
                f"{spec!r} does not exist (the folder {str(folder)!r} does), and as a hub repo: "
                f"{e.message}", hint="check the path; or, for a hub repo of the same name as "
                "a local folder, run from another directory") from None
        path = snap.path
    elif path.is_file():
        if not path.name.endswith(".safetensors"):
            raise SourceNotFoundError(f"{spec!r} is not a .safetensors file",
                                      hint="name a checkpoint directory or a .safetensors file")
        tensors = shard_header(path, path.resolve().parent, None)  # refuses FIFOs, devices
        return OpenCheckpoint(spec, path, "file", {}, tensors, (path,))
    elif not path.is_dir():
        raise SourceNotFoundError(f"{spec!r} is not a file or directory")
    else:
        check_readable_dir(path)
    root = model_root(path)
    if lexists(path / ADAPTER_CONFIG):
        return _open_adapter(spec, path, root, snap, data)
    config = read_config(path / CONFIG, root) if lexists(
        path / CONFIG) else {}
    tensors, files = _read_model_tensors(spec, path, root, snap, data)
    return OpenCheckpoint(spec, path, "model", config, tensors, files, snap)


def _local(path: Path, root: Path, snap: HubSnapshot | None, data: bool) -> dict[str, TensorInfo]:
    if snap is not None and data and not lexists(path):
        download(snap, path.name)
    return shard_header(path, root, snap)


def _read_model_tensors(spec: str, path: Path, root: Path, snap: HubSnapshot | None, data: bool
                        ) -> tuple[dict[str, TensorInfo], tuple[Path, ...]]:
    single, index = path / WEIGHTS, path / INDEX
    if lexists(single) or (snap is not None and not lexists(index)):
        return _local(single, root, snap, data), (single,)
    if lexists(index):
        weight_map, headers = read_shard_headers(
            path, root, snap, lambda shard: _local(shard, root, snap, data))
        index_tensors(path, weight_map, headers)  # the same verdict as `validate` and `run`
        tensors = {name: info for header in headers.values() for name, info in header.items()}
        return tensors, tuple(path / f for f in headers)
    pickles = [n for n in PICKLE_NAMES if is_file(path / n)]
    if pickles:
        raise UnsupportedCheckpointError(
            f"{spec!r} holds only pickle weights ({pickles[0]}), which recipekit never loads",
            hint=f"convert it once with `recipekit convert --allow-pickle {spec} <new dir>`")
    others = sorted(p.name for p in path.glob("*.safetensors"))
    raise SourceNotFoundError(f"no {WEIGHTS} or {INDEX} in {spec!r}" + (
        f" (found {', '.join(others[:3])}; name the file itself)" if others else ""),
        hint="name a checkpoint directory, a PEFT adapter directory or a .safetensors file")


def _open_adapter(spec: str, path: Path, root: Path, snap: HubSnapshot | None,
                  data: bool) -> OpenCheckpoint:
    config_path = path / ADAPTER_CONFIG
    check_confined(config_path, root)
    shown = display_path(config_path)
    config = parse_json(read_small(config_path, MAX_HEADER, ADAPTER_CONFIG), shown,
                        ADAPTER_CONFIG, strict=False,
                        hint="the adapter is damaged; save or download it again")
    if not isinstance(config, dict):
        raise CorruptCheckpointError(f"{ADAPTER_CONFIG} is {kind_of(config)}, not a JSON object",
                                     file=shown, hint="the adapter is damaged")
    weights = path / ADAPTER_WEIGHTS
    if not lexists(weights) and snap is None:
        if is_file(path / ADAPTER_PICKLE):
            raise UnsupportedCheckpointError(
                f"{spec!r} holds only a pickle adapter ({ADAPTER_PICKLE}), which recipekit "
                "never loads",
                hint=f"convert it once with `recipekit convert --allow-pickle {spec} <new dir>`")
        raise SourceNotFoundError(f"no {ADAPTER_WEIGHTS} in {spec!r}",
                                  hint=f"a PEFT adapter directory holds {ADAPTER_CONFIG} and "
                                  f"{ADAPTER_WEIGHTS}")
    return OpenCheckpoint(spec, path, "adapter", config, _local(weights, root, snap, data),
                          (weights,), snap)
