"""`recipekit diff`: a checkpoint against itself, a known perturbation, and a grown model.

Oracles: a model against itself (all zeros, cosine exactly 1), a tensor scaled by 2 (exactly:
max |a-b| = max |a|, relative norm 1), one element moved by a known amount, and torch's formulas
in fp64 on the loaded tensors.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers.builders import minilm, read_tensors
from tests.helpers.recipes import solar_recipe, write_recipe

Q = "model.layers.2.self_attn.q_proj.weight"
NORM = "model.norm.weight"


def diff_json(cli, a, b, status: int = 1) -> dict:
    """The JSON report; ``status`` is the exit status diff(1)-style: 0 same, 1 different."""
    result = cli("diff", a, b, "--json", "-q")
    assert result.exit_code == status, result.stderr
    return json.loads(result.stdout)


def test_real_minilm_against_itself(cli):
    report = diff_json(cli, minilm(), minilm(), status=0)
    assert report["comparable"] is True
    assert report["compared"] == report["identical"] == 104 and report["differing"] == 0
    assert report["summary"] == {"max_abs": 0.0, "mean_abs": 0.0, "rel_norm": 0.0,
                                 "cosine": 1.0, "nonfinite": 0, "equal": True}
    assert set(report["layers"]) == {"(outside layers)", *(f"encoder.layer.{i}" for i in range(6))}
    assert all(r["cosine"] == 1.0 and r["max_abs"] == 0.0 for r in report["tensor_list"])
    same = cli("diff", minilm(), minilm(), "-q")
    assert same.exit_code == 0 and "104 tensors compared: 104 identical, 0 differ" in same.stdout


def test_known_perturbation(cli, tmp_path, tiny_llama):
    tensors = read_tensors(tiny_llama)
    changed = dict(tensors)
    changed[Q] = tensors[Q] * 2
    changed[NORM] = tensors[NORM].clone()
    changed[NORM][5] += 0.25
    d = tmp_path / "changed"
    shutil.copytree(tiny_llama, d)
    save_file(changed, d / "model.safetensors", metadata={"format": "pt"})
    report = diff_json(cli, tiny_llama, d)
    assert report["differing"] == 2 and report["identical"] == len(tensors) - 2
    rows = {r["name"]: r for r in report["tensor_list"]}
    q = tensors[Q].double()
    assert rows[Q]["max_abs"] == float(q.abs().max())
    assert rows[Q]["mean_abs"] == pytest.approx(float(q.abs().mean()), rel=1e-12)
    assert rows[Q]["rel_norm"] == 1.0
    assert rows[Q]["cosine"] == pytest.approx(1.0, abs=1e-15)
    moved = float(changed[NORM][5].double() - tensors[NORM][5].double())
    assert moved == pytest.approx(0.25, abs=1e-6)
    n = tensors[NORM].double()
    assert rows[NORM]["max_abs"] == abs(moved)
    assert rows[NORM]["mean_abs"] == pytest.approx(abs(moved) / n.numel(), rel=1e-12)
    assert rows[NORM]["rel_norm"] == pytest.approx(abs(moved) / float(n.norm()), rel=1e-12)
    expect_cos = torch.nn.functional.cosine_similarity(n, changed[NORM].double(), dim=0)
    assert rows[NORM]["cosine"] == pytest.approx(float(expect_cos), rel=1e-12)
    # Per layer: only layer 2 differs; its rel norm is ‖Δq‖ / ‖layer 2‖.
    layer2 = torch.cat([t.double().reshape(-1) for k, t in tensors.items()
                        if k.startswith("model.layers.2.")])
    assert report["layers"]["model.layers.2"]["rel_norm"] == pytest.approx(
        float(q.norm() / layer2.norm()), rel=1e-12)
    assert all(v["max_abs"] == 0.0 for k, v in report["layers"].items()
               if k not in ("model.layers.2", "(outside layers)"))
    text = cli("diff", tiny_llama, d, "-q").stdout
    assert "largest relative differences:" in text and Q in text


def test_grown_model_lists_new_tensors(cli, tmp_path, tiny_llama):
    shutil.copytree(tiny_llama, tmp_path / "model")
    recipe = write_recipe(tmp_path, solar_recipe())
    assert cli("run", recipe, "-q").exit_code == 0
    report = diff_json(cli, tiny_llama, tmp_path / "out")
    assert report["only_in_a"] == []
    assert sorted({n.split(".")[2] for n in report["only_in_b"]}) == ["10", "11", "8", "9"]
    # Layers 0-5 were copied: identical; layer 6 now holds old layer 2.
    assert report["layers"]["model.layers.5"]["max_abs"] == 0.0
    assert report["layers"]["model.layers.6"]["max_abs"] > 0.0


def test_shape_mismatch_and_errors(cli, tmp_path):
    save_file({"w": torch.ones(2, 3)}, tmp_path / "a.safetensors")
    save_file({"w": torch.ones(3, 2)}, tmp_path / "b.safetensors")
    report = diff_json(cli, tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert report["shape_mismatch"] == [{"name": "w", "a": [2, 3], "b": [3, 2]}]
    (tmp_path / "c.safetensors").write_bytes(b"\x05")
    result = cli("diff", tmp_path / "a.safetensors", tmp_path / "c.safetensors")
    assert result.exit_code == 2  # diff(1)'s "trouble" (and found before tensor data)
    assert "c.safetensors: file is 1 bytes, shorter than a safetensors header" in result.stderr


def test_unrelated_models_are_nothing_comparable(cli, tmp_path):
    """Issue 17 item 12: no common tensor used to read `compared: 0`, cosine 1.0, rel norm 0 and
    exit 0. Oracle: there is nothing to measure, so every statistic is null and the exit is 1."""
    save_file({"w": torch.ones(2, 3)}, tmp_path / "a.safetensors")
    save_file({"v": torch.zeros(4)}, tmp_path / "b.safetensors")
    report = diff_json(cli, tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert report["comparable"] is False and report["compared"] == 0
    assert report["summary"] == {"max_abs": None, "mean_abs": None, "rel_norm": None,
                                 "cosine": None, "nonfinite": None, "equal": None}
    text = cli("diff", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "-q")
    assert text.exit_code == 1
    assert text.stdout.splitlines()[2:] == [
        "nothing comparable: no tensor has the same name and shape in both",
        "1 tensors only in a: w", "1 tensors only in b: v"]
    assert "cosine" not in text.stdout


def test_no_finite_pair_is_not_identical(cli, tmp_path):
    """An all-NaN tensor against finite values was reported with max |a-b| 0 and cosine 1
    (found by a black-box check): no pair was compared, so the statistics are null, beside a
    finite tensor whose numbers stand."""
    save_file({"w": torch.full((4, 4), float("nan")), "v": torch.ones(3)},
              tmp_path / "a.safetensors")
    save_file({"w": torch.randn(4, 4), "v": torch.full((3,), 2.0)}, tmp_path / "b.safetensors")
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    rows = {r["name"]: r for r in diff_json(cli, a, b)["tensor_list"]}
    assert {k: rows["w"][k] for k in ("max_abs", "mean_abs", "rel_norm", "cosine",
                                      "nonfinite")} == {
        "max_abs": None, "mean_abs": None, "rel_norm": None, "cosine": None, "nonfinite": 16}
    assert rows["v"]["max_abs"] == 1.0 and rows["v"]["cosine"] == 1.0
    text = cli("diff", a, b, "-q")
    assert text.exit_code == 1 and "Traceback" not in text.output
    assert "16 non-finite pairs skipped" in text.stdout


def test_exit_status_like_diff1(cli, tmp_path):
    """0 only when every tensor has an equal, same-shaped twin; an extra tensor is a difference."""
    save_file({"w": torch.ones(2, 3)}, tmp_path / "a.safetensors")
    save_file({"w": torch.ones(2, 3)}, tmp_path / "same.safetensors")
    save_file({"w": torch.ones(2, 3), "x": torch.ones(1)}, tmp_path / "more.safetensors")
    save_file({"w": torch.full((2, 3), 2.0)}, tmp_path / "other.safetensors")
    a = tmp_path / "a.safetensors"
    assert cli("diff", a, tmp_path / "same.safetensors", "-q").exit_code == 0
    assert cli("diff", a, tmp_path / "more.safetensors", "-q").exit_code == 1
    assert cli("diff", a, tmp_path / "other.safetensors", "-q").exit_code == 1
    assert cli("diff", a, tmp_path / "missing", "-q").exit_code == 2


def test_equal_non_finite_values_are_identical(cli, tmp_path):
    """A byte-identical copy of a checkpoint holding -inf (a mask buffer, an overflowed fp16
    weight) or NaN "differed", exit 1: pairs that are not both finite counted as differences
    (found by a black-box check). Equal non-finite pairs (NaN and NaN, the same infinity) are
    equal; NaN against Inf, or against a number, is not."""
    mask = torch.zeros(4, 4)
    mask[torch.triu(torch.ones(4, 4, dtype=torch.bool), 1)] = float("-inf")
    weight = torch.randn(3, 3)
    weight[1, 1] = float("nan")
    a = tmp_path / "a.safetensors"
    save_file({"mask": mask, "w": weight}, a)
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(a.read_bytes())
    report = diff_json(cli, a, copy, status=0)
    assert (report["identical"], report["differing"]) == (2, 0)
    assert all(r["equal"] for r in report["tensor_list"])
    assert report["summary"]["nonfinite"] == 7
    other = weight.clone()
    other[1, 1] = float("inf")
    save_file({"mask": mask.to(torch.bfloat16), "w": other}, tmp_path / "b.safetensors")
    rows = {r["name"]: r for r in diff_json(cli, a, tmp_path / "b.safetensors")["tensor_list"]}
    assert rows["mask"]["equal"] is True  # same values in another dtype
    assert rows["w"]["equal"] is False and rows["w"]["max_abs"] == 0.0


def test_integer_difference_beyond_fp64_precision(cli, tmp_path):
    """int64 values above 2^53 were compared through fp64, where 2^53 + 1 rounds to 2^53: a
    differing tensor was "identical", exit 0 (found by a black-box check)."""
    save_file({"ids": torch.tensor([2**53, 2**62, 7, -2**63])}, tmp_path / "a.safetensors")
    save_file({"ids": torch.tensor([2**53 + 1, 2**62 + 100, 7, 2**63 - 1])},
              tmp_path / "b.safetensors")
    (row,) = diff_json(cli, tmp_path / "a.safetensors", tmp_path / "b.safetensors")["tensor_list"]
    assert row["equal"] is False
    assert row["max_abs"] == float(2**64 - 1)  # -2^63 against 2^63 - 1, exact before rounding
    assert row["mean_abs"] == pytest.approx((1 + 100 + 0 + (2**64 - 1)) / 4, rel=1e-15)


def test_fp64_beyond_the_range_of_squares(cli, tmp_path):
    """fp64 values whose squares overflow (|x| > 1e154) or underflow (< 1e-162) gave a norm of
    inf or 0, std NaN, cosine 1 for opposite tensors, and `--json` an internal error (found by
    a black-box check). Oracle: the same numbers at a power-of-two scale where fp64 holds
    their squares (scaling by 2^k is exact)."""
    big = torch.tensor([1e200, -1e200, 3e200, 1.0], dtype=torch.float64)
    tiny = torch.tensor([1e-200, 2e-200, 3e-200], dtype=torch.float64)
    save_file({"big": big, "tiny": tiny}, tmp_path / "a.safetensors")
    save_file({"big": -big, "tiny": tiny * 1.1}, tmp_path / "b.safetensors")
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    rows = {r["name"]: r for r in diff_json(cli, a, b)["tensor_list"]}
    assert rows["big"]["cosine"] == -1.0 and rows["big"]["rel_norm"] == 2.0
    assert rows["big"]["max_abs"] == 6e200
    k = 2.0 ** 700
    x, y = tiny * k, tiny * 1.1 * k
    assert rows["tiny"]["rel_norm"] == pytest.approx(float((x - y).norm() / x.norm()), rel=1e-12)
    assert rows["tiny"]["cosine"] == pytest.approx(
        float(torch.nn.functional.cosine_similarity(x, y, dim=0)), rel=1e-12)
    result = cli("inspect", a, "--json", "-q")
    assert result.exit_code == 0, result.output
    assert "Warning" not in result.stderr
    stats = {t["name"]: t for t in json.loads(result.stdout)["tensor_list"]}
    assert stats["big"]["norm"] == pytest.approx(float((big / k).norm()) * k, rel=1e-12)
    assert stats["big"]["std"] == pytest.approx(float((big / k).std()) * k, rel=1e-12)
    assert stats["tiny"]["std"] == pytest.approx(float((tiny * k).std()) / k, rel=1e-12)
    assert stats["tiny"]["norm"] == pytest.approx(float((tiny * k).norm()) / k, rel=1e-12)


def test_hostile_tensor_names_are_escaped(cli, tmp_path):
    """Issue 17 item 13: a tensor name with an OSC title sequence and a newline is printed
    escaped (exactly), never raw."""
    evil = "w\x1b]0;pwned\x07\nforged"
    save_file({evil: torch.ones(2)}, tmp_path / "a.safetensors")
    save_file({evil: torch.ones(3)}, tmp_path / "b.safetensors")
    result = cli("diff", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "-q")
    assert result.exit_code == 1
    assert "\x1b" not in result.stdout and "\nforged" not in result.stdout
    assert "shape differs: w\\x1b]0;pwned\\x07\\nforged: [2] vs [3]" in result.stdout
