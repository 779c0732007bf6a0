"""Schema messages for `tokenizer.tokens` rules (recipe/schema.py): one clear paragraph naming
the key and the fix, where jsonschema's own text (`... should not be valid under ...`) or a
bare "unknown key" told the user nothing (found by a black-box check)."""

from __future__ import annotations

import pytest

from tests.helpers.recipes import write_recipe


def _with_rule(cli, directory, rule: str):
    """`validate --no-inputs` of a union-tokenizer merge whose token `<x>` has ``rule``."""
    r = write_recipe(directory, "recipekit: 1\nmodels: {a: ./a, b: ./b}\nsteps:\n"
                     "  - {name: m, op: merge, method: linear, from: [a, b],\n"
                     "     parameters: {weight: 1.0},\n"
                     f"     tokenizer: {{source: union, tokens: {{'<x>': {rule}}}}}}}\n")
    return cli("validate", "--no-inputs", str(r))


def _validate(cli, directory, rule: str) -> str:
    result = _with_rule(cli, directory, rule)
    assert result.exit_code == 2, result.output
    assert "should not be valid" not in result.stderr and "Traceback" not in result.output
    return result.stderr.splitlines()[0]


def test_a_rule_with_token_and_token_id_names_both_and_the_fix(cli, tmp_path):
    line = _validate(cli, tmp_path, "{model: b, token_id: 3, token: '<s>'}")
    assert line.endswith(
        "steps[0].tokenizer.tokens.<x>: a rule names both `token` and `token_id`: its row "
        "comes from one of them; keep `token:` (the model's row of that token) or "
        "`token_id:` (that row of the model), not both")


@pytest.mark.parametrize(("rule", "fix"), [
    ("{source: zero, force: true}", "{zero: true, force: true}"),
    ("{source: b}", "{model: 'b'}"),
    ("{source: {kind: model_token, model: b, token: '<s>'}}", "{model: 'b', token: '<s>'}")])
def test_mergekits_source_key_is_answered_with_recipekits_spelling(cli, tmp_path, rule, fix):
    """mergekit 0.1.5's token rule `source:` (reference tokenizers.md §2): the message says
    what to write; the spelling it gives validates."""
    line = _validate(cli, tmp_path, rule)
    assert line.endswith("steps[0].tokenizer.tokens.<x>.source: unknown key in step 'm' "
                         f"(op: merge); mergekit's `source:` is not a key here: write `{fix}`")
    result = _with_rule(cli, tmp_path, fix)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("key, value, where", [
    ("width", "[[0, 4.0], [1, 5], [2, 6], [3, 7]]", "steps[0].width[0][1]"),
    ("ffn", "[[0.0, 4], [1, 5], [2, 6], [3, 7]]", "steps[0].ffn[0][0]"),
    ("depth", "[[0.0, 1], [2, 3]]", "steps[0].depth[0][0]"),
])
def test_a_whole_number_float_is_not_an_integer(cli, tmp_path, key, value, where):
    """JSON Schema's `integer` admits 4.0, which the steps then used as a float: a head index
    4.0 crashed `validate` (internal error), an FFN block 0.0 passed it and crashed the run,
    a layer 0.0 was blamed on the checkpoint (found by a black-box check). Every integer the
    schema asks for is now refused written as a float, located, with the fix."""
    width = "" if key == "width" else ", width: [[0, 4], [1, 5], [2, 6], [3, 7]]"
    width = "" if key == "depth" else width
    r = write_recipe(tmp_path, f"""
        recipekit: 1
        models: {{large: ./large}}
        steps:
          - {{name: small, op: coalesce, from: large{width}, {key}: {value}}}
        """)
    result = cli("validate", "--no-inputs", str(r))
    assert result.exit_code == 2, result.output
    assert f"{where}: expected an integer, got " in result.stderr
    assert "; write it without a decimal point or exponent" in result.stderr
    assert "internal error" not in result.output


@pytest.mark.parametrize("where, value", [
    ("alpha", "[0.1, 0.9]"),
    ("weight", "[0.2, 0.8]"),
])
def test_mergekits_bare_gradient_is_answered_with_recipekits_spelling(cli, tmp_path, where,
                                                                      value):
    """mergekit writes a gradient as a bare list (`alpha: [0.1, 0.9]`); recipekit read it as
    a rule list and refused each number ("expected an object, got 0.1", found by a black-box
    check). Now one error names recipekit's `{gradient: [...]}`."""
    step = ("{name: m, op: interpolate, from: [a, b], alpha: " + value + "}" if where == "alpha"
            else "{name: m, op: merge, method: linear, from: [a, {model: b, weight: "
            + value + "}], parameters: {weight: 0.5}}")
    r = write_recipe(tmp_path, f"recipekit: 1\nmodels: {{a: ./a, b: ./b}}\nsteps:\n  - {step}\n")
    result = cli("validate", "--no-inputs", str(r))
    assert result.exit_code == 2, result.output
    path = "steps[0].alpha" if where == "alpha" else "steps[0].from[1].weight"
    assert result.stderr.splitlines()[0].endswith(
        f"{path}: expected a number, a gradient or a list of rules, got {value}; write a "
        f"gradient as `{{gradient: {value}}}` (mergekit's `{value}`)"), result.stderr
    assert "expected an object" not in result.stderr
