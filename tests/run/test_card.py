"""run/card.py and what a finished output holds: ready to publish with `hf upload`.

Oracles: huggingface_hub's own card tools (`ModelCard`, `metadata_load`, `validate_repo_id`)
parse the written README.md; the Hub's pipeline tags; the output folder's files themselves
(no absolute path of the writer's machine in any text file, no run state), and
`recipekit run` again (a finished output is "already complete", `--force` replaces it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.helpers.adapter_builders import make_adapter
from tests.helpers.recipes import solar_recipe, write_recipe

huggingface_hub = pytest.importorskip("huggingface_hub")

#: The Hub's pipeline tags recipekit may write (a subset of huggingface.js's PIPELINE_DATA).
HUB_PIPELINES = {"text-generation", "text-classification", "token-classification",
                 "question-answering", "fill-mask", "image-classification",
                 "feature-extraction"}


def rel(path: Path, start: Path) -> str:
    """``path`` as a recipe in ``start`` names it: relative, so the recipe names no
    absolute path either."""
    return os.path.relpath(path, start)


def run_ok(cli, recipe: Path) -> Path:
    result = cli("run", recipe, "-q")
    assert result.exit_code == 0, result.output
    return recipe.parent / "out"


def card_of(out: Path):
    """The card as the Hub reads it; its metadata checked against the Hub's rules."""
    from huggingface_hub import ModelCard, metadata_load
    from huggingface_hub.utils import validate_repo_id

    card = ModelCard.load(out / "README.md")
    meta = metadata_load(out / "README.md")
    assert meta == card.data.to_dict()
    for repo in meta.get("base_model", []):
        validate_repo_id(repo)  # raises for a local path
    assert meta.get("pipeline_tag", "text-generation") in HUB_PIPELINES
    assert all(isinstance(t, str) for t in meta["tags"])
    return card, meta


def assert_publishable(out: Path, *secrets: Path) -> None:
    """No state or temp file, and no text file naming any of ``secrets`` (absolute paths)."""
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert not [n for n in names if Path(n).name.startswith(".")], names
    for p in out.rglob("*"):
        if p.is_file() and not p.name.endswith(".safetensors"):
            text = p.read_text(errors="replace")
            for s in secrets:
                assert str(s) not in text, f"{p.name} names {s}"


class TestCardMetadata:
    """Front matter per recipe kind, parsed with huggingface_hub."""

    def test_upscale(self, cli, tmp_path, tiny_llama):
        out = run_ok(cli, write_recipe(tmp_path, solar_recipe(rel(tiny_llama, tmp_path))))
        card, meta = card_of(out)
        assert meta == {"library_name": "transformers", "tags": ["recipekit", "upscale"],
                        "pipeline_tag": "text-generation"}
        assert f"- `tiny`: {rel(tiny_llama, tmp_path)}\n" in card.text
        assert_publishable(out, tmp_path, tiny_llama)

    def test_merge_lists_hub_inputs_it_used(self, cli, tmp_path, tiny_llama_b, hub_cache):
        """A Hub input is `base_model` (pinned in the body); a local one is named in the body
        only; an input no tensor or file came from is not listed at all."""
        out = run_ok(cli, write_recipe(tmp_path, f"""
            recipekit: 1
            models:
              a: {{hub: org/tiny}}
              b: {rel(tiny_llama_b, tmp_path)}
              unused: {{hub: org/tiny, revision: main}}
            steps:
              - name: merged
                op: merge
                method: linear
                from: [{{model: a, weight: 0.5}}, {{model: b, weight: 0.5}}]
            output:
              path: ./out
            """))
        card, meta = card_of(out)
        assert meta == {"library_name": "transformers", "base_model": ["org/tiny"],
                        "tags": ["recipekit", "merge"], "pipeline_tag": "text-generation"}
        assert "- `a`: org/tiny@main (commit `0123456789abcdef" in card.text
        assert f"- `b`: {rel(tiny_llama_b, tmp_path)}\n" in card.text
        assert "`unused`:" not in card.text
        manifest = json.loads((out / "recipekit.json").read_text())
        assert manifest["inputs"]["b"]["path"] == rel(tiny_llama_b, tmp_path)
        assert manifest["recipe_file"] == "../recipe.yaml"
        assert_publishable(out, tmp_path, tiny_llama_b, hub_cache)

    def test_frankenmerge_and_pruning(self, cli, tmp_path, tiny_llama, tiny_llama_b):
        a, b = rel(tiny_llama, tmp_path), rel(tiny_llama_b, tmp_path)
        out = run_ok(cli, write_recipe(tmp_path, f"""
            recipekit: 1
            models: {{a: {a}, b: {b}}}
            steps:
              - {{name: f, op: layers, from: a, layers: [{{from: a, range: [0, 4]}},
                                                        {{from: b, range: [4, 8]}}]}}
            output: {{path: ./out}}
            """))
        assert card_of(out)[1]["tags"] == ["recipekit", "frankenmerge"]
        pruned = tmp_path / "p"
        pruned.mkdir()
        out = run_ok(cli, write_recipe(pruned, solar_recipe(rel(tiny_llama, pruned),
                                                            '["range(0,6)"]')))
        assert card_of(out)[1]["tags"] == ["recipekit", "layer-pruning"]

    def test_lora_fold(self, cli, tmp_path, tiny_llama):
        make_adapter("llama", tiny_llama, tmp_path / "lora", r=2, target_modules=["q_proj"])
        out = run_ok(cli, write_recipe(tmp_path, f"""
            recipekit: 1
            models: {{tiny: {rel(tiny_llama, tmp_path)}}}
            adapters: {{style: ./lora}}
            steps:
              - {{name: folded, op: adapters, from: tiny, adapters: [{{use: style, weight: 0.8}}]}}
            output: {{path: ./out}}
            """))
        card, meta = card_of(out)
        assert meta["tags"] == ["recipekit", "lora"] and meta["library_name"] == "transformers"
        assert "- `style`: ./lora\n" in card.text
        assert_publishable(out, tmp_path, tiny_llama)

    def test_classifier(self, cli, tmp_path, tiny_llama):
        out = run_ok(cli, write_recipe(tmp_path, f"""
            recipekit: 1
            models: {{tiny: {rel(tiny_llama, tmp_path)}}}
            steps:
              - {{name: trimmed, op: layers, from: tiny, layers: ["range(0,8)"]}}
              - name: cls
                op: head
                from: trimmed
                labels: [negative, neutral, positive]
                pad_token_id: 2
            output: {{path: ./out}}
            """))
        card, meta = card_of(out)
        assert meta == {"library_name": "transformers", "tags": ["recipekit", "classifier"],
                        "pipeline_tag": "text-classification"}
        assert "## Labels\n\n- 0: negative\n- 1: neutral\n- 2: positive\n" in card.text

    def test_adapter_output(self, cli, tmp_path, tiny_llama):
        """PEFT wrote the absolute base path into each adapter's config: the output's
        adapter_config.json names no base rather than the writer's directory."""
        for name, seed in (("a", 0), ("b", 1)):
            make_adapter("llama", tiny_llama, tmp_path / name, seed=seed, r=2,
                         target_modules=["q_proj"], task_type="CAUSAL_LM")
        assert str(tiny_llama) in (tmp_path / "a" / "adapter_config.json").read_text()
        out = run_ok(cli, write_recipe(tmp_path, """
            recipekit: 1
            adapters: {a: ./a, b: ./b}
            steps:
              - {name: mix, op: combine_adapters, adapters: [a, {use: b, weight: 0.5}]}
            output: {path: ./out}
            """))
        _, meta = card_of(out)
        assert meta == {"library_name": "peft", "tags": ["recipekit", "lora"],
                        "pipeline_tag": "text-generation"}
        assert json.loads((out / "adapter_config.json").read_text())[
            "base_model_name_or_path"] is None
        assert_publishable(out, tmp_path, tiny_llama)

    def test_absolute_paths_in_the_recipe_are_warned_about(self, cli, tmp_path, tiny_llama):
        """The card quotes the recipe verbatim: a recipe naming absolute paths is told so."""
        result = cli("run", write_recipe(tmp_path, solar_recipe(tiny_llama)), "-q")
        assert result.exit_code == 0, result.output
        assert ("warning: the recipe names absolute local path(s) "
                f"({tiny_llama}); the model card and recipekit.json quote the recipe"
                ) in result.stderr

    def test_absolute_file_urls_are_warned_about(self, cli, tmp_path, tiny_llama):
        """``file:///abs`` is the absolute path /abs (README, "Object storage")."""
        url = f"file://{tiny_llama}"
        result = cli("run", write_recipe(tmp_path, solar_recipe(url)), "-q")
        assert result.exit_code == 0, result.output
        assert f"warning: the recipe names absolute local path(s) ({url})" in result.stderr


class TestFinishedOutputHoldsNoRunState:
    """The state file goes once the manifest is written; the manifest serves reruns."""

    def test_rerun_force_and_another_plan(self, cli, tmp_path, tiny_llama):
        r = write_recipe(tmp_path, solar_recipe(rel(tiny_llama, tmp_path)))
        out = run_ok(cli, r)
        assert not (out / ".recipekit-state.json").exists()
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        assert "already complete" in cli("run", r, "-q").stdout
        result = cli("run", r, "-q", "--force")
        assert result.exit_code == 0 and "already complete" not in result.stdout
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        other = write_recipe(tmp_path, solar_recipe(rel(tiny_llama, tmp_path),
                                                    '["range(0,8)"]'))
        refused = cli("run", other, "-q")
        assert refused.exit_code == 2 and "holds the output of a different plan" in (
            refused.stderr)
        assert {p.name for p in out.iterdir()} == set(before)
        replaced = cli("run", other, "-q", "--force")
        assert replaced.exit_code == 0, replaced.output
        assert not (out / ".recipekit-state.json").exists()
        assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 8

    def test_a_lost_shard_is_rewritten(self, cli, tmp_path, tiny_llama):
        r = write_recipe(tmp_path, solar_recipe(rel(tiny_llama, tmp_path),
                                                output="  path: ./out\n  shard_size: 100KB"))
        out = run_ok(cli, r)
        shard = sorted(out.glob("model-*.safetensors"))[1]
        data = shard.read_bytes()
        shard.unlink()
        result = cli("run", r, "-q")
        assert result.exit_code == 0 and "resumed" in result.stdout, result.output
        assert shard.read_bytes() == data
        assert not (out / ".recipekit-state.json").exists()

    def test_verify_finds_the_recipe_relative_to_the_output(self, cli, tmp_path, tiny_llama):
        out = run_ok(cli, write_recipe(tmp_path, solar_recipe(rel(tiny_llama, tmp_path))))
        result = cli("verify", out)
        assert result.exit_code == 0, result.output
        assert "still matches the recorded recipe" in result.stdout
