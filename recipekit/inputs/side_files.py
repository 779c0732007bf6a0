"""Side files a recipe names: coalescing scheme files, X-LoRA scalings logs (steps) and the
output's chat template file (`output.chat_template.file`).

They are inputs like models and adapters: `resolve_side_files` reads each one while the sources
are resolved (relative to the recipe file, bounded and refusing special files like every other
read of the inputs layer), so that `recipekit lock` pins their bytes and `run --frozen` refuses
when one changed. `compile_plan` hands each step its own (`Step.files`, by key path within the
step), and the step takes the parsed content with `SideFile.value()` without opening a file.
A file that cannot be used is not an error here: its problem is kept and raised by `value()`,
where the step locates it in the recipe exactly as when the step read the file itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recipekit.errors import KeyPath, UnlocatedError
from recipekit.inputs.chat_template import read_template_file
from recipekit.inputs.scalings import read_scalings_log
from recipekit.inputs.schemes import FILE_KEYS, read_scheme_file
from recipekit.io.urls import local_path_text
from recipekit.recipe import Recipe, Step


@dataclass(frozen=True)
class SideFile:
    """One side file as a step names it, read: its content or why it cannot be used.

    ``files`` are every file read for it (a scalings log may be a mapping and several arrays);
    ``hub`` is always None (side files are local), so locks treat it like a local input.
    ``step`` is ``""`` for a file the output section names (no step has that name).
    """

    step: str
    key: KeyPath  # within the step: ("width", "file"), ("gating", "log")
    written: str
    path: Path
    files: tuple[Path, ...]
    content: Any = None
    problem: UnlocatedError | None = None
    hub: None = None

    @property
    def lock_key(self) -> str:
        """How `recipekit lock` names it: ``steps.<step>.<key>``, or ``output.<key>``."""
        head = ("steps", self.step) if self.step else ("output",)
        return ".".join((*head, *map(str, self.key)))

    def value(self) -> Any:
        """The parsed content (a scheme's groups, a `ScalingsLog`).

        Raises:
            SchemeError, ScalingsLogError: the problem found while reading it.
        """
        if self.problem is not None:
            raise self.problem
        return self.content


def side_path(recipe: Recipe, written: str) -> Path:
    """Where a side file lives: relative to the recipe file (a ``file://`` URL names its path,
    as for models: `recipekit.io.urls.local_path_text`)."""
    return recipe.file.resolve().parent / local_path_text(written)


def _read_scheme(key: str) -> Callable[[Path], tuple[Any, tuple[Path, ...]]]:
    def read(path: Path) -> tuple[Any, tuple[Path, ...]]:
        return read_scheme_file(path, FILE_KEYS[key]), (path,)
    return read


def _read_log(path: Path) -> tuple[Any, tuple[Path, ...]]:
    log = read_scalings_log(path)
    return log, tuple(log.directory / name for name in log.sha256)


#: (ops, key within the step, reader): where recipe steps name side files. A reader returns the
#: parsed content and every file it read.
KINDS: tuple[tuple[tuple[str, ...], KeyPath, Callable[[Path], tuple[Any, tuple[Path, ...]]]],
             ...] = (
    (("coalesce", "decoalesce"), ("width", "file"), _read_scheme("width")),
    (("coalesce", "decoalesce"), ("depth", "file"), _read_scheme("depth")),
    (("adapters",), ("gating", "log"), _read_log),
)


def _written(step: Step, key: KeyPath) -> str | None:
    value: Any = step.spec
    for part in key:
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value if isinstance(value, str) else None


def resolve_side_file(recipe: Recipe, step: Step, key: KeyPath) -> SideFile | None:
    """Read the side file ``step`` names under ``key`` (None when it names none there)."""
    for ops, where, read in KINDS:
        if where != key or step.op not in ops:
            continue
        written = _written(step, key)
        if written is None:
            return None
        path = side_path(recipe, written)
        try:
            content, files = read(path)
        except UnlocatedError as e:
            existing = (path,) if path.is_file() else ()
            return SideFile(step.name, key, written, path, existing, problem=e)
        return SideFile(step.name, key, written, path, files, content)
    return None


#: Where the output section names a side file (key within `output`), read as `SideFile`s of
#: step ``""``.
OUTPUT_KEY: KeyPath = ("chat_template", "file")


def resolve_output_file(recipe: Recipe) -> SideFile | None:
    """The chat template file `output.chat_template` names (None when it names none)."""
    setting = recipe.output.chat_template
    written = setting.get("file") if isinstance(setting, dict) else None
    if not isinstance(written, str):
        return None
    path = side_path(recipe, written)
    try:
        text = read_template_file(path)
    except UnlocatedError as e:
        return SideFile("", OUTPUT_KEY, written, path, (path,) if path.is_file() else (),
                        problem=e)
    return SideFile("", OUTPUT_KEY, written, path, (path,), text)


def resolve_side_files(recipe: Recipe) -> dict[tuple[str, KeyPath], SideFile]:
    """Every side file the recipe names, by (step name, key within the step); the output's
    under step name ``""``."""
    out: dict[tuple[str, KeyPath], SideFile] = {}
    for step in recipe.steps.values():
        for _, key, _ in KINDS:
            found = resolve_side_file(recipe, step, key)
            if found is not None:
                out[(step.name, key)] = found
    found = resolve_output_file(recipe)
    if found is not None:
        out[("", OUTPUT_KEY)] = found
    return out
