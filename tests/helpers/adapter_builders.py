"""Tiny PEFT LoRA adapters made with PEFT itself (the oracle), with every trainable tensor
perturbed so that B ≠ 0, DoRA magnitudes ≠ ‖W₀‖, saved copies ≠ the base."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.helpers.builders import load_model


def make_adapter(family: str, base: Path, out: Path, *, seed: int = 0, scale: float = 0.05,
                 **lora: object) -> Path:
    """Save a perturbed PEFT LoRA adapter of ``base`` with LoraConfig(**lora) to ``out``."""
    import peft

    model = load_model(family, base)
    torch.manual_seed(seed)
    pm = peft.get_peft_model(model, peft.LoraConfig(**lora))
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * scale)
    pm.save_pretrained(out)
    return out


def peft_model(family: str, base: Path, adapters: list[tuple[Path, float]]):
    """The base with the adapters loaded in order (names a0, a1, ...), all active, each
    adapter's scaling multiplied by its weight (PEFT's ``set_scale``)."""
    import peft
    from peft.tuners.lora import LoraLayer

    model = load_model(family, base)
    pm = peft.PeftModel.from_pretrained(model, adapters[0][0], adapter_name="a0")
    for i, (path, _) in enumerate(adapters[1:], 1):
        pm.load_adapter(path, adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(len(adapters))]
    pm.base_model.set_adapter(names)
    for module in pm.modules():
        if isinstance(module, LoraLayer):
            for name, (_, w) in zip(names, adapters, strict=True):
                if w != 1.0:
                    module.set_scale(name, w)
    pm.eval()
    return pm, names


def peft_merged(family: str, base: Path, adapters: list[tuple[Path, float]]):
    """(merged state dict, unmerged logits on a fixed batch) from PEFT."""
    pm, names = peft_model(family, base, adapters)
    ids = torch.arange(24).reshape(2, 12) % 100
    with torch.no_grad():
        logits = pm(input_ids=ids).logits
    merged = pm.merge_and_unload(adapter_names=names)
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}, logits
