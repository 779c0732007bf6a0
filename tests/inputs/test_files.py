"""inputs/files.py: confinement, bounded reads and the content hash every input read uses.

Oracles: hashlib; the file types os.mkfifo and symlinks create; sizes written on purpose.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from recipekit.errors import (
    CorruptCheckpointError,
    SourceUnreadableError,
    UnsupportedCheckpointError,
)
from recipekit.inputs.files import (
    check_confined,
    check_readable_dir,
    escape_reason,
    is_file,
    lexists,
    model_root,
    read_bounded,
    read_small,
    sha256_file,
)

from tests.helpers.permissions import unreadable_dir


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


class TestUnreadableDirectory:
    """The probes that discover a checkpoint's files name a directory they may not look into
    (exit code 2), instead of letting ``PermissionError`` escape or calling its files missing.
    Oracle: what the kernel answers for a mode-000 directory (simulated where chmod does not
    bite, as for root)."""

    def test_every_probe_names_the_directory(self, tmp_path, monkeypatch):
        m = tmp_path / "m"
        m.mkdir()
        (m / "config.json").write_text("{}")
        with unreadable_dir(m, monkeypatch):
            for probe in (check_readable_dir, lambda d: lexists(d / "config.json"),
                          lambda d: is_file(d / "pytorch_model.bin")):
                with pytest.raises(SourceUnreadableError) as e:
                    probe(m)
                assert e.value.exit_code == 2
                assert e.value.render() == (
                    f"{m}: cannot read: Permission denied; give the user running recipekit "
                    "read and search permission on it (chmod u+rx)")
        assert lexists(m / "config.json") and is_file(m / "config.json")
        check_readable_dir(m)

    def test_missing_files_and_broken_links_are_still_absent(self, tmp_path):
        (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
        (tmp_path / "f").write_text("")
        assert not lexists(tmp_path / "nowhere") and not is_file(tmp_path / "nowhere")
        assert lexists(tmp_path / "dangling") and not is_file(tmp_path / "dangling")
        assert not lexists(tmp_path / "f" / "below") and not is_file(tmp_path / "f" / "below")
        assert not is_file(tmp_path)
