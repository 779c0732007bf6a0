"""A tiny LLaVA made with transformers, shaped like mergekit's picoLLaVA test model
(tests/common.py `make_picoLlaVa`: a CLIP vision tower and a Llama, 2 layers each, so both
sub-configs hold the layer count 2)."""

from __future__ import annotations

from pathlib import Path

import torch


def make_tiny_llava(path: Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Save a picoLLaVA-shaped `LlavaForConditionalGeneration` with seeded weights to ``path``."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(image_size=32, patch_size=4, num_hidden_layers=2,
                              num_attention_heads=2, hidden_size=64, intermediate_size=128)
    text = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                       num_attention_heads=16, num_hidden_layers=2)
    model = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=vision, text_config=text, image_seq_length=64, image_token_index=63))
    with torch.no_grad():  # norms and biases start at 1 / 0: make every tensor distinct
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.to(dtype).save_pretrained(path, safe_serialization=True)
    return path


def llava_inputs() -> dict[str, torch.Tensor]:
    """A batch with 64 image tokens (one 32×32 image in 4×4 patches) and some text."""
    ids = torch.cat([torch.full((1, 64), 63), torch.arange(1, 9).unsqueeze(0)], dim=1)
    return {"input_ids": ids, "pixel_values": torch.randn(1, 3, 32, 32,
                                                          generator=torch.Generator().manual_seed(0))}
