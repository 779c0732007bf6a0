"""ops/forward.py: every layer's input, as transformers' ``output_hidden_states`` gives it."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from recipekit.ops.forward import decoder_layer, forward_spec, padded_mask, rotary_tables

SMALL = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
             head_dim=8, vocab_size=64, num_hidden_layers=3, max_position_embeddings=128)

#: family -> (config, model class): GQA everywhere, non-default rope_theta, Qwen2's q/k/v
#: biases, Qwen3's q/k norms, Mistral's sliding window shorter than the prompts, a llama3 rope.
CASES = {
    "llama": (tf.LlamaConfig(**SMALL, rope_parameters={"rope_type": "default",
                                                       "rope_theta": 5000.0}),
              tf.LlamaForCausalLM),
    "llama3_rope": (tf.LlamaConfig(**SMALL, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}), tf.LlamaForCausalLM),
    "mistral": (tf.MistralConfig(**SMALL, sliding_window=5, rope_theta=20000.0),
                tf.MistralForCausalLM),
    "qwen2": (tf.Qwen2Config(**SMALL, rope_theta=30000.0), tf.Qwen2ForCausalLM),
    "qwen3": (tf.Qwen3Config(**SMALL, rope_theta=40000.0), tf.Qwen3ForCausalLM),
}


def _model(name: str) -> tuple[tf.PreTrainedModel, dict[str, torch.Tensor]]:
    config, cls = CASES[name]
    torch.manual_seed(7)
    model = cls(config).eval()
    with torch.no_grad():  # non-trivial norms and biases
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model, model.state_dict()


def _layer(state: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    prefix = f"model.layers.{i}."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


class TestForwardMatchesTransformers:
    """Oracle: transformers 5 ``output_hidden_states`` (entry l = the input to decoder layer
    l), fp32, within 1e-5."""

    @pytest.mark.parametrize("name", list(CASES))
    def test_every_layer_input(self, name):
        model, state = _model(name)
        spec = forward_spec(model.config.to_dict())
        assert not isinstance(spec, str), spec
        ids = torch.tensor([[1, 5, 9, 3, 22, 40, 7, 7, 12, 2, 33]])
        with torch.no_grad():
            want = model(input_ids=ids, output_hidden_states=True).hidden_states
            h = state["model.embed_tokens.weight"][ids]
            rope = rotary_tables(spec, ids.shape[1])
            mask = padded_mask(torch.ones_like(ids, dtype=torch.bool), spec.sliding_window)
            for layer in range(model.config.num_hidden_layers):
                torch.testing.assert_close(h, want[layer], atol=1e-5, rtol=0)
                h = decoder_layer(h, _layer(state, layer), spec, rope, mask)

    @pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3"])
    def test_left_padded_batch(self, name):
        """Left pads masked as keys, positions 0..S-1 for every row, and a pad query gets a
        zero attention output (torch's SDPA, transformers' default attention)."""
        model, state = _model(name)
        spec = forward_spec(model.config.to_dict())
        ids = torch.tensor([[1, 1, 1, 4, 9, 11], [1, 8, 3, 5, 6, 2]])
        real = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=real.long(),
                         output_hidden_states=True).hidden_states
            h = state["model.embed_tokens.weight"][ids]
            rope = rotary_tables(spec, ids.shape[1])
            mask = padded_mask(real, spec.sliding_window)
            for layer in range(model.config.num_hidden_layers):
                torch.testing.assert_close(h, want[layer], atol=1e-5, rtol=0)
                h = decoder_layer(h, _layer(state, layer), spec, rope, mask)


class TestForwardSpec:
    """The configs the forward refuses, with the reason the step reports."""

    def test_refusals(self):
        base = CASES["llama"][0].to_dict()
        assert "model_type 'gemma' (it computes llama" in forward_spec(
            dict(base, model_type="gemma"))
        assert "rope_type 'yarn'" in forward_spec(
            dict(base, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}))
        assert "hidden_act 'gelu'" in forward_spec(dict(base, hidden_act="gelu"))
