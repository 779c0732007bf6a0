"""Steps build located errors one way: ``recipe.error(path, message, hint=..., cls=...)``.

Oracle: the source of every step module (no error class is given a location by hand) and one
error of another class built the one way.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from recipekit.errors import ShapeMismatchError
from recipekit.recipe import load_recipe

STEPS = Path(__file__).resolve().parents[2] / "recipekit" / "steps"


@pytest.mark.parametrize("module", sorted(p.name for p in STEPS.glob("*.py")))
def test_no_step_locates_an_error_by_hand(module):
    tree = ast.parse((STEPS / module).read_text())
    by_hand = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Call)
               and any(k.arg == "location" for k in node.keywords)]
    assert by_hand == [], f"{module}: use recipe.error(path, ..., cls=...) at lines {by_hand}"


def test_recipe_error_builds_any_located_class(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("recipekit: 1\nmodels:\n  a: ./a\nsteps:\n  - name: s\n    op: layers\n"
                    "    from: a\n    layers: [0]\n")
    recipe = load_recipe(path)
    error = recipe.error(("steps", 0, "from"), "it does not fit", hint="fix it",
                         cls=ShapeMismatchError)
    assert isinstance(error, ShapeMismatchError)
    assert (error.key_path, error.hint) == (("steps", 0, "from"), "fix it")
    assert (error.location.line, error.location.column) == (7, 11)
