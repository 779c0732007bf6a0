"""X-LoRA gate math against PEFT 0.21's own per-token transform
(`XLoraLayer.get_maybe_topk_scalings`) and against a direct mean."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from recipekit.ops.xlora import mean_gates, transform_gates


@pytest.mark.parametrize("top_k", [None, 1, 2, 4])
@pytest.mark.parametrize("softmax_topk", [False, True])
def test_transform_equals_peft(top_k, softmax_topk):
    from peft.tuners.xlora.layer import XLoraLayer

    torch.manual_seed(0)
    scalings = torch.softmax(torch.randn(3, 5, 6, 4, dtype=torch.float64), dim=-1)
    config = SimpleNamespace(top_k_lora=top_k, enable_softmax_topk=softmax_topk)
    for layer in range(6):
        peft_rows = XLoraLayer.get_maybe_topk_scalings(
            SimpleNamespace(layer_number=layer, config=config), scalings)
        ours = transform_gates(scalings[:, :, layer].numpy(), top_k=top_k,
                               softmax_topk=softmax_topk)
        assert np.abs(ours - peft_rows.numpy()).max() <= 1e-15


def test_mean_counts_every_token_once():
    rng = np.random.default_rng(0)
    chunks = [rng.random((2, 5, 3, 2)), rng.random((1, 7, 3, 2))]
    means, tokens = mean_gates(chunks)
    flat = np.concatenate([c.reshape(-1, 3, 2) for c in chunks])
    assert tokens == 17 and np.allclose(means, flat.mean(axis=0), rtol=0, atol=1e-15)
    with pytest.raises(ValueError):
        mean_gates([])
