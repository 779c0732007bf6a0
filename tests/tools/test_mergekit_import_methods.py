"""`recipekit import-mergekit` on the merge methods added for issue 16 (`ram`, `ramplus_tl`,
`arcee_fusion`) and on mergekit's compute dtype (`dtype:`, issue 16 item 4): converted, run, and
compared with mergekit 0.1.5 run live on the same config.

Oracle: mergekit-yaml from the side venv (tests marked `mergekit`) on the tiny fp32 models of
tests/goldens/mergekit_import/models and their bf16 casts; the kernels' committed goldens
(tests/ops/test_ram.py, tests/ops/test_fusion.py) cover runs without it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from tests.helpers.builders import read_tensors
from tests.helpers.ties import (
    assert_equal_outside_band,
    compile_recipe,
    plan_bands,
    whole_tensor_merges,
)

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


#: mergekit's own `test_ties_merge` (tests/test_basic_merges.py: two models at weights 0.6 and
#: 0.4, density 0.3, `dtype: bfloat16`) and configs shaped like its examples/ties.yml
#: (gradients, a filter, int8_mask, normalize, `dtype: float16`), on bf16 models
DTYPE_CONFIGS = {
    "test_ties_merge": "models:\n  - model: a\n    parameters: {weight: 0.6}\n"
                       "  - model: b\n    parameters: {weight: 0.4}\nmerge_method: ties\n"
                       "base_model: c\nparameters: {density: 0.3}\ndtype: bfloat16\n",
    "ties_no_dtype": "models:\n  - model: a\n    parameters: {weight: 0.6}\n"
                     "  - model: b\n    parameters: {weight: 0.4}\nmerge_method: ties\n"
                     "base_model: c\nparameters: {density: 0.3}\n",
    "examples_ties": "models:\n  - model: a\n"
                     "    parameters: {density: [1, 0.7, 0.1], weight: 1.0}\n"
                     "  - model: b\n    parameters: {density: 0.5, weight: [0, 0.3, 0.7, 1]}\n"
                     "  - model: d\n    parameters:\n      density: 0.33\n      weight:\n"
                     "        - {filter: mlp, value: 0.5}\n        - {value: 0}\n"
                     "merge_method: ties\nbase_model: c\n"
                     "parameters: {normalize: true, int8_mask: true}\ndtype: float16\n",
    "dare_linear_bf16_out_fp32": "models:\n  - model: a\n"
                                 "    parameters: {weight: 0.6, density: 1.0}\n"
                                 "  - model: b\n    parameters: {weight: 0.3, density: 1.0}\n"
                                 "merge_method: dare_linear\nbase_model: c\n"
                                 "dtype: bfloat16\nout_dtype: float32\n",
    "linear_bf16": "models:\n  - model: a\n    parameters: {weight: 0.3}\n"
                   "  - model: b\n    parameters: {weight: 0.7}\nmerge_method: linear\n"
                   "dtype: bfloat16\n",
    "slerp_bf16_fp32_models": "models:\n  - model: fa\n  - model: fb\nmerge_method: slerp\n"
                              "base_model: fa\nparameters: {t: 0.35}\ndtype: bfloat16\n",
    "breadcrumbs_ties": "models:\n  - model: a\n    parameters: {weight: 0.5, density: 0.8}\n"
                        "  - model: b\n    parameters: {weight: 0.5, density: 0.6}\n"
                        "merge_method: breadcrumbs_ties\nbase_model: c\n"
                        "parameters: {gamma: 0.05}\n",
}


def bf16_models(root: Path) -> None:
    """The tiny models as bf16 (a, b, c, d), and two of them as fp32 (fa, fb)."""
    for name in "abcd":
        src = MODELS / "models" / name
        for dst, dtype in ((root / name, torch.bfloat16), (root / f"f{name}", torch.float32)):
            dst.mkdir(parents=True, exist_ok=True)
            (dst / "config.json").write_text((src / "config.json").read_text())
            tensors = {k: v.to(dtype).contiguous() for k, v in read_tensors(src).items()}
            save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})


def test_import_sets_the_compute_dtype(cli, tmp_path, monkeypatch):
    """`dtype: X` becomes `compute_dtype: X`; without `dtype`, `inputs` (mergekit then computes
    in the inputs' promoted dtype)."""
    bf16_models(tmp_path)
    monkeypatch.chdir(tmp_path)
    for stem, want in (("test_ties_merge", "bfloat16"), ("ties_no_dtype", "inputs"),
                       ("examples_ties", "float16")):
        (tmp_path / "mk.yml").write_text(DTYPE_CONFIGS[stem])
        result = cli("import-mergekit", "mk.yml", "-o", tmp_path / f"{stem}.yaml")
        assert result.exit_code == 0, result.output
        steps = yaml.safe_load((tmp_path / f"{stem}.yaml").read_text())["steps"]
        assert {s["compute_dtype"] for s in steps if s["op"] == "merge"} == {want}


@pytest.mark.mergekit
@pytest.mark.skipif(not MERGEKIT_YAML.exists(), reason="no mergekit side venv "
                    "(bash bench/setup_mergekit.sh, or set RECIPEKIT_MERGEKIT_VENV)")
@pytest.mark.parametrize("stem", list(DTYPE_CONFIGS))
def test_compute_dtype_reproduces_mergekit(cli, tmp_path, monkeypatch, stem):
    """Oracle: mergekit 0.1.5 on bf16 models computing in bf16/fp16: the converted recipe
    (`compute_dtype` as mergekit) gives the same bytes.

    Tie rule: bf16/fp16 task vectors often share the TIES/breadcrumbs cut-off magnitude across
    the cut; mergekit's non-stable sort keeps an arbitrary subset of those entries, recipekit
    the lowest flat indices. Such tensors equal mergekit's bytes outside the tie band
    (tests/helpers/ties.py; a minority of positions), and every tensor equals the
    whole-tensor kernels' (stable sorts, ops/sparsify.py) run of the same recipe."""
    bf16_models(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mk.yml").write_text(DTYPE_CONFIGS[stem])
    result = cli("import-mergekit", "mk.yml", "-o", tmp_path / "recipe.yaml")
    assert result.exit_code == 0, result.output
    result = cli("run", tmp_path / "recipe.yaml", "-q", "-o", tmp_path / "ours")
    assert result.exit_code == 0, result.output
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    subprocess.run([str(MERGEKIT_YAML), "mk.yml", str(tmp_path / "theirs"),
                    "--no-write-model-card"], check=True, cwd=tmp_path, env=env,
                   capture_output=True, timeout=300)
    ours, theirs = read_tensors(tmp_path / "ours"), read_tensors(tmp_path / "theirs")
    assert ours.keys() == theirs.keys()
    bands = {k: b for k, b in plan_bands(compile_recipe(tmp_path / "recipe.yaml")).items()
             if any(band.any() for band in b)}
    for k in bands:
        assert ours[k].dtype == theirs[k].dtype, k
        assert_equal_outside_band(ours[k], theirs[k], bands[k], what=k)
    bad = [k for k in ours if k not in bands and (ours[k].dtype != theirs[k].dtype
                                                  or not torch.equal(ours[k], theirs[k]))]
    assert not bad, [(k, ours[k].dtype, theirs[k].dtype,
                      (ours[k].double() - theirs[k].double()).abs().max().item()) for k in bad]
    if bands:  # the whole-tensor kernels (stable rule) on the same recipe: the same bytes
        with monkeypatch.context() as m:
            whole_tensor_merges(m)
            result = cli("run", tmp_path / "recipe.yaml", "-q", "-o", tmp_path / "whole")
        assert result.exit_code == 0, result.output
        whole = read_tensors(tmp_path / "whole")
        assert [k for k in ours if not torch.equal(ours[k], whole[k])] == []
