"""The recipe schema's merge parts, generated from `METHODS`.

Why: the method enum, the `parameters` and per-input keys with their defaults, and the
`x-recipekit-methods` table that editors and readers see were kept by hand beside `METHODS` and
could drift. `recipekit.steps.schema` writes these fragments into `schemas/recipe.schema.json`;
tests/steps/test_schema.py fails when the committed file differs from them.
"""

from __future__ import annotations

from typing import Any

from recipekit.merge import METHODS, ParamSpec

_JSON_TYPES = {"bool": "boolean", "int": "integer"}


def _param_schema(p: ParamSpec) -> dict[str, Any]:
    """One parameter's value schema: a boolean, an integer, or a numeric parameter (number,
    gradient or rules), null allowed when the parameter is nullable."""
    if p.type in _JSON_TYPES:
        out: dict[str, Any] = {"type": _JSON_TYPES[p.type]}
    else:
        out = {"$ref": "#/$defs/number_param"}
    if p.nullable:
        out = {"oneOf": [{"type": "null"}, out]}
    if not p.required and p.default is not None:
        out["default"] = p.default
    return out


def parameter_properties(*, per_input: bool) -> dict[str, Any]:
    """The keys a merge step accepts under `parameters` (every parameter of every method), or
    in a `from` entry (`per_input`: the per-input ones), sorted by name.

    A name several methods declare takes the schema of the last one in `METHODS` order, and
    no default when their defaults differ (della's `epsilon` 0.15, ram's 1e-5): an editor
    would show one method's default for all; `x-recipekit-methods` has each method's own.
    """
    params: dict[str, ParamSpec] = {}
    defaults: dict[str, set[Any]] = {}
    for spec in METHODS.values():
        for p in spec.params:
            if not per_input or p.scope != "shared":
                params[p.name] = p
                defaults.setdefault(p.name, set()).add(p.default)
    out = {name: _param_schema(params[name]) for name in sorted(params)}
    for name, values in defaults.items():
        if len(values) > 1:
            out[name].pop("default", None)
    return out


def method_table() -> dict[str, Any]:
    """`x-recipekit-methods`: each method's base policy and parameters (scope, type, whether
    required, default), in `METHODS` order."""
    return {name: {"base": spec.base, "parameters": {
        p.name: {"scope": p.scope, "type": p.type, "required": p.required, "default": p.default}
        for p in spec.params}} for name, spec in METHODS.items()}


def apply_merge_schema(step: dict[str, Any], entry: dict[str, Any]) -> None:
    """Write the generated merge parts into the merge step's definition and the object form of
    a `from` entry (``$defs.merge_input.oneOf[1]``), in place."""
    pairs = ", ".join(name for name, spec in METHODS.items() if spec.pair)
    step["description"] = ("A mergekit 0.1.5 merge method, tensor by tensor; defaults per method "
                           f"(x-recipekit-methods). Two-model methods ({pairs}) take from: "
                           "[A, B] with t = 0 giving A and no base.")
    step["properties"]["method"]["enum"] = list(METHODS)
    step["properties"]["parameters"]["properties"] = parameter_properties(per_input=False)
    step["x-recipekit-methods"] = method_table()
    properties = entry["properties"]
    model = properties["model"]
    properties.clear()
    properties.update({"model": model, **parameter_properties(per_input=True)})
