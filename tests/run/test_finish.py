"""run/finish.py: what a run writes besides its shards.

Oracle: the output layout of DESIGN.md §4 (index only when sharded; an adapter directory has
adapter_config.json and no donor files).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from recipekit.run.finish import output_files


def plan(*shards: str, adapter: bool = False, files: dict | None = None) -> SimpleNamespace:
    return SimpleNamespace(shards=[SimpleNamespace(filename=s) for s in shards], adapter=adapter,
                           files=files or {})


def test_a_single_shard_has_no_index():
    assert output_files(plan("model.safetensors"), [Path("tokenizer.json")]) == [
        "model.safetensors", "config.json", "README.md", "tokenizer.json", "recipekit.json"]


def test_planned_files_add_to_and_leave_out_of_the_donors():
    """`Plan.files`: bytes for a donor file rewrite it, for a new file add it (after the
    donor's), None leaves a donor file out (the chat template's stale files)."""
    files = {"tokenizer_config.json": b"{}", "chat_template.jinja": b"T",
             "chat_template.json": None}
    donor = [Path("chat_template.json"), Path("tokenizer.json"), Path("tokenizer_config.json")]
    assert output_files(plan("model.safetensors", files=files), donor) == [
        "model.safetensors", "config.json", "README.md", "tokenizer.json",
        "tokenizer_config.json", "chat_template.jinja", "recipekit.json"]


def test_sharded_output_lists_its_index():
    files = output_files(plan("model-00001-of-00002.safetensors",
                              "model-00002-of-00002.safetensors"), [])
    assert "model.safetensors.index.json" in files


def test_an_adapter_output_has_its_config_and_no_donor_files():
    assert output_files(plan("adapter_model.safetensors", adapter=True), [Path("x.json")]) == [
        "adapter_model.safetensors", "adapter_config.json", "README.md", "recipekit.json"]
