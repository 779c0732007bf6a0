"""Tiny Llamas with differing tokenizers, made as mergekit's own tests make them
(`tests/common.py` `make_picollama`, `tests/test_tokenizer.py` `make_tokenizer`): a BPE
tokenizer over ``<unk>, <s>, </s>, _tok_3 ...`` in a `LlamaTokenizerFast`, plus added tokens."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch


def make_tokenizer(vocab_size: int, added_tokens: list) -> object:
    import tokenizers
    from transformers import LlamaTokenizerFast

    tokens = ["<unk>", "<s>", "</s>"] + [f"_tok_{i}" for i in range(3, vocab_size)]
    tokens = tokens[:vocab_size]
    data = {"version": "1.0", "model": {"type": "BPE", "vocab": dict(zip(tokens, range(vocab_size),
                                                                         strict=True)),
                                        "merges": []}, "added_tokens": []}
    tok = tokenizers.Tokenizer.from_str(json.dumps(data))
    with tempfile.TemporaryDirectory() as p:
        path = str(Path(p) / "tokenizer.json")
        tok.save(path)
        res = LlamaTokenizerFast(tokenizer_file=path)
    res.add_tokens(added_tokens)
    return res


def make_picollama(path: Path, vocab_size: int, seed: int, *, tied: bool = False) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48,
                      num_attention_heads=16, num_hidden_layers=2, tie_word_embeddings=tied)
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return path


def make_vocab_model(path: Path, *, rows: int, added: list, seed: int,
                     tied: bool = False) -> Path:
    """A picollama with ``rows`` vocabulary rows and a 64-token tokenizer plus ``added``."""
    make_picollama(path, rows, seed, tied=tied)
    make_tokenizer(64, added).save_pretrained(path)  # type: ignore[attr-defined]
    return path
