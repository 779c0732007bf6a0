"""One module per step kind. A step builder is a short function from virtual models to one.

``BUILDERS[op](step, models, recipe)`` returns the step's `VirtualModel` (or, for the ops that
produce adapters, its `AdapterSet`); it raises
`RecipeErrors` with every problem located at the step's keys. Builders only build nodes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from recipekit.graph import VirtualModel
from recipekit.recipe import Recipe, Step
from recipekit.steps.adapters import build_adapters, build_combine_adapters
from recipekit.steps.coalesce import build_coalesce, build_decoalesce
from recipekit.steps.extract_lora import build_extract_lora
from recipekit.steps.head import build_head
from recipekit.steps.interpolate import build_interpolate
from recipekit.steps.layers import build_layers
from recipekit.steps.merge import build_merge
from recipekit.steps.reinit import build_reinit

Builder = Callable[[Step, Mapping[str, VirtualModel], Recipe], VirtualModel]

BUILDERS: dict[str, Builder] = {
    "layers": build_layers,
    "interpolate": build_interpolate,
    "merge": build_merge,
    "head": build_head,
    "reinit": build_reinit,
    "adapters": build_adapters,
    "combine_adapters": build_combine_adapters,  # type: ignore[dict-item]  # an AdapterSet
    "extract_lora": build_extract_lora,  # type: ignore[dict-item]
    "coalesce": build_coalesce,
    "decoalesce": build_decoalesce,
}
