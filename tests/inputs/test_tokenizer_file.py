"""inputs/tokenizer_file.py: which model's tokenizer a step uses, and what is read of it."""

from __future__ import annotations

import json

import pytest

from recipekit.inputs.tokenizer_file import (
    TokenizerFileError,
    base_model_input,
    read_tokenizer_files,
)
from recipekit.recipe import load_recipe

from tests.helpers.recipes import write_recipe


class TestBaseModelInput:
    """A step's ``base`` is followed to a model input by the donor rule (DESIGN.md §3)."""

    def test_follows_steps(self, tmp_path, tiny_llama, tiny_llama_b):
        recipe = load_recipe(write_recipe(tmp_path, f"""
            recipekit: 1
            models:
              a: {tiny_llama}
              b: {tiny_llama_b}
            steps:
              - name: up
                op: layers
                from: b
                layers: ["range(0,4)"]
              - name: mixed
                op: interpolate
                from: [up, a]
                alpha: 0.5
            """))
        assert base_model_input(recipe, "a") == "a"
        assert base_model_input(recipe, "up") == "b"
        assert base_model_input(recipe, "mixed") == "b"
        assert base_model_input(recipe, "nope") is None


class TestReadTokenizerFiles:
    """The BOS/EOS texts come from tokenizer_config.json, else special_tokens_map.json
    (string or ``{"content": ...}``), as transformers reads them."""

    def test_special_tokens_map(self, tmp_path):
        (tmp_path / "tokenizer.json").write_text('{"model": {}}')
        (tmp_path / "special_tokens_map.json").write_text(json.dumps(
            {"bos_token": {"content": "<|begin|>", "lstrip": False}, "eos_token": "<|end|>"}))
        files, read = read_tokenizer_files("m", tmp_path)
        assert (files.bos_token, files.eos_token) == ("<|begin|>", "<|end|>")
        assert [p.name for p in read] == ["tokenizer.json", "special_tokens_map.json"]

    def test_missing(self, tmp_path):
        with pytest.raises(TokenizerFileError, match="the base model 'm' has no tokenizer.json"):
            read_tokenizer_files("m", tmp_path)
