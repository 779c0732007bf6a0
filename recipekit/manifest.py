"""What an output says about itself: the manifest (`recipekit.json`) and the model card.

The manifest records the recipe, the resolved inputs (path, size and mtime of each file read),
the donor, operator metadata (coalescing schemes and compensation, by step), the tool
version and each shard's sha256, so a reader can tell what produced a
checkpoint and check it. No token or credential is ever recorded.
"""

from __future__ import annotations

from typing import Any

from recipekit import __version__
from recipekit.plan import Plan


def build_manifest(plan: Plan, shards: dict[str, dict[str, Any]]) -> dict[str, Any]:
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
    }


def build_model_card(plan: Plan) -> str:
    r = plan.recipe
    title = r.name or r.file.stem
    inputs = "\n".join(f"- `{name}`: {ref.written}"
                       for name, ref in [*r.models.items(), *r.adapters.items()])
    if plan.adapter:
        about = (f"A PEFT LoRA adapter ({len(plan.model.tensors)} tensors) built with recipekit "
                 f"{__version__} from the recipe below.")
        library = "peft"
    else:
        about = (f"Built with recipekit {__version__} from the recipe below "
                 f"({plan.model.stack.num_layers} layers, config from "
                 f"`{plan.donor.name if plan.donor else '-'}`).")
        library = "transformers"
    text = "\n".join(r.document.lines)
    lang = "json" if r.file.suffix.lower() == ".json" else "yaml"
    return (
        f"---\nlibrary_name: {library}\ntags:\n- recipekit\n---\n\n# {title}\n\n"
        + (f"{r.description}\n\n" if r.description else "")
        + f"{about}\n\n"
        f"## Inputs\n\n{inputs}\n\n## Recipe\n\n```{lang}\n{text}\n```\n"
    )
