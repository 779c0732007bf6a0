"""Where a side command writes its one output file (`import-mergekit -o RECIPE`).

Why its own module: unlike `run`, such a command replaces one user-named file, so it must never
be the command's own input (by any name, link or hard link), must not replace an existing file
without `--force`, and writes like every file recipekit writes: a temp name created without
following links, fsync, rename (`recipekit.io.writer`). Oracle: tests/io/test_hostile.py.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from recipekit.errors import OutputError, OutputPathError, display_path
from recipekit.inputs.files import not_regular
from recipekit.io.writer import write_file_atomic


def check_recipe_target(config: Path, output: Path, *, force: bool) -> None:
    """Refuse to write the imported recipe over its own config (even with ``force``: the
    same file by any name, link or hard link), or over any existing path without ``force``.

    Raises:
        OutputPathError: exit code 2.
    """
    same = output.resolve() == config.resolve()
    with contextlib.suppress(OSError):
        same = same or os.path.samefile(output, config)
    if same:
        raise OutputPathError("is the mergekit config being imported", file=display_path(output),
                              hint="write the recipe to another file (-o); the input is never "
                              "overwritten, even with --force")
    if not os.path.lexists(output):
        return
    if output.is_dir() and not output.is_symlink():
        raise OutputPathError("is a directory", file=display_path(output),
                              hint="name the recipe file to write (-o FILE)")
    mode = os.lstat(output).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):  # --force renamed over /dev/full
        raise OutputPathError(f"{not_regular(mode)} and is not replaced, even with --force",
                              file=display_path(output),
                              hint="write the recipe to a file path (-o FILE)")
    if not force:
        raise OutputPathError("exists", file=display_path(output),
                              hint="rerun with --force to replace it (a symlink is replaced, "
                              "not written through), or choose another -o path")


def write_recipe_file(output: Path, text: str) -> None:
    """Write the imported recipe like every file recipekit writes (io/writer.py)."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the folder: {e.strerror or e}",
                          file=display_path(output.parent)) from e
    write_file_atomic(output, text.encode(), resumable=False)
