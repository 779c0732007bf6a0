"""`recipekit import-mergekit` on the merge methods added for issue 16 (`ram`, `ramplus_tl`,
`arcee_fusion`), converted, run, and compared with mergekit 0.1.5 run live on the same config.

Oracle: mergekit-yaml from the side venv (tests marked `mergekit`) on the tiny fp32 models of
tests/goldens/mergekit_import/models; the kernels' committed goldens (tests/ops/test_ram.py,
tests/ops/test_fusion.py) cover runs without it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers.builders import read_tensors

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "tests" / "goldens" / "mergekit_import"
MERGEKIT_VENV = Path(os.environ.get("RECIPEKIT_MERGEKIT_VENV", ROOT / "bench" / ".venv-mergekit"))
MERGEKIT_YAML = MERGEKIT_VENV / "bin" / "mergekit-yaml"

CONFIGS = {
    "ram": "models:\n  - model: models/a\n  - model: models/b\n  - model: models/d\n"
           "merge_method: ram\nbase_model: models/c\nparameters: {epsilon: 0.05}\n",
    "ramplus_tl": "models:\n  - model: models/a\n  - model: models/b\n  - model: models/d\n"
                  "merge_method: ramplus_tl\nbase_model: models/c\n"
                  "parameters: {epsilon: 0.08, r: 0.5, alpha: 0.6}\n",
    "arcee_fusion": "models:\n  - model: models/c\n  - model: models/a\n"
                    "merge_method: arcee_fusion\nbase_model: models/c\n",
}


def convert(cli, tmp_path: Path, config: str, monkeypatch) -> Path:
    monkeypatch.chdir(MODELS)  # mergekit resolves model paths against the working directory
    cfg = tmp_path / "mk.yml"
    cfg.write_text(config)
    recipe = tmp_path / "recipe.yaml"
    result = cli("import-mergekit", cfg, "-o", recipe)
    assert result.exit_code == 0, result.output
    return recipe


@pytest.mark.parametrize("method", list(CONFIGS))
def test_converted_to_a_merge_step(cli, tmp_path, monkeypatch, method):
    recipe = convert(cli, tmp_path, CONFIGS[method], monkeypatch)
    (step,) = yaml.safe_load(recipe.read_text())["steps"]
    assert step["method"] == method
    if method == "arcee_fusion":  # a two-model method: from: [base, other]
        assert [Path(m).name for m in step["from"]] == ["c", "a"] and "base" not in step
    else:
        assert Path(step["base"]).name == "c" and len(step["from"]) == 3
    assert cli("validate", recipe).exit_code == 0


@pytest.mark.mergekit
@pytest.mark.skipif(not MERGEKIT_YAML.exists(), reason="no mergekit side venv "
                    "(bash bench/setup_mergekit.sh, or set RECIPEKIT_MERGEKIT_VENV)")
@pytest.mark.parametrize("method", list(CONFIGS))
def test_same_bytes_as_mergekit(cli, tmp_path, monkeypatch, method):
    """fp32 models, no `dtype`: both compute in fp32, and every tensor is bit-identical."""
    recipe = convert(cli, tmp_path, CONFIGS[method], monkeypatch)
    result = cli("run", recipe, "-q", "-o", tmp_path / "ours")
    assert result.exit_code == 0, result.output
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    subprocess.run([str(MERGEKIT_YAML), str(tmp_path / "mk.yml"), str(tmp_path / "theirs"),
                    "--no-write-model-card"], check=True, cwd=MODELS, env=env,
                   capture_output=True, timeout=300)
    ours, theirs = read_tensors(tmp_path / "ours"), read_tensors(tmp_path / "theirs")
    assert ours.keys() == theirs.keys()
    changed = 0
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k
        changed += not torch.equal(ours[k], read_tensors(MODELS / "models" / "c")[k])
    assert changed > 10  # the merge did something
