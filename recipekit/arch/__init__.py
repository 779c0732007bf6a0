"""Architectures as data: one JSON file per model family (checked against ``schema.json``),
their lookup (`lookup`: family detection, the layer stack) and config.json access (`config`).
"""

from recipekit.arch.config import (
    ConfigKey,
    config_get,
    config_has,
    with_config,
    without_config_keys,
)
from recipekit.arch.lookup import (
    COUNT_KEYS,
    GENERIC_PER_LAYER,
    Architecture,
    LayerStack,
    detect_architecture,
    family_names,
    find_layer_stack,
    language_stack,
    load_architectures,
    scan_layer_stacks,
)
from recipekit.errors import LayerStackError

__all__ = [
    "COUNT_KEYS",
    "GENERIC_PER_LAYER",
    "Architecture",
    "ConfigKey",
    "LayerStack",
    "LayerStackError",
    "config_get",
    "config_has",
    "detect_architecture",
    "family_names",
    "find_layer_stack",
    "language_stack",
    "load_architectures",
    "scan_layer_stacks",
    "with_config",
    "without_config_keys",
]
