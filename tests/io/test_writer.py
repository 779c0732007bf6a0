"""io/writer.py: a file under a final name is never partial; the hash is the file's.

Oracle: hashlib over the finished file, and the file system's view during the write.
"""

from __future__ import annotations

import hashlib
import os

import pytest

from recipekit.errors import OutputError
from recipekit.io.writer import ShardWriter, partial_path


def test_writes_under_a_temp_name_then_renames(tmp_path):
    final = tmp_path / "model.safetensors"
    w = ShardWriter(final, b"HEADER__", 8 + 6)
    assert partial_path(final).exists() and not final.exists()
    w.write(b"abc")
    w.write(memoryview(b"def"))
    sha = w.finish()
    assert final.read_bytes() == b"HEADER__abcdef"
    assert sha == hashlib.sha256(b"HEADER__abcdef").hexdigest()
    assert not partial_path(final).exists()


def test_short_write_never_reaches_the_final_name(tmp_path):
    final = tmp_path / "model.safetensors"
    w = ShardWriter(final, b"HEADER__", 100)
    with pytest.raises(OutputError, match="wrote 8 of 100 bytes"):
        w.finish()
    assert not final.exists() and not partial_path(final).exists()


def test_overflow_is_refused(tmp_path):
    w = ShardWriter(tmp_path / "m.safetensors", b"H", 2)
    with pytest.raises(OutputError, match="overflow"):
        w.write(b"toolong")
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_a_writer_whose_temp_file_was_replaced_does_not_rename_it(tmp_path):
    """Two writers of one shard (a Ray task of a dead driver beside the resumed run): the later
    one replaces the earlier's temp file; the earlier must not rename the later's half-written
    file into place, and the later finishes with its own bytes."""
    final = tmp_path / "model.safetensors"
    early = ShardWriter(final, b"HEADER__", 8 + 3)
    early.write(b"old")
    late = ShardWriter(final, b"HEADER__", 8 + 3)  # removes `early`'s temp file, makes its own
    with pytest.raises(OutputError, match="another writer replaced this shard's temporary"):
        early.finish()
    assert not final.exists() and partial_path(final).exists()  # `late`'s file is left alone
    late.write(b"new")
    assert late.finish() == hashlib.sha256(b"HEADER__new").hexdigest()
    assert final.read_bytes() == b"HEADER__new" and not partial_path(final).exists()


def test_a_writer_found_not_ours_leaves_the_temp_name_when_aborted(tmp_path):
    """What a failed shard does after `finish` refused (execute.write_shard aborts its writer):
    the file at the temp name is another writer's, or a link put there while the shard was
    written (a Ray task of a killed driver finishing beside the rerun), and stays as it is."""
    final = tmp_path / "model.safetensors"
    early = ShardWriter(final, b"HEADER__", 8 + 3)
    early.write(b"old")
    late = ShardWriter(final, b"HEADER__", 8 + 3)
    with pytest.raises(OutputError, match="another writer replaced"):
        early.finish()
    early.abort()
    late.write(b"new")
    assert late.finish() == hashlib.sha256(b"HEADER__new").hexdigest()
    assert final.read_bytes() == b"HEADER__new"

    mine = tmp_path / "mine.txt"
    mine.write_bytes(b"notes")
    w = ShardWriter(final, b"HEADER__", 8 + 3)
    w.write(b"abc")
    os.unlink(partial_path(final))
    os.symlink(mine, partial_path(final))
    with pytest.raises(OutputError, match="another writer replaced"):
        w.finish()
    w.abort()
    assert partial_path(final).is_symlink() and mine.read_bytes() == b"notes"
    assert final.read_bytes() == b"HEADER__new"


def test_the_temp_file_is_checked_after_its_fsync_just_before_the_rename(tmp_path,
                                                                          monkeypatch):
    """A temp file replaced (here by a link) while it is fsynced, which can take seconds: the
    check that it is still ours comes after the fsync, so the link is never renamed into
    place."""
    final = tmp_path / "model.safetensors"
    mine = tmp_path / "mine.txt"
    mine.write_bytes(b"notes")
    w = ShardWriter(final, b"HEADER__", 8 + 3)
    w.write(b"abc")
    real_fsync = os.fsync

    def fsync_then_replaced(fd):  # type: ignore[no-untyped-def]
        real_fsync(fd)
        if not partial_path(final).is_symlink():
            os.unlink(partial_path(final))
            os.symlink(mine, partial_path(final))

    monkeypatch.setattr(os, "fsync", fsync_then_replaced)
    with pytest.raises(OutputError, match="another writer replaced"):
        w.finish()
    w.abort()
    assert not os.path.lexists(final)
    assert partial_path(final).is_symlink() and mine.read_bytes() == b"notes"
