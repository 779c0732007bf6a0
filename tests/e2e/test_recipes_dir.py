"""Every recipe under recipes/ validates (documents only, then with its inputs), runs end to end
on the tiny checkpoints committed beside it, verifies against its manifest, and loads in
transformers.

Found recursively (tiny checkpoints under recipes/models/ are inputs, not recipes); the count is
asserted so a recipe that stops being found fails here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers.recipes import ROOT

RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*")
                 if p.suffix in (".yaml", ".yml", ".json")
                 and "models" not in p.relative_to(ROOT / "recipes").parts)


def test_recipe_count():
    assert [p.relative_to(ROOT / "recipes").as_posix() for p in RECIPES] == [
        "alpha-grid.yaml", "classifier.yaml", "frankenmerge.yaml", "layer-removal.yaml",
        "lora-fold.yaml", "quickstart.json", "quickstart.yaml", "vcycle-1-coalesce.yaml",
        "vcycle-2-decoalesce-interpolate.yaml", "vocab-union.yaml"]


@pytest.fixture(scope="module")
def recipes_copy(tmp_path_factory) -> Path:
    """A copy of recipes/, so outputs land in a temp dir via the recipes' own relative paths."""
    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(ROOT / "recipes", root / "recipes")
    return root


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_validates_runs_and_loads(cli, recipes_copy, recipe):
    import transformers as tf

    copy = recipes_copy / "recipes" / recipe.relative_to(ROOT / "recipes")
    for check in (("validate", "--no-inputs"), ("validate",)):  # the hook's check, then all
        result = cli(*check, copy)
        assert result.exit_code == 0, result.output
    result = cli("run", copy, "-q")
    assert result.exit_code == 0, result.output
    out = Path(result.stdout.split("wrote ", 1)[1].split(":", 1)[0])
    out = out if out.is_absolute() else Path.cwd() / out
    assert out.is_relative_to(recipes_copy), out
    config = json.loads((out / "config.json").read_text())
    auto = (tf.AutoModelForSequenceClassification
            if config["architectures"][0].endswith("ForSequenceClassification")
            else tf.AutoModelForCausalLM)
    verified = cli("verify", out)  # shards, index, config and copied files match the manifest
    assert verified.exit_code == 0, verified.output
    model, info = auto.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    assert model.config.num_hidden_layers == config["num_hidden_layers"]
