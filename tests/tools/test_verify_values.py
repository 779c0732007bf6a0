"""`recipekit verify --stats`: every floating value read, non-finite tensors fail the check.

Oracles: an input with NaN and Inf planted in known tensors (copied bit-exactly into the output,
so the hashes match and only the values are wrong: the check must name those tensors and their
counts), and whole-tensor torch statistics for the per-tensor numbers of ``--json``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers.recipes import solar_recipe, write_recipe


def _run(cli, tmp_path: Path, model: Path) -> Path:
    shutil.copytree(model, tmp_path / "model")
    recipe = write_recipe(tmp_path, solar_recipe(output="  path: ./out\n  shard_size: 150KB"))
    assert cli("run", recipe, "-q").exit_code == 0
    return tmp_path / "out"


@pytest.fixture
def poisoned(tmp_path: Path, tiny_llama: Path) -> Path:
    """The tiny Llama with 3 NaN in layer 1's q_proj and 2 Inf in the final norm."""
    src = tmp_path / "src"
    shutil.copytree(tiny_llama, src)
    path = src / "model.safetensors"
    tensors = load_file(path)
    q = tensors["model.layers.1.self_attn.q_proj.weight"]
    q.view(-1)[[0, 7, 100]] = float("nan")
    tensors["model.norm.weight"][[1, 2]] = float("inf")
    save_file(tensors, path, metadata={"format": "pt"})
    return src


def test_clean_output_passes_with_statistics(cli, tmp_path, tiny_llama):
    out = _run(cli, tmp_path, tiny_llama)
    result = cli("verify", out, "--stats")
    assert result.exit_code == 0, result.stderr
    assert "floating tensors" in result.stdout and "all finite" in result.stdout


def test_json_statistics_match_torch(cli, tmp_path, tiny_llama):
    out = _run(cli, tmp_path, tiny_llama)
    doc = json.loads(cli("verify", out, "--stats", "--json").stdout)
    assert doc["verified"]
    name = "model.layers.3.mlp.down_proj.weight"
    shard = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"][name]
    t = load_file(out / shard)[name].double()
    got = doc["stats"][name]
    assert got["mean"] == pytest.approx(t.mean().item(), rel=1e-9, abs=1e-12)
    assert got["std"] == pytest.approx(t.std().item(), rel=1e-9)
    assert (got["min"], got["max"]) == (t.min().item(), t.max().item())
    assert len(doc["stats"]) == 12 * 9 + 3  # every floating tensor of the 12-layer output


def test_non_finite_tensors_fail_naming_them(cli, tmp_path, poisoned):
    out = _run(cli, tmp_path, poisoned)
    assert cli("verify", out).exit_code == 0  # the bytes are the ones written
    result = cli("verify", out, "--stats")
    assert result.exit_code == 1
    err = result.stderr
    # layer 1 of the input is output layer 1 and (second slice starts at 2) nowhere else
    assert "model.layers.1.self_attn.q_proj.weight (3 NaN, 0 Inf)" in err
    assert "model.norm.weight (0 NaN, 2 Inf)" in err
    assert "--check-finite" in err and "Traceback" not in err
    assert torch.isnan(load_file(tmp_path / "src" / "model.safetensors")[
        "model.layers.1.self_attn.q_proj.weight"]).sum() == 3
