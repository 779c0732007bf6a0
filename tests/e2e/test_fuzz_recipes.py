"""Fuzzed recipes (hardening): the loader, the compiler and the CLI never fail with anything
but a located `RecipekitError` and the right exit code, and whatever compiles is right.

Strategies and the oracle live in `tests/helpers/fuzz_*.py` (shared with `bench/fuzz_soak.py`,
which runs thousands of cases). Here about 500 derandomized cases run at three levels:
`load_recipe`; `resolve_sources` + `compile_plan` against the tiny 8-layer Llama, checked
against a reference interpreter; and `recipekit validate` / `plan` / `run` in process. The
regression tests at the end pin each bug the fuzzer found; bugs it found in modules this suite's
session could not change are listed in `fuzz_oracle.KNOWN_OPEN` (counted, not failed) and
pinned by xfail tests.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from recipekit.errors import RecipeErrors, RecipekitError, SourceNotFoundError
from recipekit.inputs.resolve import resolve_sources
from recipekit.recipe import load_recipe

from tests.helpers.fuzz_documents import recipe_documents
from tests.helpers.fuzz_mutations import (
    WHOLE_TEXTS,
    RecipeFile,
    mutated_documents,
    recipe_files,
    seed_recipe_files,
    serialized,
)
from tests.helpers.fuzz_oracle import check_case
from tests.helpers.recipes import solar_recipe, write_recipe

FUZZ = dict(deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                   HealthCheck.filter_too_much, HealthCheck.large_base_example])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_llama):
    """(parent of the case directories, the tiny model, its absolute paths as sources)."""
    model = Path(tiny_llama).resolve()
    return tmp_path_factory.mktemp("fuzz").resolve(), model, (str(model), str(model) + "/")


@pytest.fixture(scope="module")
def cli_app():
    from recipekit.cli import app

    return CliRunner(), app


@settings(max_examples=180, **FUZZ)
@given(data=st.data())
def test_generated_recipes_load_and_compile(workspace, data):
    """Schema-shaped documents, mutated, as YAML or JSON: load + compile + the reference."""
    parent, model, abs_models = workspace
    f = data.draw(serialized(data.draw(mutated_documents(abs_models))))
    check_case(f, parent, model, abs_models=abs_models)


@settings(max_examples=130, **FUZZ)
@given(f=seed_recipe_files())
def test_mutated_example_recipes_load_and_compile(workspace, f):
    """recipes/*.yaml|json with lines deleted, duplicated, swapped, re-indented, tabs, YAML
    specials, truncation and byte flips."""
    parent, model, _ = workspace
    check_case(f, parent, model)


@settings(max_examples=100, **FUZZ)
@given(data=st.data())
def test_any_recipe_through_cli_validate(workspace, cli_app, data):
    """Every kind of case through `recipekit validate`: the library's exit code, no traceback."""
    parent, model, abs_models = workspace
    f = data.draw(recipe_files(abs_models))
    check_case(f, parent, model, abs_models=abs_models, cli=cli_app)


@settings(max_examples=30, **FUZZ)
@given(data=st.data())
def test_sampled_recipes_run(workspace, cli_app, data):
    """Mostly valid recipes through `plan` and `run`: the output holds the planned tensors."""
    parent, model, abs_models = workspace
    doc = data.draw(mutated_documents(abs_models, max_mutations=1))
    check_case(data.draw(serialized(doc)), parent, model, abs_models=abs_models, cli=cli_app,
               run=True)


@settings(max_examples=40, **FUZZ)
@given(doc=recipe_documents())
def test_yaml_and_json_are_the_same_recipe(workspace, doc):
    """DESIGN §2: a JSON recipe is the same document in JSON, however it is indented."""
    parent, _, _ = workspace
    outcomes = []
    for name, text in [("r.yaml", yaml.safe_dump(doc, sort_keys=False)),
                       ("r.json", json.dumps(doc)), ("r.json", json.dumps(doc, indent=2)),
                       ("r.json", json.dumps(doc, indent="\t"))]:
        d = parent / f"same-{len(outcomes)}"
        d.mkdir(exist_ok=True)
        path = d / name
        path.write_text(text)
        try:
            outcomes.append(json.dumps(load_recipe(path).canonical(), sort_keys=True))
        except RecipekitError as e:
            outcomes.append(type(e).__name__ + ":" + "|".join(
                x.message for x in getattr(e, "errors", [e])))
    assert len(set(outcomes)) == 1, outcomes


@pytest.mark.parametrize("text", WHOLE_TEXTS, ids=[f"text{i}" for i in range(len(WHOLE_TEXTS))])
@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_whole_texts(workspace, cli_app, text, suffix):
    """Alias bombs, recursive aliases, deep nesting, empty and multi-document files."""
    parent, model, _ = workspace
    check_case(RecipeFile("recipe" + suffix, text.encode(), "whole-text"), parent, model,
               cli=cli_app, limit=20)


# ---------------------------------------------------------------------------------------------
# Regressions: one test per bug the fuzzer found


def test_model_path_with_a_too_long_name_is_a_clear_error(tmp_path, cli):
    # sources.py: Path.exists() raised OSError ENAMETOOLONG for a model directory name over
    # NAME_MAX, and validate showed "internal error"
    path = write_recipe(tmp_path, solar_recipe("./" + "x" * 300))
    with pytest.raises(SourceNotFoundError):
        resolve_sources(load_recipe(path))
    result = cli("validate", path)
    assert "internal error" not in result.output
    assert result.exit_code == 2


def test_output_path_with_a_too_long_name_is_a_clear_error(tmp_path, tiny_llama, cli):
    # io/output.py: Path.exists() raised OSError ENAMETOOLONG for an output directory name over
    # NAME_MAX, and run showed "internal error" (fixed there in a7c67b2)
    path = write_recipe(tmp_path, solar_recipe(tiny_llama, output="  path: " + "x" * 300))
    result = cli("run", "-q", "--no-fsync", path)
    assert "internal error" not in result.output
    assert result.exit_code == 2


def test_tilde_of_an_unknown_user_is_a_missing_path_not_a_crash(tmp_path):
    # Path.expanduser raised RuntimeError("Could not determine home directory.")
    r = load_recipe(write_recipe(tmp_path, solar_recipe("~nosuchuser/model",
                                                         output="  path: ~nosuchuser/out")))
    assert r.output.path == tmp_path / "~nosuchuser" / "out"
    with pytest.raises(SourceNotFoundError, match="'~nosuchuser/model' does not exist"):
        resolve_sources(r)


@pytest.mark.parametrize("size", ["null", "[1]", "{a: 1}", "'" + "9" * 400 + "'", ".inf"])
def test_unusable_shard_sizes_are_recipe_errors(tmp_path, size):
    # parse_size raised TypeError (null, list, mapping) or OverflowError ("999...9" is an
    # infinite float), and a string the schema's pattern accepts was silently replaced by 1 byte
    path = write_recipe(tmp_path, solar_recipe(output=f"  shard_size: {size}"))
    with pytest.raises(RecipeErrors) as e:
        load_recipe(path)
    assert len(e.value.errors) == 1
    assert e.value.errors[0].key_path == ("output", "shard_size")


@pytest.mark.parametrize("layers", ["5", "true", "2.5", "{from: tiny, range: [0, 2]}"])
def test_layers_that_is_not_a_list_is_a_recipe_error(tmp_path, layers):
    # step_references iterated `layers` whatever it was: TypeError for an int, bool or float
    with pytest.raises(RecipeErrors) as e:
        load_recipe(write_recipe(tmp_path, solar_recipe(layers=layers)))
    assert [x.key_path for x in e.value.errors] == [("steps", 0, "layers")]


@pytest.mark.parametrize("scalar", ["0b_", "0x_", "._", "-._", "9" * 5000, "0x" + "f" * 5000])
def test_number_like_scalars_that_are_no_numbers_are_yaml_errors(tmp_path, scalar):
    # PyYAML's int/float constructors raised ValueError for 0b_, 0x_ and ._ (which its
    # resolvers take for numbers) and for more than 4300 decimal digits; a 5000-digit hex int
    # loaded, and then crashed whatever printed it
    text = solar_recipe(layers=f"[{scalar}]")
    with pytest.raises(RecipeErrors) as e:
        load_recipe(write_recipe(tmp_path, text))
    (err,) = e.value.errors
    assert "as a number (quote it to make it a string)" in err.message
    assert (err.location.line, err.location.column) == (8, 14)


def _alias_bomb(levels: int) -> str:
    lines = ["recipekit: 1", "models: {tiny: ./model}", "l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(("name", "text", "message"), [
    # a recursive alias and nesting past Python's recursion limit raised RecursionError
    ("recipe.yaml", "recipekit: 1\nmodels: {tiny: ./model}\nsteps: &s [*s]\n",
     "invalid YAML: an alias refers to a value that contains it"),
    ("recipe.yaml", "recipekit: 1\nx: " + "[" * 500 + "]" * 500 + "\n",
     "invalid YAML: nested too deeply"),
    ("recipe.json", '{"recipekit": 1, "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
     "invalid JSON: nested too deeply"),
    # "billion laughs": 9**9 values through aliases took all memory
    ("recipe.yaml", _alias_bomb(10), "invalid YAML: aliases repeat more than 10000 values"),
], ids=["recursive-alias", "deep-yaml", "deep-json", "alias-bomb"])
def test_recursive_deep_and_exploding_documents_are_recipe_errors(tmp_path, name, text, message):
    with pytest.raises(RecipeErrors) as e:
        load_recipe(write_recipe(tmp_path, text, name=name))
    assert [x.message for x in e.value.errors] == [message]


def test_aliases_that_repeat_a_few_values_still_work(tmp_path):
    text = solar_recipe(layers="&l [0, 1]", output=None) + (
        "  - name: again\n    op: layers\n    from: up\n    layers: *l\n")
    r = load_recipe(write_recipe(tmp_path, text))
    assert r.steps["again"].spec["layers"] == [0, 1]


@pytest.mark.parametrize("n", [3, 600])
def test_long_chains_of_steps_listed_last_first(tmp_path, n):
    # _topological_order recursed once per step: a chain of 1500 steps listed from its end
    # raised RecursionError (600 steps under a recursion limit of 500 show it faster)
    steps = "".join(f"  - {{name: s{i}, op: layers, from: {'tiny' if i == 0 else f's{i - 1}'}, "
                    "layers: [0]}\n" for i in reversed(range(n)))
    text = f"recipekit: 1\nmodels:\n  tiny: ./model\nsteps:\n{steps}output: {{model: s{n - 1}}}\n"
    path = write_recipe(tmp_path, text)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(500)
    try:
        r = load_recipe(path)
    finally:
        sys.setrecursionlimit(limit)
    assert list(r.steps) == [f"s{i}" for i in range(n)]


def test_cycles_are_still_reported_once_each(tmp_path):
    text = ("recipekit: 1\nmodels: {tiny: ./model}\nsteps:\n"
            "  - {name: a, op: layers, from: c, layers: [0]}\n"
            "  - {name: b, op: layers, from: a, layers: [{from: b2, range: [0, 1]}]}\n"
            "  - {name: c, op: layers, from: b, layers: [0]}\n"
            "  - {name: b2, op: layers, from: b, layers: [0]}\n")
    with pytest.raises(RecipeErrors) as e:
        load_recipe(write_recipe(tmp_path, text))
    assert sorted(x.message for x in e.value.errors) == [
        "steps form a cycle: a -> c -> b -> a", "steps form a cycle: b -> b2 -> b"]


@pytest.mark.parametrize(("layers", "message"), [
    # len(range) overflowed past sys.maxsize in parse_layer_range (OverflowError) ...
    ('["range(0,100000000000000000000000000000)"]',
     "reaches layer 99999999999999999999999999999, but model 'tiny' has 8 layers (0-7)"),
    # ... and the layers op made a list of every index before checking any (MemoryError)
    ('["range(0,1000000000000)"]', "reaches layer 999999999999, but model 'tiny' has 8 layers"),
    ("[{from: tiny, range: [0, 1000000000000]}]", "range [0, 1000000000000] reaches layer"),
    ('["range(1000000000000,0,-1)"]', "reaches layer 1000000000000, but"),
    ("[8]", "layer 8, but model 'tiny' has 8 layers (0-7)"),
])
def test_huge_layer_ranges_are_refused_without_being_listed(tmp_path, tiny_llama, layers,
                                                            message):
    from recipekit.plan import compile_plan

    r = load_recipe(write_recipe(tmp_path, solar_recipe(tiny_llama, layers=layers)))
    with pytest.raises(RecipeErrors) as e:
        compile_plan(r, resolve_sources(r))
    (err,) = e.value.errors
    assert message in err.message
    assert err.key_path == ("steps", 0, "layers", 0)


def test_range_numbers_past_python_int_limit(tmp_path):
    # int() of more than 4300 digits raised ValueError with Python's own advice as the message
    with pytest.raises(RecipeErrors) as e:
        load_recipe(write_recipe(tmp_path, solar_recipe(layers=f'["range(0,{"9" * 5000})"]')))
    (err,) = e.value.errors
    assert err.message.endswith(": a number in it is far too large")
    assert "sys.set_int_max_str_digits" not in err.render()


@pytest.mark.parametrize(("layers", "where"), [
    # JSON Schema's `integer` admits 3.0 and 1e300, so the schema passed them; the layers op
    # then failed on them with TypeError ('float' object is not iterable / cannot be a range).
    # Once the recipe schema's integers were ints only, a float read as its text and was
    # refused as "'3.0' is not a layer index or range" (found by a black-box check).
    ("[3.0]", ("steps", 0, "layers", 0)),
    ("[1e300]", ("steps", 0, "layers", 0)),
    ("[1e2]", ("steps", 0, "layers", 0)),
    ("[{from: tiny, range: [0.0, 4]}]", ("steps", 0, "layers", 0, "range", 0)),
    ("[{from: tiny, layers: [1, 2.0]}]", ("steps", 0, "layers", 0, "layers", 1)),
])
def test_integral_floats_are_not_layer_indices(tmp_path, layers, where):
    with pytest.raises(RecipeErrors) as e:
        load_recipe(write_recipe(tmp_path, solar_recipe(layers=layers)))
    (err,) = e.value.errors
    assert err.key_path == where
    assert err.message.startswith("expected an integer layer index, got ")
    assert err.hint == "write it without a decimal point or exponent"


def test_each_integral_float_layer_index_is_one_error(tmp_path):
    with pytest.raises(RecipeErrors) as e:
        load_recipe(write_recipe(tmp_path, solar_recipe(
            layers="[3.0, 1, {from: tiny, layers: [4.0, 5e0]}]")))
    assert [(err.key_path, err.message) for err in e.value.errors] == [
        (("steps", 0, "layers", 0), "expected an integer layer index, got 3.0"),
        (("steps", 0, "layers", 2, "layers", 0), "expected an integer layer index, got 4.0"),
        (("steps", 0, "layers", 2, "layers", 1), "expected an integer layer index, got 5e0")]


@pytest.mark.parametrize("variant", ["tabs", "long-key", "raw-c1", "line-separator"])
def test_valid_json_is_read_as_json(tmp_path, variant):
    # .json recipes went through the YAML parser for positions, which refused tab-indented JSON
    # ("found character '\t' that cannot start any token"), keys over 1024 characters and raw
    # U+0080..U+009F, and folded a raw U+2028 inside a string
    doc = json.loads(solar_recipe_json())
    if variant == "long-key":
        doc["output"] = {"x" * 1100: 1}
    elif variant == "raw-c1":
        doc["description"] = "a\x80b"
    elif variant == "line-separator":
        doc["description"] = "a\u2028  b"
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(doc, indent="\t" if variant == "tabs" else 2, ensure_ascii=False))
    if variant == "long-key":
        with pytest.raises(RecipeErrors) as e:
            load_recipe(path)
        assert [x.key_path for x in e.value.errors] == [("output", "x" * 1100)]
        return
    r = load_recipe(path)
    assert r.document.data == doc
    if variant == "tabs":  # still located
        assert r.document.locate(("steps", 0, "layers")).line == 11


def solar_recipe_json() -> str:
    return json.dumps({"recipekit": 1, "models": {"tiny": "./model"}, "steps": [
        {"name": "up", "op": "layers", "from": "tiny", "layers": ["range(0,6)", "range(2,8)"]}]})


def test_date_like_names_and_revisions_are_strings(tmp_path):
    # PyYAML resolved 2024-01-01 to a timestamp, which the recipe loader refuses: an unquoted
    # tag-like revision or a step named like a date was "invalid YAML: tag ... not allowed"
    text = (solar_recipe(output=None).replace("name: up", "name: 2024-01-01")
            + "  - {name: b, op: layers, from: 2024-01-01, layers: [0]}\n"
            + "output: {model: 2001-12-14}\n")
    text = text.replace("models:\n", "models:\n  h: {hub: org/name, revision: 2024-01-01}\n")
    with pytest.raises(RecipeErrors) as e:  # only the unknown output model
        load_recipe(write_recipe(tmp_path, text))
    (err,) = e.value.errors
    assert err.message == "unknown model or step '2001-12-14'"
    r = load_recipe(write_recipe(tmp_path, text.replace("output: {model: 2001", "#")))
    assert list(r.steps) == ["2024-01-01", "b"]
    assert r.models["h"].revision == "2024-01-01"


def test_explicit_timestamps_are_still_refused(tmp_path):
    with pytest.raises(RecipeErrors, match="tag 'tag:yaml.org,2002:timestamp' is not allowed"):
        load_recipe(write_recipe(tmp_path, solar_recipe(output="  path: !!timestamp 2024-01-01")))


@pytest.mark.parametrize(("source", "where", "message"), [
    # best_match chose an error of the other object branch ({hub} for a {path} entry and back),
    # whose rendering found no unknown key and returned nothing: the schema error vanished, the
    # recipe loaded without that model, and compiling raised KeyError
    ("{path: [[], {}]}", ("models", "m", "path"), "expected a string, got [[], {}]"),
    ("{path: ./model, layer_prefix: [3]}", ("models", "m", "layer_prefix"),
     "expected a string, got [3]"),
    ("{hub: [org/name]}", ("models", "m", "hub"), 'expected a string, got ["org/name"]'),
    ("{hub: 5}", ("models", "m", "hub"), "'5' does not match"),  # 5 is read as a name
    ("{hub: org/name, revision: []}", ("models", "m", "revision"), "expected a string, got []"),
])
def test_schema_errors_in_model_sources_are_reported(tmp_path, source, where, message):
    text = solar_recipe().replace("models:\n", f"models:\n  m: {source}\n")
    with pytest.raises(RecipeErrors) as e:
        load_recipe(write_recipe(tmp_path, text))
    (err,) = e.value.errors
    assert err.key_path == where
    assert err.message.startswith(message)


@pytest.mark.parametrize(("name", "text", "where"), [
    # "\ud800" (valid JSON and YAML escape syntax) loaded as a lone surrogate; `plan` and `run`
    # then failed printing it or writing the model card: "internal error: UnicodeEncodeError"
    ("recipe.json", '{"recipekit": 1, "name": "up\\ud800", "models": {"tiny": "./model"}, '
     '"steps": [{"name": "up", "op": "layers", "from": "tiny", "layers": [0]}]}', ("name",)),
    ("recipe.yaml", solar_recipe('"./model\\uDC80"'), ("models", "tiny")),
    ("recipe.yaml", solar_recipe(output='  "\\uD83D\\uDE00": 1'), ("output", "\ud83d\ude00")),
])
def test_lone_surrogates_are_not_text(tmp_path, cli, name, text, where):
    path = write_recipe(tmp_path, text, name=name)
    with pytest.raises(RecipeErrors) as e:
        load_recipe(path)
    assert [x.key_path for x in e.value.errors] == [where]
    assert "lone UTF-16 surrogate" in e.value.errors[0].message
    result = cli("plan", path)
    assert result.exit_code == 2
    assert "internal error" not in result.output


def test_escaped_characters_outside_the_bmp_are_text(tmp_path):
    r = load_recipe(write_recipe(tmp_path, '{"recipekit": 1, "name": "\\ud83d\\ude00", '
                                 '"models": {"tiny": "./model"}, "output": {"model": "tiny"}}',
                                 name="recipe.json"))
    assert r.name == "\U0001f600"
    r = load_recipe(write_recipe(tmp_path, solar_recipe(output=None) + 'name: "\\U0001F600"\n'))
    assert r.name == "\U0001f600"


@pytest.mark.parametrize(("text", "where"), [
    # output.path "out\0x" loaded, and `run` then failed creating it: "internal error:
    # ValueError: embedded null byte"
    (solar_recipe(output='  path: "out\\0x"'), ("output", "path")),
    (solar_recipe('"./mo\\0del"'), ("models", "tiny")),
    (solar_recipe('{path: "./mo\\0del"}'), ("models", "tiny", "path")),
])
def test_paths_holding_nul_are_recipe_errors(tmp_path, cli, text, where):
    path = write_recipe(tmp_path, text)
    with pytest.raises(RecipeErrors) as e:
        load_recipe(path)
    assert [x.key_path for x in e.value.errors] == [where]
    assert "it holds a NUL character" in e.value.errors[0].message
    result = cli("run", "-q", path)
    assert result.exit_code == 2
    assert "internal error" not in result.output


def test_empty_ranges_with_a_negative_step_are_explained_as_such(tmp_path):
    # "range(0,5,-1)" was "empty (start 0 is past stop 5); did you mean range(5,0)?"
    with pytest.raises(RecipeErrors) as e:
        load_recipe(write_recipe(tmp_path, solar_recipe(layers='["range(0,5,-1)", "range(5,2)"]')))
    assert [x.message for x in e.value.errors] == [
        "'range(0,5,-1)' is empty (with a negative step, start 0 must be above stop 5)",
        "'range(5,2)' is empty (start 5 is past stop 2); did you mean range(2,5)?"]


@pytest.mark.parametrize(("scalar", "kind"), [
    # explicit tags the loader allows, on values their constructors cannot read: IndexError for
    # an empty !!float or !!int, KeyError for a !!bool that is no boolean
    ("!!float ''", "a number"), ("!!int ''", "a number"), ("!!float abc", "a number"),
    ("!!bool maybe", "a boolean"),
])
def test_explicitly_tagged_scalars_that_do_not_convert(tmp_path, scalar, kind):
    with pytest.raises(RecipeErrors) as e:
        load_recipe(write_recipe(tmp_path, solar_recipe(output=f"  dtype: {scalar}")))
    (err,) = e.value.errors
    assert err.message.startswith("invalid YAML: cannot read ")
    assert f"as {kind} (quote it to make it a string)" in err.message
    assert (err.location.line, err.location.column) == (10, 10)
