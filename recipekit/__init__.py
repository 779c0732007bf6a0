"""recipekit: compile declarative checkpoint recipes into a tensor plan and stream it to disk.

The package root stays free of torch so that `recipekit validate` and `--help` answer at once.
"""

__version__ = "0.1.0"
