"""Sweeps: run one recipe for every combination of variable values, one output each.

Why: an alpha grid or a method comparison is N whole runs of one recipe; the user wants them
named by their values, resumable as a batch, and one failure not to cost the others. Each
combination is an ordinary run (`recipekit.api.run`) into ``<root>/<name>`` with its own state
file and manifest, so resuming, "already complete" and ``--force`` work per combination exactly
as for a single run, and a combination's bytes equal those of ``recipekit run --set ...``.

Layout (README, "Variables and sweeps")::

    <root>/                      # --output, else the recipe's output.path
      sweep.json                 # the index: every combination, its output and status
      alpha=0.1,method=ties/     # one output per combination, named by the values set
      alpha=0.3,method=ties/

A name lists the variables given on the command line, in the recipe's declaration order, as
``name=value`` joined by ``,``; each value is written as text substitution writes it
(`format_value`) and every byte outside ``[A-Za-z0-9._+-]`` is %-escaped, so a name is one
portable path component, and names sort by the first variable's value first. Oracle:
tests/run/test_sweep.py compares each combination's shards (sha256) with a separate run.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recipekit.errors import RecipeErrors, RecipekitError, UsageError, display_path
from recipekit.io.urls import redact
from recipekit.recipe.document import show
from recipekit.recipe.variables import Settings, format_value, parse_value, split_setting

#: The index a sweep writes at its root (rewritten after every combination).
INDEX_NAME = "sweep.json"
SWEEP_VERSION = 1
#: Bytes of a directory name beyond which its tail becomes a hash (file systems allow 255).
_MAX_NAME = 200
_UNSAFE = re.compile(rb"[^A-Za-z0-9._+-]")


@dataclass(frozen=True)
class Combination:
    """One point of the grid: the values set (declaration order) and its directory name."""

    values: Mapping[str, Any]
    name: str


@dataclass(frozen=True)
class CombinationResult:
    """What happened to one combination: ``written`` (this call wrote it), ``resumed`` (it
    finished an interrupted run), ``complete`` (already complete), ``failed`` or ``pending``
    (not run: an earlier interruption). ``error``/``exit_code`` say why one failed."""

    name: str
    values: Mapping[str, Any]
    output: Path
    status: str
    plan_hash: str | None = None
    shards: Mapping[str, str] = field(default_factory=dict)  # file name -> sha256
    seconds: float = 0.0
    error: str | None = None
    exit_code: int | None = None


@dataclass(frozen=True)
class SweepResult:
    """A finished sweep: its root, its index and each combination's result, in grid order."""

    root: Path
    index: Path
    combinations: tuple[CombinationResult, ...]
    recipe_file: Path | None = None

    def to_json(self) -> dict[str, Any]:
        """The index document, as `sweep.json` holds it."""
        return index_document(self.root, self.recipe_file, self.combinations)

    @property
    def failed(self) -> tuple[CombinationResult, ...]:
        return tuple(c for c in self.combinations if c.status == "failed")

    def summary(self) -> str:
        """The line `recipekit sweep` prints last."""
        counts: dict[str, int] = {}
        for c in self.combinations:
            counts[c.status] = counts.get(c.status, 0) + 1
        parts = ", ".join(f"{n} {s}" for s, n in counts.items())
        index = "" if set(counts) <= {"planned", "failed"} and "planned" in counts else (
            f"; index {display_path(self.index)}")  # a dry run writes none
        return (f"sweep {display_path(self.root)}: {len(self.combinations)} combination(s): "
                f"{parts}{index}")


def sweep_values(text: str, name: str) -> list[Any]:
    """The values one ``--set`` of a sweep gives: ``0.1,0.3`` (split at every comma, each
    piece read as YAML) or ``[0.1, 0.3]`` (a YAML flow list: the way to give values that hold
    commas, ``["a,b", c]``, or lists, ``[[0, 1], [1, 0]]``). A repeated value is an error.

    Raises:
        UsageError: an empty or unreadable value, or a repeated one.
    """
    where = f"--set {name}"
    if text.lstrip().startswith("["):
        values = parse_value(text, where)
        if not values:
            raise UsageError(f"{where}: the list of values is empty", hint="give one or more")
    else:
        pieces = text.split(",")
        if len(pieces) > 1 and not all(p.strip() for p in pieces):
            raise UsageError(f"{where}: an empty value in {show(text)}",
                             hint="remove the extra comma, or write '' for an empty string")
        values = [parse_value(piece, where) for piece in pieces]
    seen: list[str] = []
    for v in values:
        key = json.dumps(v, sort_keys=True)
        if key in seen:
            raise UsageError(f"{where}: {show(v)} is given twice", hint="give each value once")
        seen.append(key)
    return values


def parse_sweep_settings(texts: Iterable[str]) -> Settings:
    """``--set NAME=V1,V2`` options as values (a list) by name, in the order given; messages
    about them name ``--set``.

    Raises:
        UsageError: a malformed option, an unreadable value, a name given twice, no option.
    """
    out = Settings(origin="--set")
    for text in texts:
        name, value = split_setting(text)
        if name in out:
            raise UsageError(f"--set {name} is given twice",
                             hint=f"list every value in one option: --set {name}=V1,V2")
        out[name] = sweep_values(value, name)
    if not out:
        raise UsageError("a sweep needs at least one --set NAME=V1,V2,...",
                         hint="for one run, use `recipekit run`")
    return out


def combination_name(values: Mapping[str, Any]) -> str:
    """``{"alpha": 0.1, "method": "ties"}`` → ``alpha=0.1,method=ties``: one portable path
    component (bytes outside ``[A-Za-z0-9._+-]`` %-escaped; a name over 200 bytes keeps its
    start and ends in a hash of the whole). A URL value's credentials are written ``***``: the
    name is shown in messages (such a URL is refused, naming its combination) and is a
    folder's name."""
    parts = []
    for name, value in values.items():
        text = _UNSAFE.sub(lambda m: b"%%%02X" % m.group(0)[0],
                           redact(format_value(value)).encode()).decode()
        parts.append(f"{name}={text}")
    out = ",".join(parts)
    if len(out) > _MAX_NAME:
        import hashlib

        out = out[:_MAX_NAME - 17] + "~" + hashlib.sha256(out.encode()).hexdigest()[:16]
    return out


def iter_combinations(axes: Mapping[str, Sequence[Any]], order: Sequence[str]
                      ) -> list[Combination]:
    """Every combination of ``axes``, the first variable of ``order`` varying slowest."""
    names = [n for n in order if n in axes] + [n for n in axes if n not in order]
    out = []
    for point in itertools.product(*(axes[n] for n in names)):
        values = dict(zip(names, point, strict=True))
        out.append(Combination(values, combination_name(values)))
    return out


@dataclass(frozen=True)
class SweepPlan:
    """A sweep checked before anything runs: its root and every combination, each of whose
    documents validated with its values (inputs are checked when each one runs)."""

    recipe: Any  # as given to the API: a path, text or data
    base_dir: str | None
    root: Path
    recipe_file: Path | None
    combinations: tuple[Combination, ...]
    origin: str = "--set"  # who gave the values, for messages

    def output(self, c: Combination) -> Path:
        return self.root / c.name

    def settings(self, c: Combination) -> Settings:
        return Settings(c.values, origin=self.origin)


def plan_sweep(recipe: Any, axes: Mapping[str, Sequence[Any]], *,
               output: str | os.PathLike | None = None,
               base_dir: str | os.PathLike | None = None) -> SweepPlan:
    """Validate the recipe with every combination of ``axes`` (documents only) and fix the
    sweep's root: ``output``, else the recipe's ``output.path`` — which then must not depend on
    a swept variable (each combination would name another root).

    Raises:
        RecipeErrors: every problem of every combination (each error says which variable
            and value it came from).
        UsageError: no values, or an ``output.path`` that varies across the grid.
    """
    from recipekit.recipe import load_recipe
    from recipekit.recipe.load import is_recipe_text

    if not axes:
        raise UsageError("a sweep needs at least one variable with values",
                         hint="for one run, use `recipekit run`")
    is_file = isinstance(recipe, os.PathLike) or (
        isinstance(recipe, str) and not is_recipe_text(recipe))
    if is_file:
        recipe = Path(recipe)  # as given, so messages name it as the user did
    base = str(Path(base_dir).resolve()) if base_dir is not None else (
        None if is_file else str(Path.cwd()))
    combos = iter_combinations(axes, _declared_order(recipe))
    origin = getattr(axes, "origin", "values=")
    errors: dict[str, tuple[RecipekitError, list[str]]] = {}  # by message: the combinations
    roots: dict[Path, Combination] = {}
    loaded = []
    for c in combos:
        try:
            r = load_recipe(recipe, base_dir=base, variables=Settings(c.values, origin=origin))
        except RecipeErrors as e:
            for x in e.errors:
                errors.setdefault(x.render(), (x, []))[1].append(c.name)
            continue
        roots.setdefault(r.output.path, c)
        loaded.append(r)
    if errors:
        raise RecipeErrors([_in_combinations(x, names, len(combos))
                            for x, names in errors.values()])
    if output is not None:
        root = Path(_local_root(os.fspath(output))).resolve()
    elif any(r.output.url is not None for r in loaded):
        raise UsageError("a sweep's root is a local directory, and the recipe's output.path is "
                         "a URL", hint="pass --output DIR (each combination then writes "
                         "DIR/<name=value,...>)")
    elif len(roots) > 1:
        (a, ca), (b, cb) = list(roots.items())[:2]
        raise UsageError(f"output.path depends on a swept variable: {ca.name} writes to "
                         f"{display_path(a)}, {cb.name} to {display_path(b)}",
                         hint="a sweep writes each combination under one root, named by its "
                         "values; pass --output DIR or keep ${...} of swept variables out of "
                         "output.path")
    else:
        root = next(iter(roots))
    for r in loaded:
        check_root_apart(root, r)
    return SweepPlan(recipe, base, root, recipe if is_file else None, tuple(combos), origin)


def _local_root(text: str) -> str:
    """The sweep root ``text`` names: a ``file://`` URL's path; any other URL is refused
    (shown without a secret it holds). Why: the index and each combination's folder are
    written with local file calls, so ``s3://b/x`` would become a folder ``s3:`` here.

    Raises:
        UsageError: ``text`` is a URL other than ``file://`` (exit 2).
    """
    from recipekit.io.urls import is_url, local_path_text, redact

    if is_url(text):
        raise UsageError(f"the sweep root {redact(text)} is a URL; a sweep's root is a local "
                         "directory", hint="pass --output DIR")
    return local_path_text(text)


def check_root_apart(root: Path, recipe: Any) -> None:
    """Refuse a sweep root that is, or lies inside, one of the recipe's inputs (the recipe
    file, a local model or adapter directory, a side file), whose index would be an input, or
    that exists and is not a directory.

    Why: the sweep creates its root and writes `sweep.json` there before any combination runs;
    each combination's own run refuses its output inside an input, but the index was already
    written into the input by then. A root that contains an input is fine: the sweep writes
    only its index and the combinations' directories there, and each run checks its own.

    Raises:
        OutputPathError: naming the input (exit code 2), before anything is created.
    """
    from recipekit.errors import OutputPathError
    from recipekit.plan.overlap import input_paths, overlapping_input

    refs = {**recipe.models, **recipe.adapters}  # local refs carry the path a run reads
    inputs = input_paths(recipe, refs)
    for path, what in ((root, "sweep root"), (root / INDEX_NAME, "sweep index")):
        found = overlapping_input(path, inputs)
        if found is not None and found[0] != "contains":
            raise OutputPathError(
                f"{what} {display_path(path)} {found[0]} {found[1]}",
                hint="pass --output a directory apart from the recipe's inputs: a sweep "
                "writes there, and inputs are never touched")
    if os.path.lexists(root) and not os.path.isdir(root):
        raise OutputPathError(f"sweep root {display_path(root)} exists and is not a directory",
                              hint="pass --output a directory, or a path that does not exist")


def _in_combinations(e: RecipekitError, names: list[str], total: int) -> RecipekitError:
    """A combination's error, saying which combinations it is in unless it is in all."""
    if len(names) < total:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        e.message = f"{e.message} [in {shown}]"
    return e


def _declared_order(recipe: Any) -> list[str]:
    """The names the recipe's ``variables:`` block declares, in its order (a name it does not
    declare is reported by the validation that follows)."""
    from recipekit.recipe.document import load_document, parse_document

    if isinstance(recipe, Mapping):
        data: Any = recipe
    elif isinstance(recipe, Path):
        data = load_document(recipe).data
    else:
        data = parse_document(recipe, "<string>", is_json=recipe.lstrip().startswith("{")).data
    block = data.get("variables") if isinstance(data, dict) else None
    return list(block) if isinstance(block, dict) else []


def run_sweep(sp: SweepPlan, run_one: Callable[[SweepPlan, Combination], CombinationResult],
              *, on_result: Callable[[CombinationResult], None] | None = None) -> SweepResult:
    """Run every combination one after another with ``run_one`` (a failure is recorded and the
    next one runs), rewriting the index after each. An interruption (Ctrl-C) leaves the index
    with the rest ``pending``, and a rerun resumes: finished combinations report ``complete``.
    """
    results = {c.name: _pending(sp, c) for c in sp.combinations}
    write_index(sp, results.values())
    try:
        for c in sp.combinations:
            results[c.name] = run_one(sp, c)
            write_index(sp, results.values())
            if on_result is not None:
                on_result(results[c.name])
    finally:
        write_index(sp, results.values())
    return SweepResult(sp.root, sp.root / INDEX_NAME, tuple(results.values()), sp.recipe_file)


def run_combination(sp: SweepPlan, c: Combination, **options: Any) -> CombinationResult:
    """One combination as an ordinary run into ``<root>/<name>``; a `RecipekitError` (a bad
    input, an output holding another plan, a full disk) becomes a ``failed`` result.
    ``options`` go to `recipekit.api.run` (device, force, fsync, workers, progress)."""
    from recipekit import api

    try:
        r = api.run(sp.recipe, output=sp.output(c), base_dir=sp.base_dir,
                    variables=sp.settings(c), **options)
    except RecipekitError as e:
        return CombinationResult(c.name, c.values, sp.output(c), "failed", error=e.render(),
                                 exit_code=e.exit_code)
    status = ("complete" if r.already_complete else "resumed" if r.shards_resumed
              else "written")
    return CombinationResult(c.name, c.values, r.output, status, _plan_hash(r.output),
                             {s.name: s.sha256 for s in r.shards}, r.seconds)


def _plan_hash(output: Path) -> str | None:
    """The plan hash the finished output's manifest records."""
    from recipekit.inputs.files import read_bounded
    from recipekit.io.names import MANIFEST

    try:
        data, _ = read_bounded(output / MANIFEST, 1 << 28)
        return json.loads(data).get("plan_hash") if data is not None else None
    except (OSError, ValueError, AttributeError, TypeError):
        return None


def _pending(sp: SweepPlan, c: Combination) -> CombinationResult:
    return CombinationResult(c.name, c.values, sp.output(c), "pending")


def index_document(root: Path, recipe_file: Path | None,
                   results: Iterable[CombinationResult]) -> dict[str, Any]:
    """`sweep.json`: the recipe (relative to the root), the variables swept and, per
    combination, its values, output directory (relative to the root), status, plan hash,
    shard hashes and error."""
    from recipekit.run.manifest import relative_path

    rows = []
    for r in results:
        row: dict[str, Any] = {"name": r.name, "values": dict(r.values),
                               "output": relative_path(r.output, root), "status": r.status}
        if r.plan_hash is not None:
            row["plan_hash"] = r.plan_hash
        if r.shards:
            row["shards"] = dict(r.shards)
        if r.error is not None:
            row["error"], row["exit_code"] = r.error, r.exit_code
        rows.append(row)
    return {"recipekit_sweep": SWEEP_VERSION,
            "recipe": relative_path(recipe_file, root) if recipe_file else None,
            "variables": list(rows[0]["values"]) if rows else [], "combinations": rows}


def write_index(sp: SweepPlan, results: Iterable[CombinationResult]) -> None:
    """Write `sweep.json` through the project's safe writer (temp name, no link followed)."""
    from recipekit.io.writer import write_file_atomic

    sp.root.mkdir(parents=True, exist_ok=True)
    doc = index_document(sp.root, sp.recipe_file, results)
    text = json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    write_file_atomic(sp.root / INDEX_NAME, text.encode(), resumable=False)
