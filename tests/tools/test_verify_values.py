"""`recipekit verify --stats`: every floating value read, non-finite tensors fail the check.

Oracles: an input with NaN and Inf planted in known tensors (copied bit-exactly into the output,
so the hashes match and only the values are wrong: the check must name those tensors and their
counts), and whole-tensor torch statistics for the per-tensor numbers of ``--json``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers.recipes import solar_recipe, write_recipe


def _run(cli, tmp_path: Path, model: Path) -> Path:
    shutil.copytree(model, tmp_path / "model")
    recipe = write_recipe(tmp_path, solar_recipe(output="  path: ./out\n  shard_size: 150KB"))
    assert cli("run", recipe, "-q").exit_code == 0
    return tmp_path / "out"


@pytest.fixture
def poisoned(tmp_path: Path, tiny_llama: Path) -> Path:
    """The tiny Llama with 3 NaN in layer 1's q_proj and 2 Inf in the final norm."""
    src = tmp_path / "src"
    shutil.copytree(tiny_llama, src)
    path = src / "model.safetensors"
    tensors = load_file(path)
    q = tensors["model.layers.1.self_attn.q_proj.weight"]
    q.view(-1)[[0, 7, 100]] = float("nan")
    tensors["model.norm.weight"][[1, 2]] = float("inf")
    save_file(tensors, path, metadata={"format": "pt"})
    return src


def test_clean_output_passes_with_statistics(cli, tmp_path, tiny_llama):
    out = _run(cli, tmp_path, tiny_llama)
    result = cli("verify", out, "--stats")
    assert result.exit_code == 0, result.stderr
    assert "floating tensors" in result.stdout and "all finite" in result.stdout


def test_json_statistics_match_torch(cli, tmp_path, tiny_llama):
    out = _run(cli, tmp_path, tiny_llama)
    doc = json.loads(cli("verify", out, "--stats", "--json").stdout)
    assert doc["verified"]
    name = "model.layers.3.mlp.down_proj.weight"
    shard = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"][name]
    t = load_file(out / shard)[name].double()
    got = doc["stats"][name]
    assert got["mean"] == pytest.approx(t.mean().item(), rel=1e-9, abs=1e-12)
    assert got["std"] == pytest.approx(t.std().item(), rel=1e-9)
    assert (got["min"], got["max"]) == (t.min().item(), t.max().item())
    assert len(doc["stats"]) == 12 * 9 + 3  # every floating tensor of the 12-layer output


def test_non_finite_tensors_fail_naming_them(cli, tmp_path, poisoned):
    out = _run(cli, tmp_path, poisoned)
    assert cli("verify", out).exit_code == 0  # the bytes are the ones written
    result = cli("verify", out, "--stats")
    assert result.exit_code == 1
    err = result.stderr
    # layer 1 of the input is output layer 1 and (second slice starts at 2) nowhere else
    assert "model.layers.1.self_attn.q_proj.weight (3 NaN, 0 Inf)" in err
    assert "model.norm.weight (0 NaN, 2 Inf)" in err
    assert "--check-finite" in err and "Traceback" not in err
    assert torch.isnan(load_file(tmp_path / "src" / "model.safetensors")[
        "model.layers.1.self_attn.q_proj.weight"]).sum() == 3


def test_each_shard_is_read_once(cli, tmp_path, tiny_llama, monkeypatch):
    """`--stats` hashes and summarises a shard from one read: the bytes read from each shard
    equal its size, and verify's own hashing pass is not run."""
    from recipekit.io.reader import FileReader
    from recipekit.tools import verify

    out = _run(cli, tmp_path, tiny_llama)
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1
    read: dict[str, int] = {}
    original = FileReader.read_into

    def counting(self, path, offset, buf):
        read[Path(path).name] = read.get(Path(path).name, 0) + len(buf)
        return original(self, path, offset, buf)

    hash_file = verify._sha256

    def no_second_pass(path):
        assert path.suffix != ".safetensors", f"{path} hashed again"
        return hash_file(path)  # config.json, the index, the model card

    monkeypatch.setattr(FileReader, "read_into", counting)
    monkeypatch.setattr(verify, "_sha256", no_second_pass)
    report = verify.verify_output(out, stats=True)
    assert not report.problems, [p.message for p in report.problems]
    assert read == {p.name: p.stat().st_size for p in shards}
    assert len(report.stats) == 12 * 9 + 3


def test_tampered_shard_fails_on_its_hash(cli, tmp_path, tiny_llama):
    """A changed value is found by the hash of the same read (the statistics of the changed
    shard are not reported as the output's)."""
    out = _run(cli, tmp_path, tiny_llama)
    shard = sorted(out.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x40
    shard.write_bytes(bytes(data))
    result = cli("verify", out, "--stats")
    assert result.exit_code == 1
    assert f"{shard.name}: sha256" in result.stderr and "differs from the manifest" in result.stderr


def test_statistics_commands_never_import_torch(cli, tmp_path, tiny_llama, tiny_llama_b):
    """`inspect`, `diff` and `verify --stats` read every value with numpy: importing torch
    alone took three times as long as reading a 2 GiB checkpoint (README, Speed). Each runs in
    a process where importing torch fails, and must give the same numbers as in this one.
    `inspect` and `diff` read no recipe either: importing yaml fails too (the recipe package
    was a sixth of their start-up)."""
    out = _run(cli, tmp_path, tiny_llama)
    root = Path(__file__).resolve().parents[2]
    code = ("import sys; sys.modules.update(dict.fromkeys(sys.argv[1].split(','))); "
            "from recipekit.cli import main; sys.argv = ['recipekit', *sys.argv[2:]]; main()")
    for args in (["inspect", tiny_llama], ["diff", tiny_llama, tiny_llama_b],
                 ["verify", out, "--stats"]):
        args = [*map(str, args), "--json", "-q"] if args[0] != "verify" else [*map(str, args),
                                                                             "--json"]
        blocked = "torch" if args[0] == "verify" else "torch,yaml"
        run = subprocess.run([sys.executable, "-c", code, blocked, *args], capture_output=True,
                             text=True, env=dict(os.environ, PYTHONPATH=str(root)), check=False)
        assert run.returncode == (1 if args[0] == "diff" else 0), run.stderr  # 1: they differ
        assert "Traceback" not in run.stderr
        got, want = json.loads(run.stdout), json.loads(cli(*args).stdout)
        if args[0] == "verify":  # its other lines say how long reading took
            got, want = got["stats"], want["stats"]
        assert got == want, args[0]
