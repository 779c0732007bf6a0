"""What the compiler knows about an op: one `Op` value, declared in the op's own module.

Why: an op's name, builder, schema definition and input kinds used to live in four places (the
builder table, a `$defs` entry found by the name `<op>_step`, the hard-coded adapter-set guard
in `compile_plan`, the schema's op list). Now the op's module declares ``OPS = (Op(...),)``,
`recipekit.steps` lists the modules once, and the schema's op list and dispatch are generated
from that list (`python -m recipekit.steps.schema`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from recipekit.errors import RecipeError
from recipekit.recipe import Recipe, Step

#: ``build(step, values, recipe)`` returns the step's `VirtualModel` or `AdapterSet`; it raises
#: `RecipeErrors` with every problem located at the step's keys.
Builder = Callable[[Step, Mapping[str, Any], Recipe], Any]

#: ``check(step, recipe)`` returns every problem the step's own keys show, located, without
#: any input: it runs when the recipe is loaded, before inputs are resolved, so that
#: `recipekit validate --no-inputs` (the pre-commit hook) finds them too.
Checker = Callable[[Step, Recipe], list[RecipeError]]


@dataclass(frozen=True)
class Op:
    """One recipe op.

    `name` is what a recipe writes under ``op:``; `build` makes the step's value; `schema` names
    the ``$defs`` entry of `schemas/recipe.schema.json` holding the op's keys (the generated
    dispatch links the two, so the name need follow no convention). With `models_only`, every
    name the step refers to outside ``adapters:`` must be a model, and `compile_plan` rejects an
    adapter set there before building; an op whose builder takes either kind (``adapters``
    folds into a model, and says so itself) sets it False. `check`, when given, is the op's
    document-only check (`Checker`): whatever its builder would refuse that the recipe alone
    shows (a method's missing `base:`, a required parameter, a gating row of the wrong length)
    is reported at load time, with the builder's own message; the builder may check again.
    """

    name: str
    build: Builder
    schema: str
    models_only: bool = True
    check: Checker | None = None
