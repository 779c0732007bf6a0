"""The `reinit` op: re-initialize selected layers the way the architecture initializes them.

Classifier fine-tuning recipes (and layer-dropping studies) restart the top layers from scratch.
Each floating tensor of the listed layers becomes what transformers' ``_init_weights`` would make
of it, by the family's ``init`` rules in arch/*.json (checked against transformers in
tests/test_arch_init.py): ``N(0, initializer_range²)`` for linear weights (GPT-2's residual
projections divided by √(2·n_layer)), ones for norm weights, zeros for biases and for Gemma's
``(1 + w)`` RMSNorm weights. Normal draws are seeded by (``seed``, output tensor name), so a
tensor's values do not depend on what else the recipe touches. Everything else passes through
as the same node (bit-exact). Oracle: tests/steps/test_reinit.py compares each new tensor with
``torch.normal`` from the same per-tensor generator, and the untouched ones byte for byte.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from recipekit.arch import Architecture, LayerStack, config_get, load_architectures
from recipekit.dtypes import is_floating, torch_dtype
from recipekit.errors import RecipeError, RecipeErrors
from recipekit.graph import Node, VirtualModel, intern
from recipekit.recipe import Recipe, Step, parse_layer_range
from recipekit.steps.registry import Op

#: transformers' fallback when a config has no (or a zero) `initializer_range`.
DEFAULT_INITIALIZER_RANGE = 0.02


@dataclass(frozen=True, eq=False)
class Normal(Node):
    """A fresh ``N(0, std²)`` tensor (ops/init.py), drawn chunk by chunk on the CPU from the
    generator seeded by (``seed``, ``tensor``), so one tensor's draw does not depend on what
    else a recipe touches or on the device; rounded once to ``dtype``."""

    rounds_once: ClassVar[bool] = True

    shape: tuple[int, ...]
    dtype: str
    std: float
    seed: int
    tensor: str

    @property
    def workspace(self) -> int:
        from recipekit.ops.init import CHUNK_ELEMENTS  # torch-free: the constant only

        return 4 * min(self.numel, CHUNK_ELEMENTS + 16)  # one fp32 chunk

    def compute(self, args: tuple[Any, ...]) -> Any:
        from recipekit.ops.init import normal
        from recipekit.ops.rng import tensor_generator

        return normal(self.shape, std=self.std, generator=tensor_generator(self.seed, self.tensor),
                      dtype=torch_dtype(self.dtype))


@dataclass(frozen=True, eq=False)
class Fill(Node):
    """A tensor holding ``value`` everywhere (ones for norms, zeros for biases)."""

    rounds_once: ClassVar[bool] = True

    shape: tuple[int, ...]
    dtype: str
    value: float

    def compute(self, args: tuple[Any, ...]) -> Any:
        from recipekit.ops.init import fill

        return fill(self.shape, value=self.value, dtype=torch_dtype(self.dtype))


def family_of(model: VirtualModel, step: Step, recipe: Recipe, op: str,
              usable: Callable[[Architecture], bool] = lambda arch: True) -> Architecture:
    """The model's architecture description, or a located error naming the known families
    the op can use (``usable``: the head op needs a classifier)."""
    arch = load_architectures().get(model.stack.family) if model.stack.family else None
    if arch is None:
        known = ", ".join(sorted(f for f, a in load_architectures().items() if usable(a)))
        raise RecipeErrors([recipe.error(
            step.key_path + ("from",), f"the {op} op needs a known architecture, but "
            f"'{step.spec['from']}' is not one (model_type "
            f"{model.config.get('model_type')!r}, layers `{model.stack.prefix}<i>`)",
            hint=f"known families: {known}")])
    return arch


def initializer_range(config: Mapping[str, Any], stack: LayerStack) -> float:
    """``initializer_range`` beside the layer count in config.json, 0.02 when absent or 0
    (``config.initializer_range or 0.02``, as transformers' ``_init_weights``)."""
    value = config_get(config, stack.count_key[:-1] + ("initializer_range",))
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    return DEFAULT_INITIALIZER_RANGE


def init_node(arch: Architecture, name: str, node: Node, *, std: float, num_layers: int,
              seed: int) -> Node:
    """The re-initialized ``name`` (same shape and dtype), or ``node`` for buffers."""
    if not is_floating(node.dtype):
        return node  # integer and bool buffers pass through
    rule = arch.init_rule(name)
    kind = rule["init"]
    if kind == "keep":
        return node
    if kind in ("ones", "zeros"):
        return intern(Fill(node.shape, node.dtype, 1.0 if kind == "ones" else 0.0))
    scale = rule.get("std_over_sqrt_layers")
    if scale:
        std = std / math.sqrt(scale * num_layers)
    return intern(Normal(node.shape, node.dtype, std, seed, name))


def _selected_layers(step: Step, num_layers: int, recipe: Recipe) -> set[int]:
    errors: list[RecipeError] = []
    selected: set[int] = set()
    for j, entry in enumerate(step.spec["layers"]):
        path = step.key_path + ("layers", j)
        indices = range(entry, entry + 1) if isinstance(entry, int) else parse_layer_range(entry)
        top = max(indices[0], indices[-1])  # not max(indices): "range(0, 10**12)" is one
        if top >= num_layers:
            what = f"layer {top}" if isinstance(entry, int) else f"{entry} reaches layer {top}"
            errors.append(recipe.error(path, f"{what}, but model '{step.spec['from']}' has "
                                       f"{num_layers} layers (0-{num_layers - 1})",
                                       hint=f"use indices below {num_layers}"))
            continue
        selected.update(indices)
    if errors:
        raise RecipeErrors(errors)
    return selected


def build_reinit(step: Step, models: Mapping[str, VirtualModel], recipe: Recipe) -> VirtualModel:
    """Build the `reinit` step's virtual model (see the module docstring).

    Raises:
        RecipeErrors: an unknown architecture, layer indices beyond the model.
    """
    base = models[step.spec["from"]]
    arch = family_of(base, step, recipe, "reinit")
    selected = _selected_layers(step, base.stack.num_layers, recipe)
    std = initializer_range(base.config, base.stack)
    seed = int(step.spec.get("seed", 0))
    tensors: dict[str, Node] = {}
    for name, node in base.tensors.items():
        hit = base.stack.split(name)
        if hit is None or hit[0] not in selected:
            tensors[name] = node
        else:
            tensors[name] = init_node(arch, name, node, std=std,
                                      num_layers=base.stack.num_layers, seed=seed)
    return VirtualModel(step.name, base.config, tensors, base.stack, base.donor, base.changed)


#: this module's ops (listed once in `recipekit.steps`)
OPS = (
    Op("reinit", build_reinit, "reinit_step"),
)
