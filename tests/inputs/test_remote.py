"""Models and outputs on object storage (io/remote.py, inputs/remote.py, io/remote_output.py).

Oracle: a real S3-compatible server — moto's, standalone on 127.0.0.1, started by this module —
reached through s3fs with the endpoint given in the environment, exactly as a user points
recipekit at a bucket. Every request the server receives is logged by a WSGI wrapper, so the
tests assert what went over the wire (the header ranges, then only the tensors the plan reads),
and the bytes of every output file are compared with a local run of the same recipe (sha256).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.builders import make_model
from tests.helpers.recipes import ROOT, write_recipe
from tests.helpers.s3 import BUCKET, RequestLog, moto_server

s3fs = pytest.importorskip("s3fs", reason="the object-storage tests need s3fs (recipekit[s3])")
pytest.importorskip("moto.server", reason="the object-storage tests need moto[server]")

import recipekit  # noqa: E402
from recipekit.inputs.remote import forget_stubs  # noqa: E402

SHARD_SIZE = "6MB"


Server = tuple[Any, RequestLog, dict[str, str]]  # filesystem, request log, environment


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A moto S3 server on a free loopback port, the environment that points s3fs at it
    (fail-closed: no config file, no instance metadata), a filesystem and the request log."""
    with moto_server(tmp_path_factory.mktemp("aws")) as (log, env), \
            pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir(BUCKET)
        try:
            yield fs, log, env
        finally:
            forget_stubs()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama of about 19 MB (fp32, vocab 16384, hidden 128, 4 layers): with 6 MB output
    shards, the embeddings and the lm_head (8 MiB each) are shards of their own, multipart
    uploads (parts ≥ 5 MiB), and the kept layers a small third one."""
    path = make_model("llama", tmp_path_factory.mktemp("big") / "model", layers=4,
                      vocab_size=16384, hidden_size=128, head_dim=32, intermediate_size=256)
    (path / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    return path


@pytest.fixture(scope="module")
def uploaded(s3: tuple[Any, RequestLog, dict[str, str]], model: Path) -> str:
    fs = s3[0]
    for p in sorted(model.iterdir()):
        fs.put_file(str(p), f"{BUCKET}/models/big/{p.name}")
    return f"s3://{BUCKET}/models/big"


def _recipe(directory: Path, model: str, output: str, layers: str = '["range(0,1)", 3]') -> Path:
    return write_recipe(directory, f"""
        recipekit: 1
        models:
          big: {model}
        steps:
          - name: cut
            op: layers
            from: big
            layers: {layers}
        output:
          path: {output}
          shard_size: {SHARD_SIZE}
        """)


#: The files that quote the recipe (its paths differ between the two runs), compared apart.
QUOTING = ("README.md", "recipekit.json")


def _local_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every file but the two that quote the recipe, plus the manifest's record of
    the shards (which must agree)."""
    out = {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
           for p in sorted(directory.rglob("*")) if p.is_file() and p.name not in QUOTING}
    out["manifest shards"] = json.dumps(
        json.loads((directory / "recipekit.json").read_text())["shards"], sort_keys=True)
    return out


def _remote_hashes(fs: Any, prefix: str) -> dict[str, str]:
    fs.invalidate_cache()
    out = {k[len(prefix) + 1:]: hashlib.sha256(fs.cat_file(k)).hexdigest()
           for k in sorted(fs.find(prefix)) if k.rsplit("/", 1)[1] not in QUOTING}
    out["manifest shards"] = json.dumps(
        json.loads(fs.cat_file(f"{prefix}/recipekit.json"))["shards"], sort_keys=True)
    return out


WEIGHTS = ("model.safetensors", "model-00001-of-00002.safetensors",
           "model-00002-of-00002.safetensors")


class TestRangedInputs:
    """A URL model is read by ranges: each shard's 8-byte length and header, then exactly the
    bytes of the tensors the plan reads (the layers op keeps layers 0 and 3 of 4), never a whole
    object; the output equals the same recipe's from the local copy, byte for byte."""

    def test_reads_only_headers_and_planned_tensors(self, s3, uploaded, model, tmp_path):
        fs, log, _ = s3
        local = recipekit.run(_recipe(tmp_path, str(model), "./local"), progress=None)
        log.clear()
        plan = recipekit.plan(_recipe(tmp_path, uploaded, "./remote"), warn=False)
        planned = {k: log.gets(f"models/big/{k}") for k in WEIGHTS}
        weights = [k for k in WEIGHTS if planned[k]]
        assert weights, log.requests
        for k in weights:  # the length, then the header alone
            (a0, b0), (a1, b1) = planned[k]
            assert (a0, b0, a1) == (0, 8, 8)
            n = int.from_bytes((model / k).read_bytes()[:8], "little")
            assert b1 == 8 + n
        log.clear()
        result = recipekit.run(plan, progress=None)
        read = {k: sorted(log.gets(f"models/big/{k}")) for k in weights}
        expected: dict[str, list[tuple[int, int]]] = {k: [] for k in weights}
        for node in plan.plan.loads():
            info = plan.plan.sources[node.source].tensors[node.name]
            expected[info.file.name].append((info.offset, info.offset + info.nbytes))
        for k in weights:  # the union of the ranges read is exactly the planned tensors
            assert _merge(read[k]) == _merge(expected[k]), k
            assert sum(b - a for a, b in read[k]) == sum(b - a for a, b in expected[k])
        stored = plan.plan.sources["big"].tensors
        loaded = {n.name for n in plan.plan.loads()}
        unread = sum(t.nbytes for name, t in stored.items() if name not in loaded)
        assert unread > 1_000_000  # layers 1 and 2 are never requested
        assert sum(b - a for k in weights for a, b in read[k]) == sum(
            t.nbytes for t in stored.values()) - unread
        assert _local_hashes(Path(result.output)) == _local_hashes(Path(local.output))

    def test_sharded_input(self, s3, model, tmp_path):
        """A sharded checkpoint (index + 3 shards) at a URL gives the bytes its local copy
        gives."""
        fs = s3[0]
        sharded = Path(recipekit.run(_recipe(tmp_path, str(model), "./sharded"),
                                     progress=None).output)
        for p in sorted(sharded.iterdir()):
            fs.put_file(str(p), f"{BUCKET}/models/sharded/{p.name}")
        again = tmp_path / "again"
        again.mkdir()
        local = recipekit.run(_recipe(again, str(sharded), "./local", '["range(0,2)"]'),
                              progress=None)
        remote = recipekit.run(_recipe(again, f"s3://{BUCKET}/models/sharded", "./remote",
                                       '["range(0,2)"]'), progress=None)
        assert len(remote.shards) == 3
        assert _local_hashes(Path(remote.output)) == _local_hashes(Path(local.output))

    def test_adapter_and_model_at_urls(self, s3, tmp_path):
        """recipes/lora-fold.yaml with its model and adapter in the bucket: the bytes of the
        committed recipe's own run (a computed op: the LoRA delta read by ranges, folded)."""
        fs = s3[0]
        models = ROOT / "recipes" / "models"
        for name in ("tiny-llama", "tiny-lora"):
            for p in sorted((models / name).iterdir()):
                fs.put_file(str(p), f"{BUCKET}/models/{name}/{p.name}")
        text = (ROOT / "recipes" / "lora-fold.yaml").read_text()
        local = write_recipe(tmp_path, text.replace("./models/", f"{models}/").replace(
            "../out/lora-fold", "./local"), "local.yaml")
        remote = write_recipe(tmp_path, text.replace("./models/", f"s3://{BUCKET}/models/")
                              .replace("../out/lora-fold", "./remote"), "remote.yaml")
        a = recipekit.run(local, progress=None)
        b = recipekit.run(remote, progress=None)
        assert _local_hashes(Path(b.output)) == _local_hashes(Path(a.output))

    def test_merge_reads_row_pieces(self, s3, uploaded, model, tmp_path):
        """A linear merge and an `interpolate` of URL inputs read their large tensors (the 8 MiB
        embeddings) in row pieces into torch-owned buffers (`execute.read_rows`), not into the
        reader's own: the same bytes as the recipe run on the local copy (a ctypes buffer
        refused the ranged read's bytes, an internal error, before)."""
        fs = s3[0]
        for p in sorted(model.iterdir()):
            fs.put_file(str(p), f"{BUCKET}/models/other/{p.name}")
        for step in ("{name: m, op: merge, method: linear, from: [a, b], "
                     "parameters: {weight: 0.5}}",
                     "{name: m, op: interpolate, from: [a, b], alpha: 0.3}"):
            def recipe(a: str, b: str, out: str, step: str = step) -> Path:
                return write_recipe(tmp_path, f"""
                    recipekit: 1
                    models:
                      a: {a}
                      b: {b}
                    steps:
                      - {step}
                    output:
                      path: {out}
                      shard_size: {SHARD_SIZE}
                    """, f"{out.strip('./')}.yaml")

            local = recipekit.run(recipe(str(model), str(model), "./local"), progress=None,
                                  force=True)
            remote = recipekit.run(recipe(uploaded, f"s3://{BUCKET}/models/other", "./remote"),
                                   progress=None, force=True)
            assert _local_hashes(Path(remote.output)) == _local_hashes(Path(local.output)), step

    def test_plan_pickles_with_its_urls(self, s3, uploaded):
        """A plan sent to another process (an executor's worker) still reads from the bucket:
        each remote tensor's file keeps its URL and ETag through pickling."""
        import pickle

        from recipekit.io.remote import is_remote

        plan = recipekit.plan({"recipekit": 1, "models": {"big": uploaded},
                               "steps": [{"name": "cut", "op": "layers", "from": "big",
                                          "layers": [0]}]}, warn=False).plan
        info = next(iter(plan.sources["big"].tensors.values()))
        copy = pickle.loads(pickle.dumps(info))
        assert is_remote(copy.file) and copy == info
        assert (copy.file.url, copy.file.etag) == (info.file.url, info.file.etag)
        assert copy.file.url == f"{uploaded}/model.safetensors" and info.file.etag

    def test_manifest_records_etags_not_credentials(self, s3, uploaded, tmp_path):
        _, _, env = s3
        out = recipekit.run(_recipe(tmp_path, uploaded, "./out"), progress=None).output
        text = (Path(out) / "recipekit.json").read_text()
        entry = json.loads(text)["inputs"]["big"]
        assert entry["url"] == uploaded
        assert entry["files"]["config.json"]["etag"]
        assert env["AWS_SECRET_ACCESS_KEY"] not in text and env["AWS_ACCESS_KEY_ID"] not in text


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


class TestOutput:
    """An output prefix on S3 holds the same bytes as a local run (sha256 of every file), shards
    arrive by multipart upload, the manifest is written last and no state object remains."""

    def test_same_bytes_as_local(self, s3, uploaded, model, tmp_path):
        fs, log, _ = s3
        local = recipekit.run(_recipe(tmp_path, str(model), "./local"), progress=None)
        url = f"s3://{BUCKET}/out/same"
        log.clear()
        result = recipekit.run(_recipe(tmp_path, uploaded, url), progress=None)
        assert result.output == url and len(result.shards) == 3
        remote = _remote_hashes(fs, f"{BUCKET}/out/same")
        assert remote == _local_hashes(Path(local.output))
        first = result.shards[0].name
        assert ("POST", "uploads") in log.writes(f"out/same/{first}")  # multipart
        keys = [p for m, p, _, _ in log.requests if m in ("PUT", "POST")
                and not p.endswith(".recipekit-state.json")]
        assert keys[-1] == f"/{BUCKET}/out/same/recipekit.json"  # the manifest comes last
        again = recipekit.run(_recipe(tmp_path, uploaded, url), progress=None)
        assert again.already_complete

    def test_cli_output_option_takes_a_url(self, s3, uploaded, tmp_path, cli):
        """`--output s3://...` is a URL (not the local path `s3:/...`), in `plan` and `run`."""
        fs = s3[0]
        recipe = _recipe(tmp_path, uploaded, "./local")
        url = f"s3://{BUCKET}/out/cli"
        shown = cli("plan", "--output", url, recipe)
        assert shown.exit_code == 0 and f"output:        {url}  (model 'cut'" in shown.stdout
        done = cli("run", "--quiet", "--output", url, recipe)
        assert done.exit_code == 0 and done.stdout.startswith(f"wrote {url}: 2 layers, 3 shard")
        assert not (tmp_path / "s3:").exists() and not (tmp_path / "local").exists()
        fs.invalidate_cache()
        assert fs.exists(f"{BUCKET}/out/cli/recipekit.json")
        clash = cli("run", "--quiet", "--output", uploaded, recipe)
        assert clash.exit_code == 2
        assert f"output {uploaded} is input `models.big` ({uploaded})" in clash.stderr

    def test_other_plan_needs_force_which_deletes_only_listed_objects(self, s3, uploaded,
                                                                       tmp_path):
        fs = s3[0]
        url = f"s3://{BUCKET}/out/replaced"
        recipekit.run(_recipe(tmp_path, uploaded, url), progress=None)
        other = _recipe(tmp_path, uploaded, url, layers='["range(0,2)"]')
        with pytest.raises(recipekit.errors.OutputPathError, match="different plan"):
            recipekit.run(other, progress=None)
        result = recipekit.run(other, progress=None, force=True)
        fs.invalidate_cache()
        left = sorted(k.rsplit("/", 1)[1] for k in fs.find(f"{BUCKET}/out/replaced"))
        manifest = json.loads(fs.cat_file(f"{BUCKET}/out/replaced/recipekit.json"))
        assert left == sorted([*manifest["shards"], *manifest["files"], "recipekit.json"])
        assert len(result.shards) == len(manifest["shards"]) and result.shards_resumed == 0

    def test_verify_finds_a_tampered_object(self, s3, uploaded, tmp_path, cli):
        """`recipekit verify s3://...` re-hashes every object against the manifest."""
        fs = s3[0]
        url = f"s3://{BUCKET}/out/verified"
        result = recipekit.run(_recipe(tmp_path, uploaded, url), progress=None)
        ok = cli("verify", url)
        assert ok.exit_code == 0 and ok.stdout.endswith(f"{url}: verified\n"), ok.output
        assert ok.stdout.count("sha256 matches, header sound") == 3
        key = f"{BUCKET}/out/verified/{result.shards[1].name}"
        data = bytearray(fs.cat_file(key))
        data[-1] ^= 1
        fs.pipe_file(key, bytes(data))
        bad = cli("verify", url)
        assert bad.exit_code == 1
        assert f"{url}/{result.shards[1].name}: sha256 " in bad.stderr
        assert bad.stderr.endswith(f"{url}: 1 problem(s) found\n")

    def test_foreign_prefix_refused(self, s3, uploaded, tmp_path):
        fs = s3[0]
        fs.pipe_file(f"{BUCKET}/out/foreign/notes.txt", b"mine")
        with pytest.raises(recipekit.errors.OutputPathError, match="did not write"):
            recipekit.run(_recipe(tmp_path, uploaded, f"s3://{BUCKET}/out/foreign"),
                          progress=None)
        assert fs.cat_file(f"{BUCKET}/out/foreign/notes.txt") == b"mine"


KILLER = """
import os, signal, sys
from recipekit.io import remote_output
calls = {"shards": 0}
Writer = remote_output.RemoteShardWriter
orig_init, orig_write = Writer.__init__, Writer.write
def init(self, fs, key, header, size, **kw):
    if key.endswith(".safetensors"):
        calls["shards"] += 1
    self._kill = key.endswith(".safetensors") and calls["shards"] == 2
    orig_init(self, fs, key, header, size, **kw)
def write(self, data, **kw):
    orig_write(self, data, **kw)
    if self._kill and self.written > 5_500_000:  # a part is uploaded by now
        os.kill(os.getpid(), signal.SIGKILL)
Writer.__init__, Writer.write = init, write
from recipekit.cli import main
main()
"""


class TestKillAndResume:
    """A run SIGKILLed during the second shard's upload (after a part went up) leaves the first
    shard, a state object naming it, an invisible incomplete upload and no manifest (the
    half-written output never looks complete); a rerun aborts that upload, uploads only the
    other shards and ends with the bytes of a local run."""

    def test_kill_during_upload_then_resume(self, s3, uploaded, model, tmp_path):
        fs, log, env = s3
        local = recipekit.run(_recipe(tmp_path, str(model), "./local"), progress=None)
        url = f"s3://{BUCKET}/out/killed"
        recipe = _recipe(tmp_path, uploaded, url)
        proc = subprocess.run(
            [sys.executable, "-c", KILLER, "run", "--quiet", str(recipe)], cwd=tmp_path,
            env={**os.environ, **env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
            timeout=300)
        assert proc.returncode == -9, proc.stderr
        fs.invalidate_cache()
        left = sorted(k.rsplit("/", 1)[1] for k in fs.find(f"{BUCKET}/out/killed"))
        shards = sorted(p.name for p in Path(local.output).glob("*.safetensors"))
        assert left == [".recipekit-state.json", shards[0]]  # no 2nd shard, no manifest
        state = json.loads(fs.cat_file(f"{BUCKET}/out/killed/.recipekit-state.json"))
        assert sorted(state["finished"]) == shards[:1]
        uploads = fs.call_s3("list_multipart_uploads", Bucket=BUCKET, Prefix="out/killed/")
        assert [u["Key"] for u in uploads.get("Uploads", [])] == [f"out/killed/{shards[1]}"]
        log.clear()
        result = recipekit.run(recipe, progress=None)
        assert result.shards_resumed == 1
        assert not log.writes(f"out/killed/{shards[0]}")
        uploads = fs.call_s3("list_multipart_uploads", Bucket=BUCKET, Prefix="out/killed/")
        assert not uploads.get("Uploads")  # the killed run's upload was aborted
        assert _remote_hashes(fs, f"{BUCKET}/out/killed") == _local_hashes(Path(local.output))


class TestDamagedInput:
    def test_truncated_header_names_the_url(self, s3, model, tmp_path):
        """A remote header gets a local header's checks; the message names the object's URL."""
        fs = s3[0]
        fs.put_file(str(model / "config.json"), f"{BUCKET}/models/cut/config.json")
        fs.pipe_file(f"{BUCKET}/models/cut/model.safetensors",
                     (model / "model.safetensors").read_bytes()[:4000])
        with pytest.raises(recipekit.errors.CorruptCheckpointError) as e:
            recipekit.validate(_recipe(tmp_path, f"s3://{BUCKET}/models/cut", "./out"))
        assert str(e.value).startswith(f"s3://{BUCKET}/models/cut/model.safetensors: ")

    @pytest.mark.parametrize("name, text", [
        ("config.json", b'{"model_type": "llama", broken'),
        ("model.safetensors.index.json", b'{broken')])
    def test_damaged_small_file_names_its_url(self, s3, model, tmp_path, name, text):
        """A damaged config or index is copied into the temporary stub folder to be read, but
        the message names the object's URL, as every other message about a URL input does
        (it named the stub's temporary path before)."""
        fs = s3[0]
        prefix = f"models/damaged-{name.split('.')[1]}"
        for p in sorted(model.iterdir()):
            fs.put_file(str(p), f"{BUCKET}/{prefix}/{p.name}")
        fs.pipe_file(f"{BUCKET}/{prefix}/{name}", text)
        with pytest.raises(recipekit.errors.CorruptCheckpointError) as e:
            recipekit.validate(_recipe(tmp_path, f"s3://{BUCKET}/{prefix}", "./out"))
        assert str(e.value).startswith(f"s3://{BUCKET}/{prefix}/{name}: {name} is not valid "
                                       "JSON (")
        assert "recipekit-remote-" not in str(e.value)


class TestPinning:
    """A URL input is pinned by each object's ETag and size: `recipekit lock` records them and a
    replaced object fails the lock check; a plan made before an object changed refuses to read
    it (a mix of two versions is never written)."""

    def test_lock_and_plan_notice_a_replaced_object(self, s3, model, tmp_path):
        fs = s3[0]
        for p in sorted(model.iterdir()):
            fs.put_file(str(p), f"{BUCKET}/models/pinned/{p.name}")
        recipe = _recipe(tmp_path, f"s3://{BUCKET}/models/pinned", "./out")
        plan = recipekit.plan(recipe, warn=False)
        original = (model / "model.safetensors").read_bytes()
        changed = original[:-1] + bytes([original[-1] ^ 1])
        fs.pipe_file(f"{BUCKET}/models/pinned/model.safetensors", changed)
        with pytest.raises(recipekit.errors.TensorDataError, match="changed since the plan"):
            recipekit.run(plan, progress=None)
        recipekit.lock(recipe)
        entry = json.loads(recipe.with_name("recipe.lock.json").read_text())["inputs"]["models.big"]
        assert entry["url"] == f"s3://{BUCKET}/models/pinned"
        assert entry["files"]["model.safetensors"]["etag"]
        fs.pipe_file(f"{BUCKET}/models/pinned/model.safetensors", original)
        with pytest.raises(recipekit.errors.LockError, match="model.safetensors is ETag"):
            recipekit.run(recipe, progress=None)

    def test_lock_names_an_object_added_since(self, s3, model, tmp_path):
        """An object added under a locked prefix is named as not in the lock, with its ETag and
        size (the message was garbled: "..., the lock has not in the lock")."""
        fs = s3[0]
        for p in sorted(model.iterdir()):
            fs.put_file(str(p), f"{BUCKET}/models/grown/{p.name}")
        recipe = _recipe(tmp_path, f"s3://{BUCKET}/models/grown", "./out")
        recipekit.lock(recipe)
        fs.pipe_file(f"{BUCKET}/models/grown/extra.txt", b"hi")
        etag = fs.info(f"{BUCKET}/models/grown/extra.txt")["ETag"].strip('"')
        with pytest.raises(recipekit.errors.LockError) as e:
            recipekit.run(recipe, progress=None)
        assert str(e.value).startswith(
            f"{recipe.with_name('recipe.lock.json')}: models.big: s3://{BUCKET}/models/grown/"
            f"extra.txt is not in the lock (ETag {etag}, 2 bytes);")

    def _replace_after_first_shard(self, fs, key, monkeypatch):
        """Replace ``key`` by a version of the same size once the run records its first shard."""
        from recipekit.io.output import OutputDir

        original = fs.cat_file(key)
        mark = OutputDir.mark_finished

        def mark_then_replace(out, shard, sha256, size):
            mark(out, shard, sha256, size)
            if len(out.state.finished) == 1:
                fs.pipe_file(key, original[:-1] + bytes([original[-1] ^ 1]))
        monkeypatch.setattr(OutputDir, "mark_finished", mark_then_replace)

    def test_object_replaced_during_the_run(self, s3, model, tmp_path, monkeypatch):
        """An object re-uploaded (same size) after the first shard is finished: every ranged read
        is pinned to the ETag the plan read (S3 If-Match), so the next read is refused, the run
        fails naming the object and keeps the finished shard, and no shard mixing two versions
        is ever recorded (the run used to finish, exit 0, with shards of both versions)."""
        fs = s3[0]
        for p in sorted(model.iterdir()):
            fs.put_file(str(p), f"{BUCKET}/models/replaced/{p.name}")
        url = f"s3://{BUCKET}/models/replaced"
        recipe = _recipe(tmp_path, url, "./out")
        self._replace_after_first_shard(fs, f"{BUCKET}/models/replaced/model.safetensors",
                                        monkeypatch)
        with pytest.raises(recipekit.errors.TensorDataError) as e:
            recipekit.run(recipe, progress=None)
        assert str(e.value).startswith(f"{url}/model.safetensors: the object changed during the "
                                       "run (")
        assert e.value.exit_code == 1
        state = json.loads((tmp_path / "out" / ".recipekit-state.json").read_text())
        assert len(state["finished"]) == 1
        assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == sorted(
            state["finished"])
        assert not (tmp_path / "out" / "recipekit.json").exists()

    def test_unpinned_backend_checked_after_each_shard(self, s3, model, tmp_path,
                                                       monkeypatch):
        """Where reads cannot be pinned (a backend without If-Match), the ETag of every object
        a shard read is checked again before the shard is kept, as a local file's fstat is: an
        object replaced between two reads of one shard fails the run and that shard is
        discarded."""
        import recipekit.io.reader as reader

        fs = s3[0]
        for p in sorted(model.iterdir()):
            fs.put_file(str(p), f"{BUCKET}/models/unpinned/{p.name}")
        url = f"s3://{BUCKET}/models/unpinned"
        key = f"{BUCKET}/models/unpinned/model.safetensors"
        original = fs.cat_file(key)
        monkeypatch.setattr("recipekit.io.remote.is_pinnable", lambda fs: False, raising=False)
        read = reader.cat_range
        calls = []
        state = tmp_path / "out" / ".recipekit-state.json"
        finished: dict[str, Any] = {}

        def read_then_replace(*args, **kwargs):
            calls.append(args)
            # reads 1 and 2: the embeddings and the lm_head, a shard each; 3: the first tensor
            # of the layers' shard, which the next reads then mix with the new version
            if len(calls) == 4:
                finished.update(json.loads(state.read_text())["finished"])
                fs.pipe_file(key, original[:-1] + bytes([original[-1] ^ 1]))
            return read(*args, **kwargs)
        monkeypatch.setattr(reader, "cat_range", read_then_replace)
        with pytest.raises(recipekit.errors.TensorDataError) as e:
            recipekit.run(_recipe(tmp_path, url, "./out"), progress=None)
        assert str(e.value).startswith(f"{url}/model.safetensors: the object changed during the "
                                       "run (")
        assert len(finished) == 2
        assert json.loads(state.read_text())["finished"] == finished  # kept, and no other
        assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == sorted(
            finished)


class TestExtraAndCredentials:
    def test_missing_s3fs_is_one_line_exit_2(self, tmp_path):
        recipe = _recipe(tmp_path, f"s3://{BUCKET}/models/big", "./out")
        code = ("import sys; sys.modules['s3fs'] = None\nfrom recipekit.cli import main\n"
                f"sys.argv = ['recipekit', 'run', {str(recipe)!r}]\nmain()")
        proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert "pip install 'recipekit[s3]'" in proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1

    def test_no_credentials_is_one_paragraph_exit_2(self, s3, uploaded, model, tmp_path, cli,
                                                    monkeypatch):
        """No credentials anywhere (botocore's NoCredentialsError is not an OSError): validate,
        run (a URL input, or local inputs and a URL output), lock and verify each exit 2 with one
        paragraph naming the URL and where credentials go (an internal error before)."""
        _, _, env = s3
        url = f"s3://{BUCKET}/out/creds"
        recipekit.run(_recipe(tmp_path, uploaded, url), progress=None)
        (tmp_path / "local").mkdir()
        local = _recipe(tmp_path / "local", str(model), "./out")
        recipe = _recipe(tmp_path, uploaded, "./out")
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        s3fs.S3FileSystem.clear_instance_cache()
        try:
            for args, shown in [(("validate", recipe), f"{recipe}:3:8: models.big: cannot list "
                                 f"{uploaded}: no credentials were found"),
                                (("run", "-q", recipe), f"{recipe}:3:8: models.big: cannot list "
                                 f"{uploaded}: no credentials were found"),
                                (("lock", recipe), f"{recipe}:3:8: models.big: cannot list "
                                 f"{uploaded}: no credentials were found"),
                                (("run", "-q", "--output", f"{url}2", local),
                                 f"{url}2: cannot list the output: no credentials were found"),
                                (("verify", url), f"{url}: cannot list: no credentials were "
                                 "found")]:
                r = cli(*args)
                assert r.exit_code == 2, (args, r.output)
                assert r.stderr.startswith(shown + "; set AWS_ACCESS_KEY_ID and "
                                           "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"), r.stderr
                assert "AWS_ENDPOINT_URL" in r.stderr and "internal error" not in r.stderr
                assert env["AWS_SECRET_ACCESS_KEY"] not in r.output
        finally:
            s3fs.S3FileSystem.clear_instance_cache()

    def test_unreachable_endpoint(self, s3, uploaded, tmp_path, cli, monkeypatch):
        """An endpoint nothing listens on (EndpointConnectionError, not an OSError): validate
        exits 2 and verify 1, each naming the URL and the endpoint (an internal error before)."""
        url = f"s3://{BUCKET}/out/unreachable"
        recipekit.run(_recipe(tmp_path, uploaded, url), progress=None)
        recipe = _recipe(tmp_path, uploaded, "./out")
        monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
        s3fs.S3FileSystem.clear_instance_cache()
        try:
            checked = cli("validate", recipe)
            assert checked.exit_code == 2, checked.output
            assert checked.stderr.startswith(
                f"{recipe}:3:8: models.big: cannot list {uploaded}: could not connect to the "
                "endpoint http://127.0.0.1:1; check "), checked.stderr
            verified = cli("verify", url)
            assert verified.exit_code == 1, verified.output
            assert verified.stderr.startswith(f"{url}: cannot list: could not connect to the "
                                              "endpoint http://127.0.0.1:1; check ")
        finally:
            s3fs.S3FileSystem.clear_instance_cache()

    def test_endpoint_lost_during_the_run(self, s3, uploaded, tmp_path, monkeypatch):
        """The endpoint stops answering after the first shard: the next ranged read fails the run
        with exit 1, naming the object and the endpoint, and the finished shard is kept (an
        internal error before)."""
        from recipekit.io.output import OutputDir

        mark = OutputDir.mark_finished

        def mark_then_lose(out, shard, sha256, size):
            mark(out, shard, sha256, size)
            monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
            monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
            s3fs.S3FileSystem.clear_instance_cache()
        monkeypatch.setattr(OutputDir, "mark_finished", mark_then_lose)
        try:
            with pytest.raises(recipekit.errors.TensorDataError) as e:
                recipekit.run(_recipe(tmp_path, uploaded, "./out"), progress=None)
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
        assert str(e.value).startswith(f"{uploaded}/model.safetensors: ranged read failed: "
                                       "could not connect to the endpoint http://127.0.0.1:1; ")
        assert "finished shards are kept" in str(e.value) and e.value.exit_code == 1
        state = json.loads((tmp_path / "out" / ".recipekit-state.json").read_text())
        assert len(state["finished"]) == 1

    @pytest.mark.parametrize("drops", [2, 99])
    def test_a_body_dropped_mid_read_is_read_again(self, s3, uploaded, model, tmp_path,
                                                  monkeypatch, drops):
        """A connection dropped in a ranged read's body ended the run (exit 1), where s3fs's
        own `cat_file` reads again: the ETag-pinned read now tries the body again (the same
        version or a refusal), and the output is a local run's bytes; a connection that keeps
        dropping still ends the run with the message, the finished shards kept."""
        import aiohttp

        from recipekit.io import remote

        (tmp_path / "local").mkdir()
        local = recipekit.run(_recipe(tmp_path / "local", str(model), "./out"), progress=None)
        real = s3fs.S3FileSystem._call_s3
        left = {"drops": drops}

        class Dropped:
            def __init__(self, body):
                self.body = body

            async def read(self):
                raise aiohttp.ClientPayloadError("Response payload is not completed")

            def close(self):
                self.body.close()

        async def flaky(self, method, *args, **kwargs):
            resp = await real(self, method, *args, **kwargs)
            if method == "get_object" and "IfMatch" in kwargs and left.get("armed") \
                    and left["drops"] > 0:
                left["drops"] -= 1
                resp["Body"] = Dropped(resp["Body"])
            return resp

        from recipekit.io.output import OutputDir

        begin = OutputDir.begin

        def arm(out, needed):  # the tensor reads: planning's header reads are not dropped
            begin(out, needed)
            left["armed"] = True
        monkeypatch.setattr(OutputDir, "begin", arm)
        monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", flaky)
        monkeypatch.setattr(remote, "BODY_TRIES", 3)
        recipe = _recipe(tmp_path, uploaded, "./out")
        if drops < remote.BODY_TRIES:
            result = recipekit.run(recipe, progress=None)
            assert left["drops"] == 0
            assert _local_hashes(Path(result.output)) == _local_hashes(Path(local.output))
            return
        with pytest.raises(recipekit.errors.TensorDataError) as e:
            recipekit.run(recipe, progress=None)
        assert str(e.value).startswith(f"{uploaded}/model.safetensors: ranged read failed: ")
        assert e.value.exit_code == 1

    def test_credentials_in_url_refused(self, tmp_path):
        recipe = _recipe(tmp_path, "s3://KEY:SECRET@bucket/m", "./out")
        with pytest.raises(recipekit.errors.UsageError) as e:
            recipekit.validate(recipe)
        assert str(e.value).startswith(f"{recipe}:3:8: models.big: the URL holds credentials "
                                       "(user:secret@, or a token in its query); recipekit "
                                       "records URLs")
        assert "SECRET" not in str(e.value).split("\n")[0]

    def test_import_does_not_load_fsspec(self):
        code = ("import sys, recipekit, recipekit.cli\n"
                "bad = [m for m in ('fsspec', 's3fs', 'botocore') if m in sys.modules]\n"
                "assert not bad, bad")
        subprocess.run([sys.executable, "-c", code], check=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})


class TestForceKeepsEditedFiles:
    """`run --force` into a finished S3 output refuses, deleting nothing, when a small file the
    manifest records no longer holds what recipekit wrote (a model card edited in the bucket):
    as a local output does (tests/io/test_output.py). Oracle: the bucket's objects before and
    after, byte for byte; an edit of another length and one of the same length (caught by
    sha256, not by size) are both named."""

    def test_edited_card_and_config_are_kept(self, s3, uploaded, tmp_path):
        fs = s3[0]
        prefix = f"{BUCKET}/out/edited"
        recipekit.run(_recipe(tmp_path, uploaded, f"s3://{prefix}"), progress=None)
        fs.pipe_file(f"{prefix}/README.md", b"# My hand-edited model card\n")
        tok = bytearray(fs.cat_file(f"{prefix}/tokenizer_config.json"))
        tok[tok.index(b"64")] = ord("9")  # same size, other bytes
        fs.pipe_file(f"{prefix}/tokenizer_config.json", bytes(tok))
        fs.invalidate_cache()
        before = {k: fs.cat_file(k) for k in fs.find(prefix)}
        other = _recipe(tmp_path, uploaded, f"s3://{prefix}", layers='["range(0,2)"]')
        with pytest.raises(recipekit.errors.OutputPathError) as e:
            recipekit.run(other, progress=None, force=True)
        assert str(e.value).startswith(
            f"output s3://{prefix} holds objects recipekit did not write (README.md (changed "
            "since recipekit wrote it), tokenizer_config.json (changed since recipekit wrote "
            "it))")
        fs.invalidate_cache()
        assert {k: fs.cat_file(k) for k in fs.find(prefix)} == before

    def test_unedited_output_is_replaced(self, s3, uploaded, tmp_path):
        """The comparison passes files recipekit wrote as they are: --force replaces them."""
        fs = s3[0]
        url = f"s3://{BUCKET}/out/unedited"
        recipekit.run(_recipe(tmp_path, uploaded, url), progress=None)
        other = _recipe(tmp_path, uploaded, url, layers='["range(0,2)"]')
        result = recipekit.run(other, progress=None, force=True)
        assert result.shards_resumed == 0
        fs.invalidate_cache()
        manifest = json.loads(fs.cat_file(f"{BUCKET}/out/unedited/recipekit.json"))
        assert manifest["plan_hash"] == recipekit.plan(other, warn=False).plan_hash


class TestResumeKeepsObjectsPutThere:
    """An object put in an interrupted run's S3 output, at the name of a file the run had not
    written yet, was overwritten by the rerun, and deleted by `--force`: a local output
    refused both already (tests/io/test_output.py). A run's files are a function of its plan:
    the rerun replaces an object there only when it holds the very bytes the run writes, and
    the state object records each small file before it is written, so `--force` tells the
    run's own from one put there since. Oracle: the bucket's objects, byte for byte, and the
    output of an uninterrupted local run."""

    @pytest.fixture
    def interrupted(self, s3, uploaded, model, tmp_path, monkeypatch):
        from tests.helpers.interrupt import interrupt_at_shard

        prefix = f"{BUCKET}/out/put-{tmp_path.name}"
        (tmp_path / "local").mkdir()
        local = recipekit.run(_recipe(tmp_path / "local", str(model), "./out"), progress=None)
        recipe = _recipe(tmp_path, uploaded, f"s3://{prefix}")
        restore, started = interrupt_at_shard(monkeypatch, 2)
        with pytest.raises(KeyboardInterrupt):
            recipekit.run(recipe, progress=None)
        restore()
        s3[0].invalidate_cache()
        return recipe, prefix, Path(local.output), started

    @pytest.mark.parametrize("name", ["README.md", "config.json", "shard"])
    def test_an_object_put_there_is_kept(self, s3, interrupted, name):
        fs = s3[0]
        recipe, prefix, _, started = interrupted
        name = started[1] if name == "shard" else name
        fs.pipe_file(f"{prefix}/{name}", b"mine\n")
        with pytest.raises(recipekit.errors.OutputPathError) as e:
            recipekit.run(recipe, progress=None)
        assert str(e.value).startswith(f"s3://{prefix}/{name} is not an object this run wrote")
        fs.invalidate_cache()
        assert fs.cat_file(f"{prefix}/{name}") == b"mine\n"
        assert not fs.exists(f"{prefix}/recipekit.json")

    def test_the_runs_own_bytes_are_taken(self, s3, interrupted):
        fs = s3[0]
        recipe, prefix, local, started = interrupted
        fs.put_file(str(local / started[1]), f"{prefix}/{started[1]}")
        result = recipekit.run(recipe, progress=None)
        assert result.shards_resumed == 1
        assert _remote_hashes(fs, prefix) == _local_hashes(local)

    @pytest.fixture
    def before_manifest(self, s3, uploaded, tmp_path, monkeypatch):
        """A run killed before its manifest (every other file written), its recipe with a
        comment."""
        from recipekit.io.remote_output import RemoteOutput

        from tests.helpers.interrupt import interrupt_before_manifest

        prefix = f"{BUCKET}/out/last-{tmp_path.name}"
        recipe = _recipe(tmp_path, uploaded, f"s3://{prefix}")
        recipe.write_text("# comment v1\n" + recipe.read_text())
        interrupt_before_manifest(monkeypatch, RemoteOutput)
        with pytest.raises(KeyboardInterrupt):
            recipekit.run(recipe, progress=None)
        monkeypatch.undo()
        s3[0].invalidate_cache()
        return recipe, prefix

    def test_an_object_at_the_manifests_name_is_kept(self, s3, uploaded, tmp_path,
                                                    before_manifest):
        """The manifest's name was left out of both checks (found by a hole-finder): the
        rerun overwrote an object put there, and `--force` deleted it."""
        fs = s3[0]
        recipe, prefix = before_manifest
        fs.pipe_file(f"{prefix}/recipekit.json", b'{"mine": 1}')
        with pytest.raises(recipekit.errors.OutputPathError) as e:
            recipekit.run(recipe, progress=None)
        assert str(e.value).startswith(f"s3://{prefix}/recipekit.json is not an object this "
                                       "run wrote")
        (tmp_path / "other").mkdir()
        other = _recipe(tmp_path / "other", uploaded, f"s3://{prefix}", layers='["range(0,2)"]')
        with pytest.raises(recipekit.errors.OutputPathError) as e:
            recipekit.run(other, progress=None, force=True)
        assert "recipekit.json (changed since recipekit wrote it)" in str(e.value)
        fs.invalidate_cache()
        assert fs.cat_file(f"{prefix}/recipekit.json") == b'{"mine": 1}'

    def test_a_comment_edited_after_the_kill_keeps_the_runs_own_card(self, s3,
                                                                    before_manifest):
        """The same plan from a recipe whose comment changed: the card the run wrote (and
        recorded) is its own, where it was refused as put there."""
        fs = s3[0]
        recipe, prefix = before_manifest
        recipe.write_text(recipe.read_text().replace("v1", "v2"))
        recipekit.run(recipe, progress=None)
        fs.invalidate_cache()
        assert b"# comment v2" in fs.cat_file(f"{prefix}/README.md")
        assert fs.exists(f"{prefix}/recipekit.json")

    def test_force_keeps_an_object_put_there(self, s3, uploaded, interrupted, tmp_path):
        fs = s3[0]
        recipe, prefix, _, _ = interrupted
        fs.pipe_file(f"{prefix}/README.md", b"mine\n")
        fs.invalidate_cache()
        before = {k: fs.cat_file(k) for k in fs.find(prefix)}
        other = _recipe(tmp_path, uploaded, f"s3://{prefix}", layers='["range(0,2)"]')
        with pytest.raises(recipekit.errors.OutputPathError) as e:
            recipekit.run(other, progress=None, force=True)
        assert "holds objects recipekit did not write (README.md (changed since" in str(e.value)
        fs.invalidate_cache()
        assert {k: fs.cat_file(k) for k in fs.find(prefix)} == before
        fs.rm_file(f"{prefix}/README.md")  # moved away: --force replaces the run's own
        result = recipekit.run(other, progress=None, force=True)
        assert result.shards_resumed == 0


class TestOverlap:
    """An output URL is compared with the URL inputs by what it names (protocol alias,
    trailing and doubled slashes), where the local check runs: `validate`, `plan` and `run`
    all exit 2 before anything is written. The local placeholder path a URL output's recipe
    keeps (out/<stem>) is compared with nothing."""

    @pytest.mark.parametrize(("output", "relation"), [
        ("s3a://{b}/models/big/sub", "lies inside"),
        ("S3A://{b}/models/big/", "is"),
        ("s3://{b}//models/big", "is"),
        ("s3a://{b}/models", "contains"),
    ])
    def test_aliases_and_slashes_are_compared(self, s3, uploaded, tmp_path, output, relation):
        fs = s3[0]
        url = output.format(b=BUCKET)
        with pytest.raises(recipekit.errors.OutputPathError) as e:
            recipekit.validate(_recipe(tmp_path, uploaded, url))
        assert str(e.value).startswith(
            f"output {url.rstrip('/')} {relation} input `models.big` ({uploaded})")
        fs.invalidate_cache()
        assert not fs.exists(f"{BUCKET}/models/big/sub")

    def test_validate_plan_and_run_exit_2(self, s3, uploaded, tmp_path, cli):
        fs = s3[0]
        recipe = _recipe(tmp_path, uploaded, uploaded)
        fs.invalidate_cache()
        before = sorted(fs.find(f"{BUCKET}/models/big"))
        for command in ("validate", "plan", "run"):
            done = cli(command, recipe)
            assert done.exit_code == 2, (command, done.output)
            assert f"output {uploaded} is input `models.big`" in done.stderr
        inside = cli("plan", "--output", f"s3a://{BUCKET}/models/big/x", recipe)
        assert inside.exit_code == 2 and "lies inside input `models.big`" in inside.stderr
        fs.invalidate_cache()
        assert sorted(fs.find(f"{BUCKET}/models/big")) == before

    def test_local_input_at_the_placeholder_path(self, s3, model, tmp_path):
        """Input ./out/<stem> and an S3 output: the placeholder is no output, so it runs."""
        shutil.copytree(model, tmp_path / "out" / "recipe")
        url = f"s3://{BUCKET}/out/placeholder"
        result = recipekit.run(_recipe(tmp_path, "./out/recipe", url), progress=None)
        assert result.output == url

    def test_recipe_inside_its_model_directory(self, s3, model, tmp_path):
        """A recipe kept in its model's folder (input `.`) with an S3 output."""
        folder = tmp_path / "m"
        shutil.copytree(model, folder)
        result = recipekit.plan(_recipe(folder, ".", f"s3://{BUCKET}/out/inside"), warn=False)
        assert result.output == f"s3://{BUCKET}/out/inside"
        with pytest.raises(recipekit.errors.OutputPathError, match="contains the recipe"):
            recipekit.plan(_recipe(folder, ".", "."), warn=False)  # the local check stands


SECRET = "TOPSECRETPW"
CRED_URL = f"s3://AKIAX:{SECRET}@{BUCKET}/out/c"


class TestCredentialsOnTheCommandLine:
    """A URL holding credentials is refused (exit 2) wherever the command line takes one, and
    the secret appears nowhere: not in the message, not in a --json event."""

    def test_run_output_json(self, s3, uploaded, tmp_path, cli):
        recipe = _recipe(tmp_path, uploaded, "./local")
        done = cli("run", "--json", "--output", CRED_URL, recipe)
        assert done.exit_code == 2
        assert SECRET not in done.output and "AKIAX" not in done.output
        events = [json.loads(line) for line in done.stdout.splitlines()]
        assert [e["event"] for e in events] == ["error"]
        assert events[0]["message"].startswith(
            f"the output URL s3://***@{BUCKET}/out/c holds credentials (user:secret@, ")
        with pytest.raises(recipekit.errors.UsageError) as e:
            recipekit.plan(recipe, output=CRED_URL)
        assert SECRET not in e.value.render()

    @pytest.mark.parametrize("args", [
        ("verify", CRED_URL), ("verify", "--json", CRED_URL), ("inspect", CRED_URL),
        ("diff", CRED_URL, "./b"), ("lock", CRED_URL), ("validate", CRED_URL),
        ("sweep", "--set", "x=1,2", "-o", CRED_URL, "r.yaml"),
    ])
    def test_other_arguments(self, args, cli):
        done = cli(*args)
        assert done.exit_code == 2, done.output
        shown = " ".join(done.output.replace("│", " ").split())  # out of click's box
        assert SECRET not in "".join(shown.split())  # not even wrapped over two lines
        assert f"s3://***@{BUCKET}/out/c" in shown

    def test_api_verify_refuses_before_the_backend(self, s3):
        """The last line of defence: every URL recipekit opens passes `open_fs`."""
        from recipekit.tools.verify_remote import verify_remote

        with pytest.raises(recipekit.errors.UsageError) as e:
            verify_remote(CRED_URL)
        assert SECRET not in e.value.render()
