"""Running a plan: fetch hub shards, stream shards, finish the output directory."""

from recipekit import _api_entry

_api_entry(__name__, "run")  # `recipekit.run(...)` is `recipekit.api.run`
