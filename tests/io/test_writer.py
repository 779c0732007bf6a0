"""io/writer.py: a file under a final name is never partial; the hash is the file's.

Oracle: hashlib over the finished file, and the file system's view during the write.
"""

from __future__ import annotations

import hashlib

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
