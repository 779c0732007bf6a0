"""Disk full, quota, file-size limits and I/O errors while writing or reading.

Faults are injected where the kernel would report them (`os.write` / `os.preadv` of the I/O
layer raising the errno, and a real RLIMIT_FSIZE in a subprocess). Oracle: the promise of
DESIGN.md §3-4 — a clear message and exit code 1, no temp file left, finished shards kept, and a
rerun that resumes to the bytes of an uninterrupted run.
"""

from __future__ import annotations

import errno
import os
import resource
import subprocess
import sys

import pytest

import recipekit.io.reader as reader_mod
import recipekit.io.writer as writer_mod

from tests.helpers.recipes import solar_recipe, write_recipe

OUTPUT = "  path: ./out\n  shard_size: 100KB"


def failing_os_write(monkeypatch, err: int, after: int) -> list[int]:
    """Make the writer's `os.write` fail with ``err`` once ``after`` calls have succeeded."""
    calls = [0]
    real = os.write

    def write(fd, data):
        calls[0] += 1
        if calls[0] > after:
            raise OSError(err, os.strerror(err))
        return real(fd, data)

    monkeypatch.setattr(writer_mod.os, "write", write)
    return calls


def listing(path):
    return sorted(p.name for p in path.iterdir())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_llama):
    from typer.testing import CliRunner

    from recipekit.cli import app

    d = tmp_path_factory.mktemp("reference")
    r = write_recipe(d, solar_recipe(tiny_llama, output=OUTPUT))
    assert CliRunner().invoke(app, ["run", str(r), "-q"]).exit_code == 0
    return d / "out"


@pytest.mark.parametrize("err, message", [
    (errno.ENOSPC, "disk full while writing; free space (`recipekit plan` shows the bytes "
                   "needed); finished shards are kept, and running the same command again resumes"),
    (errno.EDQUOT, "disk quota exceeded while writing"),
    (errno.EIO, "I/O error while writing: the disk or file system reported a failure; check the "
                "disk (dmesg) before trusting it"),
])
def test_write_fault_keeps_finished_shards_and_resumes(cli, tmp_path, tiny_llama, reference,
                                                        monkeypatch, err, message):
    r = write_recipe(tmp_path, solar_recipe(tiny_llama, output=OUTPUT))
    failing_os_write(monkeypatch, err, after=40)  # a few shards in
    result = cli("run", r, "-q")
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert message in result.stderr.splitlines()[0]
    out = tmp_path / "out"
    left = listing(out)
    assert not [n for n in left if n.endswith(".recipekit-partial")], left
    finished = [n for n in left if n.startswith("model-")]
    assert finished and "recipekit.json" not in left
    for n in finished:
        assert (out / n).read_bytes() == (reference / n).read_bytes()
    monkeypatch.undo()
    result = cli("run", r, "-q")
    assert result.exit_code == 0, result.output
    assert f", {len(finished)} resumed" in result.stdout
    for n in listing(reference):
        if n.startswith("model") or n == "config.json":
            assert (out / n).read_bytes() == (reference / n).read_bytes(), n


def test_fault_in_a_small_file_write(cli, tmp_path, tiny_llama, monkeypatch):
    """config.json / manifest writes go through write_file_atomic: same message, no temp."""
    r = write_recipe(tmp_path, solar_recipe(tiny_llama, output="  path: ./out"))
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith("config.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(writer_mod.os, "replace", replace)
    result = cli("run", r, "-q")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"{tmp_path / 'out' / 'config.json'}: disk full while "
                                    "writing")
    assert not [n for n in listing(tmp_path / "out") if n.endswith(".recipekit-partial")]
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_read_error_names_the_input_file(cli, tmp_path, tiny_llama, monkeypatch):
    r = write_recipe(tmp_path, solar_recipe(tiny_llama, output="  path: ./out"))

    def preadv(fd, buffers, offset):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(reader_mod.os, "preadv", preadv)
    result = cli("run", r, "-q")
    assert result.exit_code == 1
    assert result.stderr.splitlines()[0].endswith(
        "model/model.safetensors: read failed: Input/output error")
    assert not [n for n in listing(tmp_path / "out") if n.endswith(".recipekit-partial")]


def test_real_file_size_limit(tmp_path, tiny_llama):
    """RLIMIT_FSIZE below one shard: the kernel refuses the write (EFBIG; CPython ignores
    SIGXFSZ), and recipekit says what limit was hit."""
    r = write_recipe(tmp_path, solar_recipe(tiny_llama, output=OUTPUT))

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, resource.RLIM_INFINITY))

    proc = subprocess.run([sys.executable, "-m", "recipekit.cli", "run", str(r), "-q"],
                          capture_output=True, text=True, preexec_fn=limit, check=False)
    assert proc.returncode == 1, proc.stderr
    assert "the file size limit was reached while writing (`ulimit -f`" in proc.stderr
    assert "raise the limit or lower `output.shard_size`" in proc.stderr
    assert not [n for n in listing(tmp_path / "out") if n.endswith(".recipekit-partial")]


@pytest.mark.parametrize("err", [errno.EACCES, errno.EROFS])
def test_permission_error_on_the_state_file_says_what_is_wrong(cli, tmp_path, tiny_llama,
                                                               monkeypatch, err):
    """Issue 17 item 14: a state file the run may not write used to say "running the same
    command again resumes", which it cannot until the permission is fixed. Oracle: the exact
    message names the state file, the cause and the fix, and promises no resume. (Simulated:
    the suite runs as root, which no mode bit stops.)"""
    r = write_recipe(tmp_path, solar_recipe(tiny_llama, output="  path: ./out"))
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith(".recipekit-state.json"):
            raise OSError(err, os.strerror(err))
        return real_replace(src, dst)

    monkeypatch.setattr(writer_mod.os, "replace", replace)
    result = cli("run", r, "-q")
    assert result.exit_code == 1
    why = "permission denied" if err == errno.EACCES else "the file system is read-only"
    assert result.stderr == (
        f"{tmp_path / 'out'}: cannot write the state file .recipekit-state.json: {why}; "
        "recipekit needs to read and write the output directory; fix its owner or mode (or "
        "choose another output path) before running again\n")


def test_unreadable_state_file_is_not_called_damaged(cli, tmp_path, tiny_llama, monkeypatch):
    """A state file that cannot be read for want of permission is not "damaged" (whose hint
    says to delete the output): the message says what is wrong."""
    from pathlib import Path

    r = write_recipe(tmp_path, solar_recipe(tiny_llama, output="  path: ./out"))
    assert cli("run", r, "-q").exit_code == 0
    (tmp_path / "out" / ".recipekit-state.json").write_text("{}")  # as a killed rerun leaves
    real_read = Path.read_text

    def read_text(self, *a, **k):
        if self.name == ".recipekit-state.json":
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_read(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", read_text)
    result = cli("run", r, "-q")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"{tmp_path / 'out'}: cannot read the state file "
                                    ".recipekit-state.json: permission denied; ")
