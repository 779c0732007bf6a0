"""The published recipe schema, and its violations rendered like the rest of the messages.

`schemas/recipe.schema.json` is the contract; its validator's raw messages name schema
internals, so each kind of violation is turned into a located message that names the user's own
keys and values (with a close match where one exists).
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterator, Mapping
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recipekit.errors import KeyPath, RecipeError, format_key_path
from recipekit.recipe.document import Document, show
from recipekit.recipe.types import FORMAT_VERSION

if TYPE_CHECKING:  # imported where a document is validated: commands that read none skip it
    import jsonschema


@cache
def load_schema() -> dict[str, Any]:
    """The published recipe schema (shipped in the wheel; read from the checkout when editable)."""
    try:
        text = (resources.files("recipekit") / "_schemas" / "recipe.schema.json").read_text()
    except (FileNotFoundError, OSError):
        text = (Path(__file__).resolve().parents[2] / "schemas" / "recipe.schema.json"
                ).read_text()
    return json.loads(text)


@cache
def _validator() -> jsonschema.Draft202012Validator:
    """The schema's validator, where `integer` means a number written without a decimal point
    or exponent. JSON Schema's admits 4.0 and 1e3, which the steps then used as floats: a head
    index 4.0 crashed `validate` itself, an FFN block 0.0 passed it and crashed the run, a
    layer 0.0 named a tensor "layers.0.0" (found by a black-box check)."""
    import jsonschema

    base = jsonschema.Draft202012Validator
    strict = base.TYPE_CHECKER.redefine(
        "integer", lambda _, x: isinstance(x, int) and not isinstance(x, bool))
    return jsonschema.validators.extend(base, type_checker=strict)(load_schema())


@cache
def _standard_validator() -> jsonschema.Draft202012Validator:
    """The schema's validator with JSON Schema's own `integer` (3.0 is one): what a recipe
    recorded by an older recipekit was checked against when it was written."""
    import jsonschema

    return jsonschema.Draft202012Validator(load_schema())


def schema_problems(data: Any, *, standard: bool = False) -> list[str]:
    """Schema violations of a recipe given as data (e.g. the one a manifest records), as
    ``key.path: message`` lines; empty when valid. ``standard``: with JSON Schema's `integer`
    rather than a recipe's (ints only): a manifest written before recipes refused `seed: 3.0`
    records it as it ran, and is not an edited one."""
    validator = _standard_validator() if standard else _validator()
    return [f"{format_key_path(tuple(e.absolute_path)) or '(top level)'}: {e.message}"
            for e in sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path)
                            .__repr__())]


def whole_floats_as_ints(data: Any) -> None:
    """Write each whole-number float (``64.0``, ``2e3``) where the schema asks for an integer
    as that int, in place. For data made from another tool's config (`import-mergekit`):
    mergekit's pydantic models read ``pad_to_multiple_of: 64.0`` as 64, and a recipe refuses
    the float."""
    for _ in range(8):  # a fix inside a oneOf can reveal the next (bounded)
        found = [leaf for err in _validator().iter_errors(data)
                 for leaf in _iter_leaf_errors(err) if _whole_float_for_int(leaf)]
        for leaf in found:
            _set_at(data, tuple(leaf.absolute_path), int(leaf.instance))
        if not found:
            return


def _types(err: jsonschema.ValidationError) -> list[str]:
    """The types a `type` violation asked for."""
    want = err.validator_value
    return want if isinstance(want, list) else [want]


def _whole_float_for_int(err: jsonschema.ValidationError) -> bool:
    """A whole-number float where the schema asks for an integer (a `type` violation)."""
    return err.validator == "type" and "integer" in _types(err) \
        and isinstance(err.instance, float) and err.instance.is_integer()


def _iter_leaf_errors(err: jsonschema.ValidationError) -> Iterator[jsonschema.ValidationError]:
    yield err
    for sub in err.context or ():
        yield from _iter_leaf_errors(sub)


def coerce_numeric_strings(doc: Document) -> None:
    """Turn unquoted numbers into their text where the schema wants a string.

    A revision ``1234567`` or a step named ``2024`` is a string to the user; YAML reads a number.
    A whole-number float where an integer is also accepted (a layer index ``3.0``, where a
    "range(...)" string goes too) stays a number: it is refused as a float, not as the text
    ``'3.0'``.
    """
    for _ in range(4):
        changed = False
        leaves = [leaf for err in _validator().iter_errors(doc.data)
                  for leaf in _iter_leaf_errors(err)]
        numbers = {tuple(leaf.absolute_path) for leaf in leaves if _whole_float_for_int(leaf)}
        for leaf in leaves:
            if leaf.validator != "type" or "string" not in _types(leaf):
                continue
            path = tuple(leaf.absolute_path)
            if path not in numbers and path in doc.raw_scalars and _set_at(
                    doc.data, path, doc.raw_scalars[path]):
                changed = True
        if not changed:
            return


def _set_at(data: Any, path: KeyPath, value: Any) -> bool:
    for part in path[:-1]:
        data = data[part]
    if isinstance(data[path[-1]], str):
        return False
    data[path[-1]] = value
    return True


def _known_keys(doc: Document, path: KeyPath) -> list[str]:
    schema = load_schema()
    defs = schema["$defs"]
    if not path:
        return list(schema["properties"])
    if path == ("output",):
        return list(defs["output"]["properties"])
    if len(path) == 2 and path[0] == "steps":
        step = _get(doc.data, path)
        op = step.get("op") if isinstance(step, dict) else None
        # the op's definition, found through the dispatch generated from the op registry
        dispatch = _op_definitions(schema)
        fragment = defs.get(dispatch.get(op, "")) if isinstance(op, str) else None
        return list(fragment["properties"]) if fragment else ["name", "op"]
    if len(path) == 2 and path[0] in ("models", "adapters"):
        entry = _get(doc.data, path)
        branch = 2 if isinstance(entry, dict) and "hub" in entry else 1
        kind = "model_source" if path[0] == "models" else "adapter_source"
        return list(defs[kind]["oneOf"][branch]["properties"])
    if path == ("output", "adapter"):
        return list(defs["output"]["properties"]["adapter"]["properties"])
    if len(path) == 4 and path[0] == "steps" and path[2] == "adapters":
        return list(defs["adapter_use"]["oneOf"][1]["properties"])
    if len(path) == 4 and path[0] == "steps" and path[2] == "layers":
        return ["from", "range", "layers"]
    if len(path) == 4 and path[0] == "steps" and path[2] == "from" and "merge_input" in defs:
        return list(defs["merge_input"]["oneOf"][1]["properties"])
    return []


def _get(data: Any, path: KeyPath) -> Any:
    for part in path:
        data = data[part]
    return data


def _describe_at(doc: Document, path: KeyPath) -> str:
    if len(path) >= 2 and path[0] == "steps" and isinstance(path[1], int):
        step = _get(doc.data, path[:2])
        if isinstance(step, dict):
            return f"in step '{step.get('name', '?')}' (op: {step.get('op', '?')})"
    if path and path[0] == "models" and len(path) == 2:
        return f"in model '{path[1]}'"
    if path and path[0] == "adapters" and len(path) == 2:
        return f"in adapter '{path[1]}'"
    return "in " + (format_key_path(path) or "the recipe")


def schema_errors(doc: Document) -> list[RecipeError]:
    out: list[RecipeError] = []
    seen: set[tuple[KeyPath, str]] = set()
    for err in _validator().iter_errors(doc.data):
        # Never drop a schema error: a recipe the schema refuses must not load.
        rendered = _render_schema_error(doc, err) or [doc.error(
            tuple(err.absolute_path), f"{show(err.instance)} is not a valid value here")]
        for e in rendered:
            k = (e.key_path or (), e.message)
            if k not in seen:
                seen.add(k)
                out.append(e)
    return out


def _render_schema_error(doc: Document, err: jsonschema.ValidationError) -> list[RecipeError]:
    import jsonschema

    path: KeyPath = tuple(err.absolute_path)
    v = err.validator
    if v == "additionalProperties" and isinstance(err.instance, dict):
        return _unknown_keys(doc, path, err.instance, err.schema)
    if v == "anyOf" and all(isinstance(b, dict) and set(b) == {"required"}
                            for b in err.validator_value):
        keys = " or ".join(f"`{b['required'][0]}:`" for b in err.validator_value)
        return [doc.error(path, f"{_describe_at(doc, path)[3:]} needs {keys} (or both)",
                          key=True)]
    if v in ("oneOf", "anyOf"):
        gradient = _bare_gradient(doc, path, err)
        if gradient is not None:
            return [gradient]
        best = jsonschema.exceptions.best_match(err.context or [])
        if best is not None and best is not err:
            # Prefer the branch whose type matches what the user wrote.
            branches = _matching_type_branches(err)
            if len({b.schema_path[0] for b in branches if b.schema_path}) == 1:
                # one branch is meant: every mistake in it (a typo and a bad value beside it)
                return [e for b in branches for e in _render_schema_error(doc, b)]
            if branches:
                return _render_schema_error(doc, jsonschema.exceptions.best_match(branches))
            return _render_schema_error(doc, best)
        return [doc.error(path, f"{show(err.instance)} is not a valid value here")]
    if v == "not" and isinstance(err.schema, dict) and \
            isinstance(err.schema.get("x-recipekit-message"), str):
        return [doc.error(path, err.schema["x-recipekit-message"],
                          hint=err.schema.get("x-recipekit-hint"))]
    if v == "enum":
        return [_unknown_value(doc, path, err)]
    if v == "required":
        missing = re.findall(r"'([^']+)' is a required property", err.message)
        key = missing[0] if missing else "?"
        # a key that looks like a misspelling of the missing one is the mistake: one error,
        # not "missing" and "unknown" (without `op:` a step's other keys are not checked at
        # all, they depend on the op)
        typo = _misspelled(key, err.instance, err.schema)
        if typo is not None:
            return [doc.error(path + (typo,), f"unknown key {_describe_at(doc, path)}",
                              hint=f"did you mean '{key}'? (`{key}:` is required here)",
                              key=True)]
        return [doc.error(path, f"missing required key `{key}` {_describe_at(doc, path)}",
                          key=True)]
    return [_value_error(doc, path, err)]


def _bare_gradient(doc: Document, path: KeyPath,
                   err: jsonschema.ValidationError) -> RecipeError | None:
    """One error for mergekit's spelling of a gradient, a bare list of numbers
    (`alpha: [0.1, 0.9]`), where a numeric parameter is expected: it names recipekit's
    `{gradient: [...]}` instead of refusing each number as a rule ("expected an object")."""
    inst = err.instance
    if not (isinstance(inst, list) and inst and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in inst)):
        return None
    numeric = ({"$ref": "#/$defs/gradient"}, {"$ref": "#/$defs/number_param"})  # or nullable
    if not any(b in numeric for b in err.validator_value):
        return None
    text = json.dumps(inst)
    return doc.error(path, f"expected a number, a gradient or a list of rules, got {text}",
                     hint=f"write a gradient as `{{gradient: {text}}}` (mergekit's `{text}`)")


def _misspelled(key: str, instance: Any, schema: Any = None) -> str | None:
    """The key of ``instance`` that looks like a misspelling of the missing ``key`` (not one
    that ``schema`` allows: `models` is not a misspelled `model`)."""
    if not isinstance(instance, dict):
        return None
    known = schema.get("properties", {}) if isinstance(schema, dict) else {}
    close = difflib.get_close_matches(
        key, [k for k in instance if isinstance(k, str) and k not in known], n=1)
    return close[0] if close else None


def _unknown_keys(doc: Document, path: KeyPath, instance: dict[str, Any],
                  schema: Any = None) -> list[RecipeError]:
    """An error for each key of ``instance`` its object schema does not name, with the closest
    allowed key. The allowed keys are `_known_keys`' where the object's schema depends on a
    sibling value (a step's op, a model's form), else those of the schema that refused it (a
    nested mapping: `tokenizer`, a gradient, a rule, an expert)."""
    allowed = _known_keys(doc, path)
    if not allowed and isinstance(schema, dict):
        allowed = list(schema.get("properties", {}))
        patterns = list(schema.get("patternProperties", {}))
        extra = [k for k in instance if k not in allowed
                 and not any(re.search(pat, str(k)) for pat in patterns)]
    else:
        extra = [k for k in instance if k not in allowed]
    errs = []
    for k in extra:
        close = difflib.get_close_matches(k, allowed, n=1)
        hint = _mergekit_rule_hint(path, instance, k) or (
            f"did you mean '{close[0]}'?" if close else (
                "allowed keys: " + ", ".join(allowed) if allowed else None))
        errs.append(doc.error(path + (k,), f"unknown key {_describe_at(doc, path)}",
                              hint=hint, key=True))
    return errs


def _mergekit_rule_hint(path: KeyPath, instance: dict[str, Any], key: str) -> str | None:
    """The recipekit spelling of mergekit's `source:` in a `tokenizer.tokens` rule
    (`{source: zero, force: true}` is `{zero: true, force: true}`), or None."""
    if key != "source" or path[-3:-1] != ("tokenizer", "tokens"):
        return None
    value = instance[key]
    rest = {k: v for k, v in instance.items() if k != key}
    if value == "zero":
        form: dict[str, Any] | None = {"zero": True, **rest}
    elif isinstance(value, str):
        form = {"model": value, **rest}
    elif isinstance(value, dict) and isinstance(value.get("model"), str):  # model_token
        form = {k: value[k] for k in ("model", "token", "token_id") if k in value} | rest
    else:
        form = None
    if form is None:
        return ("mergekit's `source:` is spelled `{zero: true}`, `{model: <name>}` or "
                "`{model: <name>, token: <token>}` here")
    flow = ", ".join(f"{k}: {str(v).lower() if isinstance(v, bool) else show(v)}"
                     for k, v in form.items())
    return f"mergekit's `source:` is not a key here: write `{{{flow}}}`"


def _unknown_value(doc: Document, path: KeyPath, err: jsonschema.ValidationError) -> RecipeError:
    options = [str(o) for o in err.validator_value]
    close = difflib.get_close_matches(
        _DTYPE_ALIASES.get(str(err.instance), str(err.instance)), options, n=1)
    what = "op" if path[-1:] == ("op",) else "value"
    hint = (f"did you mean '{close[0]}'?" if close else "") + (
        " " if close else "") + "allowed: " + ", ".join(options)
    if isinstance(err.schema, dict) and isinstance(err.schema.get("x-recipekit-hint"), str):
        hint += "; " + err.schema["x-recipekit-hint"]  # e.g. the object form of a oneOf
    return doc.error(path, f"unknown {what} {show(err.instance)}", hint=hint)


def _value_error(doc: Document, path: KeyPath, err: jsonschema.ValidationError) -> RecipeError:
    """A value of the wrong kind, form or size."""
    v = err.validator
    if v == "const" and path == ("recipekit",):
        return doc.error(path, f"unsupported recipe format version {show(err.instance)}",
                         hint=f"this recipekit reads `recipekit: {FORMAT_VERSION}`")
    if v == "type":
        whole = _whole_float_for_int(err)
        want = " or ".join(_types(err))
        if whole and path[2:3] == ("layers",) and \
                err.schema is load_schema()["$defs"].get("layer_index"):
            want = "integer layer index"  # a `layers` entry or a range's bound (not a scheme's)
        got = (doc.raw_scalars.get(path) if whole else None) or show(err.instance)  # 1e2
        return doc.error(path, f"expected {_article(want)}, got {got}",
                         hint="write it without a decimal point or exponent" if whole else None)
    if v == "pattern":
        pattern = _pattern_error(doc, path, err)
        if pattern is not None:
            return pattern
    if v == "minItems":
        return doc.error(path, "must not be empty" if err.validator_value == 1 else
                         f"needs at least {err.validator_value} items")
    if v == "maxItems":
        return doc.error(path, f"takes at most {err.validator_value} items")
    if v == "minimum":
        return doc.error(path, f"{show(err.instance)} is below the minimum "
                         f"{err.validator_value}")
    if v == "minProperties":
        return doc.error(path, "must name at least one entry")
    return doc.error(path, err.message)


def _pattern_error(doc: Document, path: KeyPath,
                   err: jsonschema.ValidationError) -> RecipeError | None:
    if path and path[-1] == "shard_size":
        return doc.error(path, f"{show(err.instance)} is not a size",
                         hint="write a number of bytes or e.g. '500MB', '5GB', '2GiB'")
    if path in (("models",), ("adapters",)):  # propertyNames: the key itself
        return doc.error(path + (str(err.instance),), f"{show(err.instance)} is not a valid "
                         "model name", hint=_NAME_RULE, key=True)
    if path[-1:] in (("name",), ("from",), ("model",), ("config",)):
        return doc.error(path, f"{show(err.instance)} is not a valid name", hint=_NAME_RULE)
    if "range" in str(err.validator_value):
        if path in doc.raw_scalars and isinstance(err.instance, str) and \
                err.instance.startswith("-") and err.instance[1:].isdecimal():
            return doc.error(path, f"{show(err.instance)}: layer indices must not be negative",
                             hint="layers count from 0; to select layers from the end, write "
                             "the index, e.g. 31 for the last of 32")
        return doc.error(path, f"{show(err.instance)} is not a layer index or range",
                         hint='write an integer, "range(start, stop)" or '
                         '"range(start, stop, step)"')
    return None


_NAME_RULE = ("names contain only letters, digits, '_', '.' and '-', and do not start with "
              "'.' or '-'")
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
                  "float": "float32", "fp64": "float64", "double": "float64"}


def _matching_type_branches(err: jsonschema.ValidationError) -> list[jsonschema.ValidationError]:
    """Errors from the oneOf branches whose declared type matches the instance's type."""
    inst = err.instance
    kind = ("object" if isinstance(inst, dict) else "array" if isinstance(inst, list)
            else "string" if isinstance(inst, str) else "integer"
            if isinstance(inst, int) and not isinstance(inst, bool) else None)
    out = []
    for sub in err.context or ():
        if sub.validator == "type" and not sub.path:  # the branch's own type, not a value's
            continue
        branch = err.validator_value[sub.schema_path[0]] if sub.schema_path else {}
        branch = _resolve_ref(branch)
        if branch.get("type") == kind:
            out.append(sub)
    if isinstance(inst, dict):  # of object branches, the one whose required keys are there
        meant = [sub for sub in out if set(_resolve_ref(
            err.validator_value[sub.schema_path[0]]).get("required", ())) <= set(inst)]
        out = meant or out
    return out


def _resolve_ref(fragment: dict[str, Any]) -> dict[str, Any]:
    ref = fragment.get("$ref") if isinstance(fragment, dict) else None
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        return _resolve_ref(load_schema()["$defs"][ref.split("/")[-1]])
    return fragment if isinstance(fragment, dict) else {}


def _article(word: str) -> str:
    return ("an " if word[:1] in "aeiou" else "a ") + word


def step_references(step: Mapping[str, Any]) -> Iterator[tuple[str, KeyPath]]:
    """Names a step refers to, with their key paths relative to the step.

    Read off the schema, so that no op's model-valued key can escape name resolution and
    cycle checks: wherever the op's definition puts a ``$ref`` to ``#/$defs/name`` (through
    properties, items, alternatives), the step's value there is a reference. A step whose op
    is unknown is read with every op's definition, so its names are still checked.
    """
    schema = load_schema()
    defs = schema["$defs"]
    dispatch = _op_definitions(schema)
    op = step.get("op")
    wanted = [dispatch[op]] if isinstance(op, str) and op in dispatch else list(
        dict.fromkeys(dispatch.values()))
    seen: set[KeyPath] = set()
    for name in wanted:
        for ref, path in _names_in(step, defs[name], defs, ()):
            if path not in seen and path != ("name",):
                seen.add(path)
                yield ref, path


def _op_definitions(schema: Mapping[str, Any]) -> dict[str, str]:
    """op → the name of its ``$defs`` entry, from the step dispatch generated off the op
    registry."""
    return {case["if"]["properties"]["op"]["const"]: case["then"]["$ref"].split("/")[-1]
            for case in schema["$defs"]["step"]["allOf"]}


def _names_in(value: Any, schema: Any, defs: Mapping[str, Any], path: KeyPath
              ) -> Iterator[tuple[str, KeyPath]]:
    if not isinstance(schema, dict):
        return
    ref = schema.get("$ref")
    if ref == "#/$defs/name":
        if isinstance(value, str):
            yield value, path
        return
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        yield from _names_in(value, defs.get(ref.split("/")[-1]), defs, path)
    for key in ("oneOf", "anyOf", "allOf"):
        for branch in schema.get(key, ()):
            yield from _names_in(value, branch, defs, path)
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                yield from _names_in(value[key], sub, defs, path + (key,))
    elif isinstance(value, list):
        prefix = schema.get("prefixItems", [])
        for i, item in enumerate(value):
            sub = prefix[i] if i < len(prefix) else schema.get("items")
            yield from _names_in(item, sub, defs, path + (i,))
