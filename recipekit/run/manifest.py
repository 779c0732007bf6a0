"""What an output says about itself: the manifest (`recipekit.json`) and the model card.

The manifest records the recipe, the resolved inputs (path, size and mtime of each file read),
the donor, operator metadata (coalescing schemes and compensation, by step), the tool
version, each shard's sha256 and the size and sha256 of every other file of the output
(``files``), so a reader can tell what produced a checkpoint and check it. No token or
credential is ever recorded.
"""

from __future__ import annotations

import re
from typing import Any

from recipekit import __version__
from recipekit.plan import Plan

#: A Hub repo id (``org/name``): what `base_model` may hold.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def build_manifest(plan: Plan, shards: dict[str, dict[str, Any]],
                   files: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """``shards``: each shard's size and sha256; ``files``: the same for every other file the
    output holds (config, index, donor copies, model card), by path inside the output."""
    r = plan.recipe
    return {
        "recipekit_version": __version__,
        "recipe_file": str(r.file),
        "recipe": r.canonical(),
        "plan_hash": plan.plan_hash(),
        "inputs": {name: ckpt.manifest_entry() for name, ckpt in sorted(plan.sources.items())},
        "donor": plan.donor.name if plan.donor is not None else None,
        "output_model": r.output.model,
        **({"operators": dict(plan.operators)} if plan.operators else {}),
        "shards": {name: shards[name] for name in sorted(shards)},
        **({"files": {rel: files[rel] for rel in sorted(files)}} if files else {}),
    }


def build_model_card(plan: Plan) -> str:
    """The output's README.md, following the Hub's model card conventions: YAML front matter
    with ``library_name``, ``base_model`` (the Hub inputs, by repo id; local directories have
    no id the Hub can link, so they are listed in the body only) and ``tags: [recipekit,
    merge]``, then the inputs (Hub inputs pinned to their commit), the tool version and the
    recipe verbatim."""
    r = plan.recipe
    title = r.name or r.file.stem
    lines = []
    for name, ref in [*r.models.items(), *r.adapters.items()]:
        src = plan.sources.get(name)
        hub = getattr(src, "hub", None)
        pinned = f" (commit `{hub.commit}`)" if hub is not None else ""
        lines.append(f"- `{name}`: {ref.written}{pinned}")
    inputs = "\n".join(lines)
    base = [ref.hub for ref in r.models.values() if ref.hub is not None]
    if plan.adapter:
        about = (f"A PEFT LoRA adapter ({len(plan.model.tensors)} tensors) built with recipekit "
                 f"{__version__} from the recipe below.")
        library = "peft"
        parent = plan.config.get("base_model_name_or_path")
        if not base and isinstance(parent, str) and _HUB_ID.match(parent):
            base = [parent]
    else:
        about = (f"Built with recipekit {__version__} from the recipe below "
                 f"({plan.model.stack.num_layers} layers, config from "
                 f"`{plan.donor.name if plan.donor else '-'}`).")
        library = "transformers"
    front = [f"library_name: {library}"]
    if base:
        front += ["base_model:", *(f"- {b}" for b in dict.fromkeys(base))]
    front += ["tags:", "- recipekit", "- merge"]
    text = "\n".join(r.document.lines)
    lang = "json" if r.file.suffix.lower() == ".json" else "yaml"
    return (
        "---\n" + "\n".join(front) + f"\n---\n\n# {title}\n\n"
        + (f"{r.description}\n\n" if r.description else "")
        + f"{about}\n\n"
        f"## Inputs\n\n{inputs}\n\n## Recipe\n\n```{lang}\n{text}\n```\n"
    )
