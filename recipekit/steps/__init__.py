"""One module per step kind. A step builder is a short function from virtual models to one.

Each module declares its ops (`recipekit.steps.registry.Op`: name, builder, schema definition,
input kinds) next to their builders; `OPS` lists them once, in the order the schema's op enum
shows them. ``OPS[op].build(step, models, recipe)`` returns the step's `VirtualModel` (or, for
the ops that produce adapters, its `AdapterSet`); it raises `RecipeErrors` with every problem
located at the step's keys. Builders only build nodes. `check_steps` runs each op's
document-only check (`Op.check`) when a recipe is loaded, before any input is resolved.
"""

from __future__ import annotations

from recipekit.errors import RecipeError
from recipekit.recipe import Recipe
from recipekit.steps import (
    adapters,
    coalesce,
    extract_lora,
    head,
    interpolate,
    layers,
    merge,
    moe,
    reinit,
)
from recipekit.steps.registry import Builder, Checker, Op

#: op name → `Op`, every op recipekit knows (the schema's op list is generated from it)
OPS: dict[str, Op] = {op.name: op for op in (
    *layers.OPS, *interpolate.OPS, *merge.OPS, *head.OPS, *reinit.OPS, *adapters.OPS,
    *extract_lora.OPS, *coalesce.OPS, *moe.OPS)}

#: op name → builder (a view of `OPS`)
BUILDERS: dict[str, Builder] = {name: op.build for name, op in OPS.items()}



def check_steps(recipe: Recipe, *, skip: frozenset[str] = frozenset()) -> list[RecipeError]:
    """Every problem the ops' document checks (`Op.check`) find in the recipe's steps, except
    the steps named in ``skip`` (those the schema already refused: their keys cannot be
    trusted). Needs no input and no torch; `recipekit.recipe.load_recipe` runs it."""
    errors: list[RecipeError] = []
    for step in recipe.steps.values():
        op = OPS.get(step.op)
        if op is not None and op.check is not None and step.name not in skip:
            errors += op.check(step, recipe)
    return errors


__all__ = ["BUILDERS", "OPS", "Builder", "Checker", "Op", "check_steps"]
