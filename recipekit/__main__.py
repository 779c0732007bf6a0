"""``python -m recipekit`` and the ``recipekit`` console script.

`main` imports the command line only when called, so that a Ctrl-C while it loads (typer and
its dependencies, ~0.2 s) exits 130 with one line instead of a Python traceback.
"""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from recipekit.cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        raise SystemExit(130) from None
    cli_main()


if __name__ == "__main__":
    main()
