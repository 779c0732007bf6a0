"""Virtual models: a config plus named nodes, and the config edits steps make.

Every model input and every step is a `VirtualModel` (adapter sets are `graph.adapterset`'s
`AdapterSet`); nothing is computed until the executor pulls the output's nodes.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from recipekit.arch import ConfigKey, LayerStack
from recipekit.graph.nodes import Node


@dataclass(frozen=True)
class VirtualModel:
    """A model that exists only as a plan: config, named nodes, layer stack and file donor.

    ``changed`` lists the config keys steps rewrote (layer count, per-layer lists, ...): the
    output's config.json is the donor's with exactly these keys taken from here, and removed
    where this config lacks them (`without_config_keys`).
    """

    name: str
    config: Mapping[str, Any]
    tensors: Mapping[str, Node]
    stack: LayerStack
    donor: str  # the model input whose config and non-weight files this model inherits
    changed: frozenset[ConfigKey] = field(default_factory=frozenset)
    #: Operator metadata later steps and readers may need (coalescing schemes, compensation),
    #: recorded in the manifest under the step's name.
    meta: Mapping[str, Any] = field(default_factory=dict)

    def layer_tensors(self) -> dict[int, dict[str, Node]]:
        """``{layer index: {name within the layer: node}}``."""
        out: dict[int, dict[str, Node]] = {i: {} for i in range(self.stack.num_layers)}
        for name, node in self.tensors.items():
            hit = self.stack.split(name)
            if hit is not None:
                out[hit[0]][hit[1]] = node
        return out


def with_config(config: Mapping[str, Any], updates: Mapping[ConfigKey, Any]) -> dict[str, Any]:
    """A deep copy of ``config`` with each (possibly nested) key set to its new value."""
    out = copy.deepcopy(dict(config))
    for key, value in updates.items():
        cur = out
        for part in key[:-1]:
            cur = cur.setdefault(part, {})
        cur[key[-1]] = copy.deepcopy(value)
    return out


def without_config_keys(config: Mapping[str, Any], keys: list[ConfigKey]) -> dict[str, Any]:
    """A deep copy of ``config`` without the (possibly nested) ``keys``; absent ones are fine."""
    out = copy.deepcopy(dict(config))
    for key in keys:
        cur: Any = out
        for part in key[:-1]:
            cur = cur.get(part) if isinstance(cur, dict) else None
        if isinstance(cur, dict):
            cur.pop(key[-1], None)
    return out
