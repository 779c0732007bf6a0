"""X-LoRA gating for the `adapters` op: static per-module expert weights.

An X-LoRA model (PEFT `XLoraModel`, the original `xlora` package) mixes its LoRA experts per
token and per LoRA-wrapped module: ``y = W x + gsw · Σ_i g[t, l, i] · s_i B_i A_i x``. With
gates that do not depend on the token this is a static fold
``W_l' = W_l + gsw · Σ_i g[l, i] · w_i s_i B_i A_i`` (reference/adapters.md §4.2, §4.5 (b));
``gating:`` supplies g as

* ``modules:`` a table, either ``{module name: [g_0, ..., g_n-1]}`` or a list of rows in
  X-LoRA's module order; ``layers:`` one row per layer of the stack, for every wrapped module of
  that layer (``modules:`` rows override it); or
* ``log:`` an X-LoRA scalings log (`scalings_log`), whose per-token gates are transformed as
  X-LoRA's forward does (``top_k``, ``softmax_topk``) and averaged per module.

X-LoRA numbers its modules l in module registration order over the union of the experts'
targets (``model.modules()``), which is **not** sorted tensor-name order (``mlp.gate_proj``
sorts before ``self_attn.q_proj``). recipekit reads that order from the architecture data:
embeddings, then each layer's weights in the family file's order, then the final weights and
the head. Oracle: tests/steps/test_xlora.py against PEFT's XLoraModel forward and scalings log.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from recipekit.arch import load_architectures
from recipekit.errors import KeyPath, RecipeError, RecipeErrors, ScalingsLogError
from recipekit.graph import VirtualModel
from recipekit.inputs.side_files import side_path
from recipekit.io.header import quote_name
from recipekit.recipe import Recipe, Step

#: How many module names an error lists before "...".
SHOW = 4


@dataclass(frozen=True)
class Gating:
    """Per-module expert gates, in X-LoRA's module order.

    ``gates[l][i]`` already includes ``global_scaling_weight``; ``meta`` is what the manifest
    records under the step (the gating source, a log's files and hashes, the table).
    """

    modules: tuple[str, ...]  # tensor names of `from`
    gates: tuple[tuple[float, ...], ...]
    meta: Mapping[str, Any]


def xlora_order(model: VirtualModel, tensors: Sequence[str]) -> tuple[list[str], list[str]]:
    """(``tensors`` in module registration order, those the architecture data cannot place).

    The key: pre-stack weights, then layer by layer the family's per-layer weights in file
    order, then post-stack weights, then head weights. Checked against transformers'
    `named_modules` for every bundled decoder family in tests/steps/test_xlora.py.
    """
    arch = load_architectures().get(model.stack.family or "")
    if arch is None:
        return [], list(tensors)
    stack, base = model.stack, model.stack.base
    keys: dict[str, tuple[int, int, int]] = {}
    unplaced: list[str] = []
    for name in tensors:
        hit = stack.split(name)
        rel = name[len(base):] if name.startswith(base) else None
        if hit is not None and hit[1] in arch.weights["layer"]:
            keys[name] = (1, hit[0], arch.weights["layer"].index(hit[1]))
        elif rel is not None and rel in arch.weights["pre"]:
            keys[name] = (0, 0, arch.weights["pre"].index(rel))
        elif rel is not None and rel in arch.weights["post"]:
            keys[name] = (2, 0, arch.weights["post"].index(rel))
        elif name in arch.weights["head"]:
            keys[name] = (3, 0, arch.weights["head"].index(name))
        else:
            unplaced.append(name)
    return sorted(keys, key=keys.__getitem__), unplaced


def _module_name(tensor: str) -> str:
    return tensor[:-len(".weight")] if tensor.endswith(".weight") else tensor


def _shown(names: Sequence[str]) -> str:
    head = ", ".join(quote_name(_module_name(n)) for n in names[:SHOW])
    return head + (f" and {len(names) - SHOW} more" if len(names) > SHOW else "")


def _row(value: Any, n: int, path: KeyPath, recipe: Recipe, what: str,
         errors: list[RecipeError]) -> tuple[float, ...] | None:
    if len(value) != n:
        errors.append(recipe.error(path, f"{what} has {len(value)} weights, but the step folds "
                                   f"{n} adapters", hint="one weight per entry of `adapters:`, "
                                   "in its order"))
        return None
    if not all(math.isfinite(float(x)) for x in value):
        errors.append(recipe.error(path, f"{what} has a weight that is not finite"))
        return None
    return tuple(float(x) for x in value)


def _table(spec: Mapping[str, Any], where: KeyPath, recipe: Recipe, model: VirtualModel,
           modules: list[str], n: int) -> list[tuple[float, ...]]:
    """The gates from ``modules:`` / ``layers:`` (one row per module of ``modules``)."""
    errors: list[RecipeError] = []
    given = spec.get("modules")
    if isinstance(given, list):
        rows = _listed_rows(where, recipe, modules, n, given, errors)
    else:
        rows = _layer_rows(spec, where, recipe, model, modules, n, errors)
        _named_rows(given or {}, where, recipe, modules, n, rows, errors)
        if not errors:
            missing = [m for m in modules if m not in rows]
            if missing:
                outside = [m for m in missing if model.stack.split(m) is None]
                errors.append(recipe.error(
                    where, f"gating gives no weights for {len(missing)} LoRA-wrapped "
                    f"module(s): {_shown(missing)}", key=True,
                    hint="add them under `modules:`" + (
                        " (modules outside the layer stack are not covered by `layers:`)"
                        if outside else " or give `layers:` one row per layer")))
    if errors:
        raise RecipeErrors(errors)
    return [rows[m] for m in modules]


def _listed_rows(where: KeyPath, recipe: Recipe, modules: list[str], n: int,
                 given: list[Any], errors: list[RecipeError]
                 ) -> dict[str, tuple[float, ...]]:
    """``modules:`` as a list: one row per wrapped module, in X-LoRA's order."""
    if len(given) != len(modules):
        raise RecipeErrors([recipe.error(
            where + ("modules",), f"gating.modules has {len(given)} rows, but the adapters "
            f"wrap {len(modules)} modules (in X-LoRA's order: {_shown(modules)})",
            hint="one row per LoRA-wrapped module, or name them: {module: [weights]}")])
    rows: dict[str, tuple[float, ...]] = {}
    for i, (name, value) in enumerate(zip(modules, given, strict=True)):
        row = _row(value, n, where + ("modules", i), recipe, f"row {i} "
                   f"({quote_name(_module_name(name))})", errors)
        if row is not None:
            rows[name] = row
    return rows


def _layer_rows(spec: Mapping[str, Any], where: KeyPath, recipe: Recipe, model: VirtualModel,
                modules: list[str], n: int, errors: list[RecipeError]
                ) -> dict[str, tuple[float, ...]]:
    """``layers:``: one row per layer, for every wrapped module of that layer."""
    rows: dict[str, tuple[float, ...]] = {}
    layers = spec.get("layers")
    if layers is None:
        return rows
    count = model.stack.num_layers
    if len(layers) != count:
        errors.append(recipe.error(where + ("layers",), f"gating.layers has "
                                   f"{len(layers)} rows, but model "
                                   f"'{model.name}' has {count} layers",
                                   hint="one row per layer, for every wrapped module "
                                   "of that layer"))
        return rows
    per_layer = [_row(v, n, where + ("layers", i), recipe, f"layer {i}'s row", errors)
                 for i, v in enumerate(layers)]
    for name in modules:
        hit = model.stack.split(name)
        if hit is not None and per_layer[hit[0]] is not None:
            rows[name] = per_layer[hit[0]]  # type: ignore[assignment]
    return rows


def _named_rows(given: Mapping[str, Any], where: KeyPath, recipe: Recipe, modules: list[str],
                n: int, rows: dict[str, tuple[float, ...]], errors: list[RecipeError]) -> None:
    """``modules:`` as {module name: row}: rows that override the layers' (in place). A module
    named twice (with and without ``.weight``) is refused: the last row silently won (found by
    a black-box check)."""
    by_name = {alias: name for name in modules for alias in (name, _module_name(name))}
    first_key: dict[str, str] = {}
    for key, value in given.items():
        path = where + ("modules", key)
        target = by_name.get(key)
        if target is None:
            errors.append(recipe.error(path, f"no adapter of this step wraps module "
                                       f"{quote_name(key)}", key=True,
                                       hint=f"the wrapped modules are {_shown(modules)}"))
            continue
        if target in first_key:
            errors.append(recipe.error(path, f"module {quote_name(key)} is also given as "
                                       f"{quote_name(first_key[target])}: two rows for one "
                                       "module", key=True, hint="keep one of them"))
            continue
        first_key[target] = key
        row = _row(value, n, path, recipe, f"module {quote_name(key)}", errors)
        if row is not None:
            rows[target] = row


def _from_log(step: Step, where: KeyPath, recipe: Recipe, modules: list[str],
              n: int) -> tuple[list[tuple[float, ...]], dict[str, Any]]:
    from recipekit.ops.xlora import mean_gates

    spec = step.spec["gating"]
    written = spec["log"]
    path = side_path(recipe, written)
    try:
        log = step.files[("gating", "log")].value()
        if log.shape_tail != (len(modules), n):
            L, k = log.shape_tail
            raise ScalingsLogError(
                f"the log gates {L} modules × {k} adapters, but this step folds {n} adapters "
                f"that wrap {len(modules)} modules (in X-LoRA's order: {_shown(modules)})",
                hint="fold the experts of the X-LoRA model that wrote the log, in its order")
        means, tokens = mean_gates(log.entries(), top_k=spec.get("top_k"),
                                   softmax_topk=bool(spec.get("softmax_topk", False)))
        if not all(math.isfinite(x) for x in means.ravel().tolist()):
            raise ScalingsLogError("the log holds gates that are not finite (NaN or inf)")
    except ScalingsLogError as e:
        shown = e.message if e.message.startswith(path.name) else f"{written}: {e.message}"
        raise RecipeErrors([recipe.error(where + ("log",), shown, hint=e.hint)]) from None
    meta = {"log": written, "files": log.sha256, "tokens": tokens}
    return [tuple(float(x) for x in row) for row in means.tolist()], meta


def check_gating_document(step: Step, recipe: Recipe) -> list[RecipeError]:
    """What ``gating:`` gets wrong on its own: both or neither of a table and a log, log-only
    options with a table, ``top_k`` above the adapter count, a `modules` list beside `layers`,
    and rows whose length is not the number of ``adapters:`` entries. Part of the `adapters`
    op's document check (no adapter or model is read); `resolve_gating` runs it too."""
    spec = step.spec["gating"]
    where = step.key_path + ("gating",)
    n = len(step.spec["adapters"])
    errors: list[RecipeError] = []
    has_table = "modules" in spec or "layers" in spec
    if has_table == ("log" in spec):
        errors.append(recipe.error(where, "gating needs either a table (`modules:` and/or "
                                   "`layers:`) or a scalings `log:`" + (", not both" if has_table
                                                                         else ""), key=True))
    for key in ("top_k", "softmax_topk"):
        if key in spec and "log" not in spec:
            errors.append(recipe.error(where + (key,), f"`{key}` applies to a scalings log "
                                       "(per token, before averaging); a table gives the final "
                                       "gates", key=True))
    if spec.get("top_k") is not None and spec["top_k"] > n:
        errors.append(recipe.error(where + ("top_k",), f"top_k {spec['top_k']} exceeds the "
                                   f"{n} adapters of this step"))
    given = spec.get("modules")
    if isinstance(given, list) and "layers" in spec:
        errors.append(recipe.error(where + ("layers",), "`layers` has no effect when "
                                   "`modules` lists every module's row", key=True,
                                   hint="give `modules` as {module name: row} to override "
                                   "single modules"))
    rows = [(where + ("layers", i), f"layer {i}'s row", v)
            for i, v in enumerate(spec.get("layers") or [])]
    if isinstance(given, list):
        rows += [(where + ("modules", i), f"row {i}", v) for i, v in enumerate(given)]
    elif isinstance(given, Mapping):
        rows += [(where + ("modules", k), f"module {quote_name(k)}", v) for k, v in given.items()]
    for path, what, value in rows:
        _row(value, n, path, recipe, what, errors)
    return errors


def resolve_gating(step: Step, recipe: Recipe, model: VirtualModel, targets: Sequence[str],
                   adapters: Sequence[str]) -> Gating:
    """The step's ``gating:`` as per-module gates over ``targets`` (the tensors the adapters
    update), in X-LoRA's module order.

    Raises:
        RecipeErrors: both or neither of a table and a log, log-only options with a table,
            ``top_k`` > the adapter count, modules the architecture data cannot order, rows of
            the wrong length, unknown module names, uncovered modules, log problems.
    """
    spec = step.spec["gating"]
    where = step.key_path + ("gating",)
    n = len(adapters)
    errors = check_gating_document(step, recipe)
    modules, unplaced = xlora_order(model, targets)
    if unplaced:
        why = (f"does not place {_shown(unplaced)}" if model.stack.family else
               f"has no family for model '{model.name}'")
        errors.append(recipe.error(where, "X-LoRA's module order comes from the architecture "
                                   f"data, which {why}", key=True, hint="gating supports the "
                                   "bundled families (recipekit/arch/*.json)"))
    if errors:
        raise RecipeErrors(errors)
    scale = float(spec.get("global_scaling_weight", 1.0))
    if "log" in spec:
        rows, meta = _from_log(step, where, recipe, modules, n)
    else:
        rows, meta = _table(spec, where, recipe, model, modules, n), {"log": None}
    meta = {"adapters": list(adapters), **meta, "global_scaling_weight": scale,
            "modules": [_module_name(m) for m in modules], "gates": [list(r) for r in rows]}
    gates = tuple(tuple(scale * g for g in row) for row in rows)
    return Gating(tuple(modules), gates, {"gating": meta})
