"""Resolve every input a recipe names: models, adapters and the steps' side files.

`resolve_sources` is the one entry point of the inputs layer: it reads configs, safetensors
headers and side files (never tensor data), collecting every problem of the models and adapters
before raising, and returns them as `Sources`, which plan compilation, `recipekit lock` and the
lock check consume.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from recipekit.errors import KeyPath, RecipeErrors, RecipekitError
from recipekit.inputs.adapters import resolve_adapter
from recipekit.inputs.models import resolve_model
from recipekit.inputs.side_files import SideFile, resolve_side_files
from recipekit.inputs.tokenizer_file import resolve_tokenizers
from recipekit.recipe import Recipe


class Sources(dict[str, Any]):
    """Resolved models and adapters (`Checkpoint` / `AdapterCheckpoint`) by recipe name, plus
    ``side_files``: the steps' side files by (step name, key within the step)."""

    side_files: dict[tuple[str, KeyPath], SideFile]

    def __init__(self, items: dict[str, Any] | None = None,
                 side_files: dict[tuple[str, KeyPath], SideFile] | None = None) -> None:
        super().__init__(items or {})
        self.side_files = side_files or {}


def resolve_sources(recipe: Recipe, names: list[str] | None = None) -> Sources:
    """Resolve the named models and adapters (default: all, with the steps' side files) into
    `Checkpoint`s and `AdapterCheckpoint`s, collecting every problem before raising.

    A side file that cannot be used is not raised here: the step that names it reports it,
    located, when the plan is compiled (`side_files.side_file`).
    """
    out: dict[str, Any] = {}
    errors: list[RecipekitError] = []
    for name, ref in [*recipe.models.items(), *recipe.adapters.items()]:
        if names is not None and name not in names:
            continue
        try:
            out[name] = (resolve_model(ref, recipe) if ref.key_path[0] == "models"
                         else resolve_adapter(ref, recipe))
        except RecipekitError as e:
            errors.append(e)
    if errors:
        if len(errors) == 1:
            raise errors[0]
        if all(e.exit_code == 2 for e in errors):
            raise RecipeErrors(errors)
        raise next(e for e in errors if e.exit_code != 2)
    if names is not None:
        return Sources(out, {})
    return with_side_files(recipe, out)


def with_side_files(recipe: Recipe, checkpoints: Mapping[str, Any]) -> Sources:
    """``checkpoints`` (resolved models and adapters by name) with the side files and
    tokenizers ``recipe``'s steps read: what `compile_plan` needs of a recipe whose inputs were
    resolved for another (`import-mergekit` resolves its models once, before the recipe's
    steps exist)."""
    return Sources(dict(checkpoints), {**resolve_side_files(recipe),
                                       **resolve_tokenizers(recipe, checkpoints)})
