"""What an output says about itself: the manifest (`recipekit.json`); the model card is
`card.py`'s.

The manifest records the recipe, the resolved inputs (path relative to the recipe, size and
mtime of each file read, as the plan read its header: `io.header.FileStamp`), the donor,
operator metadata (coalescing schemes and compensation, by step), the tool version, each
shard's sha256 and the size and sha256 of every other file of the output (``files``), so a
reader can tell what produced a checkpoint and check it. No token, credential or absolute local
path is ever recorded.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from recipekit import __version__
from recipekit.plan import Plan

#: A Hub repo id (``org/name``): what `base_model` may hold.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def build_manifest(plan: Plan, shards: dict[str, dict[str, Any]],
                   files: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """``shards``: each shard's size and sha256; ``files``: the same for every other file the
    output holds (config, index, donor copies, model card), by path inside the output.

    No absolute local path is recorded, so publishing the output publishes none of the
    writer's directories: the recipe file is named relative to the output directory (where
    `recipekit verify` looks for it) and each local input relative to the recipe's directory,
    as a recipe names it."""
    r = plan.recipe
    return {
        "recipekit_version": __version__,
        "recipe_file": r.file.name if r.output.url else relative_path(r.file, r.output.path),
        "recipe": r.canonical(),
        **({"variables": dict(r.variables)} if r.variables else {}),
        "plan_hash": plan.plan_hash(),
        "inputs": {name: _portable(ckpt.manifest_entry(), r.file.parent)
                   for name, ckpt in sorted(plan.sources.items())},
        "donor": plan.donor.name if plan.donor is not None else None,
        "output_model": r.output.model,
        **({"operators": dict(plan.operators)} if plan.operators else {}),
        **({"chat_template": plan.chat_template.source} if plan.chat_template else {}),
        "shards": {name: shards[name] for name in sorted(shards)},
        **({"files": {rel: files[rel] for rel in sorted(files)}} if files else {}),
    }


def relative_path(path: Path, start: Path) -> str:
    """``path`` relative to the directory ``start``, POSIX-style (both made absolute first)."""
    return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(start))).as_posix()


def _portable(entry: dict[str, Any], base: Path) -> dict[str, Any]:
    """A manifest input entry with its local ``path`` made relative to ``base``."""
    if isinstance(entry.get("path"), str):
        entry = {**entry, "path": relative_path(Path(entry["path"]), base)}
    return entry
