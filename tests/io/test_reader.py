"""io/reader.py: `is_same_data` (two stored tensors compared in bounded chunks) and the
reused buffers of `FileReader.read_tensor`.

Oracle: the bytes we wrote (equal files, one flipped byte past the first chunk, another dtype);
for reuse, tensors and views over an earlier read that must keep their values.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from recipekit.errors import TensorDataError
from recipekit.io import reader as reader_module
from recipekit.io.header import FileStamp, TensorInfo
from recipekit.io.reader import FileReader, is_same_data


def stored(path: Path, data: bytes, *, offset: int = 8, dtype: str = "F32") -> TensorInfo:
    path.write_bytes(b"\0" * offset + data)
    return TensorInfo(path.name, dtype, (len(data) // 4,), path, offset, len(data))


def test_equal_bytes_in_two_files_are_the_same_data(tmp_path):
    data = bytes(range(256)) * 40  # 10 KiB: several chunks of 4 KiB and a short last one
    a = stored(tmp_path / "a", data)
    b = stored(tmp_path / "b", data, offset=100)
    assert is_same_data(a, b, chunk=4096)
    assert is_same_data(a, a)


def test_a_byte_past_the_first_chunk_or_another_dtype_differs(tmp_path):
    data = bytes(range(256)) * 40
    a = stored(tmp_path / "a", data)
    flipped = bytearray(data)
    flipped[-1] ^= 1
    assert not is_same_data(a, stored(tmp_path / "b", bytes(flipped)), chunk=4096)
    assert not is_same_data(a, stored(tmp_path / "c", data, dtype="I32"))
    remote = TensorInfo("r", "F32", a.shape, tmp_path / "a", -1, a.nbytes)
    assert not is_same_data(a, remote)  # only a remote header: never called equal


class TestReusedBuffers:
    """A whole read reuses a kept buffer only once no tensor or view refers to it."""

    def test_a_buffer_in_use_is_never_handed_out_again(self, tmp_path):
        a = stored(tmp_path / "a", torch.arange(64, dtype=torch.float32).numpy().tobytes())
        b = stored(tmp_path / "b", torch.full((64,), -1.0).numpy().tobytes())
        with FileReader() as reader:
            first = torch.frombuffer(reader.read_tensor(a), dtype=torch.float32)
            view = first[10:].reshape(6, 9)  # the tensor goes, its view stays
            del first
            second = torch.frombuffer(reader.read_tensor(b), dtype=torch.float32)
            assert torch.equal(view, torch.arange(10, 64, dtype=torch.float32).reshape(6, 9))
            assert torch.equal(second, torch.full((64,), -1.0))
            assert len(reader._kept) == 2
            del view, second
            again = torch.frombuffer(reader.read_tensor(a), dtype=torch.float32)
            assert len(reader._kept) == 2  # a freed buffer, not a third
            assert torch.equal(again, torch.arange(64, dtype=torch.float32))

    def test_free_buffers_are_reused_and_capped(self, tmp_path, monkeypatch):
        monkeypatch.setattr(reader_module, "KEEP_BYTES", 1000)
        monkeypatch.setattr(reader_module, "REUSE_BYTES", 600)
        small = stored(tmp_path / "s", bytes(range(200)) * 2)  # 400 bytes
        large = stored(tmp_path / "l", bytes(800))  # above REUSE_BYTES: never kept
        with FileReader() as reader:
            held = reader.read_tensor(small)
            other = reader.read_tensor(small)  # the first is in use: a second buffer
            assert len(reader._kept) == 2 and bytes(held) == bytes(other)
            del held, other
            for _ in range(5):  # both free: no new buffer
                assert bytes(reader.read_tensor(small)) == bytes(range(200)) * 2
            assert len(reader._kept) == 2
            assert bytes(reader.read_tensor(large)) == bytes(800)
            assert len(reader._kept) == 2
            bufs = [reader.read_tensor(small) for _ in range(3)]  # a third would pass 1000
            assert len(reader._kept) == 2 and all(bytes(x) == bytes(range(200)) * 2
                                                  for x in bufs)

    def test_eviction_drops_the_free_buffer_not_an_equal_one_in_use(self, tmp_path,
                                                                      monkeypatch):
        """Two kept buffers with the same bytes, one in use: making room drops the free one."""
        monkeypatch.setattr(reader_module, "KEEP_BYTES", 1000)
        small = stored(tmp_path / "s", bytes(400))
        other = stored(tmp_path / "o", bytes(range(250)) * 2)  # 500 bytes: a new buffer
        with FileReader() as reader:
            in_use = reader.read_tensor(small)
            free = reader.read_tensor(small)
            del free
            reader.read_tensor(other)  # 400 + 400 + 500 > 1000: one 400-byte buffer goes
            assert any(b is in_use.obj for b in reader._kept)
            assert len(reader._kept) == 2


class TestStamps:
    """`FileReader` reads only the version of a file its stamp names (the one a plan's offsets
    come from). Oracle: the bytes written, and the file's own stat."""

    def test_another_version_is_refused_when_opened(self, tmp_path):
        f = tmp_path / "a.bin"
        f.write_bytes(b"old-data")
        stamp = FileStamp.of(os.stat(f))
        f.with_name("new").write_bytes(b"new-data")
        os.replace(f.with_name("new"), f)
        with FileReader({f: stamp}) as r, pytest.raises(
                TensorDataError, match=r"a\.bin: the file changed since the plan read its "
                r"header \(it was replaced by another file\)"):
            r.read_into(f, 0, memoryview(bytearray(3)))

    def test_a_file_renamed_over_after_opening_is_still_read_from_its_old_version(
            self, tmp_path):
        f = tmp_path / "a.bin"
        f.write_bytes(b"old-data")
        with FileReader({f: FileStamp.of(os.stat(f))}) as r:
            r.open_files([f])
            f.with_name("new").write_bytes(b"new-data")
            os.replace(f.with_name("new"), f)
            buf = bytearray(8)
            r.read_into(f, 0, memoryview(buf))
            r.check_unchanged()
        assert bytes(buf) == b"old-data"

    def test_a_rewrite_in_place_after_opening_is_refused(self, tmp_path):
        f = tmp_path / "a.bin"
        f.write_bytes(b"old-data")
        st = os.stat(f)
        with FileReader({f: FileStamp.of(st)}) as r:
            r.open_files([f])
            with open(f, "r+b") as w:
                w.write(b"new")
            os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # a write a clock tick later
            with pytest.raises(TensorDataError, match=r"a\.bin: the file changed during the "
                               r"run \(its modification time moved\)"):
                r.check_unchanged()
