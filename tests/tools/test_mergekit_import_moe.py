"""`recipekit import-mergekit` on mergekit-moe configs: converted to one `op: moe` step.

Oracle: mergekit-moe 0.1.5 run on the same config (``--random-seed 0``, the converted recipe's
seed): every tensor of the converted recipe's output equals mergekit's (its fused experts
compared slice by slice); refusals name the key, as for merge configs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers.builders import read_tensors
from tests.helpers.mergekit import needs_mergekit
from tests.helpers.moe import make_expert, mixtral_as_mlp, run_mergekit_moe, unfuse_mergekit

CONFIG = """\
base_model: models/base
gate_mode: uniform_random
dtype: float32
experts_per_token: 1
experts:
  - source_model: models/a
    positive_prompts: ["def f(x):"]
  - source_model: models/b
    positive_prompts: ["once upon a time"]
    negative_prompts: ["import os"]
    residual_scale: 0.5
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mkmoe")
    for i, name in enumerate(("base", "a", "b")):
        make_expert("llama", root / "models" / name, seed=10 + i)
    return root


def convert(cli, root: Path, text: str, monkeypatch) -> tuple[object, Path]:
    monkeypatch.chdir(root)
    (root / "moe.yml").write_text(text)
    recipe = root / "moe.yaml"
    recipe.unlink(missing_ok=True)
    return cli("import-mergekit", "moe.yml", "-o", recipe), recipe


def test_converts_to_one_moe_step(cli, models, monkeypatch):
    result, recipe = convert(cli, models, CONFIG, monkeypatch)
    assert result.exit_code == 0, result.output
    text = recipe.read_text()
    assert text.startswith("# Converted by `recipekit import-mergekit moe.yml` (mergekit-moe)")
    doc = yaml.safe_load(text)
    assert doc["models"] == {"base": "./models/base", "a": "./models/a", "b": "./models/b"}
    assert doc["steps"] == [{
        "name": "moe", "op": "moe", "base": "base",
        "experts": [{"model": "a", "positive_prompts": ["def f(x):"]},
                    {"model": "b", "positive_prompts": ["once upon a time"],
                     "negative_prompts": ["import os"], "residual_scale": 0.5}],
        "gate_mode": "uniform_random", "experts_per_token": 1, "seed": 0}]
    assert doc["output"] == {"model": "moe", "dtype": "float32"}


@pytest.mark.parametrize("mode", ["cheap_embed", "hidden"])
def test_gate_modes_that_tokenise_prompts_convert(cli, models, monkeypatch, mode):
    """The converted recipe is checked by compiling it, and its moe step reads the base's
    tokenizer: those inputs were not resolved for the check, so every prompt-based config was
    refused with "no tokenizer found" (found by a black-box check)."""
    result, recipe = convert(cli, models, CONFIG.replace("uniform_random", mode), monkeypatch)
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(recipe.read_text())["steps"][0]["gate_mode"] == mode
    assert cli("validate", recipe).exit_code == 0


@needs_mergekit
def test_converted_recipe_equals_mergekit_moe(cli, models, monkeypatch, tmp_path):
    result, recipe = convert(cli, models, CONFIG, monkeypatch)
    assert result.exit_code == 0, result.output
    doc = yaml.safe_load(recipe.read_text())
    doc["output"]["path"] = str(tmp_path / "rk")
    recipe.write_text(yaml.safe_dump(doc, sort_keys=False))
    ran = cli("run", recipe, "-q", "--no-fsync")
    assert ran.exit_code == 0, ran.output
    assert_equals_mergekit_moe(tmp_path / "rk", models, tmp_path / "mk")


def assert_equals_mergekit_moe(ours_dir, models, mk_dir) -> None:
    """Every tensor of recipekit's output (Mixtral layout) bit-equal to mergekit-moe's, run on
    ``models``' moe.yml with seed 0."""
    ours = mixtral_as_mlp(read_tensors(ours_dir))
    theirs = unfuse_mergekit(run_mergekit_moe(models / "moe.yml", mk_dir, models, seed=0))
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name


DOLLARS = CONFIG.replace("uniform_random", "cheap_embed").replace(
    '["def f(x):"]', '["echo ${HOME}", "cost = $${price}", "$$$${"]')


def test_prompts_are_mergekits_text(cli, models, monkeypatch):
    """mergekit reads a prompt as is; a recipe substitutes `${name}` and reads `$${` as `${`.
    "echo ${HOME}" was refused (unknown variable) and "cost = $${price}" tokenised as
    "cost = ${price}" (routers 0.09 from mergekit's; found by a black-box check). Oracle: the
    recipe recipekit loads holds mergekit's text."""
    from recipekit.recipe import load_recipe

    result, recipe = convert(cli, models, DOLLARS, monkeypatch)
    assert result.exit_code == 0, result.output
    step = load_recipe(recipe).steps["moe"]
    assert step.spec["experts"][0]["positive_prompts"] == [
        "echo ${HOME}", "cost = $${price}", "$$$${"]


@needs_mergekit
def test_prompts_with_dollars_equal_mergekit_moe(cli, models, monkeypatch, tmp_path):
    result, recipe = convert(cli, models, DOLLARS, monkeypatch)
    assert result.exit_code == 0, result.output
    ran = cli("run", recipe, "-q", "--no-fsync", "-o", tmp_path / "rk")
    assert ran.exit_code == 0, ran.output
    assert_equals_mergekit_moe(tmp_path / "rk", models, tmp_path / "mk")


WHOLE_K = CONFIG.replace("experts_per_token: 1", "experts_per_token: 2.0")


def test_experts_per_token_written_as_a_whole_float_converts(cli, models, monkeypatch):
    """mergekit-moe (pydantic) reads `experts_per_token: 2.0` as 2; the import refused it
    ("mergekit-moe takes an integer"; found by a black-box check). It is written as 2; 2.5,
    which mergekit refuses too, stays refused."""
    result, recipe = convert(cli, models, WHOLE_K, monkeypatch)
    assert result.exit_code == 0, result.output
    k = yaml.safe_load(recipe.read_text())["steps"][0]["experts_per_token"]
    assert k == 2 and type(k) is int
    result, _ = convert(cli, models, WHOLE_K.replace("2.0", "2.5"), monkeypatch)
    assert result.exit_code == 2
    assert "experts_per_token is 2.5; mergekit-moe takes an integer" in result.stderr


@needs_mergekit
def test_experts_per_token_written_as_a_whole_float_equals_mergekit_moe(cli, models,
                                                                        monkeypatch, tmp_path):
    result, recipe = convert(cli, models, WHOLE_K, monkeypatch)
    assert result.exit_code == 0, result.output
    ran = cli("run", recipe, "-q", "--no-fsync", "-o", tmp_path / "rk")
    assert ran.exit_code == 0, ran.output
    assert_equals_mergekit_moe(tmp_path / "rk", models, tmp_path / "mk")
    for out in ("rk", "mk"):
        assert json.loads((tmp_path / out / "config.json").read_text())[
            "num_experts_per_tok"] == 2


@pytest.mark.parametrize("extra, message", [
    ("expert_per_token: 2\n", "expert_per_token: unknown mergekit-moe key `expert_per_token` "
     "(mergekit would silently ignore it); did you mean 'experts_per_token'?"),
    ("architecture: deepseek\n", "architecture: cannot convert the DeepSeek-MoE output"),
    ("architecture: gemma\n", "architecture: no mergekit-moe output architecture matches "
     "'gemma'"),
])
def test_what_cannot_be_converted_is_named(cli, models, monkeypatch, extra, message):
    result, _ = convert(cli, models, CONFIG + extra, monkeypatch)
    assert result.exit_code == 2, result.output
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.output


def test_wrong_types_are_located(cli, models, monkeypatch):
    """A list where a name belongs, a string where a number does: located, all reported."""
    text = CONFIG.replace("experts_per_token: 1", "experts_per_token: two").replace(
        "residual_scale: 0.5", "residual_scale: half").replace("uniform_random", "[random]")
    result, _ = convert(cli, models, text, monkeypatch)
    assert result.exit_code == 2, result.output
    assert "moe.yml:4:20: experts_per_token: experts_per_token is 'two'; mergekit-moe takes an " \
        "integer" in result.stderr
    assert "experts[1].residual_scale: `residual_scale` is a number, not 'half'" in result.stderr
    assert "gate_mode: cannot convert gate_mode ['random']" in result.stderr


def test_an_unknown_gate_mode_is_refused(cli, models, monkeypatch):
    result, _ = convert(cli, models, CONFIG.replace("uniform_random", "hidden_first"), monkeypatch)
    assert result.exit_code == 2
    assert "gate_mode: cannot convert gate_mode 'hidden_first'" in result.stderr


def test_mergekits_deepseek_choice_is_refused(cli, models, monkeypatch):
    text = CONFIG.replace("uniform_random", "random") + \
        "shared_experts:\n  - source_model: models/base\n"
    result, _ = convert(cli, models, text, monkeypatch)
    assert result.exit_code == 2, result.output
    assert "shared_experts: mergekit-moe builds a DeepSeek-MoE from these models" in \
        result.stderr
    fixed, recipe = convert(cli, models, text + "architecture: qwen\n", monkeypatch)
    assert fixed.exit_code == 0, fixed.output
    assert yaml.safe_load(recipe.read_text())["steps"][0]["architecture"] == "qwen2_moe"
