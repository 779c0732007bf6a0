"""io/reader.py's `is_same_data`: two stored tensors compared in bounded chunks.

Oracle: the bytes we wrote (equal files, one flipped byte past the first chunk, another dtype).
"""

from __future__ import annotations

from pathlib import Path

from recipekit.io.header import TensorInfo
from recipekit.io.reader import is_same_data


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
