"""Load a YAML or JSON recipe, validate it, and return a typed `Recipe`.

Validation happens in layers, each collecting every problem before raising: YAML/JSON
syntax (`document`), the published JSON Schema (`schema`), the semantic checks here that
need no checkpoint (names resolve, no cycles, layer-range grammar), and each op's document
check (`recipekit.steps.check_steps`: a merge method's contract, a head's class count, ...).
Checks against the sources' headers happen at compile time. Every message is located at the
user's own line, like a compiler.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from recipekit.errors import (
    KeyPath,
    MergekitConfigError,
    RecipeError,
    RecipeErrors,
    holds_credentials,
)
from recipekit.inputs.chat_template import setting_problem
from recipekit.io.urls import is_url, local_path_text, redact, url_problem
from recipekit.recipe.document import Document, load_document, parse_document, show
from recipekit.recipe.schema import coerce_numeric_strings, schema_errors, step_references
from recipekit.recipe.types import (
    DEFAULT_REVISION,
    DEFAULT_SHARD_SIZE,
    RANGE_PREFIX,
    ModelRef,
    Output,
    Recipe,
    Step,
    parse_layer_range,
)
from recipekit.recipe.variables import substitute_variables
from recipekit.units import parse_size

#: What `load_recipe` takes: a file path, the recipe's YAML/JSON text, or its data.
RecipeSource = str | os.PathLike | Mapping[str, Any]


def load_recipe(source: RecipeSource, *, base_dir: str | os.PathLike | None = None,
                variables: Mapping[str, Any] | None = None) -> Recipe:
    """Load, validate and type a recipe. Needs no checkpoint and no torch.

    ``source`` is a file path (`str` or `os.PathLike`), the recipe's text (a `str` holding a
    line break, or starting with ``{``: YAML, or JSON when it starts with ``{``), or its data (a
    mapping, as `yaml.safe_load` returns). A recipe's paths are relative to its file; those of
    text or data are relative to ``base_dir`` (default: the working directory), as if the
    recipe were the file ``base_dir/recipe.yaml``. Text is located by line like a file
    (``<string>:9:5: ...``); data by key path (``<dict>: steps[0].alpha: ...``).

    ``variables`` sets the recipe's declared variables (`recipekit.recipe.variables`; the
    CLI's ``--set``); each ``${name}`` takes the value set, else the declared default.

    Schema problems and semantic problems (unknown names, cycles, empty ranges) are collected
    together, so one run of `recipekit validate` lists everything.

    Raises:
        RecipeErrors: every problem found, located, sorted by line.
        MergekitConfigError: the document is a mergekit config (convert it first).
        SourceNotFoundError: the recipe file does not exist.
        TypeError: ``source`` is none of the three kinds.
    """
    if isinstance(source, Mapping):
        file = Path(base_dir or Path.cwd()) / "recipe.yaml"
        doc = Document("<dict>", plain_data(source), [])
    elif isinstance(source, str) and is_recipe_text(source):
        is_json = source.lstrip().startswith("{")
        file = Path(base_dir or Path.cwd()) / ("recipe.json" if is_json else "recipe.yaml")
        doc = parse_document(source, "<string>", is_json=is_json)
    elif isinstance(source, (str, os.PathLike)):
        file = Path(source)
        doc = load_document(file)
    else:
        raise TypeError(f"a recipe is a path, YAML/JSON text or a mapping, not "
                        f"{type(source).__name__}")
    return _typed(doc, file, variables)


def is_recipe_text(source: str) -> bool:
    """Whether a string handed to `load_recipe` is a recipe's text rather than a path: it holds a
    line break (no recipe fits on one line of YAML block style) or starts with ``{`` (JSON or
    YAML flow style). Any other string is a path, so ``"recipe.yaml"`` never parses as YAML."""
    return "\n" in source or source.lstrip().startswith("{")


def _typed(doc: Document, file: Path, variables: Mapping[str, Any] | None = None) -> Recipe:
    if not isinstance(doc.data, dict):
        raise RecipeErrors([doc.error((), "a recipe is a mapping with keys `recipekit`, "
                                      "`models`, `steps` and `output`")])
    if "recipekit_lock" in doc.data:
        raise RecipeErrors([_lockfile_error(doc)])
    refuse_mergekit_config(doc)
    used = substitute_variables(doc, variables)
    coerce_numeric_strings(doc)
    errors = schema_errors(doc) + non_finite_numbers(doc)
    recipe = dataclasses.replace(_build(doc, file, errors), variables=used)
    from recipekit.steps import check_steps  # steps/ imports this package

    refused = {e.key_path[1] for e in errors
               if e.key_path and len(e.key_path) > 1 and e.key_path[0] == "steps"}
    errors += check_steps(recipe, skip=frozenset(
        s.name for s in recipe.steps.values() if s.index in refused))
    if errors:
        raise RecipeErrors(_dedupe(errors))
    return recipe


def _lockfile_error(doc: Document) -> RecipeError:
    """A lock file given where a recipe belongs (`recipekit validate recipes/*.json`, a
    pre-commit pattern that matches ``x.lock.json``): say so instead of listing schema errors."""
    recipe = doc.data.get("recipe")
    beside = f" ({show(recipe)})" if isinstance(recipe, str) else ""
    return doc.error((), "this is a lockfile written by `recipekit lock`, not a recipe",
                     hint=f"validate the recipe it pins{beside} instead; lockfiles are checked "
                     "by `recipekit run`")


def recipe_from_data(data: Mapping[str, Any], file: Path) -> Recipe:
    """Validate and type a recipe held in memory as if it were written at ``file`` (paths are
    relative to its directory; the file need not exist). For tools that generate recipes
    (`recipekit import-mergekit`); errors are located by key path only.

    Raises:
        RecipeErrors: as `load_recipe`.
    """
    return _typed(Document(str(file), plain_data(data), []), file)


#: Top-level keys of a mergekit config that a recipe never has.
_MERGEKIT_KEYS = ("merge_method", "slices", "base_model", "tokenizer_source", "out_dtype")


def refuse_mergekit_config(doc: Document) -> None:
    """A mergekit config given where a recipe belongs is one clear error, not a schema error
    for each of its keys: it has no ``recipekit:`` and has ``merge_method``/``slices`` (or a
    ``models:`` list, mergekit's shape; a recipe's ``models`` is a mapping).

    Raises:
        MergekitConfigError: naming the command that converts it.
    """
    data = doc.data
    if "recipekit" in data or not (any(k in data for k in _MERGEKIT_KEYS)
                                   or isinstance(data.get("models"), list)):
        return
    shown = doc.file if not doc.file.startswith("<") else "CONFIG.yml"
    raise MergekitConfigError(
        "this is a mergekit config, not a recipe; convert it with `recipekit import-mergekit "
        f"{shown} -o recipe.yaml`, then use the recipe", file=doc.file)


def plain_data(data: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of recipe data handed over in memory, as the YAML reader would give it:
    tuples become lists and paths strings; numbers from numpy become Python numbers.

    Why: the schema, the plan hash and the manifest take JSON values (a tuple or a `Path` in a
    dict used to end in a TypeError deep inside). Anything else (a set, an object, a key that is
    not a string) is a located `RecipeError` here.

    Raises:
        RecipeErrors: every value that has no JSON form, by key path.
    """
    errors: list[RecipeError] = []

    def walk(value: Any, path: KeyPath) -> Any:
        if value is None or isinstance(value, (str, bool, int, float)):
            return value
        if isinstance(value, Mapping):
            out = {}
            for k, v in value.items():
                if not isinstance(k, str):
                    errors.append(RecipeError(f"key {k!r} is not a string", key_path=path,
                                              file="<dict>"))
                    continue
                out[k] = walk(v, path + (k,))
            return out
        if isinstance(value, (list, tuple)):
            return [walk(v, path + (i,)) for i, v in enumerate(value)]
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if isinstance(value, numbers.Integral):
            return int(value)
        if isinstance(value, numbers.Real):
            return float(value)
        errors.append(RecipeError(f"a {type(value).__name__} is not a recipe value",
                                  key_path=path, file="<dict>",
                                  hint="use strings, numbers, booleans, lists and mappings"))
        return None

    out = walk(data, ())
    if errors:
        raise RecipeErrors(errors)
    return out


def non_finite_numbers(doc: Document) -> list[RecipeError]:
    """Every NaN or infinity in the document (YAML `.nan`/`.inf`, JSON `NaN`/`Infinity`).

    No recipe value means anything when it is not finite: an `alpha: .nan` would write an
    all-NaN checkpoint with exit 0. The walk is iterative, so any nesting depth is fine.
    """
    errors = []
    stack: list[tuple[KeyPath, Any]] = [((), doc.data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            errors.append(doc.error(path, f"{value!r} is not a finite number",
                                    hint="parameters must be finite numbers"))
        elif isinstance(value, dict):
            stack.extend((path + (k,), v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((path + (i,), v) for i, v in enumerate(value))
    return errors


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
    raw_models = data.get("models") if isinstance(data.get("models"), dict) else {}
    raw_adapters = data.get("adapters") if isinstance(data.get("adapters"), dict) else {}
    models = _inputs(doc, "models", raw_models, base_dir, errors)
    adapters = _inputs(doc, "adapters", raw_adapters, base_dir, errors, taken=raw_models)
    names = _Names(doc, {**raw_adapters, **raw_models}, errors)  # names steps may refer to

    raw_steps = data.get("steps") if isinstance(data.get("steps"), list) else []
    steps_list = [(i, s) for i, s in enumerate(raw_steps)
                  if isinstance(s, dict) and isinstance(s.get("name"), str)]
    by_name = names.add_steps(steps_list)
    deps: dict[str, list[str]] = {}
    for i, step in steps_list:
        deps.setdefault(step["name"], names.step_dependencies(i, step))
        layers = step.get("layers")
        for j, entry in enumerate(layers if isinstance(layers, list) else []):
            _check_layer_entry(doc, ("steps", i, "layers", j), entry, errors)
    order = _topological_order(doc, by_name, deps, errors)

    out = data.get("output") if isinstance(data.get("output"), dict) else {}
    output = _output(doc, out, names, steps_list[-1][1]["name"] if steps_list else None,
                     file, errors)
    steps = {name: Step(name, str(by_name[name][1].get("op")), by_name[name][1],
                        by_name[name][0]) for name in order}
    return Recipe(file=file, document=doc, name=data.get("name"),
                  description=data.get("description"), models=models, steps=steps,
                  output=output, adapters=adapters)


def _inputs(doc: Document, section: str, raw: Mapping[str, Any], base_dir: Path,
            errors: list[RecipeError], *, taken: Mapping[str, Any] | None = None
            ) -> dict[str, ModelRef]:
    """The ``models`` (or ``adapters``) entries as `ModelRef`s: a hub repo at a revision, or a
    path resolved against the recipe's directory. Entries the schema refused are skipped, and
    so are adapters named like a ``taken`` model (an error)."""
    out: dict[str, ModelRef] = {}
    for name, entry in raw.items():
        if taken is not None and name in taken:
            errors.append(doc.error((section, name), f"'{name}' is already a model name",
                                    hint="give the adapter its own name", key=True))
            continue
        prefix = entry.get("layer_prefix") if isinstance(entry, dict) else None
        prefix = prefix if isinstance(prefix, str) and section == "models" else None
        if isinstance(entry, dict) and isinstance(entry.get("hub"), str):
            revision = entry.get("revision", DEFAULT_REVISION)
            out[name] = ModelRef(name, None, f"{entry['hub']}@{revision}", prefix,
                                 (section, name), hub=entry["hub"], revision=str(revision))
            continue
        written = entry if isinstance(entry, str) else (
            entry.get("path") if isinstance(entry, dict) else None)
        if not isinstance(written, str):
            continue
        key = (section, name) + (("path",) if isinstance(entry, dict) else ())
        if is_url(written):
            problem = url_problem(written)
            if problem is not None:
                errors.append(doc.error(key, f"the URL {problem}"))
                continue
            out[name] = ModelRef(name, None, written, prefix, (section, name),
                                 url=written.rstrip("/"))
            continue
        _check_path_text(doc, key, written, errors)
        path = Path(os.path.normpath(base_dir / _expanduser(written)))
        out[name] = ModelRef(name, path, written, prefix, (section, name))
    return out


class _Names:
    """The names a recipe defines (inputs, then steps), and the references to check
    against them."""

    def __init__(self, doc: Document, inputs: Mapping[str, Any],
                 errors: list[RecipeError]) -> None:
        self.doc, self.inputs, self.errors = doc, inputs, errors
        self.steps: dict[str, tuple[int, dict[str, Any]]] = {}
        self.known: list[str] = sorted(inputs)

    def add_steps(self, steps: list[tuple[int, dict[str, Any]]]
                  ) -> dict[str, tuple[int, dict[str, Any]]]:
        """Register step names (an input's name or a repeated one is an error); by name."""
        doc = self.doc
        for i, step in steps:
            name = step["name"]
            if name in self.inputs:
                self.errors.append(doc.error(("steps", i, "name"),
                                             f"step name '{name}' is already a model name",
                                             hint="give the step its own name"))
            elif name in self.steps:
                first = doc.locate(("steps", self.steps[name][0], "name")).line
                self.errors.append(doc.error(
                    ("steps", i, "name"), f"duplicate step name '{name}' (first used on line "
                    f"{first})", hint="give each step its own name"))
            else:
                self.steps[name] = (i, step)
        self.known = sorted(set(self.inputs) | set(self.steps))
        return self.steps

    def check(self, ref: str, path: KeyPath) -> None:
        if ref not in self.inputs and ref not in self.steps:
            close = difflib.get_close_matches(ref, self.known, n=1)
            hint = (f"did you mean '{close[0]}'? " if close else "") + (
                "known models and steps: " + ", ".join(self.known))
            self.errors.append(self.doc.error(path, f"unknown model or step '{ref}'", hint=hint))

    def step_dependencies(self, i: int, step: dict[str, Any]) -> list[str]:
        """The names step ``i`` refers to, each checked."""
        refs = []
        for ref, rel in step_references(step):
            if ref == step["name"]:
                self.errors.append(self.doc.error(
                    ("steps", i) + rel, f"step '{ref}' refers to itself",
                    hint="a step can only use models and other steps"))
                continue
            self.check(ref, ("steps", i) + rel)
            refs.append(ref)
        return refs


def _output(doc: Document, out: Mapping[str, Any], names: _Names, last_step: str | None,
            file: Path, errors: list[RecipeError]) -> Output:
    """The ``output`` section, typed: the model (default: the last step), size and path."""
    out_model = out.get("model")
    if isinstance(out_model, str):
        names.check(out_model, ("output", "model"))
    elif last_step is not None:
        out_model = last_step
    else:
        out_model = ""
        errors.append(doc.error(("output",), "no steps and no `output.model`",
                                hint="add `output: {model: <name>}` or a step", key=True))
    if isinstance(out.get("config"), str):
        names.check(out["config"], ("output", "config"))
    shard_size = _shard_size(doc, out.get("shard_size", DEFAULT_SHARD_SIZE), errors)
    base_dir = file.resolve().parent
    url = None
    if isinstance(out.get("path"), str) and is_url(out["path"]):
        problem = url_problem(out["path"])
        if problem is not None:
            errors.append(doc.error(("output", "path"), f"the URL {problem}"))
        url = out["path"].rstrip("/")
    elif isinstance(out.get("path"), str):
        _check_path_text(doc, ("output", "path"), out["path"], errors)
    out_path = Path(os.path.normpath(base_dir / _expanduser(out["path"]))) if isinstance(
        out.get("path"), str) else base_dir / "out" / file.stem
    template = out.get("chat_template")
    if isinstance(template, str):
        problem = setting_problem(template)
        if problem is not None:
            errors.append(doc.error(("output", "chat_template"), problem[0], hint=problem[1]))
    elif isinstance(template, dict) and isinstance(template.get("file"), str):
        key = ("output", "chat_template", "file")
        if is_url(template["file"]):  # was read as a local path, "s3:/bkt/t.jinja"
            errors.append(doc.error(key, f"{redact(template['file'])} is a URL; a chat template "
                                    "file is read from a local path", hint="download it and "
                                    "name the local file (or write the template inline: "
                                    "`chat_template: \"{% ... %}\"`)"))
        else:
            _check_path_text(doc, key, template["file"], errors)
    if url is not None:
        out_path = base_dir / "out" / file.stem  # unused: the output is `url`
    return Output(out_path, out_model, out.get("dtype"), shard_size, out.get("config"),
                  out.get("adapter") if isinstance(out.get("adapter"), dict) else None,
                  template if isinstance(template, (str, dict)) else None, url)


def _shard_size(doc: Document, written: Any, errors: list[RecipeError]) -> int:
    try:
        return parse_size(written)
    except ValueError as problem:  # 2.5 bytes (what the schema refuses: reported by it)
        if not any(e.key_path == ("output", "shard_size") for e in errors):
            message, _, hint = str(problem).partition("; ")
            errors.append(doc.error(("output", "shard_size"), message, hint=hint or None))
        return 1
    except (TypeError, OverflowError):  # null, a list, "999...9" (infinity)
        if not any(e.key_path == ("output", "shard_size") for e in errors):
            errors.append(doc.error(("output", "shard_size"),
                                    f"{show(written)} is not a usable size",
                                    hint="write a number of bytes or e.g. '500MB', '5GB', "
                                    "'2GiB'"))
        return 1


def _check_path_text(doc: Document, path: KeyPath, written: str,
                     errors: list[RecipeError]) -> None:
    if "\x00" in written:  # every file system call would raise ValueError
        errors.append(doc.error(path, f"{show(written)} is not a usable path: it holds a NUL "
                                "character"))
    elif holds_credentials(written):  # file://user:secret@host/...: refused like any URL's
        errors.append(doc.error(path, f"{redact(written)} holds credentials (user:secret@, or a "
                                "token in its query)", hint="name the local path"))


def _expanduser(written: str) -> str:
    """The local path text ``written`` names: a ``file://`` URL's path (`local_path_text`: fsspec
    reads ``file:///tmp/x`` as ``/tmp/x``, and so does a recipe), then ``~`` and ``~user``
    expanded where they exist; otherwise the text as written (a relative path then), where
    `Path.expanduser` would raise RuntimeError."""
    return os.path.expanduser(local_path_text(written))


def _check_layer_entry(doc: Document, path: KeyPath, entry: Any,
                       errors: list[RecipeError]) -> None:
    if isinstance(entry, str) and RANGE_PREFIX.match(entry):  # others: the schema's message
        try:
            parse_layer_range(entry)
        except ValueError as e:
            errors.append(doc.error(path, str(e)))
    elif isinstance(entry, dict):  # (a float where an integer goes: the schema's message)
        rng = entry.get("range")
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
