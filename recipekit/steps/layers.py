"""The `layers` op: depth up-scaling (SOLAR), frankenmerges and layer removal.

The output's layers are the listed source layers, renumbered from 0; every other tensor
(embeddings, final norm, head) comes from the step's `from`. Only data moves, so the output is
bit-identical to its sources; `num_hidden_layers` and per-layer config lists follow the
layers (`LayerStack.per_layer_keys`, known by name: `arch.lookup.GENERIC_PER_LAYER` and the
family file's `per_layer`, e.g. `layer_types`, SmolLM3's `no_rope_layers`). The oracle:
`transformers` logits of the output equal those of a model built by deep-copying the source
layers in the same order (tests/steps/test_layers.py).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from recipekit.arch import LayerStack, config_get, load_architectures, with_config
from recipekit.arch.layer_types import derived_layer_types, layer_types_of
from recipekit.errors import KeyPath, RecipeError, RecipeErrors, ShapeMismatchError
from recipekit.graph import Node, VirtualModel
from recipekit.recipe import Recipe, Step, parse_layer_range
from recipekit.steps.registry import Op

log = logging.getLogger(__name__)

Pick = tuple[str, int, KeyPath]  # (model name, layer index, key path of the recipe entry)


def _expand(step: Step) -> list[tuple[str, range, KeyPath, str]]:
    """Each entry as (model, indices, key path, how the user wrote it).

    Indices stay ranges until they are checked against the model: "range(0, 10**12)" is one.
    """
    out = []
    base = step.spec["from"]
    for j, entry in enumerate(step.spec["layers"]):
        path = step.key_path + ("layers", j)
        if isinstance(entry, int):
            out.append((base, range(entry, entry + 1), path, str(entry)))
        elif isinstance(entry, str):
            out.append((base, parse_layer_range(entry), path, entry))
        elif "range" in entry:
            a, b = entry["range"]
            out.append((entry["from"], range(a, b), path, f"range [{a}, {b}]"))
        else:
            for k, sub in enumerate(entry["layers"]):
                sub_path = path + ("layers", k)
                if isinstance(sub, int):
                    out.append((entry["from"], range(sub, sub + 1), sub_path, str(sub)))
                else:
                    out.append((entry["from"], parse_layer_range(sub), sub_path, sub))
    return out


def _signature(layer: Mapping[str, Node]) -> dict[str, tuple[int, ...]]:
    return {rel: node.shape for rel, node in layer.items()}


def _mismatch(theirs: Mapping[str, tuple[int, ...]], ours: Mapping[str, tuple[int, ...]],
              src: str, base: str) -> str:
    extra = sorted(set(theirs) - set(ours))
    missing = sorted(set(ours) - set(theirs))
    if extra:
        return f"has `{extra[0]}`, which layers of '{base}' lack"
    if missing:
        return f"lacks `{missing[0]}`, which layers of '{base}' have"
    for rel in sorted(ours):
        if theirs[rel] != ours[rel]:
            return (f"`{rel}` is {list(theirs[rel])} in '{src}' but {list(ours[rel])} in "
                    f"'{base}'")
    return "differs"


def build_layers(step: Step, models: Mapping[str, VirtualModel], recipe: Recipe) -> VirtualModel:
    """Build the `layers` step's virtual model (see the module docstring).

    Raises:
        RecipeErrors: layer indices beyond a model, layers whose shapes do not fit `from`.
    """
    base_name = step.spec["from"]
    base = models[base_name]
    errors: list[RecipeError] = []
    picks = _picks(step, models, recipe, errors)
    base_layers = base.layer_tensors()
    base_signatures = [_signature(layer) for layer in base_layers.values()]
    layer_cache: dict[str, dict[int, dict[str, Node]]] = {base_name: base_layers}
    checked: set[tuple[str, int]] = set()
    for src, i, path in picks:
        if src == base_name or (src, i) in checked:
            continue
        checked.add((src, i))
        layers = layer_cache.setdefault(src, models[src].layer_tensors())
        sig = _signature(layers[i])
        if sig not in base_signatures:
            errors.append(recipe.error(
                path, f"layer {i} of '{src}' does not fit the layers of '{base_name}': "
                + _mismatch(sig, base_signatures[0], src, base_name),
                hint="frankenmerges need layers of the same shapes; merge width-compatible "
                "models", cls=ShapeMismatchError))
    if errors:
        raise RecipeErrors(errors)

    tensors: dict[str, Node] = {n: node for n, node in base.tensors.items()
                                if base.stack.split(n) is None}
    for out_i, (src, i, _) in enumerate(picks):
        for rel, node in layer_cache.setdefault(src, models[src].layer_tensors())[i].items():
            tensors[base.stack.name(out_i, rel)] = node

    updates: dict[tuple[str, ...], Any] = {base.stack.count_key: len(picks)}
    for key in base.stack.per_layer_keys:
        updates[key] = [_per_layer_value(models[src], key, i, recipe, path, src)
                        for src, i, path in picks]
    per_layer = base.stack.per_layer_keys + _derived_layer_types(base, models, picks, updates)
    _warn_index_dependent(base, step)
    config = with_config(base.config, updates)
    stack = LayerStack(base.stack.prefix, len(picks), base.stack.count_key, per_layer,
                       base.stack.family, base.stack.base)
    return VirtualModel(step.name, config, tensors, stack, base.donor,
                        base.changed | frozenset(updates))


def _picks(step: Step, models: Mapping[str, VirtualModel], recipe: Recipe,
           errors: list[RecipeError]) -> list[Pick]:
    """Every (model, layer index, entry path) the `layers` entries select, in output order;
    indices beyond their model are reported instead."""
    picks: list[Pick] = []
    for src, indices, path, written in _expand(step):
        n = models[src].stack.num_layers
        top = max(indices[0], indices[-1])  # not max(indices): that would walk the range
        if top >= n:
            what = f"layer {top}" if not indices[1:] else f"{written} reaches layer {top}"
            errors.append(recipe.error(path, f"{what}, but model '{src}' has {n} layers "
                                       f"(0-{n - 1})", hint="use indices below " + str(n)))
            continue
        picks += [(src, i, path) for i in indices]
    return picks


def _layer_types(model: VirtualModel, parent: tuple[str, ...]) -> list[str] | None:
    """A model's `layer_types`: listed in its config, else as transformers derives them
    (`arch.layer_types`), else None."""
    sub = config_get(model.config, parent) if parent else model.config
    if not isinstance(sub, Mapping):
        return None
    return layer_types_of(sub, model.stack.num_layers)


def _derived_layer_types(base: VirtualModel, models: Mapping[str, VirtualModel],
                         picks: list[Pick], updates: dict[tuple[str, ...], Any]
                         ) -> tuple[tuple[str, ...], ...]:
    """Write the picked layers' `layer_types` into ``updates`` when the config has no such
    list but transformers derives one from the layer index (`arch.layer_types`) and the
    derivation for the new stack would give the layers other kinds; returns the key added
    (a stack of unchanged kinds keeps its config as it was)."""
    parent = base.stack.count_key[:-1]
    key = parent + ("layer_types",)
    if key in base.stack.per_layer_keys:
        return ()
    kinds = {src: _layer_types(models[src], parent) for src in {src for src, _, _ in picks}}
    if not picks or any(v is None for v in kinds.values()):
        return ()
    moved = [kinds[src][i] for src, i, _ in picks]  # type: ignore[index]
    sub = config_get(with_config(base.config, updates), parent) if parent else base.config
    if moved == derived_layer_types({**sub, "layer_types": None}, len(picks)):
        return ()
    updates[key] = moved
    return (key,)


def _per_layer_value(model: VirtualModel, key: tuple[str, ...], index: int, recipe: Recipe,
                     path: KeyPath, src: str) -> Any:
    """The value of a per-layer config list for one source layer (matched by key name; a
    model whose config does not list `layer_types` gives those transformers derives)."""
    for own in model.stack.per_layer_keys:
        if own[-1] == key[-1]:
            return config_get(model.config, own)[index]
    kinds = _layer_types(model, key[:-1]) if key[-1] == "layer_types" else None
    if kinds is not None:
        return kinds[index]
    raise RecipeErrors([recipe.error(
        path, f"model '{src}' has no `{key[-1]}` list in config.json, so its layers cannot be "
        f"placed among layers that have one", hint="frankenmerge models of the same family")])


def _warn_index_dependent(model: VirtualModel, step: Step) -> None:
    family = model.stack.family
    arch = load_architectures().get(family) if family else None
    for flag in arch.layer_index_dependent if arch else ():
        if model.config.get(flag):
            log.warning("step '%s': config `%s` is true, so a moved layer computes differently "
                        "at its new index", step.name, flag)


#: this module's ops (listed once in `recipekit.steps`)
OPS = (
    Op("layers", build_layers, "layers_step"),
)
