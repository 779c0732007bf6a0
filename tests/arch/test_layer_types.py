"""`arch.layer_types`: the `layer_types` transformers derives for a config without them.

Oracle: transformers 5's own config classes, built from the same config.json values.
"""

from __future__ import annotations

import pytest

from recipekit.arch.layer_types import derived_layer_types

CASES = [
    ("gemma2", {}),
    ("gemma2", {"sliding_window_pattern": 3}),  # ignored by Gemma-2: every other layer
    ("gemma3_text", {}),
    ("gemma3_text", {"sliding_window_pattern": 3}),
    ("cohere2", {}),
    ("cohere2", {"sliding_window_pattern": 2}),
    ("qwen2", {}),  # no sliding window: every layer full
    ("qwen2", {"use_sliding_window": True, "max_window_layers": 3}),
    ("qwen3", {"use_sliding_window": True, "max_window_layers": 5, "sliding_window": 64}),
    ("qwen3", {"use_sliding_window": False, "max_window_layers": 2}),
]


@pytest.mark.parametrize("layers", [1, 4, 7, 12])
@pytest.mark.parametrize("model_type, extra", CASES)
def test_matches_transformers(model_type, extra, layers):
    from transformers import AutoConfig

    config = {"model_type": model_type, "num_hidden_layers": layers, **extra}
    want = AutoConfig.for_model(model_type, num_hidden_layers=layers, **extra).layer_types
    assert derived_layer_types(config, layers) == want


def test_a_listed_or_unknown_pattern_is_not_derived():
    assert derived_layer_types({"model_type": "gemma2", "layer_types": ["full_attention"]},
                               1) is None
    assert derived_layer_types({"model_type": "llama"}, 4) is None
