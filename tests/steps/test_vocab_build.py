"""The output vocabulary and row maps (recipekit/steps/vocab_build.py). Oracle: mergekit 0.1.5's
rules written out (reference tokenizers.md §2-3), with recipekit's deterministic union order."""

from __future__ import annotations

import pytest

from recipekit.inputs.tokenizers import ModelTokenizer, TokenizerError, token_map
from recipekit.steps.vocab_build import TokenRule, build_vocab, row_sources


def tok(name: str, vocab: list[str], added: list[tuple[str, bool]] = ()) -> ModelTokenizer:
    data = {"model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(vocab)},
                      "merges": [f"{vocab[0]} {vocab[-1]}"]},
            "added_tokens": [{"id": len(vocab) + i, "content": t, "single_word": False,
                              "lstrip": False, "rstrip": False, "normalized": not special,
                              "special": special} for i, (t, special) in enumerate(added)]}
    return ModelTokenizer(name, data, vocab=token_map(data))


def test_union_order_is_base_then_regular_tokens_by_model_and_id_then_added():
    base = tok("base", ["a", "b", "c"])
    x = tok("x", ["a", "z", "y", "b"], [("<x>", True)])
    y = tok("y", ["a", "w"], [("<x>", False), ("<y>", True)])
    out = build_vocab("union", "base", ["base", "x", "y"], {"base": base, "x": x, "y": y},
                      {"base": 3, "x": 5, "y": 4}, ["extra"])
    assert out.tokens == ("a", "b", "c", "z", "y", "w", "<x>", "<y>", "extra")
    added = {t["content"]: t for t in out.data["added_tokens"]}
    assert added["<x>"]["special"] is True  # the first definition wins
    assert added["z"]["normalized"] is True and added["z"]["special"] is False
    assert out.perms["x"] == (0, 3, -1, 1, 2, -1, 4, -1, -1)


def test_tokens_beyond_a_models_vocab_size_are_dropped_with_their_merges():
    base = tok("base", ["a", "b", "c"], [("<pad0>", True)])
    out = build_vocab("base", "base", ["base"], {"base": base}, {"base": 2}, [])
    assert out.tokens == ("a", "b")
    assert out.data["model"]["merges"] == [] and out.data["added_tokens"] == []


def test_rows_follow_mergekits_rules():
    base = tok("base", ["a", "b"])
    x = tok("x", ["a", "b", "s"])
    y = tok("y", ["a", "s", "t"])
    toks = {"base": base, "x": x, "y": y}
    out = build_vocab("union", "base", ["x", "y", "base"], toks, {"base": 2, "x": 3, "y": 3},
                      ["u"])
    assert out.tokens == ("a", "b", "s", "t", "u")
    rows, missing = row_sources(out, ["x", "y", "base"], "base",
                                {"a": TokenRule("x", force=True)}, toks)
    assert rows["y"] == [(("x", 0),),            # forced
                         (("base", 1),),         # b: the base holds it
                         (("y", 1),),            # own row
                         (("y", 2),),
                         ()]                     # u: in no model
    assert rows["base"][2] == (("x", 2), ("y", 1))  # s: the mean of its holders
    assert missing == ["u"]


def test_a_rule_naming_a_token_its_model_lacks_is_an_error():
    toks = {"base": tok("base", ["a", "b", "c"]), "x": tok("x", ["a", "b"])}
    out = build_vocab("base", "base", ["base", "x"], toks, {"base": 3, "x": 2}, [])
    with pytest.raises(TokenizerError, match="model 'x' has no token 'c'"):
        row_sources(out, ["base", "x"], None, {"c": TokenRule("x")}, toks)


def test_ids_with_holes_are_refused():
    data = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 2}, "merges": []}}
    holes = ModelTokenizer("h", data, vocab=token_map(data))
    with pytest.raises(TokenizerError, match="without holes"):
        build_vocab("base", "h", ["h"], {"h": holes}, {"h": 3}, [])
