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

import json
import re

import pytest
import torch
import transformers as tf

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


#: Sliding-window Qwen2 as older Hub configs write it: layers from `max_window_layers` on slide.
QWEN2_SW = dict(layers=6, use_sliding_window=True, max_window_layers=3, sliding_window=4)
DEPTH_MAPS = {"decoalesce": [[i, i + 6] for i in range(6)],  # 6 -> 12: the stack twice
              "coalesce": [[0, 1], [2], [3, 4], [5]]}  # 6 -> 4


def _qwen2_sw(path, *, listed: bool):
    """The sliding-window Qwen2, with `layer_types` in config.json or (older configs) without."""
    model = make_model("qwen2", path, seed=8, **QWEN2_SW)
    if not listed:
        config = json.loads((model / "config.json").read_text())
        del config["layer_types"]
        (model / "config.json").write_text(json.dumps(config))
    return model


def _logits(path) -> torch.Tensor:
    model = tf.Qwen2ForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # 12 tokens: longer than the sliding window (4)
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("op", list(DEPTH_MAPS))
def test_depth_maps_move_the_layer_kinds_transformers_derives(cli, tmp_path, op):
    """A config.json without `layer_types` (kinds derived by transformers from
    `max_window_layers`: fffsss) gave the output's layers the kinds derived for the NEW count
    (decoalesce: fffsssssssss, coalesce: fffs; found by a black-box check). Oracles: the kinds
    transformers derives for the source, moved with the layers, as AutoConfig reads the output;
    and the output of the same source with `layer_types` listed computes the same logits."""
    depth = DEPTH_MAPS[op]
    listed = _qwen2_sw(tmp_path / "listed", listed=True)
    derived = _qwen2_sw(tmp_path / "derived", listed=False)
    kinds = tf.AutoConfig.from_pretrained(derived).layer_types
    assert [k[0] for k in kinds] == list("fffsss")
    moved = ([kinds[group[0]] for group in depth] if op == "coalesce" else
             [kinds[i % 6] for i in range(12)])
    out = {}
    for name, src in (("listed", listed), ("derived", derived)):
        recipe = write(tmp_path, {"m": src}, [step(op, "m", depth=depth)], f"out-{name}",
                       f"{name}.yaml")
        out[name] = run(cli, recipe)
    assert tf.AutoConfig.from_pretrained(out["derived"]).layer_types == moved
    assert tf.AutoConfig.from_pretrained(out["listed"]).layer_types == moved
    assert torch.equal(_logits(out["derived"]), _logits(out["listed"]))


@pytest.mark.parametrize("listed", [True, False], ids=["listed", "derived"])
def test_depth_group_mixing_derived_kinds_is_refused(cli, tmp_path, listed):
    """Group [2, 3] merges a full-attention and a sliding layer: refused whether the kinds are
    listed in config.json or derived by transformers (the derived case was accepted)."""
    src = _qwen2_sw(tmp_path / "m", listed=listed)
    recipe = write(tmp_path, {"m": src}, [step("coalesce", "m", depth=[[0, 1], [2, 3], [4, 5]])])
    result = cli("run", recipe, "--no-fsync", "-q")
    assert result.exit_code == 2, result.output
    assert "depth group 1 [2, 3]" in result.output
    assert "different `layer_types` values ('full_attention', 'sliding_attention')" in result.output
