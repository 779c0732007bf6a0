"""Hostile safetensors files and checkpoint directories: each one a clear error that names the
file (and the tensor), the right exit code, no traceback, no read outside the file, no path
followed out of the model directory.

Oracles: the reference safetensors library (`safe_open`), which must refuse every header we
refuse (except where the table says we are deliberately stricter) and accept, with the same
names and bytes, every one we accept; and the exact messages, pinned here.
"""

from __future__ import annotations

import json
import struct

import pytest
from safetensors import SafetensorError, safe_open

from recipekit.errors import CorruptCheckpointError, RecipekitError, UnsupportedCheckpointError
from recipekit.io.header import display_path, read_header

U64 = 1 << 64
NOT_ST = "the file is damaged or not safetensors; download or convert it again"
CRAFTED = "the file is damaged or crafted; the safetensors library refuses it too"


def st_bytes(header: object = None, data: bytes = b"", *, raw: bytes | None = None,
             n: int | None = None) -> bytes:
    """A safetensors file: length prefix, header (``raw`` bytes or ``header`` as JSON, padded to
    a multiple of 8 as the library does), data."""
    body = raw if raw is not None else json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body) if n is None else n) + body + data


def e(dtype: object, shape: object, offsets: object) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


def raw_entries(*items: tuple[str, dict]) -> bytes:
    """Header JSON written item by item, so a key can appear twice."""
    return ("{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in items) + "}").encode()


D8 = bytes(8)
A = e("F32", [2], [0, 8])
HUGE = st_bytes({"a": e("U8", [U64 - 2], [1, U64 - 1])}, D8)

# (id, file bytes, expected message after "<file>: ", exit code, reference refuses too)
REFUSED = [
    ("header-beyond-file", st_bytes({"a": A}, D8, n=4096),
     "header length 4096 runs beyond the end of the file (80 bytes); the file is truncated or "
     "not safetensors; download or convert it again", 1, True),
    ("header-absurd", st_bytes({"a": A}, D8, n=1 << 62),
     f"header length {1 << 62} exceeds the safetensors limit of 100000000 bytes; {NOT_ST}", 1,
     True),
    ("short-file", b"\x05\x00\x00",
     "file is 3 bytes, shorter than a safetensors header; the file is truncated or not "
     "safetensors; download or convert it again", 1, True),
    ("non-utf8", st_bytes(raw=b'{"a\xff":' + json.dumps(A).encode() + b"}", data=D8),
     f"header is not valid UTF-8 (byte 3); {NOT_ST}", 1, True),
    ("utf16", st_bytes(raw=json.dumps({"a": A}).encode("utf-16"), data=D8),
     f"header is not valid UTF-8 (byte 0); {NOT_ST}", 1, True),
    ("non-json", st_bytes(raw=b'{"a": nope}', data=D8),
     f"header is not valid JSON (Expecting value: line 1 column 7 (char 6)); {NOT_ST}", 1, True),
    ("nan", st_bytes(raw=raw_entries(("a", A))[:-1] + b',"x":NaN}', data=D8),
     f"header is not valid JSON (NaN is not a JSON value); {NOT_ST}", 1, True),
    ("deep-nesting", st_bytes(raw=b'{"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
     f"header is nested too deeply to be JSON from a model checkpoint; {NOT_ST}", 1, True),
    ("number-with-5000-digits", st_bytes(raw=b'{"a":{"dtype":"F32","shape":[' + b"1" * 5000
                                         + b'],"data_offsets":[0,8]}}', data=D8),
     f"header is not valid JSON (a number has thousands of digits); {NOT_ST}", 1, True),
    ("lone-surrogate-name", st_bytes(raw=b'{"a\\ud800":' + json.dumps(A).encode() + b"}",
                                     data=D8),
     f"header holds a lone UTF-16 surrogate escape (\\ud800-\\udfff), which is not valid "
     f"Unicode; {NOT_ST}", 1, True),
    ("not-an-object", st_bytes([1, 2], D8), f"header is a list, not a JSON object; {NOT_ST}", 1,
     True),
    ("entry-not-object", st_bytes({"a": [1]}, D8),
     f"the header entry of tensor `a` is a list, not an object; {NOT_ST}", 1, True),
    ("entry-missing-field", st_bytes({"a": {"dtype": "F32", "shape": [2]}}, D8),
     f"the header entry of tensor `a` has no `data_offsets`; {NOT_ST}", 1, True),
    ("dtype-not-string", st_bytes({"a": e(5, [2], [0, 8])}, D8),
     f"tensor `a` has the dtype the number 5, not a dtype name; {NOT_ST}", 1, True),
    ("negative-dim", st_bytes({"a": e("F32", [-2], [0, 8])}, D8),
     "tensor `a` has an invalid shape: the number -2 is not a dimension (dimensions are "
     f"integers from 0 to 2**64-1); {NOT_ST}", 1, True),
    ("float-dim", st_bytes({"a": e("F32", [2.0], [0, 8])}, D8),
     "tensor `a` has an invalid shape: the number 2.0 is not a dimension (dimensions are "
     f"integers from 0 to 2**64-1); {NOT_ST}", 1, True),
    ("string-dim", st_bytes({"a": e("F32", ["2"], [0, 8])}, D8),
     "tensor `a` has an invalid shape: '2' is not a dimension (dimensions are integers from 0 "
     f"to 2**64-1); {NOT_ST}", 1, True),
    ("bool-dim", st_bytes({"a": e("F32", [True, 2], [0, 8])}, D8),
     "tensor `a` has an invalid shape: true is not a dimension (dimensions are integers from 0 "
     f"to 2**64-1); {NOT_ST}", 1, True),
    ("shape-not-list", st_bytes({"a": e("F32", 2, [0, 8])}, D8),
     "tensor `a` has an invalid shape: the number 2 is not a dimension (dimensions are "
     f"integers from 0 to 2**64-1); {NOT_ST}", 1, True),
    ("dim-2**64", st_bytes({"a": e("F32", [U64], [0, 8])}, D8),
     f"tensor `a` has an invalid shape: the number {U64} is not a dimension (dimensions are "
     f"integers from 0 to 2**64-1); {NOT_ST}", 1, True),
    ("numel-overflows", st_bytes({"a": e("F32", [1 << 32, 1 << 32], [0, 8])}, D8),
     f"tensor `a` has shape [4294967296, 4294967296], whose size in bytes overflows 64 bits; "
     f"{NOT_ST}", 1, True),
    ("bytes-overflow", st_bytes({"a": e("F32", [1 << 62], [0, 8])}, D8),
     f"tensor `a` has shape [{1 << 62}], whose size in bytes overflows 64 bits; {NOT_ST}", 1,
     True),
    ("thousand-huge-dims", st_bytes({"a": e("F32", [1 << 40] * 1000, [0, 8])}, D8),
     "tensor `a` has shape [" + ", ".join([str(1 << 40)] * 8) + ", ...], whose size in bytes "
     f"overflows 64 bits; {NOT_ST}", 1, True),
    ("offsets-three", st_bytes({"a": e("F32", [2], [0, 8, 9])}, D8),
     "tensor `a` has invalid `data_offsets` ([0, 8, 9]); they are two integers [begin, end] "
     f"from 0 to 2**64-1; {NOT_ST}", 1, True),
    ("offsets-2**64", st_bytes({"a": e("U8", [U64 - 1], [1, U64])}, D8),
     f"tensor `a` has invalid `data_offsets` ([1, the number {U64}]); they are two integers "
     f"[begin, end] from 0 to 2**64-1; {NOT_ST}", 1, True),
    ("offsets-negative", st_bytes({"a": e("F32", [2], [-8, 0])}, D8),
     "tensor `a` has invalid `data_offsets` ([the number -8, 0]); they are two integers "
     f"[begin, end] from 0 to 2**64-1; {NOT_ST}", 1, True),
    ("offsets-reversed", st_bytes({"a": e("F32", [0], [8, 0])}, D8),
     f"tensor `a` has `data_offsets` [8, 0] that end before they begin; {NOT_ST}", 1, True),
    ("offsets-not-shape", st_bytes({"a": e("F32", [3], [0, 8])}, D8),
     "tensor `a` occupies 8 bytes but F32[3] needs 12; the file is damaged", 1, True),
    ("offsets-past-end", st_bytes({"a": e("F32", [2], [8, 16])}, D8),
     "file is truncated: tensor `a` ends at byte 88 but the file has 80 bytes; download or "
     "convert the checkpoint again", 1, True),
    ("offsets-huge", HUGE, f"file is truncated: tensor `a` ends at byte {len(HUGE) - 9 + U64} "
     f"but the file has {len(HUGE)} bytes; "
     "download or convert the checkpoint again", 1, True),
    ("overlap", st_bytes({"a": A, "b": e("F32", [2], [4, 12])}, bytes(12)),
     f"tensor `b` (data bytes 4-12) overlaps tensor `a`, which ends at data byte 8; {CRAFTED}",
     1, True),
    ("alias", st_bytes({"a": A, "b": A}, D8),
     f"tensor `b` (data bytes 0-8) overlaps tensor `a`, which ends at data byte 8; {CRAFTED}",
     1, True),
    ("empty-inside-another", st_bytes({"a": e("F32", [4], [0, 16]), "z": e("F32", [0], [8, 8])},
                                      bytes(16)),
     f"tensor `z` (data bytes 8-8) overlaps tensor `a`, which ends at data byte 16; {CRAFTED}",
     1, True),
    ("gap", st_bytes({"a": A, "b": e("F32", [2], [16, 24])}, bytes(24)),
     "8 bytes after tensor `a` belong to no tensor (tensor `b` starts at data byte 16, "
     f"expected 8); {CRAFTED}", 1, True),
    ("gap-at-start", st_bytes({"a": e("F32", [2], [8, 16])}, bytes(16)),
     "8 bytes at the start of the data section belong to no tensor (tensor `a` starts at data "
     f"byte 8, expected 0); {CRAFTED}", 1, True),
    ("trailing-bytes", st_bytes({"a": A}, bytes(16)),
     "the last 8 bytes of the file (from byte 80) belong to no tensor; the file is damaged or "
     "has data appended; the safetensors library refuses it too", 1, True),
    ("unknown-dtype", st_bytes({"a": e("Q32", [2], [0, 8])}, D8),
     "tensor `a` has unknown dtype 'Q32'; supported: BOOL, U8, I8, I16, U16, I32, U32, I64, U64, "
     "F16, BF16, F32, F64", 2, True),
    ("complex-dtype", st_bytes({"a": e("C64", [1], [0, 8])}, D8),
     "tensor `a` has unknown dtype 'C64'; supported: BOOL, U8, I8, I16, U16, I32, U32, I64, U64, "
     "F16, BF16, F32, F64", 2, False),
    ("fp4", st_bytes({"a": e("F4", [2], [0, 1])}, bytes(8)),
     "tensor `a` is F4: fp4/fp6 checkpoints are not supported in version 1; use the unquantized "
     "(bf16/fp16/fp32) checkpoint", 2, False),
    ("duplicate-tensor", st_bytes(raw=raw_entries(("a", A), ("a", e("F32", [2], [8, 16]))),
                                  data=bytes(16)),
     "header lists tensor `a` twice; JSON readers would silently keep only the last; "
     f"{NOT_ST}", 1, True),
    ("duplicate-identical-tensor", st_bytes(raw=raw_entries(("a", A), ("a", A)), data=D8),
     "header lists tensor `a` twice; JSON readers would silently keep only the last; "
     f"{NOT_ST}", 1, False),
    ("duplicate-field", st_bytes(raw=b'{"a":{"dtype":"F16","dtype":"F32","shape":[2],'
                                     b'"data_offsets":[0,8]}}', data=D8),
     "header has the key `dtype` twice in the entry for `a`; JSON readers would silently keep "
     f"only the last; {NOT_ST}", 1, True),
    ("duplicate-metadata", st_bytes(raw=raw_entries(("__metadata__", {"x": "1"}),
                                                    ("__metadata__", {}), ("a", A)), data=D8),
     "header lists `__metadata__` twice; JSON readers would silently keep only the last; "
     f"{NOT_ST}", 1, True),
    ("metadata-not-map", st_bytes({"__metadata__": ["pt"], "a": A}, D8),
     f"header `__metadata__` is a list, not an object of strings; {NOT_ST}", 1, True),
    ("metadata-value-not-string", st_bytes({"__metadata__": {"format": 1}, "a": A}, D8),
     f"header `__metadata__` maps `format` to the number 1, not a string; {NOT_ST}", 1, True),
    ("control-chars-in-name-are-escaped", st_bytes({"x\n\x00y": e("F32", [3], [0, 8])}, D8),
     "tensor `x\\n\\x00y` occupies 8 bytes but F32[3] needs 12; the file is damaged", 1, True),
    ("long-name-is-cut", st_bytes({"n" * 1000: e("F32", [3], [0, 8])}, D8),
     f"tensor `{'n' * 160}...` occupies 8 bytes but F32[3] needs 12; the file is damaged", 1,
     True),
]


@pytest.mark.parametrize("blob,message,code,ref_refuses",
                         [pytest.param(*c[1:], id=c[0]) for c in REFUSED])
def test_refused_headers(tmp_path, blob, message, code, ref_refuses):
    path = tmp_path / "x.safetensors"
    path.write_bytes(blob)
    with pytest.raises(RecipekitError) as info:
        read_header(path)
    assert str(info.value) == f"{display_path(path)}: {message}"
    assert info.value.exit_code == code
    assert isinstance(info.value, CorruptCheckpointError if code == 1 else
                      UnsupportedCheckpointError)
    if ref_refuses:
        with pytest.raises(SafetensorError), safe_open(path, "pt") as f:
            for k in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                f.get_tensor(k)


def test_deliberately_stricter_than_the_reference(tmp_path):
    """Where safetensors 0.8 accepts a header we refuse, and why: an identical duplicate entry
    (serde keeps the last, which happens to be harmless; we refuse every duplicate rather than
    judge which are), a complex dtype and fp4/fp6 (outside version 1's dtypes)."""
    stricter = {c[0] for c in REFUSED if not c[4]}
    assert stricter == {"duplicate-identical-tensor", "complex-dtype", "fp4"}
    path = tmp_path / "x.safetensors"
    path.write_bytes(dict((c[0], c[1]) for c in REFUSED)["duplicate-identical-tensor"])
    with safe_open(path, "pt") as f:
        assert list(f.keys()) == ["a"]


def test_header_over_the_limit_is_refused_before_reading(tmp_path):
    """A 100 MB+ header is refused from its length alone (the file is sparse: nothing read)."""
    path = tmp_path / "x.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 100_000_001))
        f.truncate(100_000_100)
    with pytest.raises(CorruptCheckpointError, match=r"header length 100000001 exceeds the "
                       r"safetensors limit of 100000000 bytes"):
        read_header(path)
    with pytest.raises(SafetensorError, match="header too large"), safe_open(path, "pt"):
        pass


ACCEPTED = [
    ("leading-and-trailing-space", st_bytes(raw=b" " + raw_entries(("a", A)) + b"\n\t",
                                            data=D8)),
    ("extra-field", st_bytes({"a": {**A, "note": [1]}}, D8)),
    ("null-metadata", st_bytes({"__metadata__": None, "a": A}, D8)),
    ("empty-tensors", st_bytes({"a": A, "z": e("F32", [0], [8, 8]), "y": e("I64", [0, 3],
                                                                           [8, 8])}, D8)),
    ("no-tensors", st_bytes({})),
    ("names-that-look-like-paths", st_bytes({"../../etc/passwd": e("F32", [1], [0, 4]),
                                             "/abs": e("F32", [1], [4, 8]),
                                             "a\x00b\nc": e("F32", [0], [8, 8]),
                                             "": e("U8", [0], [8, 8])}, D8)),
    ("surrogate-pair", st_bytes(raw=b'{"a\\ud83d\\ude00":' + json.dumps(A).encode() + b"}",
                                data=D8)),
    ("unordered-offsets", st_bytes({"b": e("F32", [2], [8, 16]), "a": A},
                                   struct.pack("<4f", 1, 2, 3, 4))),
]


@pytest.mark.parametrize("blob", [pytest.param(b, id=i) for i, b in ACCEPTED])
def test_accepted_headers_agree_with_the_reference(tmp_path, blob):
    path = tmp_path / "x.safetensors"
    path.write_bytes(blob)
    ours = read_header(path)
    with safe_open(path, "pt") as f:
        assert sorted(f.keys()) == sorted(ours)
        for name, info in ours.items():
            t = f.get_tensor(name)
            assert tuple(t.shape) == info.shape
            assert t.contiguous().view(-1).view(t.dtype).numpy().tobytes() == \
                blob[info.offset:info.offset + info.nbytes]
