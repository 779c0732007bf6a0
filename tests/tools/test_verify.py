"""`recipekit verify`: an output against its manifest, and loading it with transformers / PEFT.

Oracles: outputs `run` wrote (they must verify), the same outputs with one byte changed, a file
truncated, an index made stale or an unlisted shard added (each must fail naming the file), and
transformers / PEFT loading the output and running a forward pass.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers.adapter_builders import make_adapter
from tests.helpers.builders import make_model, minilm
from tests.helpers.permissions import unreadable_dir
from tests.helpers.recipes import solar_recipe, write_recipe


@pytest.fixture
def sharded_out(cli, tmp_path, tiny_llama) -> Path:
    shutil.copytree(tiny_llama, tmp_path / "model")
    recipe = write_recipe(tmp_path, solar_recipe(output="  path: ./out\n  shard_size: 150KB"))
    assert cli("run", recipe, "-q").exit_code == 0
    out = tmp_path / "out"
    assert (out / "model.safetensors.index.json").is_file()
    return out


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def rehash(out: Path, rel: str) -> None:
    """Record ``rel``'s current size and sha256 in the manifest, as if it had been written so."""
    manifest = out / "recipekit.json"
    doc = json.loads(manifest.read_text())
    data = (out / rel).read_bytes()
    doc["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    manifest.write_text(json.dumps(doc))


class TestManifest:
    def test_fresh_output_verifies_and_loads(self, cli, sharded_out):
        result = cli("verify", sharded_out, "--load")
        assert result.exit_code == 0, result.stderr
        shards = sorted(p.name for p in sharded_out.glob("*.safetensors"))
        for s in shards:
            assert f"ok: {s}: " in result.stdout and "sha256 matches, header sound" in result.stdout
        assert "ok: model.safetensors.index.json: maps all 111 tensors" in result.stdout
        assert "ok: loaded LlamaForCausalLM (" in result.stdout
        assert result.stdout.rstrip().endswith("out: verified")

    def test_one_changed_byte_fails_naming_the_file(self, cli, sharded_out):
        shard = sorted(sharded_out.glob("model-*.safetensors"))[1]
        flip_byte(shard, shard.stat().st_size - 3)  # a data byte: the header stays sound
        result = cli("verify", sharded_out)
        assert result.exit_code == 1
        assert f"out/{shard.name}: sha256 " in result.stderr
        assert "differs from the manifest's" in result.stderr
        assert "1 problem(s) found" in result.stderr

    def test_truncated_and_extra_files(self, cli, sharded_out):
        shard = sorted(sharded_out.glob("model-*.safetensors"))[0]
        shard.write_bytes(shard.read_bytes()[:-8])
        shutil.copy(shard, sharded_out / "extra.safetensors")
        result = cli("verify", sharded_out)
        assert result.exit_code == 1
        assert f"{shard.name}: size is " in result.stderr
        assert "the manifest records" in result.stderr
        assert "extra.safetensors: extra.safetensors is not listed in recipekit.json" in \
            result.stderr

    def test_stale_index(self, cli, sharded_out):
        index = sharded_out / "model.safetensors.index.json"
        doc = json.loads(index.read_text())
        first = next(iter(doc["weight_map"]))
        shards = sorted(set(doc["weight_map"].values()))
        doc["weight_map"][first] = next(s for s in shards if s != doc["weight_map"][first])
        index.write_text(json.dumps(doc))
        result = cli("verify", sharded_out)
        assert result.exit_code == 1
        assert f"model.safetensors.index.json: maps tensor `{first}` to" in result.stderr

    def test_edited_manifest_hash(self, cli, sharded_out):
        manifest = sharded_out / "recipekit.json"
        doc = json.loads(manifest.read_text())
        doc["shards"][next(iter(doc["shards"]))]["sha256"] = "0" * 64
        manifest.write_text(json.dumps(doc))
        result = cli("verify", sharded_out)
        assert result.exit_code == 1 and "differs from the manifest's 0000" in result.stderr

    def test_not_an_output(self, cli, tmp_path, tiny_llama):
        assert cli("verify", tmp_path / "nope").exit_code == 2
        result = cli("verify", tiny_llama)
        assert result.exit_code == 2
        assert "is not a recipekit output (no recipekit.json)" in result.stderr
        (tmp_path / "partial").mkdir()
        (tmp_path / "partial" / ".recipekit-state.json").write_text("{}")
        result = cli("verify", tmp_path / "partial")
        assert result.exit_code == 1 and "did not finish" in result.stderr

    def test_load_refuses_unknown_architecture(self, cli, sharded_out):
        config = json.loads((sharded_out / "config.json").read_text())
        config["architectures"] = ["SomeRemoteCodeModel"]
        (sharded_out / "config.json").write_text(json.dumps(config))
        rehash(sharded_out, "config.json")  # the manifest agrees: only --load can object
        result = cli("verify", sharded_out, "--load")
        assert result.exit_code == 1
        assert "'SomeRemoteCodeModel' is not a transformers class" in result.stderr


    def test_load_without_transformers_says_what_to_install(self, cli, sharded_out,
                                                             monkeypatch):
        """recipekit does not depend on transformers: without it, `--load` is a usage error
        naming the package (it was an internal error), and nothing is changed."""
        import importlib.util

        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: None if name == "transformers" else real(name, *a))
        result = cli("verify", sharded_out, "--load")
        assert result.exit_code == 2
        assert result.stderr.startswith("--load loads the output with transformers, which is "
                                        "not installed"), result.stderr
        assert "pip install transformers" in result.stderr
        assert cli("verify", sharded_out).exit_code == 0

def _replace(path: Path, kind: str, elsewhere: Path) -> None:
    """Put a FIFO, a folder or a link out of the output where ``path`` was."""
    import os

    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dir":
        path.mkdir()
    else:
        path.symlink_to(elsewhere)


def test_an_unreadable_output_is_named(cli, sharded_out, monkeypatch):
    """An output directory this user cannot read: exit 2 naming it, as the inputs are named
    (it was an internal PermissionError on the state file)."""
    with unreadable_dir(sharded_out, monkeypatch):
        result = cli("verify", sharded_out)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"{sharded_out}: cannot read: Permission denied; ")


class TestUnsafeEntries:
    """A shard or file name that reading finds to be a FIFO, a folder or a link out of the
    output is a damaged output: exit 1 like every failed check (README), naming the file, and
    `verify` neither blocks nor follows the link."""

    @pytest.mark.parametrize("kind, what", [
        ("fifo", "is a named pipe, not a regular file"),
        ("dir", "is a directory, not a regular file"),
        ("link", "is a symlink to {target}, outside the model directory {out}"),
    ])
    @pytest.mark.parametrize("rel", ["model-00002-of-00004.safetensors", "config.json",
                                     "recipekit.json"])
    def test_fails_with_exit_1(self, cli, sharded_out, tmp_path, kind, what, rel):
        if kind == "fifo" and not hasattr(__import__("os"), "mkfifo"):
            pytest.skip("needs named pipes")
        target = tmp_path / "model" / "config.json"
        path = sharded_out / rel
        assert path.is_file()
        _replace(path, kind, target)
        result = cli("verify", sharded_out)
        assert result.exit_code == 1, result.output
        assert (f"{path}: {what.format(target=target, out=sharded_out)}; recipekit writes "
                "regular files; delete it and rerun `recipekit run` with the same recipe"
                ) in result.stderr


def test_real_minilm_layer_removal_verifies_and_runs(cli, tmp_path):
    recipe = write_recipe(tmp_path, f"""
        recipekit: 1
        models:
          minilm: {minilm()}
        steps:
          - name: short
            op: layers
            from: minilm
            layers: ["range(0,4)"]
        output:
          path: ./out
        """)
    assert cli("run", recipe, "-q").exit_code == 0
    result = cli("verify", tmp_path / "out", "--load")
    assert result.exit_code == 0, result.stderr
    assert "ok: loaded BertModel (" in result.stdout
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\ntags:\n- recipekit\n"
                           "- layer-pruning\n---\n")  # 4 of 6 layers kept; no merge


def test_adapter_output_loads_with_peft(cli, tmp_path, tiny_llama):
    a = make_adapter("llama", tiny_llama, tmp_path / "a", r=4, lora_alpha=8,
                     target_modules=["q_proj", "v_proj"])
    b = make_adapter("llama", tiny_llama, tmp_path / "b", seed=1, r=2, lora_alpha=2,
                     target_modules=["q_proj"])
    recipe = write_recipe(tmp_path, f"""
        recipekit: 1
        adapters:
          a: {a}
          b: {b}
        steps:
          - name: mix
            op: combine_adapters
            adapters: [a, {{use: b, weight: 0.5}}]
        output:
          path: ./out
        """)
    assert cli("run", recipe, "-q").exit_code == 0
    out = tmp_path / "out"
    result = cli("verify", out)
    assert result.exit_code == 0, result.stderr
    assert "`--load` loads it with PEFT on the base its adapter_config.json names" in (
        result.stdout)
    # the inputs' base_model_name_or_path (an absolute path PEFT recorded) is not copied into
    # a publishable output, so `--load` asks for the base
    result = cli("verify", out, "--load")
    assert result.exit_code == 2 and "--base MODEL_DIR" in result.stderr
    result = cli("verify", out, "--load", "--base", tiny_llama)
    assert result.exit_code == 0, result.stderr
    assert "ok: loaded PEFT adapter on LlamaForCausalLM" in result.stdout
    weights = out / "adapter_model.safetensors"
    flip_byte(weights, weights.stat().st_size - 1)
    result = cli("verify", out)
    assert result.exit_code == 1 and "adapter_model.safetensors: sha256" in result.stderr


def test_adapter_load_fails_when_tensors_reach_no_module(cli, tmp_path, tiny_llama):
    """An adapter of an 8-layer model loaded on a 2-layer base: PEFT wraps layers 0-1 and drops
    the other layers' tensors without a word, so `--load` fails naming how many reached no
    module (it said "verified": found by a black-box check). Oracle: PEFT's own count of the
    LoRA parameters it loaded."""
    import peft

    from tests.helpers.builders import load_model

    a = make_adapter("llama", tiny_llama, tmp_path / "a", r=2, lora_alpha=4,
                     target_modules=["q_proj", "v_proj"])
    short = make_model("llama", tmp_path / "short", layers=2, seed=0)
    recipe = write_recipe(tmp_path, f"""
        recipekit: 1
        adapters: {{a: {a}}}
        steps:
          - {{name: mix, op: combine_adapters, adapters: [a]}}
        output: {{path: ./out, adapter: {{method: cat}}}}
        """)
    assert cli("run", recipe, "-q").exit_code == 0
    out = tmp_path / "out"
    loaded = peft.PeftModel.from_pretrained(load_model("llama", short), out)
    assert sum("lora_" in n for n, _ in loaded.named_parameters()) == 8  # of 32: silently
    result = cli("verify", out, "--load", "--base", short)
    assert result.exit_code == 1, result.stdout
    assert ("24 of the adapter's 32 tensors match no module of the base "
            f"{short} (base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight, "
            "base_model.model.model.layers.2.self_attn.q_proj.lora_B.weight, "
            "base_model.model.model.layers.2.self_attn.v_proj.lora_A.weight, ...); PEFT loads "
            "the adapter without them; load it on the model it was made for: "
            "`--base MODEL_DIR`") in " ".join(result.stderr.split())
    assert "verified" not in result.stdout
    result = cli("verify", out, "--load", "--base", tiny_llama)
    assert result.exit_code == 0, result.stderr


class TestEveryFileIsHashed:
    """Issue 17 item 9: the manifest records the size and sha256 of every file of the output,
    not only the shards, and `verify` checks them: a changed `rope_theta`, a swapped tokenizer
    or an edited model card fail naming the file (exit 1)."""

    @pytest.fixture
    def out(self, cli, tmp_path, tiny_llama) -> Path:
        shutil.copytree(tiny_llama, tmp_path / "model")
        (tmp_path / "model" / "tokenizer_config.json").write_text('{"model_max_length": 8}')
        (tmp_path / "model" / "1_Pooling").mkdir()
        (tmp_path / "model" / "1_Pooling" / "config.json").write_text('{"pooling": "mean"}')
        recipe = write_recipe(tmp_path, solar_recipe(output="  path: ./out\n  shard_size: 150KB"))
        assert cli("run", recipe, "-q").exit_code == 0
        return tmp_path / "out"

    def test_the_manifest_lists_every_other_file(self, cli, out):
        files = json.loads((out / "recipekit.json").read_text())["files"]
        assert sorted(files) == ["1_Pooling/config.json", "README.md", "config.json",
                                 "generation_config.json", "model.safetensors.index.json",
                                 "tokenizer_config.json"]
        for rel, entry in files.items():
            data = (out / rel).read_bytes()
            assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        result = cli("verify", out)
        assert result.exit_code == 0, result.stderr
        assert "ok: 6 other files: sizes and sha256 match" in result.stdout

    @pytest.mark.parametrize("rel", ["config.json", "tokenizer_config.json", "README.md",
                                     "generation_config.json",
                                     "1_Pooling/config.json", "model.safetensors.index.json"])
    def test_a_changed_file_fails_naming_it(self, cli, out, rel):
        path = out / rel
        before = path.read_text()
        if rel == "config.json":  # same size: a changed rope_theta
            path.write_text(before.replace('"rope_theta": 10000.0', '"rope_theta": 50000.0'))
        else:
            path.write_text(before + " ")
        assert path.read_text() != before
        result = cli("verify", out)
        assert result.exit_code == 1
        assert f"{path}: size " in result.stderr and ": the manifest records " in result.stderr
        assert "the file changed after it was written" in result.stderr

    def test_a_missing_file_fails(self, cli, out):
        (out / "tokenizer_config.json").unlink()
        result = cli("verify", out)
        assert result.exit_code == 1
        assert f"{out / 'tokenizer_config.json'}: is listed in recipekit.json but missing" in \
            result.stderr

    def test_an_older_manifest_is_noted(self, cli, out):
        manifest = out / "recipekit.json"
        doc = json.loads(manifest.read_text())
        del doc["files"]
        manifest.write_text(json.dumps(doc))
        result = cli("verify", out)
        assert result.exit_code == 0, result.stderr
        assert "records no hashes of the output's other files" in result.stdout + result.stderr


def test_adapter_load_fails_when_merging_changes_its_outputs(cli, tmp_path):
    """An embedding LoRA on a model with tied embeddings: PEFT applies it to the input lookup
    alone unmerged, and to the shared table (so the head too) after `merge_and_unload`, so
    one of the two is wrong (the layout `extract_lora` once wrote; found by a black-box
    check). `--load` compares the merged outputs with the unmerged ones. Oracle: the same
    change with the table saved whole (modules_to_save for both modules) verifies."""
    from safetensors.torch import save_file

    base = make_model("qwen2", tmp_path / "base", layers=2, seed=3)
    g = torch.Generator().manual_seed(4)
    common = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 2}
    layouts = {
        "bad": ({"target_modules": ["model.embed_tokens"]},
                {"model.embed_tokens.lora_embedding_A": torch.randn(2, 128, generator=g),
                 "model.embed_tokens.lora_embedding_B": torch.randn(32, 2, generator=g)}),
        "good": ({"target_modules": "dummy-target-modules",
                  "modules_to_save": ["model.embed_tokens", "lm_head"]},
                 {"model.embed_tokens.weight": (table := torch.randn(128, 32, generator=g)),
                  "lm_head.weight": table.clone()}),
    }
    results = {}
    for name, (config, tensors) in layouts.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps(dict(common, **config)))
        save_file({f"base_model.model.{k}": v for k, v in tensors.items()},
                  tmp_path / name / "adapter_model.safetensors")
        recipe = write_recipe(tmp_path, f"""
            recipekit: 1
            adapters: {{a: ./{name}}}
            steps: [{{name: mix, op: combine_adapters, adapters: [a]}}]
            output: {{path: ./out_{name}}}
            """, name=f"{name}.yaml")
        assert cli("run", recipe, "-q").exit_code == 0
        results[name] = cli("verify", tmp_path / f"out_{name}", "--load", "--base", base)
    assert results["bad"].exit_code == 1, results["bad"].output
    assert ("out_bad: the adapter's forward pass differs unmerged and merged (relative "
            "difference ") in results["bad"].stderr
    assert ("PEFT applies it one way unmerged and another after `merge_and_unload`; an "
            "embedding LoRA on a model with tied embeddings does this; save the embedding and "
            "head whole (modules_to_save) instead") in results["bad"].stderr
    assert results["good"].exit_code == 0, results["good"].output
    assert "; merged, the same to 0" in results["good"].stdout


def test_a_manifest_recording_a_whole_number_float_seed_verifies(cli, tmp_path, tiny_llama,
                                                                 tiny_llama_b):
    """An output of an older recipekit, which ran `seed: 3.0` and recorded it so, failed
    `verify` once recipes took integers as ints only ("the recorded recipe is not valid:
    steps[0].seed: 3.0 is not of type 'integer'; the manifest was edited"; found by a
    black-box check). The recorded recipe is checked with JSON Schema's own `integer` (which
    admits 3.0): the manifest is built as that version wrote it, from a fresh output (verify
    hashes the files, not the recorded recipe)."""
    recipe = write_recipe(tmp_path, f"""
        recipekit: 1
        models: {{a: {tiny_llama}, b: {tiny_llama_b}}}
        steps:
          - {{name: s, op: merge, method: dare_linear, base: a, from: [b], seed: 3,
              parameters: {{density: 0.5, weight: 1.0}}}}
        output: {{path: ./out}}
        """)
    assert cli("run", recipe, "-q").exit_code == 0
    manifest = tmp_path / "out" / "recipekit.json"
    doc = json.loads(manifest.read_text())
    assert doc["recipe"]["steps"][0]["seed"] == 3
    doc["recipe"]["steps"][0]["seed"] = 3.0
    manifest.write_text(json.dumps(doc))
    result = cli("verify", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    assert "recipekit.json: recipe valid" in result.stdout
    doc["recipe"]["steps"][0]["seed"] = 3.5  # not an integer in any reading: an edited one
    manifest.write_text(json.dumps(doc))
    result = cli("verify", tmp_path / "out")
    assert result.exit_code == 1
    assert "the recorded recipe is not valid: steps[0].seed: 3.5 is not of type 'integer'; " \
        "the manifest was edited" in result.stderr
