"""The pre-commit hook: ``python -m recipekit.hook RECIPE...`` checks recipe documents exactly as
``recipekit validate --no-inputs RECIPE...`` does, with nothing but PyYAML and jsonschema.

Why a second entry point: pre-commit installs a hook's repository with ``pip install .``, which
would bring torch (gigabytes) and the CLI's framework into the hook's environment to check a
few YAML files. `.pre-commit-hooks.yaml` therefore installs recipekit with ``--no-deps`` plus
PyYAML, jsonschema and jsonschema's own dependencies, and this module imports nothing else: the
recipe loader, the schema and the ops' document checks (`recipekit.steps.check_steps`), none of
which imports torch, numpy, safetensors or huggingface_hub. It is, with `cli.py`, the only code
that prints. Oracle: tests/test_hook.py runs it where no other package can be imported.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

USAGE = """usage: python -m recipekit.hook RECIPE...

Check recipe documents (schema, names, cycles, layer-range grammar, each op's and merge
method's own rules) without opening the models they name: `recipekit validate --no-inputs`
for pre-commit. Exit status: 0 when every file is a valid recipe, 2 otherwise."""


def check_document(path: Path) -> str:
    """Load and check one recipe document; return the line `validate --no-inputs` prints.

    Raises:
        RecipekitError: every problem the document shows, located (exit code 2), or the file
            cannot be read.
    """
    from recipekit.errors import echo_text
    from recipekit.recipe import load_recipe

    recipe = load_recipe(path)
    return f"{echo_text(path)}: ok ({len(recipe.steps)} step(s); inputs not checked)"


def main(argv: Sequence[str] | None = None) -> int:
    """Check every file named in ``argv``; return the worst exit code (2: a recipe problem,
    1: an internal error, shown without a traceback)."""
    from recipekit.errors import RecipekitError, terminal_text

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    code = 0
    for arg in args:
        try:
            print(terminal_text(check_document(Path(arg))))
        except RecipekitError as e:
            print(e.render(), file=sys.stderr)
            code = max(code, e.exit_code)
        except Exception as e:  # never a traceback in a commit hook
            print(terminal_text(f"{arg}: internal error: {type(e).__name__}: {e}; run "
                                f"`recipekit validate --no-inputs --debug {arg}` for the "
                                "traceback, and please report it"), file=sys.stderr)
            code = max(code, 1)
    return code


if __name__ == "__main__":
    sys.exit(main())
