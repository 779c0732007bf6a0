"""The output never overlaps an input: refused before anything is created or deleted.

Why: a run deletes (``--force``) and writes inside its output directory. If that directory is an
input's directory, lies inside one or contains one, the run would destroy what it reads, so the
refusal does not depend on ``--force``. Inputs are every model and adapter directory (a hub
model's whole repo cache folder, whose ``blobs/`` its snapshot links into), every side file a
step reads (coalesce scheme files, X-LoRA scalings logs) and the output's chat template file,
plus the recipe itself, all compared after resolving symlinks and then by (device, inode),
which a bind mount of an input under another path cannot hide. `recipekit lock` checks its
lock's path against the same list (`overlapping_input`).

An output URL (``s3://bucket/prefix``) is compared with the URL inputs instead, by protocol
(``s3a`` is ``s3``), bucket and key segments (`recipekit.io.urls.url_relation`); a local input
cannot be under a URL, and the local path a URL output's recipe keeps (``out/<stem>``, unused)
is not compared at all.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from recipekit.errors import OutputPathError, display_path
from recipekit.inputs.side_files import OUTPUT_KEY, side_path
from recipekit.io.urls import local_path_text, url_relation
from recipekit.recipe import Recipe

#: The files an X-LoRA scalings log may be read from, beside the path the recipe gives.
_LOG_SUFFIXES = ("", ".npy", "-mapping.json")


def _real(p: Path) -> Path:
    """``p`` with every symlink resolved (as far as it exists); a loop is left as written."""
    try:
        return p.resolve()
    except (OSError, RuntimeError):  # a symlink loop
        return Path(p).absolute()


def _side_files(spec: Any, base: Path) -> Iterator[Path]:
    """The files a step's parameters name: ``{file: ...}`` schemes and ``gating.log``."""
    if isinstance(spec, Mapping):
        for key, value in spec.items():
            if key == "file" and isinstance(value, str):
                yield base / local_path_text(value)
            elif key == "log" and isinstance(value, str):
                yield from (base / (local_path_text(value) + s) for s in _LOG_SUFFIXES)
            else:
                yield from _side_files(value, base)
    elif isinstance(spec, list):
        for item in spec:
            yield from _side_files(item, base)


def _log_parts(meta: Any, base: Path) -> Iterator[Path]:
    """The arrays a scalings-log mapping named (recorded by the gating step's metadata)."""
    if isinstance(meta, Mapping):
        if isinstance(meta.get("log"), str) and isinstance(meta.get("files"), Mapping):
            folder = (base / meta["log"]).parent
            yield from (folder / str(name) for name in meta["files"])
        for value in meta.values():
            yield from _log_parts(value, base)


def input_paths(recipe: Recipe, sources: Mapping[str, Any],
                operators: Mapping[str, Any] = ()) -> list[tuple[str, Path]]:
    """(what, path) for everything a run of ``recipe`` reads, symlinks resolved."""
    from recipekit.inputs.models import model_root

    out = [(f"the recipe {display_path(recipe.file)}", _real(recipe.file))]
    for key, refs in (("models", recipe.models), ("adapters", recipe.adapters)):
        for name in refs:
            source = sources.get(name)
            if source is not None and getattr(source, "path", None) is not None:
                out.append((f"input `{key}.{name}` ({display_path(source.path)})",
                            model_root(source.path)))
    base = recipe.file.resolve().parent
    for step in recipe.steps.values():
        for p in _side_files(step.spec, base):
            out.append((f"the file {display_path(p)} that step '{step.name}' reads", _real(p)))
    for name, meta in dict(operators).items():
        for p in _log_parts(meta, base):
            out.append((f"the file {display_path(p)} that step '{name}' reads", _real(p)))
    template = getattr(getattr(recipe, "output", None), "chat_template", None)
    written = template.get(OUTPUT_KEY[1]) if isinstance(template, Mapping) else None
    if isinstance(written, str):
        p = side_path(recipe, written)  # where `inputs.side_files` reads it
        out.append((f"the chat template file {display_path(p)} that `output` names", _real(p)))
    return out


def _relation(out: Path, inp: Path) -> str | None:
    if out == inp:
        return "is"
    if inp in out.parents:
        return "lies inside"
    if out in inp.parents:
        return "contains"
    return _same_files(out, inp)


def _identity(p: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(p)
    except OSError:  # not there (yet), or not ours to look at: the path check stands
        return None
    return st.st_dev, st.st_ino


def _same_files(out: Path, inp: Path) -> str | None:
    """The relation by what the file system says, not by spelling: a bind mount (or a
    case-insensitive file system) shows the same directory under another path, which
    `resolve` cannot see through. Each path and its existing ancestors are compared by
    (device, inode)."""
    own_out, own_in = _identity(out), _identity(inp)
    if own_out is not None and own_out == own_in:
        return "is"
    if own_in is not None and own_in in {_identity(a) for a in out.parents}:
        return "lies inside"
    if own_out is not None and own_out in {_identity(a) for a in inp.parents}:
        return "contains"
    return None


def overlapping_input(path: Path, inputs: list[tuple[str, Path]]) -> tuple[str, str] | None:
    """(relation, what) of the first input that ``path`` is, lies inside or contains, symlinks
    resolved; None when it is apart from all of them."""
    real = _real(path)
    for what, inp in inputs:
        relation = _relation(real, inp)
        if relation is not None:
            return relation, what
    return None


def check_output_apart(output: Path, inputs: list[tuple[str, Path]]) -> None:
    """Refuse an output path that is, lies inside or contains any input.

    Raises:
        OutputPathError: naming the input (exit code 2, with or without ``--force``); an
            output path that is a symlink loop.
    """
    try:
        output.resolve(strict=False)
    except (OSError, RuntimeError):  # Python 3.11 raises RuntimeError for a loop
        raise OutputPathError(f"output path {display_path(output)} is a symlink loop",
                              hint="remove the link or choose another output path") from None
    found = overlapping_input(output, inputs)
    if found is not None:
        relation, what = found
        raise OutputPathError(
            f"output path {display_path(output)} {relation} {what}",
            hint="choose an output path that neither is, lies inside nor contains an input: "
            "a run deletes and writes there, and inputs are never touched")


def check_url_apart(url: str, recipe: Recipe) -> None:
    """Refuse an output URL that is, lies inside or contains a URL input of ``recipe``.

    Why here and not when the output is opened: this runs where the local check runs (plan
    compile), so `validate`, `plan` and `run` all exit 2 before anything is listed, created or
    deleted. URLs are compared by what they name, not as written: ``s3a://b/models/a/sub`` lies
    inside the input ``s3://b/models/a/`` (`url_relation`).

    Raises:
        OutputPathError: naming the input (exit code 2, with or without ``--force``).
    """
    for key, refs in (("models", recipe.models), ("adapters", recipe.adapters)):
        for name, ref in refs.items():
            inp = getattr(ref, "url", None)
            relation = url_relation(url, inp) if inp is not None else None
            if relation is not None:
                raise OutputPathError(
                    f"output {url} {relation} input `{key}.{name}` ({inp})",
                    hint="write the output under its own prefix: a run deletes and writes "
                    "there, and inputs are never touched")


def check_plan_output(plan: Any) -> None:
    """`check_output_apart` for a compiled plan (its recipe, sources and step metadata), or
    `check_url_apart` for an output URL.

    Why no path check for a URL output: its recipe's ``output.path`` is a placeholder
    (``out/<stem>`` beside the recipe) that nothing writes, so an input there (``./out/rr``,
    or ``.`` for a recipe kept inside its model's folder) is no overlap.
    """
    url = plan.recipe.output.url
    if url is not None:
        check_url_apart(url, plan.recipe)
        return
    check_output_apart(plan.recipe.output.path,
                       input_paths(plan.recipe, plan.sources, plan.operators))
