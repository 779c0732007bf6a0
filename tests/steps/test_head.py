"""The `head` op: causal LM -> sequence classifier, checked against transformers.

Oracles: ``AutoModelForSequenceClassification`` loads the output with no missing, unexpected or
mismatched key; its logits equal a hand computation of last-token pooling (the source causal
LM's final hidden state at each row's last non-pad token, times the score weight transposed);
the score weight is ``torch.normal`` from the (seed, "score.weight") generator; every body tensor
is bit-identical to the source; config.json is what transformers writes for a classifier.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import transformers as tf
import yaml

from recipekit.arch import load_architectures
from recipekit.ops.rng import tensor_generator

from tests.helpers.builders import make_model, read_tensors

CLASSIFIER_FAMILIES = sorted(f for f, a in load_architectures().items() if a.classifier)


def test_the_issue_families_are_covered():
    assert {"llama", "mistral", "gemma2"} <= set(CLASSIFIER_FAMILIES)


def head_recipe(directory: Path, model: Path, **head: object) -> Path:
    recipe = {"recipekit": 1, "models": {"src": str(model)},
              "steps": [{"name": "clf", "op": "head", "from": "src", **head}],
              "output": {"path": "out"}}
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_ok(cli, recipe: Path) -> Path:
    result = cli("run", recipe, "-q", "--no-fsync")
    assert result.exit_code == 0, result.output
    return recipe.parent / "out"


def load_classifier(out: Path) -> tf.PreTrainedModel:
    model, info = tf.AutoModelForSequenceClassification.from_pretrained(
        out, output_loading_info=True)
    assert not any(info.values()), info
    return model.eval()


def batch(pad: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Two right-padded rows and one full row, no real token equal to ``pad``."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab - 1, (3, 9), generator=g)
    ids[ids >= pad] += 1  # skip the pad id
    lengths = [5, 9, 2]
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, n:] = pad
        mask[row, :n] = 1
    return ids, mask, lengths


@pytest.mark.parametrize("family", CLASSIFIER_FAMILIES)
def test_logits_are_last_token_pooling_of_the_source(cli, tmp_path, family):
    src = make_model(family, tmp_path / "src", layers=2, seed=3)
    source_config = json.loads((src / "config.json").read_text())
    # GPT-2's eos 50256 is beyond the tiny vocab; the tiny Qwen2 has neither pad nor eos
    explicit = family in ("gpt2", "qwen2")
    extra = {"pad_token_id": 0} if explicit else {}
    out = run_ok(cli, head_recipe(tmp_path, src, labels=["neg", "neu", "pos"], seed=11,
                                  **extra))
    config = json.loads((out / "config.json").read_text())
    arch = load_architectures()[family]
    assert config["architectures"] == [arch.classifier["architecture"]]
    assert config["num_labels"] == 3
    assert config["id2label"] == {"0": "neg", "1": "neu", "2": "pos"}
    assert config["label2id"] == {"neg": 0, "neu": 1, "pos": 2}
    assert "problem_type" not in config

    pad = config["pad_token_id"]
    donor_pad = source_config.get("pad_token_id")
    assert pad == (0 if explicit else donor_pad if donor_pad is not None
                   else source_config["eos_token_id"])

    got = read_tensors(out)
    source = read_tensors(src)
    hidden = source_config.get("hidden_size", source_config.get("n_embd"))
    std = source_config.get("initializer_range", 0.02)
    want_score = torch.empty(3, hidden).normal_(0, std, generator=tensor_generator(11,
                                                                                  "score.weight"))
    assert torch.equal(got.pop("score.weight"), want_score)
    assert "lm_head.weight" not in got
    assert got.keys() == source.keys() - {"lm_head.weight"}
    for name, t in got.items():
        assert torch.equal(t, source[name]), name

    model = load_classifier(out)
    causal = tf.AutoModelForCausalLM.from_pretrained(src).eval()
    ids, mask, lengths = batch(pad, source_config["vocab_size"])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        states = causal.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert logits.shape == (3, 3)
    last = states[torch.arange(3), torch.tensor(lengths) - 1]
    torch.testing.assert_close(logits, last @ want_score.T, rtol=1e-5, atol=1e-6)


def test_init_zeros_and_copy_from_another_classifier(cli, tmp_path, tiny_llama):
    (tmp_path / "a").mkdir()
    first = run_ok(cli, head_recipe(tmp_path / "a", tiny_llama, labels=["x", "y"], seed=4))
    zeros = tmp_path / "z"
    zeros.mkdir()
    out = run_ok(cli, head_recipe(zeros, tiny_llama, num_labels=2, init="zeros"))
    assert torch.equal(read_tensors(out)["score.weight"], torch.zeros(2, 32))
    assert json.loads((out / "config.json").read_text())["id2label"] == {
        "0": "LABEL_0", "1": "LABEL_1"}

    copy = tmp_path / "c"
    copy.mkdir()
    recipe = {"recipekit": 1, "models": {"src": str(tiny_llama), "old": str(first)},
              "steps": [{"name": "clf", "op": "head", "from": "src", "init": {"from": "old"},
                         "problem_type": "multi_label_classification"}],
              "output": {"path": "out"}}
    (copy / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = run_ok(cli, copy / "recipe.yaml")
    assert torch.equal(read_tensors(out)["score.weight"], read_tensors(first)["score.weight"])
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "x", "1": "y"}  # taken with the head
    assert config["problem_type"] == "multi_label_classification"
    plan = cli("plan", copy / "recipe.yaml", "-v")
    assert "score.weight  F32[2, 32]  <- old:score.weight" in plan.stdout  # a Load: bit-exact


def test_problem_type_of_a_reheaded_classifier_is_dropped(cli, tmp_path, tiny_llama):
    (tmp_path / "a").mkdir()
    first = run_ok(cli, head_recipe(tmp_path / "a", tiny_llama, num_labels=2,
                                    problem_type="regression"))
    assert json.loads((first / "config.json").read_text())["problem_type"] == "regression"
    out = run_ok(cli, head_recipe(tmp_path, first, num_labels=4))
    config = json.loads((out / "config.json").read_text())
    assert "problem_type" not in config and config["num_labels"] == 4
    assert read_tensors(out)["score.weight"].shape == (4, 32)
    load_classifier(out)


def test_bare_base_model_layout_gets_the_family_prefix(cli, tmp_path):
    config = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=8, vocab_size=128,
                            num_hidden_layers=2, pad_token_id=0)
    torch.manual_seed(0)
    tf.LlamaModel(config).save_pretrained(tmp_path / "bare")
    out = run_ok(cli, head_recipe(tmp_path, tmp_path / "bare", num_labels=2))
    names = set(read_tensors(out))
    assert names - {"score.weight"} == {"model." + n for n in read_tensors(tmp_path / "bare")}
    model = load_classifier(out)
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight,
                       read_tensors(tmp_path / "bare")["layers.1.mlp.up_proj.weight"])


def test_bf16_score_is_the_fp32_draw_rounded_once(cli, tmp_path):
    src = make_model("llama", tmp_path / "src", layers=1, dtype=torch.bfloat16)
    out = run_ok(cli, head_recipe(tmp_path, src, num_labels=5))
    want = torch.empty(5, 32).normal_(0, 0.02, generator=tensor_generator(0, "score.weight"))
    assert torch.equal(read_tensors(out)["score.weight"], want.to(torch.bfloat16))


ERRORS = [
    ({"num_labels": 3, "labels": ["a", "b"]},
     "recipe.yaml:8:15: steps[0].num_labels: num_labels is 3 but `labels` names 2"),
    ({}, "recipe.yaml:5:3: steps[0]: the head op needs the number of classes"),
    ({"num_labels": 2, "pad_token_id": 500},
     "recipe.yaml:9:17: steps[0].pad_token_id: pad_token_id 500 is not below the vocabulary "
     "size 128"),
    ({"init": {"from": "src"}, "num_labels": 2},
     "recipe.yaml:9:11: steps[0].init.from: 'src' has no `score.weight` to copy"),
]


@pytest.mark.parametrize(("head", "message"), ERRORS)
def test_located_errors(cli, tmp_path, tiny_llama, head, message):
    recipe = head_recipe(tmp_path, tiny_llama, **head)
    result = cli("validate", recipe)
    assert result.exit_code == 2, result.output
    assert message in result.stderr.replace(str(tmp_path) + "/", ""), result.stderr


def test_copied_head_of_another_shape_is_a_located_error(cli, tmp_path, tiny_llama):
    (tmp_path / "a").mkdir()
    first = run_ok(cli, head_recipe(tmp_path / "a", tiny_llama, num_labels=2))
    recipe = {"recipekit": 1, "models": {"src": str(tiny_llama), "old": str(first)},
              "steps": [{"name": "clf", "op": "head", "from": "src", "init": {"from": "old"},
                         "num_labels": 3}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    result = cli("validate", tmp_path / "r.yaml")
    assert result.exit_code == 2
    assert ("steps[0].init.from: `score.weight` of 'old' is [2, 32], but this head needs "
            "[3, 32] ([num_labels, hidden])") in result.stderr


def test_family_without_a_score_head_is_refused(cli, tmp_path):
    src = make_model("bert", tmp_path / "bert", layers=1)
    result = cli("validate", head_recipe(tmp_path, src, num_labels=2))
    assert result.exit_code == 2
    assert "steps[0].from: 'src' is a bert model, which has no last-token `score` classifier" \
        in result.stderr
    assert "gemma2" in result.stderr


def test_init_from_as_a_bare_word_is_a_schema_error(cli, tmp_path, tiny_llama):
    result = cli("validate", head_recipe(tmp_path, tiny_llama, num_labels=2, init="from"))
    assert result.exit_code == 2
    assert ("recipe.yaml:9:9: steps[0].init: unknown value 'from'; allowed: normal, zeros; or "
            "`{from: <model>}` to copy that model's score weight") in result.stderr


def test_std_follows_initializer_range(cli, tmp_path):
    src = make_model("mistral", tmp_path / "src", layers=1, initializer_range=0.5)
    out = run_ok(cli, head_recipe(tmp_path, src, num_labels=64))
    w = read_tensors(out)["score.weight"]
    assert math.isclose(w.std().item(), 0.5, rel_tol=0.05)
