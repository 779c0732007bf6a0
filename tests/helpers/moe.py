"""MoE test fixtures: tiny dense models with a tokenizer (mergekit-moe loads one from the base),
running mergekit-moe 0.1.5 from its side venv, and mapping its fused expert layout onto the
per-expert one recipekit writes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import torch
import transformers as tf

from tests.helpers.builders import make_model, read_tensors
from tests.helpers.mergekit import MERGEKIT_VENV


def add_tokenizer(model_dir: Path, vocab_size: int = 128) -> Path:
    """Save a character-level tokenizer (<unk>, <s>, </s>, then printable characters) with the
    model, ids below ``vocab_size``, as mergekit-moe needs one from the base."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    chars = [chr(c) for c in range(32, 127)][: vocab_size - 3]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                      unk_token="<unk>")
    fast.save_pretrained(model_dir)
    return model_dir


def make_expert(family: str, out_dir: Path, *, seed: int, layers: int = 3, **kw: object) -> Path:
    """A tiny ``family`` model with a tokenizer."""
    return add_tokenizer(make_model(family, out_dir, layers=layers, seed=seed, **kw))


def make_qwen3(out_dir: Path, *, seed: int, layers: int = 3, **config_kw: object) -> Path:
    """A tiny Qwen3 (q/k norms, GQA, untied), which `builders.FAMILIES` does not hold."""
    torch.manual_seed(seed)
    config = tf.Qwen3Config(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=8, vocab_size=128,
                            max_position_embeddings=64, num_hidden_layers=layers,
                            tie_word_embeddings=False, **config_kw)
    model = tf.Qwen3ForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(out_dir)
    return add_tokenizer(Path(out_dir))


def run_mergekit_moe(config: Path, out: Path, cwd: Path, *extra: str, seed: int = 42) -> dict:
    """mergekit-moe ``config`` into ``out`` with ``--random-seed seed``, offline, on the CPU."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONHASHSEED="0",
               CUDA_VISIBLE_DEVICES="")
    env.pop("PYTHONPATH", None)
    done = subprocess.run([str(MERGEKIT_VENV / "bin" / "mergekit-moe"), str(config), str(out),
                           "--random-seed", str(seed), *extra], cwd=cwd, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise AssertionError(f"mergekit-moe failed on {config}:\n{done.stderr[-3000:]}")
    return read_tensors(out)


def unfuse_mergekit(tensors: dict) -> dict:
    """mergekit 0.1.5's fused Mixtral/Qwen3 experts (``mlp.experts.gate_up_proj`` (E, 2I, H),
    ``mlp.experts.down_proj`` (E, H, I)) as per-expert ``gate_proj``/``up_proj``/``down_proj``
    under ``mlp.experts.{e}.``; everything else as is."""
    out = {}
    for name, t in tensors.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            stem = name.removesuffix("gate_up_proj")
            half = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{stem}{e}.gate_proj.weight"] = t[e, :half]
                out[f"{stem}{e}.up_proj.weight"] = t[e, half:]
        elif name.endswith("mlp.experts.down_proj"):
            stem = name.removesuffix("down_proj")
            for e in range(t.shape[0]):
                out[f"{stem}{e}.down_proj.weight"] = t[e]
        else:
            out[name] = t
    return out


def mixtral_as_mlp(tensors: dict) -> dict:
    """Our Mixtral names (``block_sparse_moe.experts.{e}.w1|w3|w2``, ``block_sparse_moe.gate``)
    in the ``mlp.experts.{e}.{gate,up,down}_proj`` / ``mlp.gate`` spelling."""
    names = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
    out = {}
    for name, t in tensors.items():
        name = name.replace(".block_sparse_moe.", ".mlp.")
        for old, new in names.items():
            name = name.replace(f".{old}.weight", f".{new}.weight")
        out[name] = t
    return out
