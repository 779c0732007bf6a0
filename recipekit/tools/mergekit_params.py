"""import-mergekit: the state of one conversion and the translation of mergekit parameters.

A mergekit parameter is looked up over levels (source, slice, top) of first-match
``{filter, value}`` lists whose filters are substrings; `translate_param` turns one into a
recipekit value or rule list (fnmatch globs), with the explicit rules that make recipekit's
gradient conventions (t = 1 after the layers, t = 0 in a one-layer step) give mergekit's values
(see the module docstring of `recipekit.tools.mergekit_import`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recipekit.errors import ConversionError, KeyPath
from recipekit.recipe import Document
from recipekit.recipe.params import evaluate_gradient, is_before_layers

log = logging.getLogger(__name__)


@dataclass
class Source:
    model: str  # recipekit model name
    layers: tuple[int, int] | None  # None: the whole model (a `models:` config)
    params: Mapping[str, Any] | None
    path: KeyPath


@dataclass
class Slice:
    sources: list[Source]
    base: str | None
    params: Mapping[str, Any] | None
    path: KeyPath
    length: int = 0


@dataclass
class ImportState:
    """What one conversion has read so far (models, names, notes) and how to fail."""

    doc: Document
    cwd: Path
    out_dir: Path
    models: dict[str, Any] = field(default_factory=dict)  # recipe name -> model source
    refs: dict[str, str] = field(default_factory=dict)  # mergekit reference -> recipe name
    where: dict[str, KeyPath] = field(default_factory=dict)  # recipe name -> first mention
    steps: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checkpoints: dict[str, Any] = field(default_factory=dict)
    translated: set[str] = field(default_factory=set)  # which semantic fixes were emitted
    adapters: dict[str, Any] = field(default_factory=dict)  # recipe name -> LoRA source
    lora_refs: dict[str, str] = field(default_factory=dict)  # mergekit LoRA path -> recipe name
    folds: dict[str, str] = field(default_factory=dict)  # `model+lora` step -> its model
    multi_stack: set[str] = field(default_factory=set)  # models with several layer stacks
    reserved: set[str] = field(default_factory=set)  # keywords no model may be named

    def checkpoint(self, name: str) -> Any:
        """The resolved model behind recipe name ``name`` (a LoRA fold has its model's tensor
        names and layer stack)."""
        return self.checkpoints[self.folds.get(name, name)]

    def fail(self, path: KeyPath, message: str, hint: str | None = None) -> ConversionError:
        return ConversionError([self.doc.error(path, message, hint=hint, key=True)])

    def warn(self, note: str) -> None:
        """A note for the recipe's head that is also a warning on stderr, once: where the
        recipe follows mergekit in ignoring or dropping what the config says, which a user
        reading only the config would not expect (and might not read the head for)."""
        if note not in self.notes:
            self.notes.append(note)
            log.warning("%s", note)


def post_names(st: ImportState, model: str) -> list[str]:
    """Tensors after the layers (final norm, lm_head): mergekit's t = 0, recipekit's t = 1."""
    ck = st.checkpoint(model)
    return [n for n in ck.tensors if ck.stack.split(n) is None
            and not is_before_layers(n, ck.stack)]


def layer_names(st: ImportState, model: str, index: int) -> list[str]:
    ck = st.checkpoint(model)
    return [n for n in ck.tensors if (hit := ck.stack.split(n)) is not None and hit[0] == index]


def glob_filter(text: str) -> str:
    """fnmatch pattern for 'contains ``text``' (mergekit's filter), special characters escaped."""
    return "*" + re.sub(r"([*?\[])", r"[\1]", text) + "*"


def exact(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def flatten_rules(st: ImportState, chain: list[tuple[Any, KeyPath]], renumbered: bool
             ) -> list[tuple[str | None, Any, KeyPath]]:
    """mergekit's lookup over the levels as one first-match list of (filter, value)."""
    rules: list[tuple[str | None, Any, KeyPath]] = []
    for setting, path in chain:
        items = setting if isinstance(setting, list) and setting and all(
            isinstance(e, dict) for e in setting) else [setting]
        if isinstance(setting, dict):
            items = [setting]
        for i, item in enumerate(items):
            ipath = path + ((i,) if isinstance(setting, list) and isinstance(item, dict) else ())
            if isinstance(item, dict):
                extra = sorted(set(item) - {"filter", "value"})
                if extra or "value" not in item:
                    raise st.fail(ipath, "a conditional parameter is {filter: ..., value: ...}")
                flt = item.get("filter")
                if flt == "*":
                    flt = None
                if flt is not None and not isinstance(flt, str):
                    raise st.fail(ipath + ("filter",), "a filter is a string")
                if flt is not None and renumbered and re.search(r"\d", flt):
                    raise st.fail(ipath + ("filter",), f"cannot convert filter {flt!r}: it names "
                                  "a layer index, and recipekit's per-slice steps number their "
                                  "layers from 0", hint="use a filter without digits")
                rules.append((flt, item["value"], ipath + ("value",)))
                if flt is None:
                    return rules
            else:
                rules.append((None, item, ipath))
                return rules
    return rules


def _gradient_fixes(st: ImportState, value: list[float], flt: str | None, post: list[str],
                    sl: Slice, model: str) -> list[dict[str, Any]]:
    """The explicit rules that give a gradient mergekit's value where recipekit's t differs:
    t = 0 after the layers, and t = 1 in a one-layer slice."""
    out: list[dict[str, Any]] = []
    at0 = evaluate_gradient(value, 0.0)
    for n in post:  # mergekit: t = 0 after the layers; recipekit: t = 1
        if flt is None or flt in n:
            out.append({"match": exact(n), "value": at0})
            st.translated.add("post")
    if sl.length == 1:  # mergekit: t = 1 in a one-layer slice; recipekit: t = 0
        at1 = evaluate_gradient(value, 1.0)
        st.translated.add("one_layer")
        if flt is None:
            out.append({"match": exact(st.checkpoint(model).stack.name(0, "")) + "*",
                        "value": at1})
        else:
            out += [{"match": exact(n), "value": at1}
                    for n in layer_names(st, model, 0) if flt in n]
    return out


def translate_param(st: ImportState, spec: Any, chain: list[tuple[Any, KeyPath]], sl: Slice,
                    model: str) -> tuple[bool, Any]:
    """(given, recipekit value) for one parameter of one merge input (or a shared one)."""
    chain = [(v, p) for v, p in chain if v is not None]
    if not chain:
        return False, None
    rules = flatten_rules(st, chain, renumbered=sl.sources[0].layers is not None)
    if not rules:
        return False, None
    if spec.type in ("bool", "int"):
        flt, value, path = rules[0]
        if len(rules) > 1 or flt is not None or isinstance(value, list):
            raise st.fail(path, f"cannot convert filters or gradients of the {spec.type} "
                          f"parameter `{spec.name}`: recipekit takes one value per step")
        return True, value
    out: list[dict[str, Any]] = []
    post = post_names(st, model)
    for flt, value, path in rules:
        if isinstance(value, list):
            if not value or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                    for v in value):
                raise st.fail(path, f"cannot convert the gradient {value!r}: recipekit "
                              "gradients are lists of numbers")
            if len(value) == 1:
                value = value[0]
        elif isinstance(value, (str, bool)) or (value is not None and
                                                 not isinstance(value, (int, float))):
            raise st.fail(path, f"cannot convert {value!r} for `{spec.name}`: it needs a number")
        if isinstance(value, list):
            if st.folds.get(model, model) in st.multi_stack:
                raise st.fail(path, f"cannot convert the gradient {value!r} on a model with "
                              "several layer stacks: mergekit runs t over each module's own "
                              "layers, a recipe over the one stack `layer_prefix` names",
                              hint="give one value")
            out += _gradient_fixes(st, value, flt, post, sl, model)
            value = {"gradient": value}
        if flt is not None:
            st.translated.add("filter")
        out.append({"value": value} if flt is None else {"match": glob_filter(flt), "value": value})
    if out[-1].get("match") is not None and not spec.required:
        out.append({"value": spec.default})  # mergekit falls back to the default
    if len(out) == 1 and "match" not in out[0]:  # a lone filtered rule stays a rule: a
        return True, out[0]["value"]             # tensor it misses has no value, as in mergekit
    return True, out
