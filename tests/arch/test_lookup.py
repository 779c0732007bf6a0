"""Architecture knowledge is family data: the JSON files answer what steps used to hard-code.

Oracle: transformers' own modules (GPT-2's `Conv1D` weights, `n_inner=None` meaning 4·n_embd,
the embedding tables each family registers) and a scan of the step modules' source.
"""

from __future__ import annotations

import ast
from pathlib import Path

import transformers as tf

import recipekit
from recipekit.arch import family_names, load_architectures

FAMILIES = {a.family for a in load_architectures().values()}


def test_gpt2_conv1d_weights_are_the_fan_in_fan_out_modules():
    model = tf.GPT2Model(tf.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16))
    conv1d = {n.split("h.0.", 1)[1] + ".weight" for n, m in model.named_modules()
              if isinstance(m, tf.pytorch_utils.Conv1D)}
    assert set(load_architectures()["gpt2"].fan_in_fan_out) == conv1d
    assert all(not a.fan_in_fan_out for a in load_architectures().values() if a.family != "gpt2")


def test_gpt2_null_n_inner_is_four_times_n_embd():
    gpt2, llama = load_architectures()["gpt2"], load_architectures()["llama"]
    assert gpt2.config_value({"n_embd": 24, "n_inner": None}, "intermediate_size") == 96
    assert gpt2.config_value({"n_embd": 24, "n_inner": 40}, "intermediate_size") == 40
    assert llama.config_value({"hidden_size": 24}, "intermediate_size") is None


def test_embedding_tables_are_what_transformers_registers_as_embeddings():
    import torch

    for family, model in {"gpt2": tf.GPT2Model(tf.GPT2Config(n_layer=1, n_embd=8, n_head=2)),
                          "llama": tf.LlamaModel(tf.LlamaConfig(
                              num_hidden_layers=1, hidden_size=8, num_attention_heads=2,
                              intermediate_size=16, vocab_size=16)),
                          "bert": tf.BertModel(tf.BertConfig(
                              num_hidden_layers=1, hidden_size=8, num_attention_heads=2,
                              intermediate_size=16, vocab_size=16))}.items():
        tables = {n + ".weight" for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Embedding)}
        assert set(family_names(family, "embeddings")) == tables, family


def test_an_unknown_family_gets_every_familys_names():
    union = family_names(None, "embeddings")
    assert {"embed_tokens.weight", "wte.weight", "embeddings.word_embeddings.weight"} <= set(union)
    assert set(family_names("llama", "vocabulary_tensors")) == {"embed_tokens.weight",
                                                                "lm_head.weight"}


def test_no_step_module_names_a_family():
    """Steps ask the family data; a family name written in a step is knowledge out of place."""
    steps = Path(recipekit.__file__).parent / "steps"
    for path in steps.glob("*.py"):
        literals = {n.value for n in ast.walk(ast.parse(path.read_text()))
                    if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        assert not literals & FAMILIES, (path.name, literals & FAMILIES)


def test_per_layer_lists_are_known_by_name_not_by_length():
    """A name-detected family (SmolLM3: no family file) still has its layer-indexed lists found
    (`no_rope_layers`, `layer_types`; transformers' SmolLM3Config gives each one entry per
    layer), while lists that merely have as many entries as layers (`architectures`,
    `eos_token_id` of a 1-layer stack) are left alone."""
    from recipekit.arch import find_layer_stack

    config = tf.SmolLM3Config(num_hidden_layers=1, no_rope_layer_interval=2).to_dict()
    config.update(architectures=["SmolLM3ForCausalLM"], eos_token_id=[2])
    assert len(config["no_rope_layers"]) == len(config["layer_types"]) == 1
    stack = find_layer_stack(config, ["model.embed_tokens.weight",
                                      "model.layers.0.mlp.up_proj.weight"])
    assert stack.family is None
    assert sorted(stack.per_layer_keys) == [("layer_types",), ("no_rope_layers",)]
