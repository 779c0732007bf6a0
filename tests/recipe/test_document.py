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


class TestLocatedEncodingErrors:
    """Issue 17 item 14: a non-UTF-8 byte or a NUL used to be reported without a position, a
    JSON duplicate key as "YAML would ...". Oracle: the line and column of the first bad byte
    (counted in characters, as an editor does) and the file's own format."""

    def test_non_utf8_byte_is_located(self, tmp_path):
        p = tmp_path / "r.yaml"
        p.write_bytes("recipekit: 1\nname: \"été\xff\"\n".encode("latin-1").replace(
            "été".encode("latin-1"), "été".encode()))
        with pytest.raises(RecipeErrors) as e:
            load_document(p)
        assert e.value.render() == (
            f"{p}:2:11: not UTF-8 text: byte 0xff (invalid start byte); save the recipe as "
            "UTF-8\n    name: \"été\\xff\"\n              ^")

    def test_nul_is_located(self, tmp_path):
        p = tmp_path / "r.yaml"
        p.write_bytes(b"recipekit: 1\nname: \"ab\x00c\"\n")
        with pytest.raises(RecipeErrors) as e:
            load_document(p)
        assert e.value.render() == (
            f"{p}:2:10: invalid YAML: unacceptable character U+0000: control characters are not "
            "allowed; remove it, or write it as an escape in a double-quoted string\n"
            "    name: \"ab\\x00c\"\n             ^")

    def test_json_duplicate_key_names_json(self, tmp_path):
        p = tmp_path / "r.json"
        p.write_text('{"recipekit": 1,\n "recipekit": 2}\n')
        with pytest.raises(RecipeErrors) as e:
            load_document(p)
        assert e.value.render().splitlines()[0] == (
            f"{p}:2:2: recipekit: duplicate key `recipekit` (first defined on line 1); remove one "
            "of them; JSON would silently keep only the last")
