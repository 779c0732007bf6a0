"""One module per step kind. A step builder is a short function from virtual models to one.

``BUILDERS[op](step, models, recipe)`` returns the step's `VirtualModel`; it raises
`RecipeErrors` with every problem located at the step's keys. Builders only build nodes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from recipekit.model import VirtualModel
from recipekit.recipe import Recipe, Step
from recipekit.steps.coalesce import build_coalesce, build_decoalesce
from recipekit.steps.interpolate import build_interpolate
from recipekit.steps.layers import build_layers
from recipekit.steps.merge import build_merge

Builder = Callable[[Step, Mapping[str, VirtualModel], Recipe], VirtualModel]

BUILDERS: dict[str, Builder] = {
    "layers": build_layers,
    "interpolate": build_interpolate,
    "merge": build_merge,
    "coalesce": build_coalesce,
    "decoalesce": build_decoalesce,
}
