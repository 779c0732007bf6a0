"""`recipekit import-mergekit`: a mergekit 0.1.5 config (`models:` or `slices:`) → a recipe.

Why: people arrive with mergekit YAML. The conversion keeps mergekit's meaning, not its
spelling, and refuses (exit 2, naming the key) whatever has no exact recipekit equivalent.
mergekit semantics it must reproduce (reference/mergekit.md §1.4-1.5, read in mergekit's
`config.py`, `parameter_resolver.py`, `plan.py`):

* **Precedence and filters.** A parameter is looked up in the source's `parameters`, then the
  slice's, then the top level; inside one level a list of `{filter, value}` is tried in order,
  `filter` being a plain *substring* of the tensor name, and a level where nothing matches
  falls through to the next. recipekit rules are first-match fnmatch globs on the full name, so
  the levels are concatenated into one rule list and each filter becomes ``*<escaped>*``.
* **Gradients.** mergekit evaluates t per *slice* (t = i/(n-1) for layer i of the slice, and
  t = 1 when the slice has one layer) and at t = 0 for every tensor outside the layers —
  embeddings *and* the final norm and lm_head. recipekit evaluates t per step with t = 1 after
  the layers and t = 0 for a one-layer step. Each slice becomes its own `merge` step (so t runs
  per slice, as in mergekit), and where the two disagree explicit rules are emitted: the
  tensors after the layers get the gradient's value at t = 0, the layer of a one-layer slice its
  value at t = 1.
* **Slices.** Each source's `layer_range` becomes a `layers` step; the slices' results are
  stacked by a final `layers` step. mergekit takes the tensors before the layers from the first
  slice and those after them from the last; when those differ, an `interpolate` with α = 0/1
  rules (exact copies) takes the final norm and head from the last slice.
* **base_model** joins a `models:` merge as an extra input when it is not listed (mergekit
  appends it); it becomes `base:` for methods that use a base, `from: [base, other]` for slerp
  and nearswap, and the donor of config.json (`output.config`).
* **model+lora**: mergekit folds the LoRA into the model (PEFT's `merge_and_unload`) before
  merging; the recipe gets the LoRA under `adapters:` and an `op: adapters` step the merge takes.
* **dtype / out_dtype** become `output.dtype`; `dtype` (or, without it, `inputs`: their promoted
  dtype) becomes each merge step's `compute_dtype`, so the method computes in it as mergekit does.
* **chat_template** (`auto`, a built-in name, literal Jinja) becomes `output.chat_template`.
* **Text** mergekit reads as is (paths, prompts, chat templates) is written with every ``${``
  as ``$${`` (`recipe.variables.escape_references`): a recipe substitutes ``${name}``.

Oracle: tests/test_mergekit_import.py converts typical configs, runs the recipes and compares
them with mergekit 0.1.5's outputs (goldens in tests/goldens/mergekit_import/, made by
tests/goldens/make_mergekit_import_goldens.py; a live comparison runs under the `mergekit` marker).
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from recipekit.arch import language_stack
from recipekit.errors import (
    ConversionError,
    KeyPath,
    RecipeErrors,
    RecipekitError,
    format_key_path,
)
from recipekit.inputs.chat_template import AUTO, is_literal, setting_problem
from recipekit.inputs.resolve import resolve_sources, with_side_files
from recipekit.merge import METHODS, MethodSpec
from recipekit.plan import compile_plan
from recipekit.recipe import load_document, recipe_from_data, whole_floats_as_ints
from recipekit.recipe.variables import escape_references
from recipekit.tools.mergekit_moe import choose_architecture, is_moe_config, moe_step
from recipekit.tools.mergekit_params import (
    ImportState,
    Slice,
    Source,
    exact,
    post_names,
    translate_param,
)

#: What recipekit converts, and what it refuses with a reason (the key is named in the error).
TOP_KEYS = ("merge_method", "models", "slices", "base_model", "parameters", "dtype", "out_dtype",
            "chat_template", "tokenizer_source", "tokenizer")
REFUSED = {
    "modules": "per-module configs (a VLM's text and vision modules merged differently) have "
               "no recipekit equivalent: a merge step covers every tensor of a model, and "
               "`layers` steps restack only the one stack `layer_prefix:` names; a `models:` "
               "config of VLMs converts",
}
#: Parameters mergekit 0.1.5 accepts in a config and ignores where the method's function does
#: not take them (see `_ignored_by_mergekit`); other unknown keys are refused as likely typos.
IGNORED_BY_MERGEKIT = ("weight",)
SLICE_KEYS = ("sources", "base_model", "parameters", "residual_weight")
SOURCE_KEYS = ("model", "layer_range", "parameters")
DTYPES = ("float32", "float16", "bfloat16", "float64")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def convert_file(config: Path, out_file: Path | None, cwd: Path | None = None) -> str:
    """The recipe text for mergekit config ``config``, checked by recipekit's own validation.

    Relative model paths are resolved as mergekit does (against ``cwd``, default the current
    directory) and written relative to the recipe's directory (``out_file``'s, or ``cwd``).

    Raises:
        ConversionError: what cannot be converted, located in the mergekit config.
        RecipekitError: models that cannot be read, as `recipekit validate` reports them.
    """
    doc = load_document(config)
    cwd = (cwd or Path.cwd()).resolve()
    out_dir = out_file.resolve().parent if out_file is not None else cwd
    st = ImportState(doc, cwd, out_dir)
    data = doc.data
    if not isinstance(data, dict):
        raise st.fail((), "a mergekit config is a mapping with `merge_method` and `models` or "
                      "`slices`")
    if is_moe_config(data):
        return _convert_moe(st, data, config, out_file, cwd)
    _check_top(st, data)
    st.reserved = _tokenizer_keywords(data)
    method = METHODS[data["merge_method"]]
    slices = _read_slices(st, data, method)
    _resolve_models(st)
    _measure(st, slices)
    final = _build_steps(st, data, method, slices)
    _convert_tokenizer(st, data, final)
    recipe = escape_references(_recipe(st, data, method, final, config))  # text as mergekit's
    whole_floats_as_ints(recipe)  # mergekit reads `pad_to_multiple_of: 64.0` as 64
    text = _render(st, recipe, config)
    _validate(recipe, (out_file or cwd / (config.stem + ".yaml")).resolve(), st)
    return text


def _convert_moe(st: ImportState, data: dict[str, Any], config: Path, out_file: Path | None,
                 cwd: Path) -> str:
    """A mergekit-moe config as a recipe with one `moe` step (`tools.mergekit_moe`)."""
    step, output = moe_step(st, data, _model)
    _resolve_models(st)
    choose_architecture(st, step)
    st.steps.append(step)
    recipe = escape_references({  # prompts (and paths) mean what they meant to mergekit
        "recipekit": 1, "name": config.stem,
        "description": f"converted from the mergekit-moe config {config.name}",
        "models": st.models, **({"adapters": st.adapters} if st.adapters else {}),
        "steps": st.steps, "output": output})
    whole_floats_as_ints(recipe)  # mergekit-moe reads `experts_per_token: 2.0` as 2
    head = [f"# Converted by `recipekit import-mergekit {config.name}` (mergekit-moe). What was "
            "translated:"]
    text = _render(st, recipe, config, head)
    _validate(recipe, (out_file or cwd / (config.stem + ".yaml")).resolve(), st)
    return text


# --- reading the config --------------------------------------------------------------------

def _check_top(st: ImportState, data: dict[str, Any]) -> None:
    errors = []
    for key, value in data.items():
        if key in REFUSED:
            if value is not None:
                errors.append(st.doc.error((key,), f"cannot convert `{key}`: {REFUSED[key]}",
                                           key=True, hint="remove it to convert the rest"))
        elif key not in TOP_KEYS:
            close = difflib.get_close_matches(str(key), [*TOP_KEYS, *REFUSED], n=1)
            errors.append(st.doc.error((key,), f"unknown mergekit key `{key}` (mergekit would "
                                       "silently ignore it)", key=True,
                                       hint=f"did you mean '{close[0]}'?" if close else None))
    method = data.get("merge_method")
    if method is None:
        errors.append(st.doc.error((), "no `merge_method`"))
    elif not isinstance(method, str) or method not in METHODS:
        errors.append(st.doc.error(("merge_method",), f"cannot convert merge method {method!r}: "
                                   "recipekit has " + ", ".join(METHODS)))
    if ("models" in data) == ("slices" in data):
        errors.append(st.doc.error((), "a mergekit config has exactly one of `models` and "
                                   "`slices`"))
    for key in ("dtype", "out_dtype"):
        value = data.get(key)
        if value is not None and str(value).removeprefix("torch.") not in DTYPES:
            errors.append(st.doc.error((key,), f"cannot convert {key} {value!r}: recipekit "
                                       "writes " + ", ".join(DTYPES)))
    template = data.get("chat_template")
    if template is not None:
        problem = ("a chat template is a string", None) if not isinstance(template, str) \
            else setting_problem(template)
        if problem is not None:
            errors.append(st.doc.error(("chat_template",), f"cannot convert chat_template: "
                                       f"{problem[0]}", hint=problem[1]))
    if errors:
        raise ConversionError(errors)


def _model(st: ImportState, ref: Any, path: KeyPath) -> str:
    """The recipe name of a mergekit model reference, registering its source (a `model+lora`
    reference names the `adapters` step that folds the LoRA into the model)."""
    if isinstance(ref, dict):
        extra = sorted(set(ref) - {"model"})
        if extra:
            raise st.fail(path + (extra[0],), f"cannot convert `{extra[0]}` of a model "
                          "reference", hint="write a LoRA as `model: base+lora`; architecture "
                          "overrides are not supported")
        ref = ref.get("model")
    if not isinstance(ref, str) or not ref:
        raise st.fail(path, "a model reference is a path or a hub repo id")
    if ref in st.refs:
        return st.refs[ref]
    if "+" in ref:
        return _lora_model(st, ref, path)
    source, base = _source(st, ref, path, "model")
    name = _fresh_name(st, base)
    st.models[name] = source
    st.refs[ref] = name
    st.where[name] = path
    return name


def _source(st: ImportState, ref: str, path: KeyPath, what: str) -> tuple[Any, str]:
    """(recipe source, a name for it) of a local directory or hub id ``ref`` (``what``: model
    or LoRA), resolved as mergekit resolves it."""
    name_part, _, revision = ref.partition("@")
    local = (st.cwd / os.path.expanduser(name_part))
    if local.is_dir():
        if revision:
            raise st.fail(path, f"{ref!r}: a local directory has no revision")
        source: Any = os.path.relpath(local.resolve(), st.out_dir)
        if source.startswith("../.."):
            source = str(local.resolve())  # far away: an absolute path reads better
        elif not source.startswith((".", "/")):
            source = "./" + source
    elif _HUB_ID.match(name_part):
        source = {"hub": name_part, "revision": revision} if revision else {"hub": name_part}
    else:
        raise st.fail(path, f"{what} {ref!r} is neither a directory (relative to {st.cwd}) nor "
                      "a hub repo id (org/name)")
    base = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(name_part).name or what).lstrip(".-") or "m"
    return source, base


def _fresh_name(st: ImportState, base: str) -> str:
    """``base``, or ``base_2``, ``base_3``... where it is taken or a keyword of the recipe
    (`_tokenizer_keywords`)."""
    taken = {*st.models, *st.adapters, *(s["name"] for s in st.steps), *st.reserved}
    name, i = base, 2
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    if base in st.reserved:
        st.notes.append(f"model '{name}' is not named '{base}': `{base}` is a keyword of the "
                        "merge step's `tokenizer:` (every model's tokens)")
    return name


def _tokenizer_keywords(data: dict[str, Any]) -> set[str]:
    """The names no model of the recipe may take: `union` where the tokenizer source is the
    keyword `union` (a model of the step named `union` makes the keyword ambiguous, and
    recipekit refuses it). A model in a folder named `base` keeps its name: a clashing keyword
    `base` is written as the model it means (`_convert_tokenizer`)."""
    block = data.get("tokenizer")
    if block is None:
        source = data.get("tokenizer_source")
    else:
        source = block.get("source", "union") if isinstance(block, dict) else None
    return {"union"} if source == "union" else set()


def _lora_model(st: ImportState, ref: str, path: KeyPath) -> str:
    """mergekit's `model+lora`: the LoRA folded into the model (PEFT's `merge_and_unload`,
    which mergekit runs before merging) by an `op: adapters` step, whose name is returned."""
    parts = ref.split("+")
    if len(parts) != 2 or not all(parts):
        raise st.fail(path, f"cannot read {ref!r}: a LoRA reference is `model+lora`")
    model = _model(st, parts[0], path)
    lora = st.lora_refs.get(parts[1])
    if lora is None:
        source, base = _source(st, parts[1], path, "LoRA")
        lora = _fresh_name(st, base)
        st.adapters[lora] = source
        st.lora_refs[parts[1]] = lora
        st.where[lora] = path
    name = _fresh_name(st, f"{model}_{lora}")
    st.steps.append({"name": name, "op": "adapters", "from": model, "adapters": [lora]})
    st.folds[name] = model
    st.refs[ref] = name
    st.notes.append(f"{ref}: step '{name}' folds the LoRA into the model (PEFT's "
                    "merge_and_unload, which mergekit runs before merging)")
    return name


def _params(st: ImportState, value: Any, path: KeyPath) -> Mapping[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise st.fail(path, "`parameters` is a mapping of parameter names to values")
    return value


def _read_slices(st: ImportState, data: dict[str, Any], method: MethodSpec) -> list[Slice]:
    base = _model(st, data["base_model"], ("base_model",)) if data.get("base_model") else None
    if "models" in data:
        entries = data["models"]
        if not isinstance(entries, list) or not entries:
            raise st.fail(("models",), "`models` is a non-empty list of {model, parameters}")
        sources = [_models_entry(st, entry, ("models", i)) for i, entry in enumerate(entries)]
        _refuse_duplicates(st, sources)
        if base is not None and all(s.model != base for s in sources):
            sources.append(Source(base, None, None, ("base_model",)))  # mergekit appends it
            st.notes.append(f"base_model '{base}' is not under `models:`; mergekit merges it "
                            "as an extra input, and so does this recipe")
        return [Slice(sources, base, None, ("models",))]
    raw = data["slices"]
    if not isinstance(raw, list) or not raw:
        raise st.fail(("slices",), "`slices` is a non-empty list of {sources: [...]}")
    out = []
    for k, sl in enumerate(raw):
        path = ("slices", k)
        if not isinstance(sl, dict) or not isinstance(sl.get("sources"), list) or \
                not sl["sources"]:
            raise st.fail(path, "each slice has a non-empty `sources` list")
        for key in sl:
            if key not in SLICE_KEYS:
                raise st.fail(path + (key,), f"unknown key `{key}` in a slice")
        if sl.get("residual_weight") is not None:
            st.notes.append(f"slices[{k}].residual_weight is ignored (mergekit ignores it too)")
        sources = [_slice_source(st, src, path + ("sources", j))
                   for j, src in enumerate(sl["sources"])]
        _refuse_duplicates(st, sources)
        lengths = {s.layers[1] - s.layers[0] for s in sources if s.layers}
        if len(lengths) > 1:
            raise st.fail(path + ("sources",), "the sources of a slice must have the same number "
                          f"of layers (got {sorted(lengths)})")
        sbase = _model(st, sl["base_model"], path + ("base_model",)) if sl.get("base_model") \
            else base
        out.append(Slice(sources, sbase, _params(st, sl.get("parameters"), path + ("parameters",)),
                         path, lengths.pop()))
    if all(s.length == 0 for s in out):
        raise st.fail(("slices",), "every slice is empty: the output would have no layers")
    return out


def _refuse_duplicates(st: ImportState, sources: list[Source]) -> None:
    """Refuse a model listed twice in one slice (or `models:`), as mergekit 0.1.5 does
    ("Duplicate merge inputs"): its merge inputs are keyed by model, so two layer ranges of one
    model cannot be merged with each other. The same path spelt twice is one reference."""
    seen: dict[str, Source] = {}
    for s in sources:
        if s.model in seen:
            raise st.fail(s.path + ("model",), f"model '{s.model}' is already a source here "
                          f"({format_key_path(seen[s.model].path)}): mergekit refuses a merge "
                          "that lists one model twice (\"Duplicate merge inputs\")",
                          hint="list each model once per slice; to merge two layer ranges of "
                          "one model, write a recipe: a `layers` step for each range and a "
                          "`merge` step over them")
        seen[s.model] = s


def _models_entry(st: ImportState, entry: Any, path: KeyPath) -> Source:
    """One ``{model, parameters}`` entry of a `models:` config (the whole model)."""
    if not isinstance(entry, dict) or "model" not in entry:
        raise st.fail(path, "each `models` entry is {model: ..., parameters: ...}")
    extra = sorted(set(entry) - {"model", "parameters"})
    if extra:
        raise st.fail(path + (extra[0],), f"unknown key `{extra[0]}` in a `models` entry")
    return Source(_model(st, entry["model"], path + ("model",)), None,
                  _params(st, entry.get("parameters"), path + ("parameters",)), path)


def _slice_source(st: ImportState, src: Any, spath: KeyPath) -> Source:
    """One ``{model, layer_range, parameters}`` entry of a slice's ``sources``."""
    if not isinstance(src, dict) or "model" not in src or "layer_range" not in src:
        raise st.fail(spath, "each source is {model, layer_range: [start, end]}")
    for key in src:
        if key not in SOURCE_KEYS:
            raise st.fail(spath + (key,), f"unknown key `{key}` in a slice source")
    lr = src["layer_range"]
    if isinstance(lr, list):  # mergekit (pydantic) reads [0, 2.0] as (0, 2)
        lr = [int(x) if isinstance(x, float) and x.is_integer() else x for x in lr]
    if not (isinstance(lr, list) and len(lr) == 2 and all(
            isinstance(x, int) and not isinstance(x, bool) for x in lr)) \
            or lr[0] < 0 or lr[1] < lr[0]:
        raise st.fail(spath + ("layer_range",), f"layer_range {lr!r} is not [start, end] "
                      "with 0 <= start <= end")
    return Source(_model(st, src["model"], spath + ("model",)), tuple(lr),
                  _params(st, src.get("parameters"), spath + ("parameters",)), spath)


# --- the models ----------------------------------------------------------------------------

def _resolve_models(st: ImportState) -> None:
    """Read each model's config and headers (recipekit's own resolution) for layer counts and
    the names of the tensors after the layers. A model with several layer stacks (a VLM) gets
    `layer_prefix:` naming its language model's (`_name_language_stacks`)."""
    first = next(iter(st.models))
    probe = {"recipekit": 1, "models": st.models, **({"adapters": st.adapters} if st.adapters
                                                      else {}),
             "steps": [{"name": "probe", "op": "layers", "from": first, "layers": [0]}]}
    for retry in (True, False):
        recipe = recipe_from_data(escape_references(probe), st.out_dir / "import.yaml")
        try:
            st.checkpoints = resolve_sources(recipe)
            return
        except (RecipeErrors, RecipekitError) as e:
            errors = e.errors if isinstance(e, RecipeErrors) else [e]
            if not (retry and _name_language_stacks(st, errors)):
                raise _relocate(st, errors[0]) from None


def _name_language_stacks(st: ImportState, errors: list[RecipekitError]) -> bool:
    """Set `layer_prefix` on each model refused for having several layer stacks, naming the
    stack its `text_config` owns (mergekit merges every module of a VLM; a recipe merges every
    tensor too, and needs the stack named only to count layers). False if any error is another
    one or no single language stack is found."""
    for e in errors:
        stacks = getattr(e, "stacks", ())
        prefix = language_stack(stacks)
        if not (e.key_path and e.key_path[0] == "models" and prefix):
            return False
        name = e.key_path[1]
        source = st.models[name]
        st.models[name] = {**(source if isinstance(source, dict) else {"path": source}),
                           "layer_prefix": prefix.rstrip(".")}
        st.multi_stack.add(name)
        st.notes.append(f"'{name}' has several layer stacks ("
                        + ", ".join(s.rstrip(".") for s in stacks) + "): `layer_prefix` names "
                        "the language model's; the merge covers every tensor, as mergekit's")
    return True


def _relocate(st: ImportState, e: RecipekitError) -> RecipekitError:
    """A source error located at the model's mention in the mergekit config."""
    if e.key_path and e.key_path[0] in ("models", "adapters") and len(e.key_path) > 1:
        name = e.key_path[1]
        e.location = st.doc.locate(st.where.get(name, ()))
        e.key_path = st.where.get(name)
    return e


def _measure(st: ImportState, slices: list[Slice]) -> None:
    for sl in slices:
        for s in sl.sources:
            n = st.checkpoint(s.model).stack.num_layers
            if s.layers is not None and st.folds.get(s.model, s.model) in st.multi_stack:
                raise st.fail(s.path + ("layer_range",), "cannot convert a layer_range of a "
                              "model with several layer stacks: mergekit slices each module's "
                              "layers, a recipe only the one stack `layer_prefix` names",
                              hint="merge whole models (`models:`)")
            if s.layers is None:
                sl.length = n
            elif s.layers[1] > n:
                raise st.fail(s.path + ("layer_range",), f"layer_range {list(s.layers)} reaches "
                              f"layer {s.layers[1] - 1}, but '{s.model}' has {n} layers")
        if sl.sources[0].layers is None:
            lengths = {st.checkpoint(s.model).stack.num_layers for s in sl.sources}
            if len(lengths) > 1:
                raise st.fail(sl.path, f"the models have different layer counts {sorted(lengths)}")


# --- steps ---------------------------------------------------------------------------------

def _source_model(st: ImportState, s: Source, k: int, sl: Slice, used: set[str]) -> str:
    """The merge input for one source: the model itself, or a `layers` step for its range."""
    n = st.checkpoint(s.model).stack.num_layers
    if s.layers is None or s.layers == (0, n) or sl.length == 0:
        return s.model
    name, i = f"slice{k}_{s.model}", 2
    while name in used:
        name, i = f"slice{k}_{s.model}_{i}", i + 1
    used.add(name)
    a, b = s.layers
    st.steps.append({"name": name, "op": "layers", "from": s.model,
                     "layers": [f"range({a},{b})"]})
    return name


def _merge_slice(st: ImportState, data: dict[str, Any], method: MethodSpec, sl: Slice,
                 models: list[str], name: str) -> tuple[str, bool]:
    """The step for one slice, merging ``models`` (the recipe's inputs for its sources);
    returns (its name, whether it is a plain copy of one model's layers, so that its non-layer
    tensors are that model's)."""
    inputs = list(zip(sl.sources, models, strict=True))
    top = data.get("parameters")
    if top is not None and not isinstance(top, dict):
        raise st.fail(("parameters",), "`parameters` is a mapping")
    levels = [(sl.params, sl.path + ("parameters",)), (top, ("parameters",))]
    known = {p.name for p in method.params}
    for params, path in [*levels, *((s.params, s.path + ("parameters",)) for s in sl.sources)]:
        for key in params or {}:
            if key not in known and not _ignored_by_mergekit(st, method, key, path + (key,)):
                close = difflib.get_close_matches(key, sorted(known), n=1)
                raise st.fail(path + (key,), f"cannot convert parameter `{key}`: method "
                              f"{method.name} has " + (", ".join(sorted(known)) or "none"),
                              hint=f"did you mean '{close[0]}'?" if close else None)
    for s in sl.sources:
        _drop_unread_per_model(st, method, s, is_base=s.model == sl.base)
    model0 = sl.sources[0].model
    shared: dict[str, Any] = {}
    for p in method.params:
        if p.scope == "shared":
            chain = [(lv.get(p.name) if lv else None, path + (p.name,)) for lv, path in levels]
            given, value = translate_param(st, p, chain, sl, model0)
            if given:
                shared[p.name] = value

    def per_input(s: Source, is_base: bool) -> dict[str, Any]:
        out = {}
        for p in method.params:
            if p.scope == "shared" or (is_base and p.scope == "per_non_base"):
                continue
            chain = [((s.params or {}).get(p.name), s.path + ("parameters", p.name))]
            chain += [(lv.get(p.name) if lv else None, path + (p.name,)) for lv, path in levels]
            given, value = translate_param(st, p, chain, sl, s.model)
            if given:
                out[p.name] = value
        return out

    base_at = next((i for i, (s, _) in enumerate(inputs) if s.model == sl.base), None)
    step: dict[str, Any] = {"name": name, "op": "merge", "method": method.name}
    if method.pair or method.base in ("required", "optional"):
        if sl.base is None and method.base == "required":
            raise st.fail(("base_model",) if sl.path == ("models",) else sl.path,
                          f"method {method.name} needs a `base_model`")
        if sl.base is not None and base_at is None:
            raise st.fail(sl.path + ("sources",), f"base model '{sl.base}' is not among the "
                          "slice's sources (mergekit needs it there)")
    if method.name == "passthrough":
        if len(inputs) != 1:
            raise st.fail(sl.path, "passthrough takes exactly one source"
                          + (" (a base_model adds a second)" if sl.base else ""))
        s, model = inputs[0]
        scale = per_input(s, False).get("scale")
        if scale is None or scale == 1:
            return model, True
        step["from"] = [{"model": model, "scale": scale}]
    elif method.pair:
        if len(inputs) != 2:
            raise st.fail(sl.path, f"{method.name} merges exactly two models, the base and one "
                          f"other (got {len(inputs)})")
        other = inputs[1 - base_at]
        step["from"] = [inputs[base_at][1], other[1]]
    else:
        entries = []
        for i, (s, model) in enumerate(inputs):
            if base_at == i and method.base != "ignored":
                step["base"] = model
                continue
            params = per_input(s, False)
            entries.append({"model": model, **params} if params else model)
        step["from"] = entries
    if shared:
        step["parameters"] = shared
    if method.random:
        step["seed"] = 0
    # mergekit computes in `dtype` (inputs cast at load), else in the inputs' promoted dtype
    step["compute_dtype"] = str(data.get("dtype") or "inputs").removeprefix("torch.")
    st.steps.append(step)
    return name, False


def _convert_tokenizer(st: ImportState, data: dict[str, Any], final: str) -> None:
    """`tokenizer_source` / `tokenizer:` become the merge step's `tokenizer:` (steps/vocab.py),
    whose spelling mirrors mergekit's: a source, per-token sources (`model_token` as
    `{model, token | token_id}`, `zero`), `force` and `pad_to_multiple_of`."""
    key = "tokenizer" if data.get("tokenizer") is not None else "tokenizer_source"
    value = data.get(key)
    if value is None:
        return
    if data.get("tokenizer") is not None and data.get("tokenizer_source") is not None:
        raise st.fail(("tokenizer",), "mergekit refuses both `tokenizer_source` and "
                      "`tokenizer`", key=True)
    step = next((s for s in st.steps if s["name"] == final), None)
    if step is None or step["op"] != "merge":
        raise st.fail((key,), f"cannot convert `{key}` of a config that is not one merge of "
                      "`models:` (a slices config combines several steps)", key=True)
    block = value if key == "tokenizer" else {"source": value}
    if not isinstance(block, dict):
        raise st.fail((key,), "`tokenizer` is a mapping (source, tokens, pad_to_multiple_of)")
    source = block.get("source", "union")
    path = (key,) if key == "tokenizer_source" else (key, "source")
    if source not in ("union", "base"):
        source = _model(st, source, path)
    elif source == "base" and "base" not in step and data.get("base_model"):
        source = _model(st, data["base_model"], ("base_model",))  # the tokenizer base
    if source == "base" and "base" in _step_models(step):
        source = step.get("base") or _step_models(step)[0]  # the model the keyword means
    tokens: dict[str, Any] = {}
    for token, cfg in (block.get("tokens") or {}).items():
        tpath = (key, "tokens", token)
        src = (cfg or {}).get("source")
        force = bool((cfg or {}).get("force", False))
        if isinstance(src, dict) and src.get("kind") == "zero":
            out: Any = {"zero": True}
        elif isinstance(src, dict) and src.get("kind") == "model_token":
            out = {"model": _model(st, src.get("model"), tpath + ("source", "model"))}
            out.update({k: src[k] for k in ("token", "token_id") if src.get(k) is not None})
        elif isinstance(src, (str, dict)):
            out = {"model": _model(st, src, tpath + ("source",))}
        else:
            raise st.fail(tpath, "a token needs a `source` (mergekit 0.1.5 fails without one)")
        if force:
            out["force"] = True
        tokens[str(token)] = out
    spec: dict[str, Any] = {"source": source}
    if tokens:
        spec["tokens"] = tokens
    if block.get("pad_to_multiple_of"):
        spec["pad_to_multiple_of"] = block["pad_to_multiple_of"]
    step["tokenizer"] = spec if len(spec) > 1 else source
    if "base" not in step and data.get("base_model"):
        st.notes.append(f"method {step['method']} takes no base: a token some models lack "
                        "takes the mean of the holders' rows, where mergekit takes the "
                        "base_model's row when it holds the token")
    st.notes.append("recipekit appends the union's tokens by model order and id; mergekit's "
                    "order of other models' regular tokens changes from run to run")


def _step_models(step: dict[str, Any]) -> list[str]:
    """The recipe names of a merge step's models: its `from` entries, then its base (the
    order of `steps.merge.check_merge`, whose first model is the tokenizer base without one)."""
    names = [e["model"] if isinstance(e, dict) else e for e in step["from"]]
    return names + ([step["base"]] if step.get("base") else [])


def _ignored_by_mergekit(st: ImportState, method: MethodSpec, key: str, path: KeyPath) -> bool:
    """Whether mergekit 0.1.5 ignores parameter ``key`` of ``method``: mergekit passes a method
    only the parameters its function declares, so `weight` on a method without one (slerp,
    nearswap, model_stock, karcher, sce, passthrough) is never read; the recipe drops it, with
    a note. Oracle: mergekit's merge_methods/*.py signatures, and its own test configs, which
    set `weight` on those methods (tests/tools/test_mergekit_import_suite.py runs them)."""
    if key not in IGNORED_BY_MERGEKIT or any(p.name == key for p in method.params):
        return False
    st.warn(f"{format_key_path(path)} is dropped: mergekit's {method.name} takes no `{key}` "
            "and ignores it")
    return True


def _drop_unread_per_model(st: ImportState, method: MethodSpec, s: Source,
                           is_base: bool) -> None:
    """Note each parameter under a model's `parameters` that mergekit 0.1.5 never reads there:
    it resolves a method-wide parameter (ties' `lambda`, `normalize`, slerp's `t`) from the
    slice's and the top level's `parameters` only, and gives the base model of a method that
    uses one no per-model parameter but its own (`weight` and `density` of the others). The
    recipe drops them as mergekit ignores them, and says so (a value the user set that does
    nothing). Oracle: mergekit's `parameter_resolver.resolve_parameters`; the converted recipe
    of such a config gives mergekit's output (tests/tools/test_mergekit_import.py)."""
    uses_base = is_base and method.base != "ignored"
    for p in method.params:
        if p.name not in (s.params or {}):
            continue
        path = format_key_path(s.path + ("parameters", p.name))
        if p.scope == "shared":
            st.warn(f"{path} is dropped: `{p.name}` is a method-wide parameter of "
                    f"{method.name}, which mergekit reads only from a slice's or the top-level "
                    "`parameters` and ignores under a model")
        elif uses_base and p.scope == "per_non_base":
            st.warn(f"{path} is dropped: mergekit's {method.name} gives the base model no "
                    f"`{p.name}` and ignores it")


def _build_steps(st: ImportState, data: dict[str, Any], method: MethodSpec,
                 slices: list[Slice]) -> str:
    used: set[str] = {*st.models, *st.adapters, *st.folds}
    results, models = [], []
    for k, sl in enumerate(slices):
        name = "merged" if len(slices) == 1 else f"slice{k}"
        used.add(name)
        models = [_source_model(st, s, k, sl, used) for s in sl.sources]
        results.append(_merge_slice(st, data, method, sl, models, name))
    if len(slices) == 1:
        final, copy = results[0]
        if copy:  # a passthrough of a whole model without scale: a copy of its layers
            n = slices[0].length
            st.steps.append({"name": "merged", "op": "layers", "from": final,
                             "layers": [f"range(0,{n})"]})
            final = "merged"
        return final
    stack = [{"from": r, "range": [0, sl.length]}
             for (r, _), sl in zip(results, slices, strict=True) if sl.length > 0]
    first, last = results[0], results[-1]
    same_post = first[0] == last[0] or (first[1] and last[1] and
                                        slices[0].sources[0].model == slices[-1].sources[0].model)
    if same_post:
        st.steps.append({"name": "merged", "op": "layers", "from": first[0], "layers": stack})
        return "merged"
    post_from = _post_merge(st, data, method, slices, models, used) or last[0]
    st.steps.append({"name": "stacked", "op": "layers", "from": first[0], "layers": stack})
    st.steps.append({"name": "stacked_post", "op": "layers", "from": post_from, "layers": stack})
    post = post_names(st, slices[-1].sources[0].model)
    st.steps.append({"name": "merged", "op": "interpolate", "from": ["stacked", "stacked_post"],
                     "alpha": [*({"match": exact(n), "value": 1} for n in post), {"value": 0}]})
    st.notes.append("mergekit takes the embeddings from the first slice and the final norm and "
                    "head from the last: step 'merged' copies them (alpha 0 or 1 is an exact "
                    "copy)")
    return "merged"


def _post_merge(st: ImportState, data: dict[str, Any], method: MethodSpec,
                slices: list[Slice], models: list[str], used: set[str]) -> str | None:
    """The step whose final norm and lm_head mergekit writes, when it is not the last slice's
    own merge (None then). mergekit 0.1.5's `plan_module` merges the tensors after the layers
    over ``zip([weight] * len(slices[0].sources), slices[-1].sources)``: only the first N
    sources of the last slice, N being the first slice's count. ``models``: the last slice's
    inputs. Oracle: mergekit-yaml on such a config (tests/tools/test_mergekit_import.py)."""
    last, n = slices[-1], len(slices[0].sources)
    if len(last.sources) <= n:
        return None
    kept, dropped = last.sources[:n], last.sources[n:]
    if last.base is not None and method.base != "ignored" and \
            any(s.model == last.base for s in dropped):
        raise st.fail(last.path + ("sources",), f"mergekit merges the final norm and lm_head "
                      f"from only the first {n} source(s) of the last slice (as many as the "
                      f"first slice has), which leave out base model '{last.base}': mergekit "
                      "0.1.5 fails on this config (\"Base input is not present in merge "
                      "inputs for lm_head.weight\")",
                      hint=f"list the base model among the first {n} sources of the last slice")
    name = _fresh_name(st, f"slice{len(slices) - 1}_post")
    used.add(name)
    post = Slice(kept, last.base, last.params, last.path, last.length)
    step, _ = _merge_slice(st, data, method, post, models[:n], name)
    names = ", ".join(f"'{s.model}'" for s in kept)
    st.warn(f"mergekit merges the final norm and lm_head from only the first {n} source(s) "
            f"of the last slice ({names}; as many as the first slice has), not from all "
            f"{len(last.sources)}: step '{step}' merges those, as mergekit does")
    return step


# --- output --------------------------------------------------------------------------------

def _recipe(st: ImportState, data: dict[str, Any], method: MethodSpec, final: str,
            config: Path) -> dict[str, Any]:
    output: dict[str, Any] = {"model": final}
    dtype = data.get("out_dtype") or data.get("dtype")
    if dtype:
        output["dtype"] = str(dtype).removeprefix("torch.")
        if data.get("dtype") and data.get("dtype") != data.get("out_dtype") and \
                output["dtype"] not in ("float32", "float64"):
            st.notes.append(f"dtype {data['dtype']}: mergekit casts the inputs to it and "
                            "merges in it; so does `compute_dtype`, and the result, rounded to "
                            f"{output['dtype']}, can differ in the last bit")
    base = st.refs.get(data["base_model"]) if isinstance(data.get("base_model"), str) else None
    if base is not None:
        output["config"] = st.folds.get(base, base)
    else:
        st.notes.append("no base_model: mergekit picks the config/tokenizer donor from an "
                        "unordered set; this recipe takes the first model's")
    template = data.get("chat_template")
    if template is not None:
        output["chat_template"] = template
        st.notes.append(_template_note(template))
    if method.random:
        st.notes.append(f"{method.name} is random: recipekit seeds each tensor from (seed, "
                        "tensor name), so masks differ from mergekit's --random-seed stream")
    if "filter" in st.translated:
        st.notes.append("mergekit filters are substrings of tensor names, recipekit's `match` "
                        "is a glob on the full name: each filter F became `*F*`")
    if "post" in st.translated:
        st.notes.append("mergekit evaluates gradients at t = 0 for the tensors after the layers "
                        "(final norm, lm_head), recipekit at t = 1: explicit rules give them "
                        "the gradient's first value")
    if "one_layer" in st.translated:
        st.notes.append("mergekit evaluates gradients at t = 1 in a one-layer slice, recipekit "
                        "at t = 0: explicit rules give that layer the gradient's last value")
    return {"recipekit": 1, "name": config.stem,
            "description": f"converted from the mergekit config {config.name} "
                           f"(merge_method: {method.name})",
            "models": st.models, **({"adapters": st.adapters} if st.adapters else {}),
            "steps": st.steps, "output": output}


def _template_note(template: str) -> str:
    """What `output.chat_template` does differently from mergekit's `chat_template`."""
    if template == AUTO:
        return ("chat_template auto: a tie between templates goes to the model listed first "
                "(mergekit's to the first of an unordered set)")
    if is_literal(template):
        return "chat_template: the Jinja text is written as chat_template.jinja, as mergekit does"
    return (f"chat_template {template}: recipekit's own built-in, written from the format's "
            "published convention; mergekit's alpaca, exaone and llama3 files render extra "
            "whitespace, chatml and mistral render the same")


class _Dumper(yaml.SafeDumper):
    """Block style, flow lists of scalars, no anchors/aliases (a recipe is read by people)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(isinstance(e, (int, float, str)) for e in data) or all(
        isinstance(e, dict) and len(e) <= 2 and all(isinstance(v, (int, float, str))
                                                     for v in e.values()) for e in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow and len(
        data) <= 8 and all(not isinstance(e, dict) for e in data))


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    """Multi-line text (a literal chat template) as a `|` block, as people write it; PyYAML
    falls back to a quoted style where a block cannot hold the text exactly."""
    return dumper.represent_scalar("tag:yaml.org,2002:str", data,
                                   style="|" if "\n" in data else None)


_Dumper.add_representer(list, _represent_list)
_Dumper.add_representer(str, _represent_str)


def _render(st: ImportState, recipe: dict[str, Any], config: Path,
            head: list[str] | None = None) -> str:
    head = head or [
        f"# Converted by `recipekit import-mergekit {config.name}`: each output slice is a",
        "# step (t of gradients runs per slice, as in mergekit), each layer_range a `layers`",
        "# step. What was translated:"]
    head += [f"#  - {n}" for n in st.notes] or ["#  - nothing needed translating beyond syntax"]
    body = yaml.dump(recipe, Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                     width=100, allow_unicode=True)
    return "\n".join(head) + "\n" + body


def _validate(recipe: dict[str, Any], file: Path, st: ImportState) -> None:
    """recipekit's own checks on the result (schema, names, method contracts, shapes).

    A problem of the converted recipe is reported in the mergekit config the user wrote, with
    the recipe's key path: the recipe is not written, so its own lines cannot be shown (they
    once named the output file, or ``<stem>.yaml`` in the working directory, without a line).

    Raises:
        ConversionError: the converted recipe's problems, located at the config's top.
        RecipekitError: models that cannot be read (located in their own files).
    """
    try:
        r = recipe_from_data(recipe, file)
        compile_plan(r, with_side_files(r, st.checkpoints))  # a moe step's tokenizer
    except RecipekitError as e:
        errors = e.errors if isinstance(e, RecipeErrors) else [e]
        if not any(_in_file(err, file) for err in errors):
            raise
        raise ConversionError([st.doc.error((), "the recipe converted from this config does "
                                            f"not validate: {_bare(err)}", hint=_fix(err))
                               if _in_file(err, file) else err for err in errors]) from None


def _fix(err: RecipekitError) -> str:
    rules = " rule" in err.message or " rule" in (err.hint or "")
    return "nothing was written; fix the config" + (
        " (a rule's `match:` is mergekit's `filter:`, a default rule an entry without "
        "`filter:`)" if rules else "")


def _in_file(err: RecipekitError, file: Path) -> bool:
    loc = err.location
    return (loc.file if loc is not None else err.file) == str(file)


def _bare(err: RecipekitError) -> str:
    """An error's key path, message and hint without its location (a file not written)."""
    text = err.message + (f"; {err.hint}" if err.hint else "")
    return f"{format_key_path(err.key_path)}: {text}" if err.key_path else text

