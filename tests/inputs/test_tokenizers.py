"""Reading a model's tokenizer files (recipekit/inputs/tokenizers.py). Oracle: the files as
written, and `tokenizers`' own `get_vocab(with_added_tokens=True)` for the token map."""

from __future__ import annotations

import json

import pytest

from recipekit.inputs.tokenizers import TokenizerError, read_model_tokenizer, token_map


def test_token_map_equals_tokenizers_get_vocab():
    from tokenizers import Tokenizer

    data = {"version": "1.0", "model": {"type": "Unigram", "unk_id": 0,
                                        "vocab": [["<unk>", 0.0], ["a", -1.0], ["b", -2.0]]},
            "added_tokens": [{"id": 3, "content": "<x>", "single_word": False, "lstrip": False,
                              "rstrip": False, "normalized": False, "special": True}]}
    got = Tokenizer.from_str(json.dumps(data)).get_vocab(with_added_tokens=True)
    assert token_map(data) == got == {"<unk>": 0, "a": 1, "b": 2, "<x>": 3}


def test_reads_tokenizer_json_and_its_side_files(tmp_path):
    data = {"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}, "added_tokens": []}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    (tmp_path / "generation_config.json").write_text('{"bos_token_id": 0}')
    tok = read_model_tokenizer("m", tmp_path)
    assert tok.vocab == {"a": 0} and tok.generation == {"bos_token_id": 0}
    assert tok.config is None and tok.model_type == "BPE"


def test_a_slow_only_model_is_told_how_to_convert(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\0")
    with pytest.raises(TokenizerError, match=r"model 'm' has only a slow tokenizer "
                       r"\(tokenizer.model, no tokenizer.json\).*save_pretrained\(dir\)"):
        read_model_tokenizer("m", tmp_path)


def test_no_tokenizer_and_a_broken_one_are_errors(tmp_path):
    with pytest.raises(TokenizerError, match="model 'm' has no tokenizer.json"):
        read_model_tokenizer("m", tmp_path)
    (tmp_path / "tokenizer.json").write_text("{")
    with pytest.raises(TokenizerError, match="is not valid JSON"):
        read_model_tokenizer("m", tmp_path)
