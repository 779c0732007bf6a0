"""run/finish.py: what a run writes besides its shards.

Oracle: the output layout of DESIGN.md §4 (index only when sharded; an adapter directory has
adapter_config.json and no donor files).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from recipekit.run.finish import output_files


def plan(*shards: str, adapter: bool = False) -> SimpleNamespace:
    return SimpleNamespace(shards=[SimpleNamespace(filename=s) for s in shards], adapter=adapter,
                           files={}, omitted=frozenset())


def test_a_single_shard_has_no_index():
    assert output_files(plan("model.safetensors"), [Path("tokenizer.json")]) == [
        "model.safetensors", "config.json", "README.md", "tokenizer.json", "recipekit.json"]


def test_sharded_output_lists_its_index():
    files = output_files(plan("model-00001-of-00002.safetensors",
                              "model-00002-of-00002.safetensors"), [])
    assert "model.safetensors.index.json" in files


def test_an_adapter_output_has_its_config_and_no_donor_files():
    assert output_files(plan("adapter_model.safetensors", adapter=True), [Path("x.json")]) == [
        "adapter_model.safetensors", "adapter_config.json", "README.md", "recipekit.json"]
