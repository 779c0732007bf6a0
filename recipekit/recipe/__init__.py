"""Recipes: read a YAML or JSON file with positions (`document`), check it against the published
schema (`schema`), type it (`types`) and check what the schema cannot (`load`).

This package must not import torch: `recipekit validate` answers before torch could load.
"""

from recipekit.recipe.document import Document, load_document
from recipekit.recipe.load import load_recipe, recipe_from_data
from recipekit.recipe.schema import (
    load_schema,
    schema_problems,
    step_references,
    whole_floats_as_ints,
)
from recipekit.recipe.types import (
    DEFAULT_REVISION,
    DEFAULT_SHARD_SIZE,
    FORMAT_VERSION,
    ModelRef,
    Output,
    Recipe,
    Step,
    parse_layer_range,
)

__all__ = [
    "DEFAULT_REVISION",
    "DEFAULT_SHARD_SIZE",
    "FORMAT_VERSION",
    "Document",
    "ModelRef",
    "Output",
    "Recipe",
    "Step",
    "load_document",
    "load_recipe",
    "load_schema",
    "parse_layer_range",
    "recipe_from_data",
    "schema_problems",
    "step_references",
    "whole_floats_as_ints",
]
