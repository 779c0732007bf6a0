"""Virtual models: a config plus named nodes (config edits are `recipekit.arch.config`'s).

Every model input and every step is a `VirtualModel` (adapter sets are `graph.adapterset`'s
`AdapterSet`); nothing is computed until the executor pulls the output's nodes.
"""

from __future__ import annotations

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
    #: For a model input: where each stored tensor lives (`io.header.TensorInfo` by name), so
    #: a step can compare two inputs' bytes at compile time (`extract_lora`); a step's model
    #: reaches it through `models[load.source]` of its `Load` nodes.
    stored: Mapping[str, Any] = field(default_factory=dict)
    #: Non-weight files this step made (relative path -> bytes; None: the donor's copy is not
    #: written): a step that aligned vocabularies holds the output tokenizer (steps/vocab.py).
    #: The output takes those of its nearest ancestor that has any (`plan.compile`), over the
    #: donor's.
    files: Mapping[str, bytes | None] = field(default_factory=dict)

    def layer_tensors(self) -> dict[int, dict[str, Node]]:
        """``{layer index: {name within the layer: node}}``."""
        out: dict[int, dict[str, Node]] = {i: {} for i in range(self.stack.num_layers)}
        for name, node in self.tensors.items():
            hit = self.stack.split(name)
            if hit is not None:
                out[hit[0]][hit[1]] = node
        return out

