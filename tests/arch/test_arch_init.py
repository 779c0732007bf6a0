"""arch/*.json `init` rules and `classifier` entries, checked against transformers itself.

Oracle: a freshly constructed transformers model of each family (its ``_init_weights``, with an
unusual ``initializer_range`` so the std is recognisable). Every tensor of its layers must be
what the family's first matching rule says: all ones, all zeros, a centred normal of the rule's
std, or (``keep``) a buffer. Names are those transformers saves (its in-memory names differ for
some families). The `classifier` class must exist in transformers and have a
bias-free ``score`` of shape [num_labels, hidden].
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers as tf

from recipekit.arch import load_architectures

from tests.helpers.builders import FAMILIES, LAYER_KEY, read_tensors

RANGE = 0.3  # far from every default (0.02), so a rule that falls back to a default shows up
LAYERS = 4


def fresh_model(family: str) -> torch.nn.Module:
    config_cls, model_cls, kwargs = FAMILIES[family]
    kwargs = dict(kwargs, initializer_range=RANGE, **{LAYER_KEY.get(family, "num_hidden_layers"):
                                                        LAYERS})
    # widen the layers a little so a normal's sample std is a tight estimate
    for key in ("hidden_size", "n_embd"):
        if key in kwargs:
            kwargs[key] = 64
    for key in ("intermediate_size", "n_inner"):
        if key in kwargs:
            kwargs[key] = 128
    torch.manual_seed(0)
    return model_cls(config_cls(**kwargs))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_init_rules_match_transformers(family, tmp_path):
    arch = load_architectures()[family]
    fresh_model(family).save_pretrained(tmp_path)  # on-disk names, which the rules match
    state = read_tensors(tmp_path)
    stack = next(b + arch.layer_stack + "." for b in arch.base_prefixes
                 if any(n.startswith(b + arch.layer_stack + ".") for n in state))
    checked = {"ones": 0, "zeros": 0, "normal": 0, "keep": 0}
    for name, t in state.items():
        if not name.startswith(stack):
            continue
        rule = arch.init_rule(name)
        kind = rule["init"]
        checked[kind] += 1
        if kind == "keep":
            continue  # a buffer (old GPT-2 files): passes through, nothing to compare
        if kind == "ones":
            assert torch.equal(t, torch.ones_like(t)), name
        elif kind == "zeros":
            assert torch.equal(t, torch.zeros_like(t)), name
        else:
            std = RANGE / math.sqrt(rule.get("std_over_sqrt_layers", 0) * LAYERS or 1)
            assert t.numel() >= 1024, name
            assert abs(t.float().std().item() / std - 1) < 0.1, (name, t.std().item(), std)
            assert abs(t.float().mean().item()) < 0.1 * std, name
    assert checked["normal"] and checked["ones"] + checked["zeros"], checked


def test_gemma_norms_are_zero_centred():
    """Gemma's RMSNorm scales by (1 + w): the init that acts as identity is w = 0."""
    for family in ("gemma", "gemma2"):
        assert load_architectures()[family].init_rule(
            "model.layers.0.pre_feedforward_layernorm.weight")["init"] == "zeros"


@pytest.mark.parametrize("family", sorted(f for f, a in load_architectures().items()
                                          if a.classifier))
def test_classifier_class_has_a_bias_free_score(family):
    arch = load_architectures()[family]
    config_cls, _, kwargs = FAMILIES[family]
    model = getattr(tf, arch.classifier["architecture"])(config_cls(**kwargs, num_labels=3))
    state = model.state_dict()
    weight = state[arch.classifier["weight"]]
    assert weight.shape == (3, kwargs.get("hidden_size", kwargs.get("n_embd")))
    assert arch.classifier["weight"].replace(".weight", ".bias") not in state
    assert arch.classifier["architecture"] in arch.architectures
