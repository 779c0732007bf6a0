"""`recipekit inspect`: parameter counts and statistics of real and random checkpoints.

Oracles: transformers' ``num_parameters()`` on the loaded model, torch (fp64) on the tensors
safetensors loads, PEFT's ``get_nb_trainable_parameters()`` for adapter directories, and planted
NaN/Inf values.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers.adapter_builders import make_adapter
from tests.helpers.builders import load_model, minilm, read_tensors


def inspect_json(cli, *args) -> dict:
    result = cli("inspect", *args, "--json", "-q")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def assert_stats_equal_torch(report: dict, tensors: dict) -> None:
    assert [r["name"] for r in report["tensor_list"]] == list(report_names(report))
    for row in report["tensor_list"]:
        x = tensors[row["name"]].double().reshape(-1)
        finite = x[torch.isfinite(x)]
        assert row["shape"] == list(tensors[row["name"]].shape)
        assert row["nan"] == int(torch.isnan(x).sum()) and row["inf"] == int(torch.isinf(x).sum())
        assert row["mean"] == pytest.approx(float(finite.mean()), rel=1e-9, abs=1e-15)
        if finite.numel() > 1:
            assert row["std"] == pytest.approx(float(finite.std()), rel=1e-9, abs=1e-15)
        assert (row["min"], row["max"]) == (float(finite.min()), float(finite.max()))
        assert row["norm"] == pytest.approx(float(finite.norm()), rel=1e-9, abs=1e-15)


def report_names(report: dict):
    return (r["name"] for r in report["tensor_list"])


class TestRealMiniLM:
    """Oracle: BertModel.from_pretrained(MiniLM).num_parameters() and torch on its tensors."""

    def test_counts_and_statistics(self, cli):
        import transformers

        report = inspect_json(cli, minilm())
        model = transformers.BertModel.from_pretrained(minilm())
        assert report["parameters"] == model.num_parameters() == 22_713_216
        assert report["buffers"] == 512  # embeddings.position_ids, I64
        assert report["layers"] == {"encoder.layer.": 6}
        assert report["architectures"] == ["BertModel"]
        for i in range(6):
            assert report["per_layer"][f"encoder.layer.{i}"] == sum(
                p.numel() for n, p in model.named_parameters()
                if n.startswith(f"encoder.layer.{i}."))
        assert sum(report["per_module"].values()) == report["parameters"]
        assert report["per_module"]["encoder.layer.*.attention.self.query"] == 6 * (384 * 384 + 384)
        assert report["nonfinite"] == {}
        assert_stats_equal_torch(report, read_tensors(minilm()))

    def test_human_table(self, cli):
        result = cli("inspect", minilm(), "-q")
        assert result.exit_code == 0, result.stderr
        assert "parameters: 22,713,216 (+ 512 integer buffer values)" in result.stdout
        assert "encoder.layer.5" in result.stdout and "layers: encoder.layer.* x 6" in result.stdout


class TestRandomModels:
    def test_sharded_chunked_equals_torch(self, cli, tmp_path, tiny_llama, monkeypatch):
        """A sharded copy read in 7-element chunks gives the unsharded statistics (oracle: torch
        on the loaded tensors; the per-layer counts: LlamaForCausalLM's named_parameters)."""
        from recipekit.io import chunks

        sharded = tmp_path / "sharded"
        load_model("llama", tiny_llama).save_pretrained(sharded, max_shard_size="40KB")
        assert (sharded / "model.safetensors.index.json").is_file()
        monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", 7)
        report = inspect_json(cli, sharded)
        assert len(report["files"]) > 1
        model = load_model("llama", tiny_llama)
        assert report["parameters"] == model.num_parameters()
        assert report["per_layer"]["model.layers.3"] == sum(
            p.numel() for n, p in model.named_parameters() if n.startswith("model.layers.3."))
        assert_stats_equal_torch(report, read_tensors(sharded))
        plain = inspect_json(cli, tiny_llama)
        assert plain["stats"] == pytest.approx(report["stats"], rel=1e-9)

    def test_planted_nan_inf_in_a_file(self, cli, tmp_path, monkeypatch):
        g = torch.Generator().manual_seed(0)
        w = torch.randn(300, 70, generator=g).to(torch.bfloat16)
        w[5, 5] = w[299, 69] = float("nan")
        w[7, 0] = float("-inf")
        tensors = {"model.layers.0.mlp.w.weight": w,
                   "model.layers.1.mlp.w.weight": torch.ones_like(w),
                   "norm.weight": torch.tensor([float("inf"), 1.0, 2.0])}
        path = tmp_path / "x.safetensors"
        save_file(tensors, path, metadata={"format": "pt"})
        monkeypatch.chdir(tmp_path)
        report = inspect_json(cli, "x.safetensors")  # a relative path
        assert report["kind"] == "file"
        assert report["nonfinite"] == {"model.layers.0.mlp.w.weight": {"nan": 2, "inf": 1},
                                       "norm.weight": {"nan": 0, "inf": 1}}
        assert report["stats"]["nan"] == 2 and report["stats"]["inf"] == 2
        assert report["layer_stats"]["model.layers.1"]["std"] == 0.0
        assert_stats_equal_torch(report, tensors)
        text = cli("inspect", path, "-q").stdout
        assert "model.layers.0.mlp.w.weight" in text  # tensors with NaN/Inf are listed

    def test_headers_only_reads_no_data(self, cli, model_copy):
        # Zero the data section: the headers stay sound, so only a data read could notice.
        with open(model_copy / "model.safetensors", "r+b") as f:
            n = int.from_bytes(f.read(8), "little")
            size = f.seek(0, 2)
            f.seek(8 + n)
            f.write(b"\0" * (size - 8 - n))
        report = inspect_json(cli, model_copy, "--headers-only")
        assert "stats" not in report and report["parameters"] > 0


class TestAdapters:
    """Oracle: PEFT's own count of trainable parameters after loading the adapter."""

    @pytest.mark.parametrize("lora", [
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        dict(r=8, lora_alpha=16, target_modules=["q_proj", "up_proj", "down_proj"],
             rank_pattern={"up_proj": 2}, use_dora=True, modules_to_save=["lm_head"]),
        # PEFT saves the embedding's base layer beside an embedding LoRA: frozen, not counted
        dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "v_proj"]),
    ], ids=["plain", "dora-pattern-saved", "embedding-saved-base"])
    def test_rank_alpha_targets_trainable(self, cli, tmp_path, tiny_llama, lora):
        import peft

        out = make_adapter("llama", tiny_llama, tmp_path / "lora", **lora)
        report = inspect_json(cli, out)
        a = report["adapter"]
        pm = peft.PeftModel.from_pretrained(load_model("llama", tiny_llama), out,
                                            is_trainable=True)
        assert a["trainable_parameters"] == pm.get_nb_trainable_parameters()[0]
        assert (a["r"], a["lora_alpha"], a["use_dora"]) == (lora["r"], lora["lora_alpha"],
                                                            bool(lora.get("use_dora")))
        assert a["targets"] == sorted(lora["target_modules"])
        assert a["modules"] == (1 + 8 if "embed_tokens" in lora["target_modules"]
                                else 8 * len(lora["target_modules"]))
        if "rank_pattern" in lora:
            assert a["ranks"] == {"2": 8, "8": 16}
            assert a["dora_modules"] == 24
        assert_stats_equal_torch(report, read_tensors(out))


class TestErrors:
    def test_missing_path(self, cli, tmp_path):
        result = cli("inspect", tmp_path / "nope")
        assert result.exit_code == 2
        assert "nope' does not exist; name a checkpoint directory" in result.stderr
        assert "Traceback" not in result.stderr

    def test_truncated_file_names_it(self, cli, model_copy):
        p = model_copy / "model.safetensors"
        p.write_bytes(p.read_bytes()[:-10])
        result = cli("inspect", model_copy)
        assert result.exit_code == 2  # found from the header and the size (issue 17 item 10)
        assert "model.safetensors: file is truncated: tensor" in result.stderr

    def test_pickle_only(self, cli, tmp_path, tiny_llama):
        d = tmp_path / "pkl"
        shutil.copytree(tiny_llama, d)
        (d / "model.safetensors").rename(d / "pytorch_model.bin")
        result = cli("inspect", d)
        assert result.exit_code == 2 and "recipekit convert --allow-pickle" in result.stderr

    def test_hub_repo_offline_from_cache(self, cli, tmp_path, tiny_llama, monkeypatch):
        from tests.helpers.hub import SHA, add_to_cache

        cache = tmp_path / "cache"
        add_to_cache(cache, "org/tiny", {p.name: p for p in tiny_llama.iterdir()})
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        report = inspect_json(cli, "org/tiny@main")
        assert report["hub"] == {"repo": "org/tiny", "commit": SHA}
        assert report["stats"] == inspect_json(cli, tiny_llama)["stats"]
        missing = cli("inspect", "org/other")
        assert missing.exit_code == 2 and "org/other" in missing.stderr


    def test_mistyped_local_path_is_not_only_a_hub_repo(self, cli, tmp_path, tiny_llama,
                                                         monkeypatch):
        """`inspect fx/tinyy` beside a folder fx/ said only that hub repo 'fx/tinyy' could not
        be reached (found by a black-box check): the message now says the path does not exist
        either."""
        shutil.copytree(tiny_llama, tmp_path / "fx" / "tiny")
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        result = cli("inspect", "fx/tinyy")
        assert result.exit_code == 2 and "Traceback" not in result.stderr
        assert "'fx/tinyy' does not exist (the folder 'fx' does), and as a hub repo" \
            in result.stderr
        assert "check the path" in result.stderr


def test_string_architectures_is_one_class_name(cli, tmp_path, tiny_llama):
    """Issue 17 item 14: `"architectures": "LlamaForCausalLM"` (a string, as hand-written
    configs have it) used to print as `L, l, a, m, a, ...`. Oracle: transformers' meaning, a
    list of class names."""
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = "LlamaForCausalLM"
    (model / "config.json").write_text(json.dumps(config))
    assert inspect_json(cli, model, "--headers-only")["architectures"] == ["LlamaForCausalLM"]
    text = cli("inspect", model, "--headers-only", "-q").stdout
    assert "architecture: LlamaForCausalLM (model_type llama)" in text
    config["architectures"] = [{"x": 1}, "A"]
    (model / "config.json").write_text(json.dumps(config))
    assert inspect_json(cli, model, "--headers-only")["architectures"] == ['{"x": 1}', "A"]
