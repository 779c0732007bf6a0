"""The output vocabulary of a step that aligns vocabularies, and each input's row map into it.

Pure data (no torch, no files): mergekit 0.1.5's rules (`tokenizer/build.py`,
`tokenizer/embed.py`; reference tokenizers.md §2-3), with two deliberate differences that make
the result deterministic and refuse less:

* `union` appends the other models' regular-vocabulary tokens by model order, then by their
  original id (mergekit: in hash-map order, different on every run);
* every source tokenizer, not only the base's, loses the tokens at or beyond its model's
  vocab size (mergekit strips only the base and fails with `KeyError` on the others); a
  model's token at or beyond its vocab size is absent from that model.

Oracle: tests/steps/test_vocab.py compares the token → id map and every row with mergekit's
output on the models of its own `tests/test_tokenizer.py`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from recipekit.inputs.tokenizers import ADDED_FLAGS, ModelTokenizer, TokenizerError, token_map

log = logging.getLogger(__name__)

#: How the row of a token is made where a model lacks it (or for every model, with force):
#: ("rows", ((model, row), ...)) the mean of those rows (one: a copy); ("zero",).
Default = tuple[Any, ...]


@dataclass(frozen=True)
class TokenRule:
    """A `tokens:` entry: where a token's row comes from, and whether every model takes it."""

    model: str | None = None  # None: zeros
    token: str | None = None  # the model's row of this token (None: the same token)
    token_id: int | None = None  # or this row
    zero: bool = False
    force: bool = False


@dataclass(frozen=True)
class OutputVocab:
    """The output tokenizer (tokenizer.json as a dict), its tokens by id, and per input model
    the output row → input row map (-1: the model lacks the token)."""

    data: Mapping[str, Any]
    tokens: tuple[str, ...]
    perms: Mapping[str, tuple[int, ...]]

    @property
    def size(self) -> int:
        return len(self.tokens)


def _plain(content: str, token_id: int) -> dict[str, Any]:
    """An added token as `tokenizers`' ``add_tokens([str])`` makes it."""
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False,
            "rstrip": False, "normalized": True, "special": False}


def stripped(tok: ModelTokenizer, size: int) -> dict[str, Any]:
    """``tok``'s tokenizer.json without the tokens at or beyond ``size`` (padding entries such
    as `<UNUSED_0>`): added tokens dropped, BPE vocabulary entries and the merges naming them
    removed (mergekit `get_stripped_tokenizer`).

    Raises:
        TokenizerError: such tokens in the model vocabulary of a non-BPE tokenizer, or ids with
            holes (the output's new ids would collide, pitfall 7).
    """
    data = copy.deepcopy(dict(tok.data))
    data["added_tokens"] = [t for t in data.get("added_tokens") or () if int(t["id"]) < size]
    model = data["model"]
    vocab = model.get("vocab")
    if isinstance(vocab, dict) and any(int(i) >= size for i in vocab.values()):
        if model.get("type") != "BPE":
            raise TokenizerError(f"model '{tok.model}': its {model.get('type')} tokenizer has "
                                 f"tokens at or beyond its vocab size {size}; only BPE "
                                 "tokenizers can be trimmed to it")
        gone = {k for k, i in vocab.items() if int(i) >= size}
        model["vocab"] = {k: i for k, i in vocab.items() if k not in gone}

        def keep(m: Any) -> bool:
            parts = m.split(" ", 1) if isinstance(m, str) else list(m)
            return not any(p in gone for p in parts)
        model["merges"] = [m for m in model.get("merges") or () if keep(m)]
    elif isinstance(vocab, list) and len(vocab) > size:
        raise TokenizerError(f"model '{tok.model}': its Unigram tokenizer has tokens at or "
                             f"beyond its vocab size {size}; only BPE tokenizers can be "
                             "trimmed to it")
    ids = sorted(token_map(data).values())
    if ids != list(range(len(ids))):
        raise TokenizerError(f"model '{tok.model}': its tokenizer's ids are not 0..{len(ids) - 1}"
                             " without holes; new tokens could not get ids of their own")
    return data


def _regular(tok: ModelTokenizer) -> list[tuple[str, int]]:
    """The model vocabulary (not the added tokens), by id."""
    model = tok.data.get("model") or {}
    vocab = model.get("vocab")
    if isinstance(vocab, dict):
        return sorted(((str(k), int(v)) for k, v in vocab.items()), key=lambda kv: kv[1])
    if isinstance(vocab, list):
        return [(str(e[0]), i) for i, e in enumerate(vocab)]
    return []


def build_vocab(source: str, base: str, models: Sequence[str],
                tokenizers: Mapping[str, ModelTokenizer], sizes: Mapping[str, int],
                extra: Sequence[str]) -> OutputVocab:
    """The output vocabulary and the row maps.

    Args:
        source: ``union``, ``base`` or a model name (already resolved: ``base`` is ``base``).
        base: the tokenizer base (the step's base, or its first model).
        models: the step's models in merge order.
        tokenizers: each model's tokenizer; sizes: each model's vocab size (its table rows).
        extra: the `tokens:` keys, appended when absent (mergekit does the same).

    Raises:
        TokenizerError: a tokenizer that cannot be trimmed or has id holes.
    """
    start = base if source in ("union", "base") else source
    data = stripped(tokenizers[start], sizes[start])
    vocab = token_map(data)
    added = list(data.get("added_tokens") or ())

    def append(entry: dict[str, Any]) -> None:
        entry = dict(entry, id=len(vocab))
        vocab[entry["content"]] = entry["id"]
        added.append(entry)

    if source == "union":
        order = [base] + [m for m in models if m != base]
        first: dict[str, dict[str, Any]] = {}  # added tokens, first definition wins
        for m in order:
            for t in tokenizers[m].added:
                if int(t["id"]) < sizes[m]:
                    prev = first.setdefault(str(t["content"]), t)
                    if any(prev.get(f) != t.get(f) for f in ADDED_FLAGS):
                        log.warning("added token %r is defined with other flags in '%s': "
                                    "the first definition is kept", t["content"], m)
        for m in order[1:]:
            for token, i in _regular(tokenizers[m]):
                if i < sizes[m] and token not in vocab and token not in first:
                    append(_plain(token, 0))
        for content, t in first.items():
            if content not in vocab:
                append({k: t[k] for k in ("content", *ADDED_FLAGS) if k in t})
    for token in extra:
        if token not in vocab:
            append(_plain(token, 0))
    data["added_tokens"] = sorted(added, key=lambda t: int(t["id"]))
    tokens = [""] * len(vocab)
    for token, i in vocab.items():
        tokens[i] = token
    perms = {}
    for m in models:
        theirs = tokenizers[m].vocab
        perms[m] = tuple(theirs[t] if t in theirs and theirs[t] < sizes[m] else -1
                         for t in tokens)
    return OutputVocab(data, tuple(tokens), perms)


def row_sources(out: OutputVocab, models: Sequence[str], base: str | None,
                rules: Mapping[str, TokenRule], tokenizers: Mapping[str, ModelTokenizer],
                ) -> tuple[dict[str, list[tuple[tuple[str, int], ...]]], list[str]]:
    """Per model, each output row's sources (model, row) to average (one: a copy; none:
    zeros), by mergekit's rules: a model's own row where it has the token (unless `force`),
    else the token's stand-in: the only holder's row, the base's if it holds it, the mean of
    the holders' rows, zeros for a token no model holds, or the `tokens:` rule.

    Returns:
        (the rows by model, the tokens no model holds: a warning each).

    Raises:
        TokenizerError: a rule naming a token its model lacks.
    """
    missing: list[str] = []
    defaults: list[tuple[tuple[str, int], ...]] = []
    for i, token in enumerate(out.tokens):
        holders = [m for m in models if out.perms[m][i] >= 0]
        rule = rules.get(token)
        if rule is not None:
            defaults.append(_rule_rows(token, rule, out, i, tokenizers))
        elif len(holders) == 1:
            defaults.append(((holders[0], out.perms[holders[0]][i]),))
        elif not holders:
            missing.append(token)
            defaults.append(())
        elif base is not None and base in holders:
            defaults.append(((base, out.perms[base][i]),))
        else:
            defaults.append(tuple((m, out.perms[m][i]) for m in holders))
    rows: dict[str, list[tuple[tuple[str, int], ...]]] = {}
    for m in models:
        p = out.perms[m]
        rows[m] = [((m, p[i]),) if p[i] >= 0 and not (token in rules and rules[token].force)
                   else defaults[i] for i, token in enumerate(out.tokens)]
    return rows, missing


def _rule_rows(token: str, rule: TokenRule, out: OutputVocab, i: int,
               tokenizers: Mapping[str, ModelTokenizer]) -> tuple[tuple[str, int], ...]:
    if rule.zero or rule.model is None:
        return ()
    if rule.token_id is not None:
        return ((rule.model, rule.token_id),)
    if rule.token is not None:
        theirs = tokenizers[rule.model].vocab
        if rule.token not in theirs:
            raise TokenizerError(f"token {rule.token!r} is not in model '{rule.model}''s "
                                 "tokenizer")
        return ((rule.model, theirs[rule.token]),)
    row = out.perms[rule.model][i]
    if row < 0:
        raise TokenizerError(f"model '{rule.model}' has no token {token!r} to take its row "
                             "from; name another model, or `{model: m, token: t}`")
    return ((rule.model, row),)
