"""Running a plan: fetch hub shards, stream shards, finish the output directory."""

from recipekit import callable_package

callable_package(__name__, "run")  # `recipekit.run(...)` is `recipekit.api.run`
