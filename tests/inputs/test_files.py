"""inputs/files.py: confinement, bounded reads and the content hash every input read uses.

Oracles: hashlib; the file types os.mkfifo and symlinks create; sizes written on purpose.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from recipekit.errors import CorruptCheckpointError, UnsupportedCheckpointError
from recipekit.inputs.files import (
    check_confined,
    escape_reason,
    model_root,
    read_bounded,
    read_small,
    sha256_file,
)


def test_sha256_file_is_hashlib_over_the_bytes(tmp_path):
    p = tmp_path / "blob"
    data = os.urandom(3 * (1 << 20) + 17)  # several read blocks and a partial one
    p.write_bytes(data)
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()


def test_read_bounded_returns_the_bytes_or_only_the_size(tmp_path):
    p = tmp_path / "f.json"
    p.write_bytes(b"x" * 100)
    assert read_bounded(p, 100) == (b"x" * 100, 100)
    assert read_bounded(p, 99) == (None, 100)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_named_pipe_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="named pipe"):
        read_bounded(fifo, 10)
    assert escape_reason(fifo, tmp_path.resolve()) == "is a named pipe, not a regular file"
    with pytest.raises(UnsupportedCheckpointError):
        check_confined(fifo, tmp_path.resolve())


def test_read_small_refuses_a_file_larger_than_any_real_one(tmp_path):
    p = tmp_path / "config.json"
    p.write_bytes(b" " * 2048)
    with pytest.raises(CorruptCheckpointError) as info:
        read_small(p, 1024, "config.json")
    assert info.value.message == ("config.json is 2.00 KiB, larger than the 1.00 KiB any real "
                                  "config.json stays under")


def test_a_symlink_out_of_the_model_directory_is_refused(tmp_path):
    outside = tmp_path / "secret"
    outside.write_text("{}")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").symlink_to(outside)
    why = escape_reason(model / "config.json", model_root(model))
    assert why is not None and why.startswith(f"is a symlink to {outside}")
    with pytest.raises(UnsupportedCheckpointError):
        check_confined(model / "config.json", model_root(model))


def test_a_hub_snapshot_may_resolve_into_its_repo_cache(tmp_path):
    repo = tmp_path / "models--org--name"
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    assert model_root(snap) == repo.resolve()
    assert model_root(tmp_path) == Path(tmp_path).resolve()
