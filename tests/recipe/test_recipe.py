"""recipe.py: YAML/JSON loading rules, the schema contract, and the layer-range grammar.

Oracles: YAML 1.2 number rules, Python's own `range`, and the schema file itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from recipekit.errors import RecipeErrors
from recipekit.recipe import (
    DEFAULT_SHARD_SIZE,
    load_document,
    load_recipe,
    load_schema,
    parse_layer_range,
)

from tests.helpers.recipes import ROOT, solar_recipe, write_recipe

BASE = solar_recipe(output=None)


class TestYamlRules:
    def test_exponent_floats_are_floats(self, tmp_path):
        doc = load_document(write_recipe(tmp_path, "a: 1e-3\nb: 2E5\nc: .5\nd: 1_000\n"))
        assert doc.data == {"a": 0.001, "b": 200000.0, "c": 0.5, "d": 1000}

    def test_numeric_looking_names_are_strings(self, tmp_path):
        r = load_recipe(write_recipe(tmp_path, BASE.replace("name: up", "name: 2024")
                                     .replace("tiny", "007")))
        assert list(r.steps) == ["2024"]
        assert list(r.models) == ["007"]
        assert r.output.model == "2024"

    def test_duplicate_keys_name_both_lines(self, tmp_path):
        with pytest.raises(RecipeErrors) as e:
            load_recipe(write_recipe(tmp_path, BASE + "output: {}\noutput: {}\n"))
        assert "duplicate key `output` (first defined on line 9)" in e.value.render()

    def test_no_python_tags(self, tmp_path):
        with pytest.raises(RecipeErrors) as e:
            load_document(write_recipe(tmp_path, "a: !!python/object/apply:os.system ['true']\n"))
        assert "invalid YAML" in e.value.render()

    def test_json_twin_is_the_same_document(self, tmp_path):
        y = load_document(write_recipe(tmp_path, BASE))
        j = load_document(write_recipe(tmp_path, json.dumps(y.data, indent=1), "recipe.json"))
        assert j.data == y.data
        assert j.locate(("steps", 0, "layers", 1)).line == 13

    def test_json_syntax_error_is_located(self, tmp_path):
        with pytest.raises(RecipeErrors) as e:
            load_document(write_recipe(tmp_path, '{"recipekit": 1,\n "models": }', "r.json"))
        assert e.value.render().startswith(f"{tmp_path / 'r.json'}:2:12: invalid JSON: ")

    def test_json_duplicate_keys(self, tmp_path):
        with pytest.raises(RecipeErrors) as e:
            load_document(write_recipe(tmp_path, '{"a": 1,\n "a": 2}', "r.json"))
        assert "duplicate key `a` (first defined on line 1)" in e.value.render()


class TestTypedRecipe:
    def test_defaults(self, tmp_path):
        r = load_recipe(write_recipe(tmp_path, BASE))
        assert r.output.model == "up"
        assert r.output.path == tmp_path / "out" / "recipe"
        assert r.output.shard_size == 5 * 10**9
        assert r.models["tiny"].path == tmp_path / "model"

    def test_paths_are_relative_to_the_recipe(self, tmp_path):
        sub = tmp_path / "sub"
        sub.mkdir()
        r = load_recipe(write_recipe(sub, BASE.replace("./model", "../m") +
                                     "output: {path: ../o, shard_size: 2GiB}\n"))
        assert r.models["tiny"].path == tmp_path / "m"
        assert r.output.path == tmp_path / "o"
        assert r.output.shard_size == 2 * 2**30

    @pytest.mark.parametrize("written, size", [
        ("1e9", 10**9), ("2.0e9", 2 * 10**9), ("2000000000.0", 2 * 10**9), ("1_000", 1000),
        ("'1.5KB'", 1500), ("'0.5KiB'", 512)])
    def test_a_whole_number_of_bytes_is_a_shard_size_however_written(self, tmp_path, written,
                                                                     size):
        """`shard_size: 1e9` was refused as "'1e9' is not a size" (the number read as its text,
        once the schema's integer refused floats) while 2000000000.0 passed (found by a
        black-box check): a whole number of bytes is a size, with or without an exponent."""
        r = load_recipe(write_recipe(tmp_path, solar_recipe(output=f"  shard_size: {written}")))
        assert r.output.shard_size == size and type(r.output.shard_size) is int

    @pytest.mark.parametrize("written", ["2.5", "'2.5'", "'2.5 B'", "0.5", "1.5e0"])
    def test_a_fraction_of_a_byte_is_refused(self, tmp_path, written):
        """2.5 bytes was read as 2 and 0.5 as "not a positive size": a byte count that is not
        whole is refused, located, saying so."""
        with pytest.raises(RecipeErrors) as e:
            load_recipe(write_recipe(tmp_path, solar_recipe(output=f"  shard_size: {written}")))
        (err,) = e.value.errors
        assert err.key_path == ("output", "shard_size")
        assert err.message.endswith(" is not a whole number of bytes")
        assert err.hint == "write an integer, or a size with a unit, e.g. '500MB', '5GB', '2GiB'"

    def test_file_urls_name_local_paths(self, tmp_path):
        """``file://`` is fsspec's local file system: ``file:///abs`` is ``/abs`` and
        ``file://rel`` is ``rel`` beside the recipe, for models and the output (it named a
        folder ``file:`` beside the recipe)."""
        sub = tmp_path / "sub"
        sub.mkdir()
        r = load_recipe(write_recipe(sub, solar_recipe(f"file://{tmp_path}/m",
                                                       output=f"  path: file://{tmp_path}/o")))
        assert r.models["tiny"].path == tmp_path / "m" and r.models["tiny"].url is None
        assert r.output.path == tmp_path / "o" and r.output.url is None
        r = load_recipe(write_recipe(sub, solar_recipe("file://m", output="  path: FILE://o")))
        assert r.models["tiny"].path == sub / "m" and r.output.path == sub / "o"

    def test_steps_may_refer_forward(self, tmp_path):
        text = BASE.replace("from: tiny", "from: later") + """
  - name: later
    op: layers
    from: tiny
    layers: [0, 1, 2, 3, 4, 5, 6, 7]
output: {model: up}
"""
        r = load_recipe(write_recipe(tmp_path, text))
        assert list(r.steps) == ["later", "up"]

    def test_schema_defaults_match_the_code(self):
        out = load_schema()["$defs"]["output"]["properties"]
        assert out["shard_size"]["default"] == DEFAULT_SHARD_SIZE
        assert load_schema()["properties"]["steps"]["default"] == []

    def test_published_schema_is_valid_2020_12(self):
        import jsonschema

        schema = json.loads((ROOT / "schemas" / "recipe.schema.json").read_text())
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema == load_schema()

    def test_recipe_module_does_not_import_torch(self):
        code = ("import sys, recipekit.recipe, recipekit.cli, recipekit.plan, "
                "recipekit.inputs.resolve; "
                "assert 'torch' not in sys.modules, 'torch imported'")
        subprocess.run([sys.executable, "-c", code], check=True)


class TestLayerRangeGrammar:
    """Oracle: Python's range()."""

    @given(st.integers(0, 200), st.integers(0, 200), st.integers(-5, 5).filter(bool))
    def test_matches_python_range(self, a, b, step):
        expected = range(a, b, step)
        text = f"range({a}, {b}, {step})" if step != 1 else f"range({a},{b})"
        if len(expected):
            assert parse_layer_range(text) == expected
        else:
            with pytest.raises(ValueError, match="is empty"):
                parse_layer_range(text)

    @given(st.integers(0, 40), st.integers(-4, 40), st.integers(-5, -1))
    def test_negative_steps_select_what_python_selects(self, a, b, step):
        """``range(7,-1,-1)`` is layers 7..0 in Python and fusion_bench (issue 16 item 9)."""
        expected = range(a, b, step)
        text = f"range({a},{b},{step})"
        if expected and expected[-1] < 0:
            with pytest.raises(ValueError, match="must not be negative"):
                parse_layer_range(text)
        elif expected:
            assert parse_layer_range(text) == expected
        else:
            with pytest.raises(ValueError, match="is empty"):
                parse_layer_range(text)

    def test_reversed_stack_down_to_layer_zero(self):
        assert list(parse_layer_range("range(7,-1,-1)")) == [7, 6, 5, 4, 3, 2, 1, 0]

    @pytest.mark.parametrize("text", [
        "range(0,24", "range(0;4)", "range(a,b)", "range(0,4,0)", "range(-1,3)", "range(0,-1)",
        "range(3,-5,-1)", "range(\u0663,5)", "range(0,\uff17)",
        "__import__('os').system('true')", "range(0, 4) + range(1, 2)", "list(range(3))",
    ])
    def test_rejects_everything_else(self, text):
        with pytest.raises(ValueError):
            parse_layer_range(text)

    def test_never_evaluates(self, tmp_path, monkeypatch):
        import builtins

        monkeypatch.setattr(builtins, "eval", None)
        assert parse_layer_range(" range( 8 , 32 ) ") == range(8, 32)


def test_schema_is_shipped_in_the_wheel_config():
    text = (ROOT / "pyproject.toml").read_text()
    assert '"schemas/recipe.schema.json" = "recipekit/_schemas/recipe.schema.json"' in text
    assert Path(ROOT / "schemas" / "recipe.schema.json").is_file()
