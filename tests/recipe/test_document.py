"""recipe/document.py: a recipe file read with the position of every key and value.

Oracle: the line and column of each key as written in the file.
"""

from __future__ import annotations

import pytest

from recipekit.errors import RecipeErrors
from recipekit.recipe.document import load_document, show


def test_every_key_and_value_is_located(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("recipekit: 1\nmodels:\n  base: ./m\nsteps: [{name: a, op: layers}]\n")
    doc = load_document(p)
    assert doc.key_marks[("models", "base")] == (3, 3)
    assert doc.value_marks[("models", "base")] == (3, 9)
    assert doc.locate(("steps", 0, "op")).line == 4
    assert doc.locate(("steps", 0, "missing")).line == 4  # the nearest enclosing position


def test_aliases_are_bounded(tmp_path):
    p = tmp_path / "r.yaml"
    rows = ["a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    rows += [f"{k}: &{k} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, "
             f"*{prev}, *{prev}, *{prev}]" for prev, k in zip("abcde", "bcdef", strict=True)]
    p.write_text("\n".join(rows) + "\n")
    with pytest.raises(RecipeErrors, match="aliases repeat more than 10000 values"):
        load_document(p)


def test_show_quotes_and_shortens():
    assert show("x") == "'x'" and show(1.5) == "1.5" and show(None) == "null"
    assert show("y" * 100).endswith("...") and len(show("y" * 100)) == 60
