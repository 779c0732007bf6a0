"""Fuzzed recipes (hardening): the loader, the compiler and the CLI never fail with anything
but a located `RecipekitError` and the right exit code, and whatever compiles is right.

The regression tests below pin each bug the fuzzer found.
"""

from __future__ import annotations

import pytest

from recipekit.errors import SourceNotFoundError
from recipekit.recipe import load_recipe
from recipekit.sources import resolve_sources

from conftest import solar_recipe, write_recipe

# ---------------------------------------------------------------------------------------------
# Regressions: one test per bug the fuzzer found


def test_tilde_of_an_unknown_user_is_a_missing_path_not_a_crash(tmp_path):
    # Path.expanduser raised RuntimeError("Could not determine home directory.")
    r = load_recipe(write_recipe(tmp_path, solar_recipe("~nosuchuser/model",
                                                         output="  path: ~nosuchuser/out")))
    assert r.output.path == tmp_path / "~nosuchuser" / "out"
    with pytest.raises(SourceNotFoundError, match="'~nosuchuser/model' does not exist"):
        resolve_sources(r)
