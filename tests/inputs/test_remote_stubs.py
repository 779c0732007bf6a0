"""inputs/remote.py: stub roots of URL inputs, and the sweep of the ones killed runs left.

Oracle: the file system after the sweep (a dead process's root gone with its files; a live
process's root, a root without a process id, a link and a plain file of the same name
untouched, and nothing followed through the link). No object storage needed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from recipekit.inputs import remote
from recipekit.inputs.remote import STUB_PREFIX, sweep_stale_stubs


def test_a_killed_runs_stub_root_is_removed_by_the_next_run(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    stale = tmp_path / f"{STUB_PREFIX}{ended.pid}-abc_12"
    (stale / "s3_bucket_model-x1").mkdir(parents=True)
    (stale / "s3_bucket_model-x1" / "config.json").write_text("{}")
    live = tmp_path / f"{STUB_PREFIX}{os.getpid()}-keep"
    live.mkdir()
    legacy = tmp_path / f"{STUB_PREFIX}q8x_z"  # no process id in the name
    legacy.mkdir()
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "f").write_text("keep")
    link = tmp_path / f"{STUB_PREFIX}{ended.pid}-link"
    link.symlink_to(target)
    plain = tmp_path / f"{STUB_PREFIX}{ended.pid}-file"
    plain.write_text("x")

    monkeypatch.setattr(remote, "_stub_root", None)
    try:
        made = remote._stub_dir("s3://bucket/model")  # a new run's first URL input sweeps
        assert made.parent.name.startswith(f"{STUB_PREFIX}{os.getpid()}-")
        assert not stale.exists()
        assert live.is_dir() and legacy.is_dir() and plain.is_file()
        assert link.is_symlink() and (target / "f").read_text() == "keep"
        sweep_stale_stubs()  # a live process's root, this one's included, stays
        assert made.is_dir() and live.is_dir()
    finally:
        remote.forget_stubs()
    assert not made.parent.exists()
