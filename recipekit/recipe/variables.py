"""Recipe variables: a top-level ``variables:`` mapping of defaults, ``${name}`` references,
and the values ``--set name=value`` (or the API's ``variables=``) gives them.

Why: an alpha grid or a method comparison is the same recipe with one value changed; copying
the file per value loses the link between them. Substitution happens on the loaded document,
after YAML/JSON parsing and before the schema, so every later check sees plain values and
every message still points at the user's line, with a note naming the variable:
``recipe.yaml:12:12: steps[1].alpha: expected a number, got 'abc' (from variable 'alpha' set
by --set)``.

Rules (README, "Variables and sweeps"):

* a string that is exactly ``${name}`` takes the variable's value with its type (a number stays
  a number, a list a list);
* ``${name}`` inside a longer string is text substitution (numbers in their shortest form,
  ``true``/``false``, ``null``); a list or mapping cannot be pasted into text;
* ``$${`` is a literal ``${``; any other ``${`` that is not ``${name}`` is an error;
* mapping keys are never substituted, and defaults are literal (a default cannot refer to a
  variable).

No `eval` anywhere: a reference is a name looked up in a dict. Oracle: tests/recipe/
test_variables.py compares substituted recipes with the same recipe written inline.
"""

from __future__ import annotations

import copy
import difflib
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from recipekit.errors import KeyPath, RecipeError, RecipeErrors, UsageError
from recipekit.recipe.document import Document, parse_document, show

#: A variable's name: an identifier (ASCII), so ``${name}`` and ``name=value`` never clash.
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
#: ``$${`` (a literal), ``${name}`` (a reference), or any other ``${`` (an error).
_REF = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$\{")
_WHOLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}\Z")


class Settings(dict):
    """Variable values given from outside the recipe, by name, and who gave them (for
    messages: ``--set`` from the CLI, ``variables=`` from the Python API)."""

    def __init__(self, values: Mapping[str, Any] | Iterable[tuple[str, Any]] = (), *,
                 origin: str = "variables=") -> None:
        super().__init__(values)
        self.origin = origin


def parse_value(text: str, where: str) -> Any:
    """One value as written on the command line, read as YAML (the recipe loader's reader:
    ``1e-3`` is a float, ``2024-01-01`` a string, no tags): ``0.3``, ``ties``, ``'0.3'`` (a
    string), ``[1, 2]``, ``{gradient: [0, 1]}``.

    Raises:
        UsageError: empty text, or text YAML cannot read (named by ``where``).
    """
    if not text.strip():
        raise UsageError(f"{where}: no value after '='",
                         hint="write a value, or '' (quoted) for an empty string")
    try:
        return parse_document(text, where).data
    except RecipeErrors as e:
        first = e.errors[0]
        raise UsageError(f"{where}: cannot read {show(text)}: {first.message}",
                         hint="quote a string that YAML reads otherwise") from None


def split_setting(text: str) -> tuple[str, str]:
    """``"alpha=0.3"`` → ``("alpha", "0.3")``.

    Raises:
        UsageError: no ``=``, or a name that is not an identifier.
    """
    name, eq, value = text.partition("=")
    name = name.strip()
    if not eq:
        raise UsageError(f"--set {show(text)}: expected NAME=VALUE",
                         hint="for example --set alpha=0.3")
    if not NAME.match(name):
        raise UsageError(f"--set {show(text)}: {show(name)} is not a variable name",
                         hint="names are letters, digits and '_', not starting with a digit")
    return name, value


def parse_settings(texts: Iterable[str]) -> Settings:
    """``--set`` options (one value each) as `Settings`; a name given twice is an error.

    Raises:
        UsageError: a malformed option, an unreadable value or a repeated name.
    """
    out = Settings(origin="--set")
    for text in texts:
        name, value = split_setting(text)
        if name in out:
            raise UsageError(f"--set {name} is given twice", hint="give each variable once")
        out[name] = parse_value(value, f"--set {name}")
    return out


def format_value(value: Any) -> str:
    """A value as text substitution writes it: strings as they are, numbers in Python's
    shortest round-trip form (``0.10`` and ``1e-1`` both give ``0.1``), booleans and null as
    YAML/JSON spell them, lists and mappings as compact JSON (for sweep directory names)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, type(None), list, dict)):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return repr(value) if isinstance(value, float) else str(value)


def escape_references(value: Any) -> Any:
    """``value`` (a document's value: text, list, mapping) with every ``${`` in its text
    written ``$${``, so that substitution gives the text back: for tools that write recipes
    from text that is not a recipe (`recipekit import-mergekit` copies prompts, paths and
    chat templates), where ``${HOME}`` was refused as an unknown variable and ``$${x}`` read
    as ``${x}``. Mapping keys are never substituted, so they are left as they are.

    Example:
        >>> escape_references({"prompts": ["echo ${HOME}", "cost = $${price}"]})
        {'prompts': ['echo $${HOME}', 'cost = $$${price}']}
    """
    if isinstance(value, str):
        return value.replace("${", "$${")
    if isinstance(value, dict):
        return {k: escape_references(v) for k, v in value.items()}
    if isinstance(value, list):
        return [escape_references(v) for v in value]
    return value


def substitute_variables(doc: Document, settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """Resolve the document's variables (defaults, then ``settings``) and substitute every
    ``${name}`` in its values, in place. ``doc.data["variables"]`` then holds the values used
    (so the schema checks them) and each substituted path gets a note for messages.

    Returns:
        The values used, by name, in declaration order (empty when the recipe declares none).

    Raises:
        RecipeErrors: a malformed ``variables`` block, an undeclared name set, an unknown or
            malformed reference, a list pasted into text; every one located, with did-you-mean.
    """
    data = doc.data
    if not isinstance(data, dict):
        return {}
    errors: list[RecipeError] = []
    declared = _declared(doc, errors)
    settings = settings or {}
    origin = getattr(settings, "origin", "variables=")
    for name in settings:
        if name not in declared:
            errors.append(_undeclared(doc, name, origin, declared))
    values = {name: copy.deepcopy(settings[name]) if name in settings else default
              for name, default in declared.items()}
    if errors:
        raise RecipeErrors(errors)
    sub = _Substitution(doc, values, {n for n in settings if n in declared}, origin)
    for key in list(data):
        if key != "variables":
            data[key] = sub.walk(data[key], (key,))
    if sub.errors:
        raise RecipeErrors(sub.errors)
    if "variables" in data and isinstance(data["variables"], dict):
        data["variables"] = copy.deepcopy(values)
    return values


def _declared(doc: Document, errors: list[RecipeError]) -> dict[str, Any]:
    """The ``variables`` block's defaults, checked: a mapping of identifiers to literal
    values (``$${`` in a default is a literal ``${``; a ``${name}`` in one is an error)."""
    block = doc.data.get("variables")
    if block is None and "variables" not in doc.data:
        return {}
    if not isinstance(block, dict):
        errors.append(doc.error(("variables",), f"expected a mapping of variable names to "
                                f"default values, got {show(block)}",
                                hint="for example `variables: {alpha: 0.5}`"))
        return {}
    out = {}
    literal = _Substitution(doc, {}, set(), "")
    for name, default in block.items():
        if not NAME.match(name):
            errors.append(doc.error(("variables", name), f"{show(name)} is not a variable name",
                                    hint="names are letters, digits and '_', not starting "
                                    "with a digit", key=True))
            continue
        out[name] = literal.walk(default, ("variables", name), in_default=True)
    errors += literal.errors
    return out


def _undeclared(doc: Document, name: str, origin: str, declared: Mapping[str, Any]
                ) -> RecipeError:
    close = difflib.get_close_matches(name, list(declared), n=1)
    if not declared:
        hint = "declare it in a top-level `variables:` mapping with its default"
    else:
        hint = (f"did you mean '{close[0]}'? " if close else "") + (
            "declared: " + ", ".join(declared))
    err = doc.error(("variables",), f"{origin} {name}: the recipe declares no variable "
                    f"'{name}'", hint=hint, key=True)
    if "variables" not in doc.data:  # nothing to point at: name the file only
        err.location = None
        err.file = doc.file
    return err


class _Substitution:
    """One walk over the document's values, collecting located errors."""

    def __init__(self, doc: Document, values: Mapping[str, Any], overridden: set[str],
                 origin: str) -> None:
        self.doc, self.values, self.overridden, self.origin = doc, values, overridden, origin
        self.errors: list[RecipeError] = []

    def walk(self, value: Any, path: KeyPath, *, in_default: bool = False) -> Any:
        stack: list[tuple[Any, Any, KeyPath]] = []  # (container, key, path) still to visit
        root = {"": value}
        stack.append((root, "", path))
        while stack:
            container, key, p = stack.pop()
            item = container[key]
            if isinstance(item, dict):
                stack.extend((item, k, p + (k,)) for k in item)
            elif isinstance(item, list):
                stack.extend((item, i, p + (i,)) for i in range(len(item)))
            elif isinstance(item, str) and "${" in item:
                container[key] = self.text(item, p, in_default)
        return root[""]

    def text(self, text: str, path: KeyPath, in_default: bool) -> Any:
        whole = _WHOLE.match(text)
        if whole and not in_default:
            name = whole.group(1)
            if not self._known(name, path):
                return text
            value = copy.deepcopy(self.values[name])
            self._note(path, [name])
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.doc.raw_scalars[path] = format_value(value)  # a revision stays text
            return value
        used: list[str] = []

        def replace(m: re.Match[str]) -> str:
            if m.group(0) == "$${":
                return "${"
            name = m.group(1)
            if name is None:
                self.errors.append(self.doc.error(path, f"{show(text)}: `${{` starts no "
                                                  "variable reference", hint="write ${name} "
                                                  "(letters, digits, '_'), or $${ for a "
                                                  "literal ${"))
                return m.group(0)
            if in_default:
                self.errors.append(self.doc.error(path, f"a variable's default cannot refer "
                                                  f"to a variable (${{{name}}})",
                                                  hint="write the value itself, or $${ for a "
                                                  "literal ${"))
                return m.group(0)
            if not self._known(name, path):
                return m.group(0)
            value = self.values[name]
            if isinstance(value, (list, dict)):
                kind = "list" if isinstance(value, list) else "mapping"
                self.errors.append(self.doc.error(path, f"variable '{name}' is a {kind}, which "
                                                  "cannot be pasted into text",
                                                  hint=f"write \"${{{name}}}\" alone as the "
                                                  "whole value"))
                return m.group(0)
            used.append(name)
            return format_value(value)

        out = _REF.sub(replace, text)
        if used:
            self._note(path, used)
        return out

    def _known(self, name: str, path: KeyPath) -> bool:
        if name in self.values:
            return True
        close = difflib.get_close_matches(name, list(self.values), n=1)
        hint = (f"did you mean '{close[0]}'? " if close else "") + (
            ("declared: " + ", ".join(self.values)) if self.values else
            "declare it in a top-level `variables:` mapping with its default") + (
            "; write $${ for a literal ${")
        self.errors.append(self.doc.error(path, f"unknown variable '{name}'", hint=hint))
        return False

    def _note(self, path: KeyPath, names: list[str]) -> None:
        parts = [f"'{n}' set by {self.origin}" if n in self.overridden else f"'{n}'"
                 for n in dict.fromkeys(names)]
        word = "variable" if len(parts) == 1 else "variables"
        self.doc.notes[path] = f"from {word} {', '.join(parts)}"

