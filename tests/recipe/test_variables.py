"""Recipe variables (`recipekit/recipe/variables.py`): ``variables:``, ``${name}``, ``--set``.

Oracle: the same recipe with the value written inline. A substituted recipe must type, hash
(`Recipe.canonical`) and fail exactly like its inline twin, with messages located at the user's
``${...}`` and naming the variable. Needs no checkpoint.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recipekit.errors import RecipeErrors, UsageError
from recipekit.recipe import load_recipe
from recipekit.recipe.variables import (
    Settings,
    escape_references,
    format_value,
    parse_settings,
    parse_value,
)

from tests.helpers.recipes import write_recipe

RECIPE = """\
recipekit: 1
variables:
  alpha: 0.5
  method: linear
  tag: v1
models:
  a: ./a
  b: ./b
steps:
  - name: blended
    op: interpolate
    from: [a, b]
    alpha: ${alpha}
output:
  path: out/blend-${alpha}-${tag}
"""


def inline(alpha: str, path: str) -> str:
    """`RECIPE` with the values written in place and no variables block."""
    return ("recipekit: 1\nmodels:\n  a: ./a\n  b: ./b\nsteps:\n  - name: blended\n"
            f"    op: interpolate\n    from: [a, b]\n    alpha: {alpha}\noutput:\n"
            f"  path: {path}\n")


def errors_of(source, **kw) -> str:
    with pytest.raises(RecipeErrors) as e:
        load_recipe(source, **kw)
    return e.value.render()


class TestSubstitution:
    """Whole values keep their type, text substitution writes the shortest form, and the
    canonical recipe equals the inline one."""

    def test_defaults(self, tmp_path):
        r = load_recipe(write_recipe(tmp_path, RECIPE))
        assert r.steps["blended"].spec["alpha"] == 0.5
        assert r.output.path == tmp_path / "out" / "blend-0.5-v1"
        assert r.variables == {"alpha": 0.5, "method": "linear", "tag": "v1"}

    @pytest.mark.parametrize("written, value, text", [
        ("0.3", 0.3, "0.3"), ("1e-3", 0.001, "0.001"), ("0.10", 0.1, "0.1"), ("1", 1, "1")])
    def test_set_numbers(self, tmp_path, written, value, text):
        r = load_recipe(write_recipe(tmp_path, RECIPE),
                        variables=parse_settings([f"alpha={written}"]))
        got = r.steps["blended"].spec["alpha"]
        assert got == value and type(got) is type(value)
        assert r.output.path.name == f"blend-{text}-v1"
        assert r.variables["alpha"] == value

    @pytest.mark.parametrize("written, text", [("'0.3'", "0.3"), ("true", "true"),
                                               ("a b", "a b"), ("2", "2")])
    def test_set_text(self, tmp_path, written, text):
        r = load_recipe(write_recipe(tmp_path, RECIPE),
                        variables=parse_settings([f"tag={written}"]))
        assert r.output.path.name == f"blend-0.5-{text}"

    def test_canonical_equals_inline(self, tmp_path):
        var = load_recipe(write_recipe(tmp_path, RECIPE), variables={"alpha": 0.3})
        same = load_recipe(write_recipe(tmp_path, inline("0.3", "out/blend-0.3-v1"),
                                        "inline.yaml"))
        other = load_recipe(write_recipe(tmp_path, RECIPE, "r2.yaml"), variables={"alpha": 0.4})
        assert json.dumps(var.canonical()) == json.dumps(same.canonical())
        assert var.canonical() != other.canonical()
        assert "variables" not in var.canonical()

    def test_list_and_mapping_values(self, tmp_path):
        text = RECIPE.replace("alpha: 0.5", "alpha: {gradient: [0, 1]}")
        r = load_recipe(write_recipe(tmp_path, text.replace("-${alpha}", "")))
        assert r.steps["blended"].spec["alpha"] == {"gradient": [0, 1]}
        r = load_recipe(write_recipe(tmp_path, text.replace("-${alpha}", "")),
                        variables=parse_settings(["alpha=[{match: '*.mlp.*', value: 0.3}, "
                                                  "{value: 0.5}]"]))
        assert r.steps["blended"].spec["alpha"][0] == {"match": "*.mlp.*", "value": 0.3}

    def test_escape_and_keys(self, tmp_path):
        text = RECIPE.replace("out/blend-${alpha}-${tag}", "out/$${alpha}-$$-${tag}")
        r = load_recipe(write_recipe(tmp_path, text))
        assert r.output.path.name == "${alpha}-$$-v1"

    def test_numeric_value_where_a_string_belongs(self, tmp_path):
        """A revision set to 1234567 is text, as the same number written inline is."""
        text = ("recipekit: 1\nvariables: {rev: main}\nmodels:\n"
                "  a: {hub: org/a, revision: '${rev}'}\nsteps:\n"
                "  - {name: s, op: layers, from: a, layers: [0]}\n")
        r = load_recipe(write_recipe(tmp_path, text), variables=parse_settings(["rev=1234567"]))
        assert r.models["a"].revision == "1234567"

    def test_json_and_dict_recipes(self, tmp_path):
        data = {"recipekit": 1, "variables": {"alpha": 0.5}, "models": {"a": "./a", "b": "./b"},
                "steps": [{"name": "s", "op": "interpolate", "from": ["a", "b"],
                           "alpha": "${alpha}"}]}
        path = tmp_path / "r.json"
        path.write_text(json.dumps(data, indent=1))
        for source in (path, data):
            r = load_recipe(source, base_dir=tmp_path, variables={"alpha": 0.2})
            assert r.steps["s"].spec["alpha"] == 0.2
        assert data["steps"][0]["alpha"] == "${alpha}"  # the caller's dict is not changed

    def test_no_variables_no_change(self, tmp_path):
        r = load_recipe(write_recipe(tmp_path, inline("0.3", "out/x")))
        assert r.variables == {} and "variables" not in r.canonical()


class TestErrors:
    """Every mistake is located at the user's line, says which variable, and offers a fix."""

    def test_bad_value_names_the_variable(self, tmp_path):
        path = write_recipe(tmp_path, RECIPE)
        assert errors_of(path, variables=parse_settings(["alpha=abc"])) == (
            f"{path}:13:12: steps[0].alpha: expected a number, got 'abc' (from variable "
            "'alpha' set by --set)\n        alpha: ${alpha}\n               ^")

    def test_bad_default_names_the_variable(self, tmp_path):
        path = write_recipe(tmp_path, RECIPE.replace("alpha: 0.5", "alpha: high"))
        assert errors_of(path).startswith(
            f"{path}:13:12: steps[0].alpha: expected a number, got 'high' (from variable "
            "'alpha')")

    def test_undeclared_set(self, tmp_path):
        path = write_recipe(tmp_path, RECIPE)
        assert errors_of(path, variables=parse_settings(["alhpa=0.3"])) == (
            f"{path}:2:1: variables: --set alhpa: the recipe declares no variable 'alhpa'; "
            "did you mean 'alpha'? declared: alpha, method, tag\n    variables:\n    ^")
        plain = write_recipe(tmp_path, inline("0.3", "out"), "plain.yaml")
        assert errors_of(plain, variables={"alpha": 1}) == (
            f"{plain}: variables: variables= alpha: the recipe declares no variable 'alpha'; "
            "declare it in a top-level `variables:` mapping with its default")

    def test_unknown_reference(self, tmp_path):
        path = write_recipe(tmp_path, RECIPE.replace("alpha: ${alpha}", "alpha: ${alhpa}"))
        assert errors_of(path).startswith(
            f"{path}:13:12: steps[0].alpha: unknown variable 'alhpa'; did you mean 'alpha'? "
            "declared: alpha, method, tag; write $${ for a literal ${")

    @pytest.mark.parametrize("written", ["${ alpha }", "${}", "x-${alpha"])
    def test_malformed_reference(self, tmp_path, written):
        path = write_recipe(tmp_path, RECIPE.replace("${alpha}-${tag}", written))
        assert errors_of(path).startswith(
            f"{path}:15:9: output.path: 'out/blend-{written}': `${{` starts no variable "
            "reference; write ${name} (letters, digits, '_'), or $${ for a literal ${")

    def test_list_pasted_into_text(self, tmp_path):
        path = write_recipe(tmp_path, RECIPE)
        assert "variable 'alpha' is a list, which cannot be pasted into text" in errors_of(
            path, variables={"alpha": [1, 2]})

    def test_default_refers_to_a_variable(self, tmp_path):
        path = write_recipe(tmp_path, RECIPE.replace("tag: v1", "tag: v-${alpha}"))
        assert f"{path}:5:8: variables.tag: a variable's default cannot refer to a variable" in (
            errors_of(path))

    def test_bad_block_and_name(self, tmp_path):
        path = write_recipe(tmp_path, RECIPE.replace("  tag: v1", "  2tag: v1"))
        assert f"{path}:5:3: variables.2tag: '2tag' is not a variable name" in errors_of(path)
        path = write_recipe(tmp_path, inline("0.3", "out").replace(
            "models:", "variables: [a]\nmodels:"), "list.yaml")
        assert "variables: expected a mapping of variable names" in errors_of(path)


class TestSettings:
    """``--set NAME=VALUE`` parsing: YAML values with the loader's float rule."""

    @pytest.mark.parametrize("text, value", [("1e-3", 0.001), ("2024-01-01", "2024-01-01"),
                                             ("[1, 2]", [1, 2]), ("'a,b'", "a,b"),
                                             ("null", None)])
    def test_values(self, text, value):
        assert parse_value(text, "--set x") == value

    @pytest.mark.parametrize("texts, message", [
        (["alpha"], "--set 'alpha': expected NAME=VALUE"),
        (["2a=1"], "--set '2a=1': '2a' is not a variable name"),
        (["a=1", "a=2"], "--set a is given twice"),
        (["a="], "--set a: no value after '='"),
        (["a=[1"], "--set a: cannot read '[1': invalid YAML"),
        (["a=!!python/object:os.system x"], "--set a: cannot read"),
    ])
    def test_mistakes(self, texts, message):
        with pytest.raises(UsageError) as e:
            parse_settings(texts)
        assert e.value.render().startswith(message)

    def test_origin(self):
        assert parse_settings(["a=1"]).origin == "--set"
        assert Settings({"a": 1}).origin == "variables="

    @pytest.mark.parametrize("value, text", [(0.1, "0.1"), (1e-05, "1e-05"), (3, "3"),
                                             (False, "false"), (None, "null"), ("x/y", "x/y"),
                                             ([1, "a"], '[1,"a"]')])
    def test_format_value(self, value, text):
        assert format_value(value) == text


class TestEscapeProperty:
    """Oracle: any text survives when each ``${`` in it is written ``$${`` (hypothesis), as
    `escape_references` writes it (import-mergekit's prompts, paths, templates)."""

    @settings(max_examples=300, deadline=None)
    @given(st.text(alphabet="${}ab_ \\", max_size=30))
    def test_escaped_text_is_literal(self, text):
        data = {"recipekit": 1, "variables": {"a": 1}, "models": {"m": "./m"},
                "steps": [{"name": "s", "op": "layers", "from": "m", "layers": [0]}],
                "description": escape_references(text)}
        assert load_recipe(data).document.data["description"] == text

    def test_values_are_escaped_and_keys_kept(self):
        assert escape_references({"${k}": ["${a}", {"b": "$${c}"}, 1, None]}) == {
            "${k}": ["$${a}", {"b": "$$${c}"}, 1, None]}
