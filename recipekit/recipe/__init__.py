"""Load a YAML or JSON recipe, validate it, and return a typed `Recipe`.

Validation happens in three layers, each collecting every problem before raising: YAML/JSON
syntax (with duplicate keys named on both lines), the published JSON Schema
(`schemas/recipe.schema.json`), and semantic checks that need no checkpoint (names resolve, no
cycles, layer-range grammar). Checks against the sources' headers happen at compile time.
Every message is located at the user's own line, like a compiler.

This module must not import torch: `recipekit validate` answers before torch could load.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from recipekit.errors import (
    KeyPath,
    Location,
    RecipeError,
    RecipeErrors,
    UsageError,
    format_key_path,
)
from recipekit.units import parse_size

FORMAT_VERSION = 1
DEFAULT_SHARD_SIZE = "5GB"
DEFAULT_REVISION = "main"

# ---------------------------------------------------------------------------------------------
# YAML with YAML 1.2 floats, positions for every key and value, and duplicate-key errors.


class _Loader(yaml.SafeLoader):
    """SafeLoader whose float rule accepts ``1e-3`` (YAML 1.2); PyYAML 1.1 reads it as a string.

    As in YAML 1.2, ``2024-01-01`` is a string (YAML 1.1 reads a timestamp, which a recipe
    refuses): a revision, tag or step name written that way is just a name.
    """


_FLOAT_TAG = "tag:yaml.org,2002:float"
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_Loader.yaml_implicit_resolvers = {
    first: [r for r in rules if r[0] not in (_FLOAT_TAG, _TIMESTAMP_TAG)]
    for first, rules in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(
        r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
            |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
            |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
            |[-+]?\.(?:inf|Inf|INF)
            |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


_ALLOWED_TAGS = frozenset(f"tag:yaml.org,2002:{t}" for t in
                          ("str", "int", "float", "bool", "null", "map", "seq"))


@dataclass
class Document:
    """A parsed recipe document with the position of every key and value."""

    file: str  # as the user named it, for messages
    data: Any
    lines: list[str]
    key_marks: dict[KeyPath, tuple[int, int]] = field(default_factory=dict)
    value_marks: dict[KeyPath, tuple[int, int]] = field(default_factory=dict)
    raw_scalars: dict[KeyPath, str] = field(default_factory=dict)

    def locate(self, path: KeyPath, *, key: bool = False) -> Location:
        """Return where ``path`` sits: its key's position if ``key`` or it has no value mark.

        Falls back to the nearest enclosing path that has a position.
        """
        p = tuple(path)
        while True:
            marks = (self.key_marks, self.value_marks) if key else (
                self.value_marks, self.key_marks)
            for m in marks:
                if p in m:
                    line, col = m[p]
                    text = self.lines[line - 1] if 0 < line <= len(self.lines) else None
                    return Location(self.file, line, col, text)
            if not p:
                return Location(self.file)
            p = p[:-1]

    def error(self, path: KeyPath, message: str, *, hint: str | None = None,
              key: bool = False, cls: type[UsageError] = RecipeError) -> RecipeError:
        """A ``cls`` error (`RecipeError`, `ShapeMismatchError`, ...) located at ``path``."""
        return cls(message, key_path=path, hint=hint,  # type: ignore[return-value]
                   location=self.locate(path, key=key))


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _compose(text: str, doc: Document, errors: list[RecipeError]) -> Any:
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
    finally:
        loader.dispose()
    if root is None:
        return None
    visited: set[int] = set()  # nodes converted so far; one seen again came through an alias
    inside: set[int] = set()  # the collections being converted, outermost first
    repeated = 0

    def convert(node: yaml.Node, path: KeyPath) -> Any:
        nonlocal repeated
        doc.value_marks[path] = _mark(node)
        if node.tag not in _ALLOWED_TAGS:
            raise yaml.constructor.ConstructorError(
                None, None, f"tag {node.tag!r} is not allowed in a recipe", node.start_mark)
        if id(node) in inside:
            raise yaml.constructor.ConstructorError(
                None, None, "an alias refers to a value that contains it", node.start_mark)
        if id(node) in visited:
            repeated += 1
            if repeated > _MAX_ALIASED_VALUES:
                raise yaml.constructor.ConstructorError(
                    None, None, f"aliases repeat more than {_MAX_ALIASED_VALUES} values",
                    node.start_mark)
        visited.add(id(node))
        if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
            inside.add(id(node))
            try:
                return convert_collection(node, path)
            finally:
                inside.discard(id(node))
        return convert_scalar(node, path)

    def convert_collection(node: yaml.Node, path: KeyPath) -> Any:
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            seen: dict[str, int] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    errors.append(RecipeError(
                        "mapping keys must be plain strings",
                        key_path=path, location=_loc(doc, key_node)))
                    continue
                key = str(key_node.value)
                line = key_node.start_mark.line + 1
                if key in seen:
                    errors.append(RecipeError(
                        f"duplicate key `{key}` (first defined on line {seen[key]})",
                        key_path=path + (key,), location=_loc(doc, key_node),
                        hint="remove one of them; YAML would silently keep only the last"))
                    continue
                seen[key] = line
                doc.key_marks[path + (key,)] = _mark(key_node)
                out[key] = convert(value_node, path + (key,))
            return out
        return [convert(item, path + (i,)) for i, item in enumerate(node.value)]

    def convert_scalar(node: yaml.Node, path: KeyPath) -> Any:
        try:
            value = loader.construct_object(node, deep=True)
            if isinstance(value, int):
                str(value)  # Python refuses to print an int of more than 4300 digits
        except (ValueError, IndexError, KeyError):  # 0b_, ._, 4301 digits; !!int '', !!bool x
            kind = "a boolean" if node.tag.endswith(":bool") else "a number"
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {_show(node.value)} as {kind} (quote it to make it "
                "a string)", node.start_mark) from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            doc.raw_scalars[path] = str(node.value)
        return value

    loader = _Loader(text)  # a fresh constructor for scalars
    try:
        return convert(root, ())
    finally:
        loader.dispose()


#: Values an alias may repeat in all (a legitimate recipe repeats a few dozen): beyond it, a
#: "billion laughs" document would take all memory.
_MAX_ALIASED_VALUES = 10_000


def _loc(doc: Document, node: yaml.Node) -> Location:
    line, col = _mark(node)
    return Location(doc.file, line, col, doc.lines[line - 1] if line <= len(doc.lines) else None)


def _reject_duplicate_json_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key `{k}`")
        out[k] = v
    return out


def load_document(path: str | Path) -> Document:
    """Parse a recipe file (YAML, or JSON by extension) into a located `Document`.

    Raises:
        RecipeErrors: syntax errors and duplicate keys, located.
        SourceNotFoundError: the file does not exist.
    """
    from recipekit.errors import SourceNotFoundError

    display = str(path)
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SourceNotFoundError(
            "recipe file not found", file=display,
            hint="check the path; recipes are YAML (.yaml/.yml) or JSON (.json)") from None
    except IsADirectoryError:
        raise SourceNotFoundError("is a directory, not a recipe file", file=display) from None
    except UnicodeDecodeError as e:
        raise RecipeErrors([RecipeError(f"not UTF-8 text ({e.reason})", file=display)]) from None
    doc = Document(display, None, text.splitlines())
    errors: list[RecipeError] = []
    yaml_text, json_data, json_ok = text, None, False
    if p.suffix.lower() == ".json":
        # The YAML pass below then only locates the JSON parser's document. Tabs are JSON
        # whitespace that YAML refuses in places; no JSON string holds a raw tab, so the YAML
        # pass reads them as spaces (one column each, as before).
        yaml_text = text.replace("\t", " ")
        try:
            json_data = json.loads(text, object_pairs_hook=_reject_duplicate_json_keys)
            json_ok = True
        except json.JSONDecodeError as e:
            raise RecipeErrors([RecipeError(
                f"invalid JSON: {e.msg}",
                location=Location(display, e.lineno, e.colno, _line(doc, e.lineno)))]) from None
        except ValueError:
            pass  # duplicate keys: reported with both lines by the YAML pass below
        except RecursionError:
            raise RecipeErrors([RecipeError("invalid JSON: nested too deeply",
                                            file=display)]) from None
    try:
        doc.data = _compose(yaml_text, doc, errors)
    except (yaml.YAMLError, RecursionError) as e:
        if not json_ok:
            raise _syntax_error(doc, e) from None
        # Valid JSON that YAML cannot read (a key over 1024 characters, a raw U+0080): the JSON
        # parser's document, located as far as the YAML pass got.
        doc.data, errors = json_data, []
    if json_ok and doc.data != json_data:  # YAML folds a raw U+2028 or NEL in a string
        doc.data = json_data
    errors += _lone_surrogates(doc)
    if errors:
        raise RecipeErrors(errors)
    return doc


_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogates(doc: Document) -> list[RecipeError]:
    """Strings that are not text: "\\ud800" escapes a lone UTF-16 surrogate, valid in JSON and
    YAML syntax but not encodable, so every later print or file write of it would fail."""
    out = []
    todo: list[tuple[KeyPath, Any]] = [((), doc.data)]
    while todo:
        path, value = todo.pop()
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(
            value, list) else ()
        for k, v in items:
            todo.append((path + (k,), v))
            if isinstance(k, str) and _SURROGATE.search(k):
                out.append(doc.error(path + (k,), f"key {_show(k)} is not valid text: it holds a "
                                     "lone UTF-16 surrogate", key=True))
        if isinstance(value, str) and _SURROGATE.search(value):
            out.append(doc.error(path, f"{_show(value)} is not valid text: it holds a lone UTF-16 "
                                 "surrogate", hint="write the character itself (or escape it as "
                                 "\\U0001f600 in YAML, as a \\ud83d\\ude00 pair in JSON)"))
    return out


def _syntax_error(doc: Document, e: yaml.YAMLError | RecursionError) -> RecipeErrors:
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        loc = (Location(doc.file, mark.line + 1, mark.column + 1, _line(doc, mark.line + 1))
               if mark else Location(doc.file))
        problem = e.problem or e.context or "invalid YAML"
        return RecipeErrors([RecipeError(f"invalid YAML: {problem}", location=loc)])
    if isinstance(e, RecursionError):
        return RecipeErrors([RecipeError("invalid YAML: nested too deeply", file=doc.file)])
    return RecipeErrors([RecipeError(f"invalid YAML: {e}", file=doc.file)])


def _line(doc: Document, line: int) -> str | None:
    return doc.lines[line - 1] if 0 < line <= len(doc.lines) else None


# ---------------------------------------------------------------------------------------------
# Schema


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
    return jsonschema.Draft202012Validator(load_schema())


def schema_problems(data: Any) -> list[str]:
    """Schema violations of a recipe given as data (e.g. the one a manifest records), as
    ``key.path: message`` lines; empty when valid."""
    return [f"{format_key_path(tuple(e.absolute_path)) or '(top level)'}: {e.message}"
            for e in sorted(_validator().iter_errors(data), key=lambda e: list(e.absolute_path)
                            .__repr__())]


def _iter_leaf_errors(err: jsonschema.ValidationError) -> Iterator[jsonschema.ValidationError]:
    yield err
    for sub in err.context or ():
        yield from _iter_leaf_errors(sub)


def _coerce_numeric_strings(doc: Document) -> None:
    """Turn unquoted numbers into their text where the schema wants a string.

    A revision ``1234567`` or a step named ``2024`` is a string to the user; YAML reads a number.
    """
    for _ in range(4):
        changed = False
        for err in _validator().iter_errors(doc.data):
            for leaf in _iter_leaf_errors(err):
                want = leaf.validator_value
                if leaf.validator != "type" or "string" not in (
                        want if isinstance(want, list) else [want]):
                    continue
                path = tuple(leaf.absolute_path)
                if path in doc.raw_scalars and _set_at(doc.data, path, doc.raw_scalars[path]):
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
        dispatch = {case["if"]["properties"]["op"]["const"]: case["then"]["$ref"].split("/")[-1]
                    for case in defs["step"]["allOf"]}
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


def _schema_errors(doc: Document) -> list[RecipeError]:
    out: list[RecipeError] = []
    seen: set[tuple[KeyPath, str]] = set()
    for err in _validator().iter_errors(doc.data):
        # Never drop a schema error: a recipe the schema refuses must not load.
        rendered = _render_schema_error(doc, err) or [doc.error(
            tuple(err.absolute_path), f"{_show(err.instance)} is not a valid value here")]
        for e in rendered:
            k = (e.key_path or (), e.message)
            if k not in seen:
                seen.add(k)
                out.append(e)
    return out


def _render_schema_error(doc: Document, err: jsonschema.ValidationError) -> list[RecipeError]:
    path: KeyPath = tuple(err.absolute_path)
    v = err.validator
    if v == "additionalProperties" and isinstance(err.instance, dict):
        allowed = _known_keys(doc, path)
        extra = [k for k in err.instance if k not in allowed]
        errs = []
        for k in extra:
            close = difflib.get_close_matches(k, allowed, n=1)
            hint = f"did you mean '{close[0]}'?" if close else (
                "allowed keys: " + ", ".join(allowed) if allowed else None)
            errs.append(doc.error(path + (k,), f"unknown key {_describe_at(doc, path)}",
                                  hint=hint, key=True))
        return errs
    if v == "anyOf" and all(isinstance(b, dict) and set(b) == {"required"}
                            for b in err.validator_value):
        keys = " or ".join(f"`{b['required'][0]}:`" for b in err.validator_value)
        return [doc.error(path, f"{_describe_at(doc, path)[3:]} needs {keys} (or both)",
                          key=True)]
    if v in ("oneOf", "anyOf"):
        best = jsonschema.exceptions.best_match(err.context or [])
        if best is not None and best is not err:
            # Prefer the branch whose type matches what the user wrote.
            branches = _matching_type_branches(err)
            if branches:
                return _render_schema_error(doc, jsonschema.exceptions.best_match(branches))
            return _render_schema_error(doc, best)
        return [doc.error(path, f"{_show(err.instance)} is not a valid value here")]
    if v == "enum":
        options = [str(o) for o in err.validator_value]
        close = difflib.get_close_matches(
            _DTYPE_ALIASES.get(str(err.instance), str(err.instance)), options, n=1)
        what = "op" if path[-1:] == ("op",) else "value"
        hint = (f"did you mean '{close[0]}'?" if close else "") + (
            " " if close else "") + "allowed: " + ", ".join(options)
        if isinstance(err.schema, dict) and isinstance(err.schema.get("x-recipekit-hint"), str):
            hint += "; " + err.schema["x-recipekit-hint"]  # e.g. the object form of a oneOf
        return [doc.error(path, f"unknown {what} {_show(err.instance)}", hint=hint)]
    if v == "required":
        missing = re.findall(r"'([^']+)' is a required property", err.message)
        key = missing[0] if missing else "?"
        return [doc.error(path, f"missing required key `{key}` {_describe_at(doc, path)}",
                          key=True)]
    if v == "const" and path == ("recipekit",):
        return [doc.error(path, f"unsupported recipe format version {_show(err.instance)}",
                          hint=f"this recipekit reads `recipekit: {FORMAT_VERSION}`")]
    if v == "type":
        want = err.validator_value
        want = " or ".join(want) if isinstance(want, list) else want
        return [doc.error(path, f"expected {_article(want)}, got {_show(err.instance)}")]
    if v == "pattern" and path and path[-1] == "shard_size":
        return [doc.error(path, f"{_show(err.instance)} is not a size",
                          hint="write a number of bytes or e.g. '500MB', '5GB', '2GiB'")]
    if v == "pattern" and path in (("models",), ("adapters",)):  # propertyNames: the key itself
        return [doc.error(path + (str(err.instance),), f"{_show(err.instance)} is not a valid "
                          "model name", hint=_NAME_RULE, key=True)]
    if v == "pattern" and path[-1:] in (("name",), ("from",), ("model",), ("config",)):
        return [doc.error(path, f"{_show(err.instance)} is not a valid name", hint=_NAME_RULE)]
    if v == "pattern" and "range" in str(err.validator_value):
        return [doc.error(path, f"{_show(err.instance)} is not a layer index or range",
                          hint='write an integer, "range(start, stop)" or '
                          '"range(start, stop, step)"')]
    if v == "minItems":
        return [doc.error(path, "must not be empty" if err.validator_value == 1 else
                          f"needs at least {err.validator_value} items")]
    if v == "maxItems":
        return [doc.error(path, f"takes at most {err.validator_value} items")]
    if v == "minimum":
        return [doc.error(path, f"{_show(err.instance)} is below the minimum "
                          f"{err.validator_value}")]
    if v == "minProperties":
        return [doc.error(path, "must name at least one entry")]
    return [doc.error(path, err.message)]


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


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) < 60 else text[:57] + "..."


# ---------------------------------------------------------------------------------------------
# Layer-range grammar (never eval)

_RANGE = re.compile(r"^\s*range\s*\(\s*(-?\d+)\s*,\s*(-?\d+)\s*(?:,\s*(-?\d+)\s*)?\)\s*$")


def parse_layer_range(text: str) -> range:
    """Parse ``"range(a,b)"`` / ``"range(a,b,step)"`` into a non-empty `range`.

    Python's half-open semantics; indices are non-negative; the range must not be empty.

    Example:
        >>> parse_layer_range("range(8, 32)")
        range(8, 32)

    Raises:
        ValueError: with a message that echoes what was written.
    """
    m = _RANGE.match(text)
    if not m:
        raise ValueError(
            f"{text!r} is not a layer range; write \"range(start, stop)\" or "
            "\"range(start, stop, step)\" with integers")
    try:
        start, stop = int(m.group(1)), int(m.group(2))
        step = int(m.group(3)) if m.group(3) is not None else 1
    except ValueError:  # more than 4300 digits
        raise ValueError(f"{_show(text)}: a number in it is far too large") from None
    if start < 0 or stop < 0:
        raise ValueError(f"{text!r}: layer indices must not be negative")
    if step == 0:
        raise ValueError(f"{text!r}: step must not be 0")
    r = range(start, stop, step)
    if not r:  # len() overflows past sys.maxsize
        if start == stop:
            raise ValueError(f"{text!r} is empty (start equals stop); ranges are half-open, "
                             f"so range({start},{stop + 1}) selects layer {start}")
        if step < 0:
            raise ValueError(f"{text!r} is empty (with a negative step, start {start} must be "
                             f"above stop {stop})")
        raise ValueError(f"{text!r} is empty (start {start} is past stop {stop}); "
                         f"did you mean range({stop},{start})?")
    return r


# ---------------------------------------------------------------------------------------------
# The typed recipe


@dataclass(frozen=True)
class ModelRef:
    """A named checkpoint input: a local directory or a hub repo at a revision."""

    name: str
    path: Path | None  # resolved against the recipe's directory; None for hub models
    written: str  # as the user wrote it, for messages
    layer_prefix: str | None
    key_path: KeyPath
    hub: str | None = None
    revision: str = DEFAULT_REVISION


@dataclass(frozen=True)
class Step:
    """One step of the recipe: a name, an op and its (schema-checked) parameters."""

    name: str
    op: str
    spec: Mapping[str, Any]
    index: int

    @property
    def key_path(self) -> KeyPath:
        return ("steps", self.index)


@dataclass(frozen=True)
class Output:
    path: Path
    model: str
    dtype: str | None
    shard_size: int
    config: str | None
    adapter: Mapping[str, Any] | None = None  # how an adapter-set output is written


@dataclass(frozen=True)
class Recipe:
    """A validated recipe: models, steps in dependency order, output, and its located document."""

    file: Path
    document: Document
    name: str | None
    description: str | None
    models: Mapping[str, ModelRef]
    steps: Mapping[str, Step]  # topologically ordered
    output: Output
    adapters: Mapping[str, ModelRef] = field(default_factory=dict)  # PEFT adapter inputs

    def error(self, path: KeyPath, message: str, *, hint: str | None = None,
              key: bool = False, cls: type[UsageError] = RecipeError) -> RecipeError:
        """A `RecipeError` (or ``cls``) located at ``path`` in the user's file: the one way
        steps build located errors."""
        return self.document.error(path, message, hint=hint, key=key, cls=cls)

    def canonical(self) -> dict[str, Any]:
        """The document with defaults filled in: what the manifest records and the plan hashes."""
        data = json.loads(json.dumps(self.document.data))
        data.setdefault("steps", [])
        out = data.setdefault("output", {})
        out["model"] = self.output.model
        out["shard_size"] = self.output.shard_size
        return data


def step_references(step: Mapping[str, Any]) -> Iterator[tuple[str, KeyPath]]:
    """Names a step refers to, with their key paths relative to the step.

    Generic over ops: ``from`` (a name or a list of names / {model: name} mappings), ``base``,
    ``tuned``, ``adapters`` entries (names or {use: name}), ``init: {from: name}`` (the
    head op) and ``from`` inside ``layers`` entries. An op whose schema names a model under
    another key adds it here; tests/steps/test_registries.py::TestReferences fails until then.
    """
    src = step.get("from")
    if isinstance(src, str):
        yield src, ("from",)
    elif isinstance(src, list):
        for i, item in enumerate(src):
            if isinstance(item, str):
                yield item, ("from", i)
            elif isinstance(item, dict) and isinstance(item.get("model"), str):
                yield item["model"], ("from", i, "model")
    for key in ("base", "tuned"):
        if isinstance(step.get(key), str):
            yield step[key], (key,)
    uses = step.get("adapters")
    for i, item in enumerate(uses if isinstance(uses, list) else []):
        if isinstance(item, str):
            yield item, ("adapters", i)
        elif isinstance(item, dict) and isinstance(item.get("use"), str):
            yield item["use"], ("adapters", i, "use")
    init = step.get("init")
    if isinstance(init, dict) and isinstance(init.get("from"), str):
        yield init["from"], ("init", "from")
    layers = step.get("layers")
    for i, entry in enumerate(layers if isinstance(layers, list) else []):
        if isinstance(entry, dict) and isinstance(entry.get("from"), str):
            yield entry["from"], ("layers", i, "from")


def load_recipe(path: str | Path) -> Recipe:
    """Load, validate and type a recipe file. Needs no checkpoint and no torch.

    Schema problems and semantic problems (unknown names, cycles, empty ranges) are collected
    together, so one run of `recipekit validate` lists everything.

    Raises:
        RecipeErrors: every problem found, located, sorted by line.
    """
    doc = load_document(path)
    if not isinstance(doc.data, dict):
        raise RecipeErrors([doc.error((), "a recipe is a mapping with keys `recipekit`, "
                                      "`models`, `steps` and `output`")])
    _coerce_numeric_strings(doc)
    errors = _schema_errors(doc)
    recipe = _build(doc, Path(path), errors)
    if errors:
        raise RecipeErrors(_dedupe(errors))
    return recipe


def recipe_from_data(data: Mapping[str, Any], file: Path) -> Recipe:
    """Validate and type a recipe held in memory as if it were written at ``file`` (paths are
    relative to its directory; the file need not exist). For tools that generate recipes
    (`recipekit import-mergekit`); errors are located by key path only.

    Raises:
        RecipeErrors: as `load_recipe`.
    """
    doc = Document(str(file), copy.deepcopy(dict(data)), [])
    _coerce_numeric_strings(doc)
    errors = _schema_errors(doc)
    recipe = _build(doc, file, errors)
    if errors:
        raise RecipeErrors(_dedupe(errors))
    return recipe


def _dedupe(errors: list[RecipeError]) -> list[RecipeError]:
    seen: set[str] = set()
    out = []
    for e in errors:
        if e.render() not in seen:
            seen.add(e.render())
            out.append(e)
    return out


def _build(doc: Document, file: Path, errors: list[RecipeError]) -> Recipe:
    """Semantic checks and typing. Defensive: runs even when the schema found problems."""
    data = doc.data
    base_dir = file.resolve().parent

    models: dict[str, ModelRef] = {}
    raw_models = data.get("models") if isinstance(data.get("models"), dict) else {}
    for name, entry in raw_models.items():
        prefix = entry.get("layer_prefix") if isinstance(entry, dict) else None
        prefix = prefix if isinstance(prefix, str) else None
        if isinstance(entry, dict) and isinstance(entry.get("hub"), str):
            revision = entry.get("revision", DEFAULT_REVISION)
            models[name] = ModelRef(name, None, f"{entry['hub']}@{revision}", prefix,
                                    ("models", name), hub=entry["hub"], revision=str(revision))
            continue
        written = entry if isinstance(entry, str) else (
            entry.get("path") if isinstance(entry, dict) else None)
        if not isinstance(written, str):
            continue
        _check_path_text(doc, ("models", name) + (("path",) if isinstance(entry, dict) else ()),
                         written, errors)
        path = Path(os.path.normpath(base_dir / _expanduser(written)))
        models[name] = ModelRef(name, path, written, prefix, ("models", name))

    adapters: dict[str, ModelRef] = {}
    raw_adapters = data.get("adapters") if isinstance(data.get("adapters"), dict) else {}
    for name, entry in raw_adapters.items():
        if name in raw_models:
            errors.append(doc.error(("adapters", name), f"'{name}' is already a model name",
                                    hint="give the adapter its own name", key=True))
            continue
        if isinstance(entry, dict) and isinstance(entry.get("hub"), str):
            revision = entry.get("revision", DEFAULT_REVISION)
            adapters[name] = ModelRef(name, None, f"{entry['hub']}@{revision}", None,
                                      ("adapters", name), hub=entry["hub"],
                                      revision=str(revision))
            continue
        written = entry if isinstance(entry, str) else (
            entry.get("path") if isinstance(entry, dict) else None)
        if not isinstance(written, str):
            continue
        _check_path_text(doc, ("adapters", name) + (("path",) if isinstance(entry, dict)
                                                    else ()), written, errors)
        path = Path(os.path.normpath(base_dir / _expanduser(written)))
        adapters[name] = ModelRef(name, path, written, None, ("adapters", name))
    raw_models = {**raw_adapters, **raw_models}  # names steps may refer to

    raw_steps = data.get("steps") if isinstance(data.get("steps"), list) else []
    steps_list = [(i, s) for i, s in enumerate(raw_steps)
                  if isinstance(s, dict) and isinstance(s.get("name"), str)]
    by_name: dict[str, tuple[int, dict[str, Any]]] = {}
    for i, step in steps_list:
        name = step["name"]
        if name in raw_models:
            errors.append(doc.error(("steps", i, "name"),
                                    f"step name '{name}' is already a model name",
                                    hint="give the step its own name"))
        elif name in by_name:
            first = doc.locate(("steps", by_name[name][0], "name")).line
            errors.append(doc.error(("steps", i, "name"),
                                    f"duplicate step name '{name}' (first used on line {first})",
                                    hint="give each step its own name"))
        else:
            by_name[name] = (i, step)
    known = sorted(set(raw_models) | set(by_name))

    def check_ref(ref: str, path: KeyPath) -> None:
        if ref not in raw_models and ref not in by_name:
            close = difflib.get_close_matches(ref, known, n=1)
            hint = (f"did you mean '{close[0]}'? " if close else "") + (
                "known models and steps: " + ", ".join(known))
            errors.append(doc.error(path, f"unknown model or step '{ref}'", hint=hint))

    deps: dict[str, list[str]] = {}
    for i, step in steps_list:
        refs = []
        for ref, rel in step_references(step):
            if ref == step["name"]:
                errors.append(doc.error(("steps", i) + rel, f"step '{ref}' refers to itself",
                                        hint="a step can only use models and other steps"))
                continue
            check_ref(ref, ("steps", i) + rel)
            refs.append(ref)
        deps.setdefault(step["name"], refs)
        layers = step.get("layers")
        for j, entry in enumerate(layers if isinstance(layers, list) else []):
            _check_layer_entry(doc, ("steps", i, "layers", j), entry, errors)

    order = _topological_order(doc, by_name, deps, errors)

    out = data.get("output") if isinstance(data.get("output"), dict) else {}
    out_model = out.get("model")
    if isinstance(out_model, str):
        check_ref(out_model, ("output", "model"))
    elif steps_list:
        out_model = steps_list[-1][1]["name"]
    else:
        out_model = ""
        errors.append(doc.error(("output",), "no steps and no `output.model`",
                                hint="add `output: {model: <name>}` or a step", key=True))
    if isinstance(out.get("config"), str):
        check_ref(out["config"], ("output", "config"))
    written_size = out.get("shard_size", DEFAULT_SHARD_SIZE)
    try:
        shard_size = parse_size(written_size)
    except (ValueError, TypeError, OverflowError):  # null, a list, "999...9" (infinity)
        shard_size = 1
        if not any(e.key_path == ("output", "shard_size") for e in errors):
            errors.append(doc.error(("output", "shard_size"),
                                    f"{_show(written_size)} is not a usable size",
                                    hint="write a number of bytes or e.g. '500MB', '5GB', "
                                    "'2GiB'"))
    if isinstance(out.get("path"), str):
        _check_path_text(doc, ("output", "path"), out["path"], errors)
    out_path = Path(os.path.normpath(base_dir / _expanduser(out["path"]))) if isinstance(
        out.get("path"), str) else base_dir / "out" / file.stem

    steps = {name: Step(name, str(by_name[name][1].get("op")), by_name[name][1],
                        by_name[name][0]) for name in order}
    return Recipe(
        file=file, document=doc, name=data.get("name"), description=data.get("description"),
        models=models, steps=steps,
        output=Output(out_path, out_model, out.get("dtype"), shard_size, out.get("config"),
                      out.get("adapter") if isinstance(out.get("adapter"), dict) else None),
        adapters=adapters,
    )


def _check_path_text(doc: Document, path: KeyPath, written: str,
                     errors: list[RecipeError]) -> None:
    if "\x00" in written:  # every file system call would raise ValueError
        errors.append(doc.error(path, f"{_show(written)} is not a usable path: it holds a NUL "
                                "character"))


def _expanduser(written: str) -> str:
    """``~`` and ``~user`` expanded where they exist; otherwise the text as written (a relative
    path then), where `Path.expanduser` would raise RuntimeError."""
    return os.path.expanduser(written)


def _check_layer_entry(doc: Document, path: KeyPath, entry: Any,
                       errors: list[RecipeError]) -> None:
    if isinstance(entry, str):
        try:
            parse_layer_range(entry)
        except ValueError as e:
            errors.append(doc.error(path, str(e)))
    elif isinstance(entry, float):
        _check_not_float(doc, path, entry, errors)
    elif isinstance(entry, dict):
        rng = entry.get("range")
        for k, x in enumerate(rng if isinstance(rng, list) else []):
            _check_not_float(doc, path + ("range", k), x, errors)
        if isinstance(rng, list) and len(rng) == 2 and all(
                isinstance(x, int) and not isinstance(x, bool) for x in rng):
            a, b = rng
            if b <= a:
                errors.append(doc.error(path + ("range",), f"range [{a}, {b}] is empty" + (
                    "" if a == b else f"; did you mean [{b}, {a}]?"),
                    hint="ranges are half-open: [start, stop) with start < stop"))
        sub_layers = entry.get("layers")
        for j, sub in enumerate(sub_layers if isinstance(sub_layers, list) else []):
            _check_layer_entry(doc, path + ("layers", j), sub, errors)


def _check_not_float(doc: Document, path: KeyPath, value: Any,
                     errors: list[RecipeError]) -> None:
    """JSON Schema's `integer` admits 3.0 and 1e300; a layer index must be written as an int.

    (Other floats already fail the schema.)"""
    if isinstance(value, float) and value.is_integer():
        errors.append(doc.error(path, f"expected an integer layer index, got {_show(value)}",
                                hint="write it without a decimal point or exponent"))


def _topological_order(doc: Document, by_name: dict[str, tuple[int, dict[str, Any]]],
                       deps: dict[str, list[str]], errors: list[RecipeError]) -> list[str]:
    """Steps in dependency order (recipe order where free); a cycle is reported once."""
    order: list[str] = []
    state: dict[str, int] = {}  # 1 visiting, 2 done
    reported: set[frozenset[str]] = set()

    def visit(root: str) -> None:  # depth-first, with explicit stacks: chains may be long
        if state.get(root) == 2:
            return
        state[root] = 1
        path = [root]  # the steps being visited, outermost first
        todo = [iter(deps.get(root, []))]
        while todo:
            dep = next(todo[-1], None)
            if dep is None:
                done = path.pop()
                todo.pop()
                state[done] = 2
                order.append(done)
            elif dep == path[-1] or state.get(dep) == 2 or dep not in by_name:
                continue
            elif state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                key = frozenset(cycle)
                if key not in reported:
                    reported.add(key)
                    first = min(cycle[:-1], key=lambda n: by_name[n][0])
                    errors.append(doc.error(
                        ("steps", by_name[first][0], "name"),
                        "steps form a cycle: " + " -> ".join(cycle),
                        hint="a step can only use models and steps that do not depend on it"))
            else:
                state[dep] = 1
                path.append(dep)
                todo.append(iter(deps.get(dep, [])))

    for name in by_name:
        visit(name)
    return order
