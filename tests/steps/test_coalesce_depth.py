"""Depth-only `coalesce` averages each depth group's layers (issue 16 item 1).

Oracle: MLTF's depth map (reference/coalescing.md §1.2-1.3): small layer i is ``R · layers`` with
``R[i, j] = 1/|h_i|``, i.e. the mean of the large layers of group i; recipekit computes it in
fp32 and rounds once. The formula is evaluated here from the input tensors: for groups of two
``(a + b) / 2`` in fp32 is exact before the final rounding, so the comparison is bit for bit;
a group of three is compared with the float64 mean (within the fp32 sum's two roundings). The
models have DISTINCT layers (random weights per layer), unlike the round-trip tests whose group
members are identical copies and so could not tell "mean" from "first member".
"""

from __future__ import annotations

import re

import pytest
import torch

from tests.helpers.builders import make_model, read_tensors
from tests.steps.test_coalesce import assert_same_tensors, run, step, write

PREFIX = {"bert": "bert.encoder.layer.", "gpt2": "transformer.h.", "llama": "model.layers."}
CASES = [("bert", torch.float32), ("gpt2", torch.float32), ("llama", torch.float32),
         ("llama", torch.bfloat16)]


def _split(family: str, name: str) -> tuple[int, str] | None:
    hit = re.fullmatch(re.escape(PREFIX[family]) + r"(\d+)\.(.+)", name)
    return (int(hit.group(1)), hit.group(2)) if hit else None


@pytest.mark.parametrize(("family", "dtype"), CASES, ids=["bert", "gpt2", "llama", "llama-bf16"])
def test_depth_only_coalesce_is_the_group_mean(cli, tmp_path, family, dtype):
    big = make_model(family, tmp_path / "big", layers=4, seed=5, dtype=dtype)
    depth = [[0, 2], [1, 3]]
    small = run(cli, write(tmp_path, {"big": big}, [step("coalesce", "big", depth=depth)]))
    src, out = read_tensors(big), read_tensors(small)
    checked = 0
    for name, got in out.items():
        hit = _split(family, name)
        if hit is None:
            assert torch.equal(got, src[name]), name  # outside the layers: unchanged
            continue
        i, rel = hit
        members = [src[f"{PREFIX[family]}{j}.{rel}"] for j in depth[i]]
        assert got.dtype == members[0].dtype, name
        if not members[0].is_floating_point():
            assert torch.equal(got, members[0]), name  # integer buffers: group[0]'s
            continue
        assert not torch.equal(members[0], members[1]), name  # the layers really differ
        expected = ((members[0].float() + members[1].float()) / 2).to(dtype)
        assert torch.equal(got, expected), name
        checked += 1
    assert checked >= 2 * 6


def test_depth_group_of_three_is_the_mean(cli, tmp_path):
    big = make_model("llama", tmp_path / "big", layers=5, seed=6)
    depth = [[0, 3], [1, 2, 4]]
    small = run(cli, write(tmp_path, {"big": big}, [step("coalesce", "big", depth=depth)]))
    src, out = read_tensors(big), read_tensors(small)
    for name, got in out.items():
        hit = _split("llama", name)
        if hit is None:
            continue
        i, rel = hit
        members = torch.stack([src[f"model.layers.{j}.{rel}"].double() for j in depth[i]])
        expected = members.mean(0)
        bound = 2 * torch.finfo(torch.float32).eps * members.abs().amax(0)  # fp32 sum, divide
        assert ((got.double() - expected).abs() <= bound).all(), name
        assert not torch.equal(got, src[f"model.layers.{depth[i][0]}.{rel}"]), name


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_depth_only_round_trip_is_still_bit_exact(cli, tmp_path, family):
    small = make_model(family, tmp_path / "small", layers=3, seed=7)
    depth = [[0, 3], [1, 4], [2, 5]]
    big = run(cli, write(tmp_path, {"small": small}, [step("decoalesce", "small", depth=depth)],
                         "big", "d.yaml"))
    back = run(cli, write(tmp_path, {"big": big}, [step("coalesce", "big", depth=depth)],
                          "back", "c.yaml"))
    assert_same_tensors(small, back)
