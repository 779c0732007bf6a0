"""The MLTF V-cycle as the two shipped recipes (recipes/vcycle-*.yaml).

Oracles: bit-exact comparisons. Step 1 (coalesce) reproduces the committed untrained small model
`recipes/models/tiny-llama-small`; step 2 (decoalesce + interpolate) at α = 0 returns the large
model bit for bit, at α = 1 the de-coalesced small model, and coalescing that again returns the
small model (coalesce ∘ decoalesce = identity).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers.builders import read_tensors
from tests.helpers.recipes import ROOT

RECIPES = ROOT / "recipes"


@pytest.fixture
def recipes(tmp_path: Path) -> Path:
    shutil.copytree(RECIPES, tmp_path / "recipes", ignore=shutil.ignore_patterns("out"))
    return tmp_path / "recipes"


def run(cli, recipe: Path, out: Path) -> Path:
    result = cli("run", recipe, "--no-fsync", "-q", "--output", out)
    assert result.exit_code == 0, result.output
    return out


def with_alpha(recipe: Path, alpha: float) -> Path:
    doc = yaml.safe_load(recipe.read_text())
    doc["steps"][1]["alpha"] = alpha
    path = recipe.with_name(f"alpha-{alpha}.yaml")
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_step_1_reproduces_the_committed_small_model(cli, recipes, tmp_path):
    out = run(cli, recipes / "vcycle-1-coalesce.yaml", tmp_path / "small")
    assert_equal(read_tensors(out), read_tensors(RECIPES / "models" / "tiny-llama-small"))


def test_step_2_alpha_0_returns_the_large_model_bit_exactly(cli, recipes, tmp_path):
    small = run(cli, recipes / "vcycle-1-coalesce.yaml", tmp_path / "small")
    step2 = recipes / "vcycle-2-decoalesce-interpolate.yaml"
    doc = yaml.safe_load(step2.read_text())
    doc["models"]["small"] = str(small)  # the untrained small model from step 1
    step2.write_text(yaml.safe_dump(doc, sort_keys=False))
    large = read_tensors(RECIPES / "models" / "tiny-llama")
    assert_equal(read_tensors(run(cli, with_alpha(step2, 0.0), tmp_path / "a0")), large)
    expanded = run(cli, with_alpha(step2, 1.0), tmp_path / "a1")
    half = read_tensors(run(cli, step2, tmp_path / "half"))
    assert any(not torch.equal(half[k], large[k]) for k in large)
    # α = 1 is the de-coalesced small model: coalescing it again returns the small model
    back = tmp_path / "back.yaml"
    doc1 = yaml.safe_load((recipes / "vcycle-1-coalesce.yaml").read_text())
    doc1["models"]["large"] = str(expanded)
    back.write_text(yaml.safe_dump(doc1, sort_keys=False))
    assert_equal(read_tensors(run(cli, back, tmp_path / "back")), read_tensors(small))
