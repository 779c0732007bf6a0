"""io/header.py: golden header bytes, and agreement with the safetensors library both ways.

Oracle: `safetensors.torch` (the reference implementation) reads what we build and we read
what it writes, field for field.
"""

from __future__ import annotations

import os
import struct

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from recipekit.io.header import FileStamp, build_header, read_header


def test_golden_bytes():
    header, offsets = build_header([("b", "F32", (2,)), ("a", "I64", (1, 1))])
    body = (b'{"__metadata__":{"format":"pt"},'
            b'"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
            b'"a":{"dtype":"I64","shape":[1,1],"data_offsets":[8,16]}}')
    body += b" " * (-len(body) % 8)
    assert header == struct.pack("<Q", len(body)) + body
    assert len(header) % 8 == 0
    assert offsets == [0, 8]


def test_safetensors_reads_what_we_build(tmp_path):
    tensors = {"w": torch.randn(3, 4), "ids": torch.arange(5), "h": torch.randn(2).half(),
               "empty": torch.zeros(0, 3)}
    header, _ = build_header([(n, {"float32": "F32", "int64": "I64", "float16": "F16"}[
        str(t.dtype).removeprefix("torch.")], tuple(t.shape)) for n, t in tensors.items()])
    path = tmp_path / "x.safetensors"
    with open(path, "wb") as f:
        f.write(header)
        for t in tensors.values():
            f.write(t.numpy().tobytes())
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt"}
        for name, t in tensors.items():
            assert torch.equal(f.get_tensor(name), t)


def test_we_read_what_safetensors_writes(tmp_path):
    tensors = {"a.weight": torch.randn(4, 2).bfloat16(), "b": torch.arange(3, dtype=torch.int32)}
    path = tmp_path / "x.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    infos = read_header(path)
    data = path.read_bytes()
    for name, t in tensors.items():
        info = infos[name]
        assert info.shape == tuple(t.shape)
        raw = data[info.offset:info.offset + info.nbytes]
        assert raw == t.view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16 else \
            raw == t.numpy().tobytes()


def test_a_header_records_the_version_of_the_file_it_was_read_from(tmp_path):
    """Every tensor's `stamp` is the file's size, mtime and inode when its header was read
    (what the executor checks before reading at its offsets). Oracle: ``os.stat``."""
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.zeros(2), "b": torch.ones(3)}, path)
    st = os.stat(path)
    infos = read_header(path)
    assert {info.stamp for info in infos.values()} == {
        FileStamp(st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino)}
