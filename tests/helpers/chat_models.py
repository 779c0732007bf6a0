"""Tiny Llamas with tokenizers made as mergekit's tests make them (`tests/test_tokenizer.py`'s
`make_tokenizer`: a BPE vocabulary `<unk>, <s>, </s>, _tok_3..` without merges in a
`LlamaTokenizerFast`), with or without a chat template, for the chat template tests."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from tests.helpers.builders import make_model


def make_tokenizer(vocab_size: int = 64, added_tokens: list[str] | None = None):
    """mergekit's `make_tokenizer`, verbatim in behaviour."""
    import tokenizers
    from transformers import LlamaTokenizerFast

    tokens = (["<unk>", "<s>", "</s>"] + [f"_tok_{i}" for i in range(3, vocab_size)])[:vocab_size]
    vocab = dict(zip(tokens, range(vocab_size), strict=True))
    tok = tokenizers.Tokenizer.from_str(json.dumps({
        "version": "1.0", "model": {"type": "BPE", "vocab": vocab, "merges": []},
        "added_tokens": []}))
    with tempfile.TemporaryDirectory() as p:
        tok.save(os.path.join(p, "tokenizer.json"))
        res = LlamaTokenizerFast(tokenizer_file=os.path.join(p, "tokenizer.json"))
    res.add_tokens(added_tokens or [])
    return res


def make_chat_model(path: Path, *, seed: int = 0, tokenizer: bool = True,
                    template: str | None = None, in_config: bool = False) -> Path:
    """A 2-layer Llama (vocab 64) at ``path``; with a tokenizer, and with ``template`` as its
    chat template: saved by transformers 5 (chat_template.jinja), or with ``in_config`` as the
    older layout's `chat_template` key of tokenizer_config.json."""
    make_model("llama", path, layers=2, seed=seed, vocab_size=64)
    if tokenizer:
        tok = make_tokenizer()
        if template is not None and not in_config:
            tok.chat_template = template
        tok.save_pretrained(path)
        if template is not None and in_config:
            cfg = json.loads((path / "tokenizer_config.json").read_text())
            cfg["chat_template"] = template
            (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return path


#: Conversations rendered with each template: with and without a system message, ending on a
#: user turn (a generation prompt follows) or on an assistant turn.
CONVERSATIONS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}],
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}],
    [{"role": "user", "content": "  padded  "}],
]


def renderings(model_dir: Path) -> list[str]:
    """`AutoTokenizer.apply_chat_template` (text) on every conversation, with and without a
    generation prompt: what a user of the output sees."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=g)
            for c in CONVERSATIONS for g in (True, False)]
