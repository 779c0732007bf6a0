"""The Ray executor (`recipekit.run.ray`, ``recipekit run --executor ray``) on a real cluster.

Oracle: a local run of the same recipe; every output file's sha256 must be equal (manifests
aside, which quote the output path). The cluster is two Ray nodes started by this module as
separate processes (``ray start --head`` and ``ray start --address``, 1 CPU each, on 127.0.0.2
with token auth; /work/shared/reference/cluster.md §1.1), once for the module, and stopped by
PID, worker first. Faults come from tests/helpers/ray_faults.py, installed in the test jobs'
workers by Ray's ``worker_process_setup_hook``: a worker SIGKILLed in the middle of a shard
(Ray retries the task) and slow shards during which a driver process is SIGKILLed (then the
run is resumed, locally and on Ray).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import recipekit
from recipekit.errors import DeviceError, ExtraMissingError, OutputPathError, TensorDataError
from recipekit.io.names import MANIFEST, STATE

from tests.helpers.builders import rewrite_reordered
from tests.helpers.recipes import ROOT, write_recipe

HAS_RAY = importlib.util.find_spec("ray") is not None
requires_ray = pytest.mark.skipif(not HAS_RAY, reason="Ray is not installed "
                                  "(pip install 'recipekit[ray]')")
MODELS = ROOT / "recipes" / "models"
HAS_S3 = all(importlib.util.find_spec(m) is not None for m in ("s3fs", "moto"))
HOST = "127.0.0.2"  # loopback that Ray keeps (it swaps 127.0.0.1 for a routable address)

COPY = f"""\
recipekit: 1
models:
  tiny: {MODELS / "tiny-llama"}
steps:
  - name: up
    op: layers
    from: tiny
    layers: ["range(0,6)", "range(2,8)"]
output:
  path: ./out
  shard_size: 40KB
"""
COMPUTED = f"""\
recipekit: 1
models:
  a: {MODELS / "tiny-llama"}
  b: {MODELS / "tiny-llama-b"}
steps:
  - name: mixed
    op: interpolate
    from: [a, b]
    alpha: {{gradient: [0.2, 0.9]}}
output:
  path: ./out
  shard_size: 40KB
  dtype: float32
"""


def digests(out: Path) -> dict[str, str]:
    """sha256 of every file of an output (the manifest quotes paths; its shard hashes are
    compared through the shards themselves)."""
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and p.name != MANIFEST}


def local_reference(tmp_path: Path, text: str) -> dict[str, str]:
    """The file digests of a local run of the same recipe file (same name, same relative
    output path: the model card quotes both)."""
    folder = tmp_path / "reference"
    folder.mkdir()
    recipekit.run(write_recipe(folder, text), progress=None)
    return digests(folder / "out")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    address: str
    env: dict[str, str]  # what a driver process needs (auth token, PYTHONPATH)
    faults: Path  # marker folder of tests/helpers/ray_faults.py
    runtime_env: dict[str, object]
    #: the environment pointing s3fs at a moto server the nodes were started with (None
    #: without s3fs/moto): credentials reach workers from their node, as on a real cluster
    s3_env: dict[str, str] | None = None


def _stop(proc: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM a `ray start --block` leader's process group; SIGKILL it if it lingers."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group is left
    proc.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A head and a worker node as separate processes (1 CPU each), and this process
    connected as a driver whose workers carry the fault hooks."""
    tmp = tmp_path_factory.mktemp("ray")
    faults = tmp / "faults"
    faults.mkdir()
    (tmp / "home").mkdir()
    ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    assert ray_bin, "the `ray` command is missing"
    token = secrets.token_hex(32)
    stack = contextlib.ExitStack()
    s3_env = None
    if HAS_S3:
        from tests.helpers.s3 import moto_server

        (tmp / "aws").mkdir()
        _, s3_env = stack.enter_context(moto_server(tmp / "aws"))
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0", RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                          if p))
    node_env = dict(env, HOME=str(tmp / "home"), **(s3_env or {}))  # no ~/.ray of the developer's
    port = _free_port()
    common = ["--block", "--num-cpus=1", f"--node-ip-address={HOST}",
              "--object-store-memory=100000000"]
    procs: list[subprocess.Popen] = []
    log = open(tmp / "nodes.log", "wb")  # noqa: SIM115 - closed at teardown
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ADDRESS")}
    # before Ray is imported: it caches its auth mode when first imported
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    os.environ.pop("RAY_ADDRESS", None)
    import ray

    try:
        procs.append(subprocess.Popen(
            [ray_bin, "start", "--head", f"--port={port}", f"--temp-dir={tmp / 'rt'}",
             "--include-dashboard=false", "--disable-usage-stats",
             f"--ray-client-server-port={_free_port()}", *common],
            env=node_env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT))
        address = f"{HOST}:{port}"
        deadline = time.monotonic() + 60
        while True:
            with socket.socket() as s:
                if s.connect_ex((HOST, port)) == 0:
                    break
            assert time.monotonic() < deadline and procs[0].poll() is None, (
                (tmp / "nodes.log").read_text())
            time.sleep(0.2)
        procs.append(subprocess.Popen(
            [ray_bin, "start", f"--address={address}", *common], env=node_env,
            start_new_session=True, stdout=log, stderr=subprocess.STDOUT))
        runtime_env = {"worker_process_setup_hook": "tests.helpers.ray_faults.install",
                       "env_vars": {"RECIPEKIT_TEST_FAULTS": str(faults)}}
        ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING,
                 log_to_driver=False)
        while sum(n["Alive"] for n in ray.nodes()) < 2:
            assert time.monotonic() < deadline + 60, (tmp / "nodes.log").read_text()
            time.sleep(0.2)
        yield Cluster(address, env, faults, runtime_env, s3_env)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for proc in reversed(procs):  # the worker before the head (reference §1.1)
            _stop(proc)
        log.close()
        stack.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@requires_ray
@pytest.mark.parametrize("text", [COPY, COMPUTED], ids=["copy", "computed"])
def test_same_bytes_as_a_local_run(cluster: Cluster, tmp_path: Path, text: str) -> None:
    expected = local_reference(tmp_path, text)
    recipe = write_recipe(tmp_path, text)
    result = recipekit.run(recipe, executor="ray", progress=None)
    out = tmp_path / "out"
    assert digests(out) == expected
    shards = sorted(k for k in expected if k.endswith(".safetensors"))
    assert len(shards) >= 5 and [s.name for s in result.shards] == shards
    assert result.shards_resumed == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert {k: v["sha256"] for k, v in manifest["shards"].items()} == {
        s.name: s.sha256 for s in result.shards} == {
        k: v for k, v in expected.items() if k.endswith(".safetensors")}
    # and a rerun on either executor finds it complete
    assert recipekit.run(recipe, progress=None).already_complete
    assert recipekit.run(recipe, executor="ray", progress=None).already_complete


@requires_ray
@pytest.mark.skipif(not HAS_S3, reason="needs s3fs and moto[server] (pip install '.[test]')")
def test_inputs_and_output_on_object_storage(cluster: Cluster, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A bucket and a cluster: the tasks read their tensors by ranges and upload their shards
    (multipart) from the worker processes, the driver writes the rest; the same bytes as a
    local run of the same recipe from local files."""
    import s3fs

    from recipekit.inputs.remote import forget_stubs

    bucket = "recipekit-ray"  # moto's backends are per process: not the object-storage tests'

    assert cluster.s3_env is not None
    for k, v in cluster.s3_env.items():
        monkeypatch.setenv(k, v)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir(bucket)
    for name in ("tiny-llama", "tiny-llama-b"):
        for p in sorted((MODELS / name).iterdir()):
            if p.is_file():
                fs.put_file(str(p), f"{bucket}/models/{name}/{p.name}")
    text = COMPUTED.replace(str(MODELS / "tiny-llama-b"), f"s3://{bucket}/models/tiny-llama-b")
    text = text.replace(f"  a: {MODELS / 'tiny-llama'}", f"  a: s3://{bucket}/models/tiny-llama")
    local = local_reference(tmp_path, COMPUTED)
    try:
        result = recipekit.run(write_recipe(tmp_path, text), executor="ray", progress=None,
                               output=f"s3://{bucket}/out/ray")
    finally:
        forget_stubs()
    remote = {k.split("/out/ray/", 1)[1]: hashlib.sha256(fs.cat_file(k)).hexdigest()
              for k in fs.find(f"{bucket}/out/ray")}
    shards = {k: v for k, v in local.items() if k.endswith(".safetensors")}
    assert len(shards) >= 5 and {k: remote[k] for k in shards} == shards
    assert {s.name: s.sha256 for s in result.shards} == shards
    for rel in ("config.json", "model.safetensors.index.json"):
        assert remote[rel] == local[rel]
    assert MANIFEST in remote and STATE not in remote


@requires_ray
def test_a_sweep_runs_each_combination_as_a_task(cluster: Cluster, tmp_path: Path,
                                                  tiny_llama: Path, tiny_llama_b: Path) -> None:
    """`recipekit sweep --executor ray`: one task per combination (each a whole local run on
    a node); the same bytes as the local sweep."""
    import recipekit

    from tests.helpers.sweeps import SWEEP_RECIPE, shard_hashes

    recipe = write_recipe(tmp_path, SWEEP_RECIPE.format(a=tiny_llama, b=tiny_llama_b))
    values = {"alpha": [0.25, 0.75], "dtype": ["bfloat16"]}
    local = recipekit.sweep(recipe, values, output=tmp_path / "local")
    remote = recipekit.sweep(recipe, values, output=tmp_path / "ray", executor="ray")
    assert [c.status for c in remote.combinations] == ["written", "written"]
    for a, b in zip(local.combinations, remote.combinations, strict=True):
        assert a.name == b.name
        assert shard_hashes(a.output) == shard_hashes(b.output) == dict(b.shards)
    index = json.loads((tmp_path / "ray" / "sweep.json").read_text())
    assert [c["status"] for c in index["combinations"]] == ["written", "written"]


@requires_ray
def test_progress_moves_within_running_shards(cluster: Cluster, tmp_path: Path) -> None:
    """While shards are running the progress follows their temp files (here: written in full,
    then held before the rename), before any shard is finished; in the end it counts every
    byte once."""
    recipe = write_recipe(tmp_path, COPY)
    updates: list[recipekit.ProgressUpdate] = []
    (cluster.faults / "slow").write_text("1.5")
    try:
        recipekit.run(recipe, executor="ray", progress=updates.append)
    finally:
        (cluster.faults / "slow").unlink()
    first_shard = next(i for i, u in enumerate(updates) if u.shard_done is not None)
    assert any(u.done > 0 for u in updates[:first_shard])
    assert updates[-1].done == updates[-1].total == recipekit.plan(recipe).bytes_written
    assert all(a.done <= b.done for a, b in zip(updates, updates[1:], strict=False))


@requires_ray
def test_worker_killed_mid_shard_is_retried(cluster: Cluster, tmp_path: Path) -> None:
    """A worker SIGKILLed after writing part of a shard: Ray runs the task again, the retry
    replaces the half-written temp file, and the output is byte for byte a local run's."""
    expected = local_reference(tmp_path, COMPUTED)
    recipe = write_recipe(tmp_path, COMPUTED)
    (cluster.faults / "kill-once").touch()
    recipekit.run(recipe, executor="ray", progress=None)
    out = tmp_path / "out"
    assert list(cluster.faults.glob("kill-once.taken-*")), "no worker was killed"
    assert digests(out) == expected
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp file left


RAY_DRIVER = """\
import logging, sys, ray, recipekit
ray.init(address=sys.argv[1], runtime_env={runtime_env!r}, logging_level=logging.WARNING,
         log_to_driver=False)
recipekit.run(sys.argv[2], executor="ray", progress=None)
"""
LOCAL_DRIVER = """\
import sys, recipekit
from tests.helpers.ray_faults import install
install()  # the same slow shards, in this process
recipekit.run(sys.argv[2], progress=None)
"""


def _kill_driver_mid_run(cluster: Cluster, recipe: Path, out: Path, total: int,
                         executor: str) -> int:
    """Start a driver process on ``recipe`` (a Ray or a local run) with slow shards, SIGKILL
    it once the state file records a finished shard, and return how many it recorded."""
    (cluster.faults / "slow").write_text("1")
    code = (RAY_DRIVER.format(runtime_env=cluster.runtime_env) if executor == "ray" else
            LOCAL_DRIVER)
    env = dict(cluster.env, RECIPEKIT_TEST_FAULTS=str(cluster.faults))
    proc = subprocess.Popen([sys.executable, "-c", code, cluster.address, str(recipe)],
                            env=env, cwd=recipe.parent, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                finished = json.loads((out / STATE).read_text())["finished"]
            except (OSError, ValueError, KeyError):
                finished = {}
            if finished:
                break
            assert proc.poll() is None, proc.communicate()[0].decode()
            assert time.monotonic() < deadline, "no shard finished in time"
            time.sleep(0.05)
        proc.kill()
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
        (cluster.faults / "slow").unlink()
    assert not (out / MANIFEST).exists()
    assert 1 <= len(finished) < total
    return len(finished)


@requires_ray
@pytest.mark.parametrize(("killed", "resume_on"), [("ray", "local"), ("ray", "ray"),
                                                   ("local", "ray")])
def test_driver_killed_then_resumed(cluster: Cluster, tmp_path: Path, killed: str,
                                    resume_on: str) -> None:
    """A driver SIGKILLed after at least one shard is recorded (a Ray driver's tasks die with
    it): the same recipe resumes, on the other executor or the same, from the recorded shards
    and writes the bytes of an uninterrupted local run."""
    expected = local_reference(tmp_path, COMPUTED)
    recipe = write_recipe(tmp_path, COMPUTED)
    out = tmp_path / "out"
    recorded = _kill_driver_mid_run(cluster, recipe, out, total=5, executor=killed)
    result = recipekit.run(recipe, executor=resume_on, progress=None)  # type: ignore[arg-type]
    assert result.shards_resumed >= recorded
    assert digests(out) == expected
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


@requires_ray
def test_a_file_put_at_a_shards_name_is_kept_as_by_a_local_run(cluster: Cluster,
                                                               tmp_path: Path) -> None:
    """A recorded shard of an interrupted run replaced by a user's file: the rerun on Ray
    refuses to write over it (exit 2, the file kept, the finished shards too), with the
    message a local rerun gives. The driver knows the names it had not recorded; the task
    writing one checks before its rename that the file there holds the shard's bytes."""
    recipe = write_recipe(tmp_path, COMPUTED)
    out = tmp_path / "out"
    _kill_driver_mid_run(cluster, recipe, out, total=5, executor="local")
    shard = out / sorted(json.loads((out / STATE).read_text())["finished"])[0]
    shard.unlink()
    shard.write_bytes(b"my notes")
    with pytest.raises(OutputPathError) as on_ray:
        recipekit.run(recipe, executor="ray", progress=None)
    assert shard.read_bytes() == b"my notes"
    assert not (out / MANIFEST).exists()
    with pytest.raises(OutputPathError) as local:
        recipekit.run(recipe, progress=None)
    assert str(on_ray.value) == str(local.value)
    assert str(local.value).startswith(f"{shard} is not a file this run wrote: ")
    assert on_ray.value.exit_code == 2
    assert shard.read_bytes() == b"my notes"


@requires_ray
def test_an_input_rewritten_during_the_run_is_called_changed(
        cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An input truncated after the driver checked it and before the tasks open it: the task
    finds another size than the plan's; the driver sees that size too, so the file changed
    during the run (as a local run says), not a node that sees other files."""
    import recipekit.run.ray as ray_executor
    from recipekit.io.reader import FileReader

    model = tmp_path / "model"
    shutil.copytree(MODELS / "tiny-llama", model)
    recipe = write_recipe(tmp_path, COPY.replace(str(MODELS / "tiny-llama"), str(model)))
    weights = model / "model.safetensors"
    size = weights.stat().st_size

    class CheckedThenTruncated(FileReader):
        def open_files(self, paths):  # type: ignore[no-untyped-def]
            super().open_files(paths)
            with open(weights, "r+b") as f:
                f.truncate(size // 2)

    monkeypatch.setattr(ray_executor, "FileReader", CheckedThenTruncated)
    with pytest.raises(TensorDataError) as e:
        recipekit.run(recipe, executor="ray", progress=None)
    assert str(e.value).startswith(
        f"{weights}: the file changed during the run (it has {size // 2} bytes, the version "
        f"planned from {size}): model-0000")
    assert e.value.exit_code == 1
    assert not list((tmp_path / "out").glob("*.safetensors"))


@requires_ray
def test_a_wrong_address_fails_within_seconds(tmp_path: Path) -> None:
    """A port where no cluster listens: Ray would try for about 13 minutes; recipekit bounds
    its attempt and says it cannot connect (exit 1), before creating the output."""
    recipe = write_recipe(tmp_path, COPY)
    address = f"{HOST}:{_free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "recipekit", "run", str(recipe), "-q", "--executor", "ray",
         "--address", address], env=dict(env, PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0"),
        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - start < 60
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].startswith(
        f"cannot connect to the Ray cluster at {address}: ConnectionError: ")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@requires_ray
def test_a_task_error_is_the_error_a_local_run_raises(cluster: Cluster, tmp_path: Path) -> None:
    """An input truncated after planning: the TensorDataError reaches the caller as itself
    (exit code 1 in the CLI), naming the file, and no shard of it is recorded. The driver's
    check of each input against the version planned from (`FileReader`) refuses it before a
    task reads it; a task's own refusal is tested on the task function below."""
    model = tmp_path / "model"
    shutil.copytree(MODELS / "tiny-llama", model)
    recipe = write_recipe(tmp_path, COPY.replace(str(MODELS / "tiny-llama"), str(model)))
    plan = recipekit.plan(recipe)
    weights = model / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(TensorDataError) as e:
        recipekit.run(plan, executor="ray", progress=None)
    assert str(e.value).startswith(f"{weights}: the file changed since the plan read its "
                                   "header (it has ")
    assert e.value.exit_code == 1
    assert not list((tmp_path / "out").glob("*.safetensors"))


@requires_ray
def test_cuda_on_a_cluster_without_gpus_is_refused(cluster: Cluster, tmp_path: Path) -> None:
    """A task asking for a GPU no node has would wait forever: refused before any is sent."""
    recipe = write_recipe(tmp_path, COMPUTED)
    with pytest.raises(DeviceError, match="the Ray cluster has no GPU"):
        recipekit.run(recipe, executor="ray", device="cuda", progress=None)
    assert not list((tmp_path / "out").glob("*.safetensors"))


def test_missing_ray_is_one_line_exit_2(monkeypatch: pytest.MonkeyPatch, cli,
                                        tmp_path: Path) -> None:
    """Without Ray, ``--executor ray`` fails before any work with one line naming the extra."""
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    recipe = write_recipe(tmp_path, COPY)
    with pytest.raises(ExtraMissingError):
        recipekit.run(recipe, executor="ray", progress=None)
    result = cli("run", recipe, "--executor", "ray")
    assert result.exit_code == 2
    assert result.stderr == ("--executor ray needs Ray, which is not installed; "
                             "pip install 'recipekit[ray]'\n")
    assert not (tmp_path / "out").exists()


def test_address_needs_the_ray_executor(cli, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, COPY)
    result = cli("run", recipe, "--address", "127.0.0.2:6379")
    assert result.exit_code == 2
    assert result.stderr == ("an address applies to the Ray executor; add --executor ray "
                             "(executor='ray'), or drop --address\n")


def test_cli_and_import_do_not_import_ray() -> None:
    """`import recipekit` and the CLI's start-up (``run --help``) leave Ray unimported."""
    code = ("import sys, recipekit, recipekit.api, recipekit.cli; "
            "from typer.testing import CliRunner; "
            "r = CliRunner().invoke(recipekit.cli.app, ['run', '--help']); "
            "assert r.exit_code == 0 and '--executor' in r.stdout, r.stdout; "
            "assert 'ray' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)))


@pytest.mark.parametrize("in_place", [False, True], ids=["renamed", "in-place"])
def test_a_task_refuses_an_input_changed_since_the_plan(tmp_path: Path, in_place: bool) -> None:
    """A task reads the offsets the driver planned with, so it refuses an input file that is
    not that version (it compared sizes only, and a re-saved file of the same size was read at
    the old offsets). The task function is called as a worker would, without a cluster; the
    oracle is `rewrite_reordered`, which moves every offset and keeps the size."""
    from recipekit import __version__
    from recipekit.run.ray import shard_payload, write_shard_task

    model = tmp_path / "model"
    shutil.copytree(MODELS / "tiny-llama", model)
    recipe = write_recipe(tmp_path, COPY.replace(str(MODELS / "tiny-llama"), str(model)))
    plan = recipekit.plan(recipe).plan
    weights = model / "model.safetensors"
    before = weights.stat().st_mtime_ns
    rewrite_reordered(weights, in_place=in_place)
    if weights.stat().st_mtime_ns == before:
        os.utime(weights, ns=(before, before + 1))  # as a write a clock tick later would
    (tmp_path / "out").mkdir()
    with pytest.raises(TensorDataError, match=r"the file changed since the plan read its "
                       r"header \((it was replaced by another file|its modification time "
                       r"moved)\)") as e:
        write_shard_task(__version__, shard_payload(plan, plan.shards[0]),
                         str(tmp_path / "out"), "cpu", False, False, 1)
    assert e.value.file.endswith("model/model.safetensors")
    assert not list((tmp_path / "out").iterdir())
