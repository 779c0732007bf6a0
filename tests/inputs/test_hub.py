"""hub.py and hub sources: offline runs from a fake huggingface_hub cache, and the online path
with huggingface_hub's network functions replaced by a local fake.

Oracles: the same model given as a local directory (byte-identical output), the cache layout
huggingface_hub itself reads (`models--org--name/{blobs,refs,snapshots}`), and the set of files a
plan needs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest

from tests.helpers.builders import load_model, make_model
from tests.helpers.hub import SHA, add_to_cache
from tests.helpers.recipes import solar_recipe, write_recipe


def outputs_equal(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir() if p.suffix in (".safetensors", ".json")
                   and p.name not in ("recipekit.json", ".recipekit-state.json"))
    assert "config.json" in names
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


class TestOfflineCache:
    @pytest.mark.parametrize("revision", ["main", SHA])
    def test_same_bytes_as_the_local_directory(self, cli, tmp_path, tiny_llama, hub_cache,
                                               revision):
        local = write_recipe(tmp_path, solar_recipe(tiny_llama, output="  path: ./local"),
                             "local.yaml")
        hub = write_recipe(tmp_path, solar_recipe(f"{{hub: org/tiny, revision: '{revision}'}}",
                                                  output="  path: ./hub"), "hub.yaml")
        assert cli("run", local, "-q").exit_code == 0
        result = cli("run", hub, "-q")
        assert result.exit_code == 0, result.output
        outputs_equal(tmp_path / "local", tmp_path / "hub")
        assert (tmp_path / "hub" / "generation_config.json").is_file()
        manifest = json.loads((tmp_path / "hub" / "recipekit.json").read_text())
        blob = hashlib.sha256((tiny_llama / "model.safetensors").read_bytes()).hexdigest()
        assert manifest["inputs"]["tiny"] == {
            "hub": "org/tiny", "revision": revision, "commit": SHA,
            "files": {"config.json": hashlib.sha256(
                (tiny_llama / "config.json").read_bytes()).hexdigest(),
                "model.safetensors": blob}}

    def test_missing_repo_offline(self, cli, tmp_path, hub_cache):
        r = write_recipe(tmp_path, solar_recipe("{hub: org/absent}"))
        result = cli("run", r, "-q")
        assert result.exit_code == 2
        assert "Traceback" not in result.output
        assert result.stderr.splitlines()[0] == (
            f"{r}:3:9: models.tiny: hub repo 'org/absent' at revision 'main' is not in the local "
            f"cache ({hub_cache}) and HF_HUB_OFFLINE is set; run once online, or point "
            "HF_HUB_CACHE / HF_HOME at a cache that has it")

    def test_unknown_branch_offline(self, cli, tmp_path, hub_cache):
        r = write_recipe(tmp_path, solar_recipe("{hub: org/tiny, revision: dev}"))
        result = cli("validate", r)
        assert result.exit_code == 2
        assert "hub repo 'org/tiny' at revision 'dev' is not in the local cache" in result.stderr

    def test_numeric_revision_is_a_string(self, cli, tmp_path, hub_cache):
        r = write_recipe(tmp_path, solar_recipe("{hub: org/tiny, revision: 1234567}"))
        result = cli("validate", r)
        assert "at revision '1234567'" in result.stderr

    def test_org_name_string_gets_the_hub_hint(self, cli, tmp_path):
        r = write_recipe(tmp_path, solar_recipe("org/tiny"))
        result = cli("validate", r)
        assert result.exit_code == 2
        assert "if 'org/tiny' is a Hugging Face Hub repo, write `{hub: org/tiny}`" in \
            result.stderr

    def test_hub_and_path_together_is_an_error(self, cli, tmp_path):
        r = write_recipe(tmp_path, solar_recipe("{hub: org/tiny, path: ./x}"))
        result = cli("validate", r)
        assert result.exit_code == 2
        assert "models.tiny.path: unknown key in model 'tiny'" in result.stderr


class FakeHub:
    """Stands in for the network: serves one sharded repo from a local 'server' directory and
    records which files were downloaded."""

    def __init__(self, cache: Path, server: Path, repo: str) -> None:
        self.cache, self.server, self.repo = cache, server, repo
        self.downloaded: list[str] = []

    def snapshot_download(self, repo_id, *, revision, cache_dir, local_files_only,
                          ignore_patterns, **_):
        assert repo_id == self.repo and not local_files_only and cache_dir == str(self.cache)
        files = {p.name: p for p in self.server.iterdir() if p.suffix != ".safetensors"}
        return str(add_to_cache(self.cache, repo_id, files))

    def hf_hub_download(self, repo_id, filename, *, revision, cache_dir, local_files_only, **_):
        assert revision == SHA and not local_files_only
        self.downloaded.append(filename)
        return str(add_to_cache(self.cache, repo_id, {filename: self.server / filename}) / filename)

    def parse_safetensors_file_metadata(self, repo_id, filename, *, revision, **_):
        from huggingface_hub.utils import SafetensorsFileMetadata, TensorInfo

        raw = (self.server / filename).read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        meta = header.pop("__metadata__", {})
        return SafetensorsFileMetadata(meta, {k: TensorInfo(v["dtype"], v["shape"],
                                                            tuple(v["data_offsets"]))
                                              for k, v in header.items()})


def test_online_path_downloads_only_the_shards_the_plan_reads(cli, tmp_path, tiny_llama,
                                                              monkeypatch):
    server = tmp_path / "server"
    load_model("llama", make_model("llama", tmp_path / "b", layers=8, seed=5)).save_pretrained(
        server, max_shard_size="40KB")
    shards = sorted(p.name for p in server.glob("model-*.safetensors"))
    assert len(shards) >= 4
    cache = tmp_path / "cache"
    fake = FakeHub(cache, server, "org/b")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.hf_hub_download)
    monkeypatch.setattr(huggingface_hub.HfApi, "parse_safetensors_file_metadata",
                        lambda api, *a, **k: fake.parse_safetensors_file_metadata(*a, **k))
    recipe = f"""
recipekit: 1
models:
  a: {tiny_llama}
  b: {{hub: org/b}}
steps:
  - name: mix
    op: layers
    from: a
    layers: [{{from: b, range: [0, 2]}}, "range(2,8)"]
output: {{path: ./out}}
"""
    r = write_recipe(tmp_path, recipe)
    result = cli("validate", r)
    assert result.exit_code == 0, result.output
    assert fake.downloaded == []  # validate reads remote headers only
    result = cli("run", r, "-q")
    assert result.exit_code == 0, result.output
    index = json.loads((server / "model.safetensors.index.json").read_text())["weight_map"]
    needed = sorted({index[f"model.layers.{i}.{rest}"] for i in (0, 1) for rest in (
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
        "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
        "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight")})
    assert sorted(fake.downloaded) == needed
    assert len(needed) < len(shards)
    from safetensors import safe_open

    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as out, \
            safe_open(server / index["model.layers.1.mlp.up_proj.weight"], "pt") as src:
        assert out.get_tensor("model.layers.1.mlp.up_proj.weight").equal(
            src.get_tensor("model.layers.1.mlp.up_proj.weight"))
    shutil.rmtree(tmp_path / "out")
