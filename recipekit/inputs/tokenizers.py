"""A model input's tokenizer files, read for vocabulary alignment (a step's `tokenizer:` key).

Why here: only the inputs layer opens files. A step that aligns vocabularies needs, per model
input, the token → id map of its `tokenizer.json` (fast-tokenizer format, the one the
`tokenizers` library reads and writes), its added tokens with their flags, and the side files
that name token ids (`tokenizer_config.json`, `special_tokens_map.json`,
`generation_config.json`). They are read as plain JSON (the output is checked with `tokenizers`
when it is written, `steps.vocab_files`). Every file read here is a donor-type file of the
model directory, so `recipekit lock` already pins it and `run --frozen` refuses when it changed
(tools/lock.py `_files`); what the output tokenizer is built from enters the plan hash through
the files the plan writes (`Plan.plan_hash`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recipekit.errors import UnlocatedError
from recipekit.inputs.files import read_bounded
from recipekit.io.names import (
    ADAPTER_CONFIG,
    CHAT_TEMPLATE,
    GENERATION_CONFIG,
    SPECIAL_TOKENS_MAP,
    TOKENIZER_CONFIG,
    TOKENIZER_JSON,
)

#: Slow-tokenizer files: a directory with one of these and no tokenizer.json cannot be aligned.
SLOW_FILES = ("tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
              "sentencepiece.bpe.model")
#: A tokenizer.json larger than this is not one (large vocabularies are ~20 MB).
MAX_TOKENIZER = 512 * 1024 * 1024
#: Flags of an added token as tokenizer.json spells them (`tokenizers` 0.23).
ADDED_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")


class TokenizerError(UnlocatedError):
    """A model's tokenizer cannot be used for alignment; the step locates it at `tokenizer:`."""


@dataclass(frozen=True)
class ModelTokenizer:
    """A model input's fast tokenizer, parsed: the whole tokenizer.json, and the side files."""

    model: str  # the recipe's model name
    data: Mapping[str, Any]  # tokenizer.json
    config: Mapping[str, Any] | None = None  # tokenizer_config.json
    special_map: Mapping[str, Any] | None = None  # special_tokens_map.json
    generation: Mapping[str, Any] | None = None  # generation_config.json
    vocab: Mapping[str, int] = field(default_factory=dict)  # with added tokens
    #: chat_template.jinja's bytes: the template goes with the tokenizer (transformers reads
    #: it before tokenizer_config.json's `chat_template`)
    template: bytes | None = None

    @property
    def added(self) -> list[dict[str, Any]]:
        """The added tokens, by ascending id."""
        return sorted((dict(t) for t in self.data.get("added_tokens") or ()),
                      key=lambda t: int(t["id"]))

    @property
    def model_type(self) -> str | None:
        return (self.data.get("model") or {}).get("type")


def token_map(data: Mapping[str, Any]) -> dict[str, int]:
    """token → id: the model's vocabulary (a dict for BPE/WordPiece/WordLevel, a list of
    ``[piece, score]`` for Unigram), then the added tokens (an added token's id wins)."""
    model = data.get("model") or {}
    vocab = model.get("vocab")
    out: dict[str, int] = {}
    if isinstance(vocab, dict):
        out.update((str(k), int(v)) for k, v in vocab.items())
    elif isinstance(vocab, list):
        out.update((str(entry[0]), i) for i, entry in enumerate(vocab))
    for t in data.get("added_tokens") or ():
        out[str(t["content"])] = int(t["id"])
    return out


def _json(path: Path) -> Any:
    raw, size = read_bounded(path, MAX_TOKENIZER)
    if raw is None:
        raise TokenizerError(f"{path} is {size} bytes: too large for a tokenizer file")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path} is not valid JSON ({e})") from None


def _optional(directory: Path, name: str) -> Any:
    p = directory / name
    if not p.is_file():
        return None
    value = _json(p)
    return value if isinstance(value, dict) else None


def read_model_tokenizer(name: str, directory: Path) -> ModelTokenizer:
    """The tokenizer of the model input ``name`` stored in ``directory``.

    Raises:
        TokenizerError: no tokenizer.json (with the fix for a slow-tokenizer-only model), or
            one that cannot be read.
    """
    path = directory / TOKENIZER_JSON
    if not path.is_file():
        slow = [f for f in SLOW_FILES if (directory / f).is_file()]
        if slow:
            raise TokenizerError(
                f"model '{name}' has only a slow tokenizer ({slow[0]}, no {TOKENIZER_JSON}); "
                "aligning vocabularies reads the fast-tokenizer file: convert it once with "
                "transformers (`AutoTokenizer.from_pretrained(dir).save_pretrained(dir)` "
                f"writes {TOKENIZER_JSON}) and run again")
        raise TokenizerError(f"model '{name}' has no {TOKENIZER_JSON} in {directory}: aligning "
                             "vocabularies needs each model's tokenizer")
    data = _json(path)
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise TokenizerError(f"{path} is not a tokenizers file (no `model` object)")
    return ModelTokenizer(name, data, _optional(directory, TOKENIZER_CONFIG),
                          _optional(directory, SPECIAL_TOKENS_MAP),
                          _optional(directory, GENERATION_CONFIG), token_map(data),
                          _template(directory))


def _template(directory: Path) -> bytes | None:
    p = directory / CHAT_TEMPLATE
    if not p.is_file():
        return None
    raw, size = read_bounded(p, MAX_TOKENIZER)
    if raw is None:
        raise TokenizerError(f"{p} is {size} bytes: too large for a chat template")
    return raw


def read_tokenizers(sources: Mapping[str, Any]) -> dict[str, ModelTokenizer | TokenizerError]:
    """Every model input's tokenizer (or why it cannot be used), by recipe name: adapter inputs
    and inputs without a directory are left out."""
    out: dict[str, ModelTokenizer | TokenizerError] = {}
    for name, source in sources.items():
        directory = getattr(source, "path", None)
        if directory is None or getattr(source, "config_path", None) is None:
            continue
        if (Path(directory) / ADAPTER_CONFIG).is_file():
            continue
        try:
            out[name] = read_model_tokenizer(name, Path(directory))
        except (TokenizerError, OSError) as e:
            out[name] = e if isinstance(e, TokenizerError) else TokenizerError(str(e))
    return out
