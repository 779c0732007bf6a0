"""``python -m recipekit``: the console script, for environments without it on PATH."""

from recipekit.cli import main

if __name__ == "__main__":
    main()
