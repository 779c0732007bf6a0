"""execute.py + io/output.py end to end: what a run writes, byte for byte, and how it behaves
when run again, interrupted, raced or short of disk.

Oracles: the source tensors (bit-exact data movement), torch's own `.to()` for casts, hashlib
over the written files, and transformers logits of a deep-copied reference model.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from recipekit.plan.cost import KEPT_HEAP, KEPT_HEAP_MAX

from tests.helpers.builders import read_tensors, rewrite_reordered
from tests.helpers.interrupt import interrupt_at_shard
from tests.helpers.memory import MEASURE
from tests.helpers.recipes import ROOT, solar_recipe, write_recipe

ORDER = list(range(0, 6)) + list(range(2, 8))


def solar(tmp_path: Path, model: Path, shard: str = "100KB", extra: str = "") -> Path:
    output = f"  path: ./out\n  shard_size: {shard}"
    return write_recipe(tmp_path, solar_recipe(model, output=output) + extra)



def ok(cli, *args):
    result = cli(*args)
    assert result.exit_code == 0, result.output
    return result


class TestSolarUpscale:
    """Oracle: source tensors (bit-exact) and a deep-copied transformers reference (logits)."""

    @pytest.mark.parametrize("family", ["mistral", "llama"])
    def test_sharded_output_is_bit_identical_and_loads(self, cli, tmp_path, family, request):
        import transformers as tf

        source_dir = request.getfixturevalue(f"tiny_{family}")
        ok(cli, "run", solar(tmp_path, source_dir), "-q")
        out = tmp_path / "out"
        shards = sorted(out.glob("model-*.safetensors"))
        assert len(shards) > 1
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == {s.name for s in shards}
        src, dst = read_tensors(source_dir), read_tensors(out)
        assert len(dst) == 3 + 12 * 9
        for name, t in dst.items():
            if ".layers." in name:
                i = int(name.split(".")[2])
                name_src = name.replace(f".layers.{i}.", f".layers.{ORDER[i]}.")
            else:
                name_src = name
            assert t.dtype == src[name_src].dtype and torch.equal(t, src[name_src]), name
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                      for t in dst.values())
        for s in shards:
            with safe_open(s, "pt") as f:
                assert f.metadata() == {"format": "pt"}

        cls = tf.MistralForCausalLM if family == "mistral" else tf.LlamaForCausalLM
        model = cls.from_pretrained(out)
        assert model.config.num_hidden_layers == 12
        source = cls.from_pretrained(source_dir)
        ref = copy.deepcopy(source)
        ref.model.layers = torch.nn.ModuleList(copy.deepcopy(source.model.layers[i])
                                               for i in ORDER)
        for i, layer in enumerate(ref.model.layers):
            layer.self_attn.layer_idx = i
        ref.config.num_hidden_layers = 12
        ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
        assert torch.equal(model(ids).logits, ref(ids).logits)

    def test_output_files(self, cli, tmp_path, tiny_llama):
        ok(cli, "run", solar(tmp_path, tiny_llama), "-q")
        out = tmp_path / "out"
        assert (out / "generation_config.json").read_bytes() == (
            tiny_llama / "generation_config.json").read_bytes()
        assert (out / "README.md").read_text().startswith("---\nlibrary_name: transformers")
        config = json.loads((out / "config.json").read_text())
        source = json.loads((tiny_llama / "config.json").read_text())
        assert config == dict(source, num_hidden_layers=12, torch_dtype="float32")
        manifest = json.loads((out / "recipekit.json").read_text())
        for name, info in manifest["shards"].items():
            data = (out / name).read_bytes()
            assert info == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        assert manifest["donor"] == "tiny" and "token" not in json.dumps(manifest).lower()
        assert not list(out.glob(".*partial"))

    def test_cast_matches_torch(self, cli, tmp_path, tiny_llama):
        ok(cli, "run", solar(tmp_path, tiny_llama, extra="  dtype: bfloat16\n"), "-q")
        src, dst = read_tensors(tiny_llama), read_tensors(tmp_path / "out")
        assert torch.equal(dst["lm_head.weight"], src["lm_head.weight"].to(torch.bfloat16))
        config = json.loads((tmp_path / "out" / "config.json").read_text())
        assert config["dtype"] == config["torch_dtype"] == "bfloat16"


class TestDeterminism:
    """Oracle: the bytes of a first run."""

    def test_json_twin_and_second_run_are_byte_identical(self, cli, tmp_path, tiny_llama):
        import yaml

        a = solar(tmp_path / "a", tiny_llama) if (tmp_path / "a").mkdir() is None else None
        ok(cli, "run", a, "-q")
        b_dir = tmp_path / "b"
        b_dir.mkdir()
        twin = write_recipe(b_dir, json.dumps(yaml.safe_load(a.read_text()), indent=2),
                            "recipe.json")
        ok(cli, "run", twin, "-q")
        ok(cli, "run", a, "-q", "--output", tmp_path / "c")
        names = sorted(p.name for p in (tmp_path / "a" / "out").iterdir()
                       if p.suffix in (".safetensors", ".json") and p.name != "recipekit.json")
        assert "model.safetensors.index.json" in names and "config.json" in names
        for name in names:
            first = (tmp_path / "a" / "out" / name).read_bytes()
            assert (b_dir / "out" / name).read_bytes() == first, name
            assert (tmp_path / "c" / name).read_bytes() == first, name


class TestRerun:
    def test_same_plan_is_already_complete(self, cli, tmp_path, tiny_llama):
        r = solar(tmp_path, tiny_llama)
        ok(cli, "run", r, "-q")
        result = ok(cli, "run", r, "-q")
        assert "already complete" in result.stdout

    def test_force_repairs_a_damaged_output_of_the_same_plan(self, cli, tmp_path, tiny_llama):
        """A flipped byte keeps the size, so a plain rerun calls the output complete; `--force`
        writes every file again. Oracle: the first run's bytes, and `verify`."""
        r = solar(tmp_path, tiny_llama)
        ok(cli, "run", r, "-q")
        shard = sorted((tmp_path / "out").glob("*.safetensors"))[0]
        good = shard.read_bytes()
        shard.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
        assert cli("verify", tmp_path / "out").exit_code == 1
        assert "already complete" in ok(cli, "run", r, "-q").stdout
        assert "already complete" not in ok(cli, "run", r, "-q", "--force").stdout
        assert shard.read_bytes() == good
        assert cli("verify", tmp_path / "out").exit_code == 0

    def test_a_deleted_file_is_written_again(self, cli, tmp_path, tiny_llama):
        r = solar(tmp_path, tiny_llama)
        ok(cli, "run", r, "-q")
        config = (tmp_path / "out" / "config.json").read_bytes()
        (tmp_path / "out" / "config.json").unlink()
        result = ok(cli, "run", r, "-q")
        assert "already complete" not in result.stdout and "resumed" in result.stdout
        assert (tmp_path / "out" / "config.json").read_bytes() == config

    def test_interrupted_run_resumes_finished_shards(self, cli, tmp_path, tiny_llama,
                                                     monkeypatch):
        r = solar(tmp_path, tiny_llama)
        restore, calls = interrupt_at_shard(monkeypatch, 3)
        result = cli("run", r, "-q", "--json")
        assert result.exit_code == 130
        # a JSON Lines reader gets a last event (it stopped after the second shard's)
        last = json.loads(result.stdout.splitlines()[-1])
        assert (last["event"], last["type"], last["exit_code"]) == ("error", "Interrupted", 130)
        out = tmp_path / "out"
        finished = sorted(p.name for p in out.glob("model-*.safetensors"))
        assert finished == calls[:2]
        assert not (out / "recipekit.json").exists()
        assert not list(out.glob(".*partial"))
        restore()
        result = ok(cli, "run", r, "-q")
        assert ", 2 resumed" in result.stdout
        fresh = tmp_path / "fresh"
        ok(cli, "run", r, "-q", "-o", fresh)
        for p in out.glob("model*"):
            assert p.read_bytes() == (fresh / p.name).read_bytes()

    def test_different_plan_needs_force(self, cli, tmp_path, tiny_llama):
        r = solar(tmp_path, tiny_llama)
        ok(cli, "run", r, "-q")
        r2 = write_recipe(tmp_path, r.read_text().replace('"range(2,8)"', '"range(3,8)"'))
        result = cli("run", r2, "-q")
        assert result.exit_code == 2
        assert "holds the output of a different plan" in result.stderr
        assert "rerun with --force" in result.stderr
        ok(cli, "run", r2, "-q", "--force")
        config = json.loads((tmp_path / "out" / "config.json").read_text())
        assert config["num_hidden_layers"] == 11

    def test_force_never_deletes_foreign_files(self, cli, tmp_path, tiny_llama):
        r = solar(tmp_path, tiny_llama)
        ok(cli, "run", r, "-q")
        (tmp_path / "out" / "notes.txt").write_text("mine")
        r2 = write_recipe(tmp_path, r.read_text().replace('"range(2,8)"', '"range(3,8)"'))
        result = cli("run", r2, "-q", "--force")
        assert result.exit_code == 2
        assert "holds files recipekit did not write (notes.txt)" in result.stderr
        assert (tmp_path / "out" / "notes.txt").read_text() == "mine"

    def test_foreign_directory_is_refused(self, cli, tmp_path, tiny_llama):
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "important.bin").write_bytes(b"x")
        result = cli("run", solar(tmp_path, tiny_llama), "-q", "--force")
        assert result.exit_code == 2
        assert "holds files recipekit did not write (important.bin)" in result.stderr
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["important.bin"]

    def test_concurrent_run_fails_clearly(self, cli, tmp_path, tiny_llama):
        out = tmp_path / "out"
        out.mkdir()
        fd = os.open(out, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # what a running recipekit holds
            result = cli("run", solar(tmp_path, tiny_llama), "-q")
        finally:
            os.close(fd)
        assert result.exit_code == 1
        assert "another recipekit run is writing to" in result.stderr
        assert not list(out.glob("*.safetensors"))

    def test_disk_full_is_checked_before_writing(self, cli, tmp_path, tiny_llama, monkeypatch):
        import shutil

        monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1, 1, 10))
        result = cli("run", solar(tmp_path, tiny_llama), "-q")
        assert result.exit_code == 1
        assert "not enough free disk: the output needs" in result.stderr
        assert not list((tmp_path / "out").glob("*.safetensors"))


class TestInputChangedDuringTheRun:
    """An input file that changes while the run writes never gives a shard that mixes two
    versions, and the manifest records the version the plan read. Oracles: a run of the
    unchanged input (hashlib over its files), the input file's own stat before the change, and
    `verify`. The change happens at a fixed point: when the second of five shards starts."""

    @staticmethod
    def change_at_second_shard(monkeypatch, change):
        import recipekit.run.execute as ex

        real, calls = ex.write_shard, []

        def changing(plan, shard, *a, **k):
            calls.append(shard.filename)
            if len(calls) == 2:
                change()
            return real(plan, shard, *a, **k)

        monkeypatch.setattr(ex, "write_shard", changing)
        return calls

    def test_a_rewrite_in_place_is_refused_and_finished_shards_are_kept(
            self, cli, tmp_path, model_copy, monkeypatch):
        r = solar(tmp_path, model_copy)
        ok(cli, "run", r, "-q", "-o", tmp_path / "ref")
        weights = model_copy / "model.safetensors"
        before = weights.stat().st_mtime_ns

        def rewrite():
            rewrite_reordered(weights, in_place=True)  # same inode, same size
            if weights.stat().st_mtime_ns == before:
                # a write's mtime is the clock's coarse tick: move it as a write a tick later
                os.utime(weights, ns=(before, before + 1))

        calls = self.change_at_second_shard(monkeypatch, rewrite)
        result = cli("run", r, "-q")
        assert result.exit_code == 1, result.output
        assert "model.safetensors: the file changed during the run (its modification time " \
               "moved): the shard being written may mix bytes of two versions, so it was " \
               "discarded; finished shards are kept; run again" in " ".join(result.stderr.split())
        out = tmp_path / "out"
        assert sorted(p.name for p in out.glob("*.safetensors")) == calls[:1]
        assert (out / calls[0]).read_bytes() == (tmp_path / "ref" / calls[0]).read_bytes()
        assert not (out / "recipekit.json").exists() and not list(out.glob(".*partial"))

    def test_a_donor_file_changed_during_the_run_is_refused_before_the_manifest(
            self, cli, tmp_path, model_copy, monkeypatch):
        """The donor's other files are copied when the shards are done: one changed during
        the run (here generation_config.json) would sit beside a config.json made from the
        old files, under a manifest naming the new ones. The run stops before the manifest
        (exit 1); the finished shards stay."""
        r = solar(tmp_path, model_copy)
        donor = model_copy / "generation_config.json"
        donor.write_text('{"bos_token_id": 1, "eos_token_id": 2}')
        self.change_at_second_shard(
            monkeypatch, lambda: donor.write_text('{"bos_token_id": 1, "eos_token_id": 7}'))
        result = cli("run", r, "-q")
        assert result.exit_code == 1, result.output
        assert "an input's files changed during the run" in result.stderr
        out = tmp_path / "out"
        assert not (out / "recipekit.json").exists()
        assert len(list(out.glob("*.safetensors"))) == 5

    def test_a_file_replaced_by_rename_is_read_from_the_old_version(
            self, cli, tmp_path, model_copy, tiny_llama_b, monkeypatch):
        """Another model of the same shapes renamed over the input mid-run: every shard comes
        from the version planned from, which the manifest names (it named the new one, and
        `verify` and reruns accepted the output)."""
        r = solar(tmp_path, model_copy)
        ok(cli, "run", r, "-q", "-o", tmp_path / "ref")
        weights = model_copy / "model.safetensors"
        old = weights.stat()

        def replace():
            tmp = weights.with_name("new.tmp")
            tmp.write_bytes((tiny_llama_b / "model.safetensors").read_bytes())
            os.utime(tmp, ns=(old.st_mtime_ns + 1, old.st_mtime_ns + 1))
            os.replace(tmp, weights)

        self.change_at_second_shard(monkeypatch, replace)
        ok(cli, "run", r, "-q")
        out, ref = tmp_path / "out", tmp_path / "ref"
        shards = sorted(p.name for p in ref.glob("*.safetensors"))
        assert len(shards) == 5
        for name in shards:
            assert (out / name).read_bytes() == (ref / name).read_bytes(), name
        recorded = json.loads((out / "recipekit.json").read_text())["inputs"]["tiny"]["files"]
        assert recorded["model.safetensors"] == {"size": old.st_size,
                                                 "mtime_ns": old.st_mtime_ns}
        # the input is not the version the output was made from: a rerun is another plan
        monkeypatch.undo()
        assert cli("run", r, "-q").exit_code == 2


# VmHWM belongs to this address space; ru_maxrss would inherit the forking parent's peak.
PEAK = textwrap.dedent("""
    import re, sys
    from recipekit.cli import app
    try:
        app(sys.argv[1:], prog_name="recipekit")
    except SystemExit as e:
        assert not e.code, e.code
    status = open("/proc/self/status").read()
    print(int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) * 1024)
""")


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_shard_size(tmp_path):
    """256 MiB of weights: peak RSS stays far below the output size, shard size 10 MB or 10 GB.

    Oracle: the kernel's high-water RSS (VmHWM) of a fresh process per run.
    """
    from safetensors.torch import save_file

    src = tmp_path / "big"
    src.mkdir()
    layers = 4
    tensors = {"model.embed_tokens.weight": torch.zeros(1024, 1024)}
    for i in range(layers):
        tensors[f"model.layers.{i}.mlp.up_proj.weight"] = torch.ones(4096, 4096)  # 64 MiB
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps({"model_type": "llama",
                                                 "num_hidden_layers": layers}))
    del tensors
    peaks = {}
    for shard in ("10MB", "10GB"):
        d = tmp_path / shard
        d.mkdir()
        r = write_recipe(d, solar_recipe(src, '["range(0,4)", "range(0,4)"]',
                                         f"  path: ./out\n  shard_size: {shard}"))
        proc = subprocess.run([sys.executable, "-c", PEAK, "run", str(r), "-q", "--no-fsync"],
                              capture_output=True, text=True, check=True,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
        peaks[shard] = int(proc.stdout.split()[-1])
    output_bytes = 8 * 64 * 2**20
    for shard, peak in peaks.items():
        assert peak < 200 * 2**20, (shard, peak)  # interpreter + one 16 MiB copy buffer
        assert peak < output_bytes / 2, (shard, peak)
    assert abs(peaks["10MB"] - peaks["10GB"]) < 32 * 2**20, peaks




@pytest.mark.slow
def test_peak_memory_estimate_matches_a_measurement(tmp_path):
    """`recipekit plan`'s estimate is the working set above an idle process: an upper bound
    within 1.5x of the measured high-water mark for a slerp (its coefficients by passes over
    row pieces read from the files, then the output in row pieces), within 2x for a casting
    plan computed in row pieces (whose small peak is mostly allocator overhead), and an upper
    bound (within 5%) for a pure copy.

    Oracle: VmHWM of a fresh process, reset just before the run (Linux clear_refs).
    """
    from safetensors.torch import save_file

    src = tmp_path / "big"
    src.mkdir()
    tensors = {"model.embed_tokens.weight": torch.zeros(1024, 1024)}
    for i in range(4):
        tensors[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(4096, 4096)  # 64 MiB
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps({"model_type": "llama",
                                                 "num_hidden_layers": 4}))
    del tensors
    results = {}
    slerp = (f"recipekit: 1\nmodels:\n  a: {src}\n  b: {src}\nsteps:\n  - name: m\n"
             "    op: merge\n    method: slerp\n    from: [a, b]\n    parameters: {t: 0.3}\n"
             "output:\n  path: ./slerp\n")
    for name, dtype in (("cast", "\n  dtype: bfloat16"), ("copy", ""), ("slerp", None)):
        text = slerp if dtype is None else solar_recipe(
            src, '["range(0,4)", "range(0,4)"]', f"  path: ./{name}\n  shard_size: 100MB{dtype}")
        r = write_recipe(tmp_path, text, f"{name}.yaml")
        proc = subprocess.run([sys.executable, "-c", MEASURE, str(r)], capture_output=True,
                              text=True, check=True)
        results[name] = json.loads(proc.stdout)
    slerp, cast = results["slerp"], results["cast"]
    # slerp: 65-70 MiB measured streamed, 86-97 on 2026-12-06 with and without `kept_heap`
    # (173-178 MiB when it held both inputs; 277-361 MiB when it held fp32 copies and an fp32
    # result)
    # (both bounds of the estimate also count the free heap kept between chunked tensors:
    # `plan.cost.kept_heap`, the most for slerp's passes, the least for a cast)
    assert slerp["measured"] <= slerp["estimate"] <= 1.5 * slerp["measured"] + KEPT_HEAP_MAX, \
        results
    kept = KEPT_HEAP
    # Chunked: a few MiB of pieces plus allocator and thread-arena overhead that varies from run
    # to run (6-8 MiB measured in all since pieces' temporaries reuse the heap; 16-35 MiB
    # before); the estimate keeps a fixed margin for other elementwise plans
    # (`plan.cost.CHUNKED_OVERHEAD`), so it is at most that much above the measurement, and
    # both stay far below one 64 MiB input.
    assert cast["measured"] <= cast["estimate"] <= cast["measured"] + 24 * 2**20 + kept, results
    assert cast["measured"] < 48 * 2**20, results
    # an upper bound for a pure copy, give or take a thread stack's touched pages
    assert results["copy"]["measured"] <= 1.05 * results["copy"]["estimate"], results


class TestCheckFinite:
    """Oracle: NaN/Inf planted at known positions of known tensors."""

    def test_reports_by_tensor_name(self, cli, tmp_path):
        from safetensors.torch import save_file

        src = tmp_path / "m"
        src.mkdir()
        layer = torch.zeros(8, 4)
        bad = layer.clone()
        bad[0, 0], bad[1, 1], bad[2, 2] = float("nan"), float("inf"), -float("inf")
        save_file({"model.layers.0.w": layer, "model.layers.1.w": bad,
                   "model.embed.weight": torch.ones(2, 2), "ids": torch.arange(3)},
                  src / "model.safetensors", metadata={"format": "pt"})
        (src / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
        r = write_recipe(tmp_path, solar_recipe("./m", "[0, 1, 1]", "  path: ./out"))
        result = ok(cli, "run", r, "-q", "--check-finite")
        assert result.stderr.splitlines() == [
            "warning: non-finite values in 2 tensor(s):",
            "  model.layers.1.w (from tiny:model.layers.1.w): 1 NaN, 2 Inf",
            "  model.layers.2.w (from tiny:model.layers.1.w): 1 NaN, 2 Inf"]
        assert read_tensors(tmp_path / "out")["model.layers.2.w"].isnan().sum() == 1

        cast = write_recipe(tmp_path, solar_recipe("./m", "[1]", "  path: ./cast\n"
                                                   "  dtype: bfloat16"), "cast.yaml")
        result = ok(cli, "run", cast, "-q", "--check-finite")
        assert "  input tiny:model.layers.1.w: 1 NaN, 2 Inf" in result.stderr
        assert "  model.layers.0.w: 1 NaN, 2 Inf" in result.stderr

    def test_counts_add_up_over_row_pieces(self, cli, tmp_path, monkeypatch):
        """A cast computed in row pieces (16 rows each) reports the whole tensor's counts once."""
        from safetensors.torch import save_file

        import recipekit.plan.cost as pl

        src = tmp_path / "m"
        src.mkdir()
        bad = torch.zeros(64, 4)
        bad[0, 0], bad[30, 1], bad[63, 3] = float("nan"), float("inf"), -float("inf")
        save_file({"model.layers.0.w": bad}, src / "model.safetensors",
                  metadata={"format": "pt"})
        (src / "config.json").write_text(json.dumps({"num_hidden_layers": 1}))
        monkeypatch.setattr(pl, "CHUNK_ELEMS", 12)
        cast = write_recipe(tmp_path, solar_recipe("./m", "[0]", "  path: ./cast\n"
                                                   "  dtype: bfloat16"))
        result = ok(cli, "run", cast, "-q", "--check-finite")
        assert result.stderr.splitlines()[1:] == [
            "  input tiny:model.layers.0.w: 1 NaN, 2 Inf", "  model.layers.0.w: 1 NaN, 2 Inf"]
        # slerp reads its inputs whole for the coefficients, then slices them by rows:
        # each input is still counted once
        slerp = write_recipe(tmp_path, "recipekit: 1\nmodels:\n  a: ./m\n  b: ./m\nsteps:\n"
                             "  - name: s\n    op: merge\n    method: slerp\n    from: [a, b]\n"
                             "    parameters: {t: 0.3}\noutput:\n  path: ./slerp\n", "s.yaml")
        lines = ok(cli, "run", slerp, "-q", "--check-finite").stderr.splitlines()[1:]
        assert sorted(lines)[:2] == ["  input a:model.layers.0.w: 1 NaN, 2 Inf",
                                     "  input b:model.layers.0.w: 1 NaN, 2 Inf"]

    def test_clean_model(self, cli, tmp_path, tiny_llama):
        relative = Path(os.path.relpath(tiny_llama, tmp_path))  # no absolute-path warning
        result = ok(cli, "run", solar(tmp_path, relative), "-q", "--check-finite")
        assert result.stdout.splitlines()[-1] == "check-finite: no NaN or Inf values"
        assert result.stderr == ""


CHUNKED_STEPS = {
    "linear": "op: merge\n    method: linear\n    from: [{model: a, weight: 0.7}, "
              "{model: b, weight: 0.45}]",
    "task_arithmetic": "op: merge\n    method: task_arithmetic\n    base: a\n"
                       "    from: [{model: b, weight: {gradient: [0.2, 0.9]}}]",
    "nearswap": "op: merge\n    method: nearswap\n    from: [a, b]\n"
                "    parameters: {t: 0.01}",
    "passthrough": "op: merge\n    method: passthrough\n    from: [{model: b, scale: 0.3}]",
    "interpolate": "op: interpolate\n    from: [a, b]\n    alpha: 0.37",
    # coefficients from the whole tensors, then c_a·a + c_b·b by rows
    "slerp": "op: merge\n    method: slerp\n    from: [a, b]\n    parameters: {t: 0.3}",
}


class TestChunkedEvaluation:
    """Large elementwise expressions are computed in flat pieces (DESIGN.md §1, issue 7).

    Oracle: the same recipe evaluated whole, at one torch intra-op thread (the pieces use one),
    written byte for byte the same; pieces of 100 elements make every tiny-model tensor span
    several pieces and end in a partial one.
    """

    def run(self, cli, tmp_path, a, b, body, out, dtype="", *flags):
        text = (f"recipekit: 1\nmodels:\n  a: {a}\n  b: {b}\nsteps:\n  - name: m\n    {body}\n"
                f"output:\n  path: ./{out}\n  shard_size: 200KB{dtype}\n")
        ok(cli, "run", write_recipe(tmp_path, text, f"{out}.yaml"), "-q", "--no-fsync", *flags)
        return {p.name: p.read_bytes() for p in sorted((tmp_path / out).glob("*.safetensors"))}

    @pytest.mark.parametrize("name", list(CHUNKED_STEPS))
    def test_pieces_equal_the_whole_tensor(self, cli, tmp_path, tiny_llama, tiny_llama_b, name,
                                           monkeypatch):
        import recipekit.plan.cost as pl
        import recipekit.run.execute as ex

        calls = []
        real = ex.evaluate_chunks
        monkeypatch.setattr(ex, "evaluate_chunks",
                            lambda *a: calls.append(a[0]) or real(*a))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            dtype = "\n  dtype: bfloat16" if name == "linear" else ""
            whole = self.run(cli, tmp_path, tiny_llama, tiny_llama_b, CHUNKED_STEPS[name],
                             "whole", dtype)
            assert not calls
            monkeypatch.setattr(pl, "CHUNK_ELEMS", 100)
            pieces = self.run(cli, tmp_path, tiny_llama, tiny_llama_b, CHUNKED_STEPS[name],
                              "pieces", dtype, "--workers", "1")
            side_by_side = self.run(cli, tmp_path, tiny_llama, tiny_llama_b,
                                    CHUNKED_STEPS[name], "workers", dtype, "--workers", "3")
            assert torch.get_num_threads() == 1  # restored after the workers' pieces
        finally:
            torch.set_num_threads(threads)
        assert len(calls) > 20
        assert whole == pieces == side_by_side

    def test_whole_tensor_kernels_run_at_one_thread(self, cli, tmp_path, tiny_llama,
                                                   tiny_llama_b, monkeypatch):
        """A whole kernel's reductions would sum in an order set by the thread count: it runs
        at one thread whatever the cores and `--workers`, and the thread count is restored."""
        from recipekit.steps.merge import Merge

        seen = []
        real = Merge.compute
        monkeypatch.setattr(Merge, "compute",
                            lambda self, args: seen.append(torch.get_num_threads())
                            or real(self, args))
        threads = torch.get_num_threads()
        torch.set_num_threads(3)
        try:
            self.run(cli, tmp_path, tiny_llama, tiny_llama_b,
                     "op: merge\n    method: sce\n    base: a\n    from: [b]",
                     "stock", "", "--workers", "2")
            assert torch.get_num_threads() == 3
        finally:
            torch.set_num_threads(threads)
        assert seen and set(seen) == {1}

    def test_whole_inputs_of_the_next_tensor_are_read_ahead(self, cli, tmp_path, tiny_llama,
                                                            tiny_llama_b, monkeypatch):
        """While one tensor is computed, the read-ahead thread reads the inputs the next one
        reads whole (a TIES threshold's): the main thread reads only the first tensor's of
        each shard, and the bytes are those of a run without read-ahead."""
        import threading

        import recipekit.plan.cost as pl
        from recipekit.io.reader import FileReader

        threads: list[str] = []
        real = FileReader.read_tensor
        monkeypatch.setattr(FileReader, "read_tensor", lambda self, info: threads.append(
            threading.current_thread().name) or real(self, info))
        body = ("op: merge\n    method: ties\n    base: a\n"
                "    from: [{model: b, weight: 1, density: 0.5}]")
        ahead = self.run(cli, tmp_path, tiny_llama, tiny_llama_b, body, "ahead")
        on_main = threads.count("MainThread")
        assert len(threads) > 20 and on_main < len(threads) / 4
        monkeypatch.setattr(pl, "PREFETCH_BYTES", 0)
        threads.clear()
        assert self.run(cli, tmp_path, tiny_llama, tiny_llama_b, body, "inline") == ahead
        assert threads and set(threads) == {"MainThread"}

    def test_whole_tensor_ops_are_not_chunked_and_plan_says_so(self, cli, tmp_path, tiny_llama,
                                                               tiny_llama_b, monkeypatch):
        import recipekit.plan.cost as pl

        monkeypatch.setattr(pl, "CHUNK_ELEMS", 100)
        body = ("op: merge\n    method: dare_ties\n    base: a\n    random_masks: mergekit\n"
                "    from: [{model: b, weight: 1, density: 0.5}]")
        text = (f"recipekit: 1\nmodels:\n  a: {tiny_llama}\n  b: {tiny_llama_b}\nsteps:\n"
                f"  - name: m\n    {body}\n")
        r = write_recipe(tmp_path, text)
        plan = json.loads(ok(cli, "plan", r, "--format", "json").stdout)
        whole = plan["estimates"]["whole_tensor"]
        assert whole["op"] == "dare_ties"  # mergekit's torch.bernoulli draw needs it whole
        assert whole["tensor"] in ("model.embed_tokens.weight", "lm_head.weight")
        assert "whole tensor:  dare_ties of `" in ok(cli, "plan", r).stdout
        streamed = write_recipe(tmp_path, text.replace("    random_masks: mergekit\n", ""),
                                "streamed.yaml")
        assert json.loads(ok(cli, "plan", streamed, "--format", "json").stdout)[
            "estimates"]["whole_tensor"] is None
        linear = text.replace(body, CHUNKED_STEPS["linear"])
        r = write_recipe(tmp_path, linear, "linear.yaml")
        assert json.loads(ok(cli, "plan", r, "--format", "json").stdout)[
            "estimates"]["whole_tensor"] is None
        assert "whole tensor" not in ok(cli, "plan", r).stdout


class TestBatch:
    """Computed pieces reach the writer in batches (`run.execute._Batch`). Oracle: the bytes
    the writer receives are the pieces', in order; every buffer is back in the pool once
    written."""

    class Writer:
        def __init__(self):
            self.writes: list[bytes] = []

        def write(self, view, done):
            self.writes.append(bytes(view))
            done()

    def test_pieces_are_written_in_order_in_batches(self, monkeypatch):
        import recipekit.run.execute as ex

        monkeypatch.setattr(ex, "BATCH_BYTES", 40)
        pool, writer = ex.BufferPool(2, 64), self.Writer()
        batch = ex._Batch(pool, writer)
        sizes = [3, 5, 1, 7, 2, 16, 4, 9]  # int32 values: 12..64 bytes, over the limit and not
        pieces = [torch.arange(sum(sizes[:i]), sum(sizes[:i + 1]), dtype=torch.int32)
                  for i in range(len(sizes))]
        assert all(batch.add(p) for p in pieces)
        assert not batch.add(torch.zeros(17, dtype=torch.int32))  # 68 bytes: over a buffer
        assert not batch.add(torch.zeros(0))
        batch.flush()
        batch.flush()  # nothing left: nothing written
        assert b"".join(writer.writes) == torch.cat(pieces).numpy().tobytes()
        # handed over at 40 bytes or more, or early when the next piece does not fit
        assert [len(w) for w in writer.writes] == [64, 8, 64, 52]
        assert pool._free.qsize() + pool._left == 2  # every buffer made is back


class TestReleaseHeap:
    """Oracle: the calls made to a stand-in libc. After a chunked tensor the heap is trimmed
    only when more than `plan.cost.KEPT_HEAP` of it is free (mallinfo2's ``fordblks``); without
    ``mallinfo2`` (glibc before 2.33) it is trimmed every time, and off glibc nothing runs."""

    class FakeLibc:
        def __init__(self, free: int | None) -> None:
            from recipekit.run.execute import _MallInfo2

            self.trims = 0
            if free is not None:
                def mallinfo2():  # a function, so that `restype` can be set on it as on ctypes'
                    assert mallinfo2.restype is _MallInfo2
                    return _MallInfo2(fordblks=free)

                self.mallinfo2 = mallinfo2

        def malloc_trim(self, pad: int) -> int:
            assert pad == 0
            self.trims += 1
            return 1

    @pytest.mark.parametrize(("free", "keep", "trims"), [
        (0, None, 0), (10 << 20, None, 0), (32 << 20, None, 0), ((32 << 20) + 1, None, 1),
        (None, None, 1), (100 << 20, 128 << 20, 0), ((128 << 20) + 1, 128 << 20, 1)])
    def test_trims_above_the_threshold(self, monkeypatch, free, keep, trims):
        from recipekit.run import execute

        assert execute.KEPT_HEAP == 32 << 20  # the default: `plan.cost.kept_heap`'s least
        libc = self.FakeLibc(free)
        monkeypatch.setattr(execute.ctypes, "CDLL", lambda name: libc)
        execute._release_heap() if keep is None else execute._release_heap(keep)
        assert libc.trims == trims

    def test_no_glibc(self, monkeypatch):
        from recipekit.run import execute

        def missing(name):
            raise OSError(name)

        monkeypatch.setattr(execute.ctypes, "CDLL", missing)
        execute._release_heap()  # no error
