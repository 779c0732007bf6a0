"""Hostile safetensors files and checkpoint directories: each one a clear error that names the
file (and the tensor), the right exit code, no traceback, no read outside the file, no path
followed out of the model directory.

Oracles: the reference safetensors library (`safe_open`), which must refuse every header we
refuse (except where the table says we are deliberately stricter) and accept, with the same
names and bytes, every one we accept; the exact messages, pinned here; and the files on disk
(what a run may copy or create).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import SafetensorError, safe_open

from recipekit.errors import (
    CorruptCheckpointError,
    RecipekitError,
    UnsupportedCheckpointError,
    display_path,
)
from recipekit.io.header import read_header

from tests.helpers.recipes import solar_recipe, write_recipe

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
#: Both kinds exit 2 (issue 17 item 10): a header is read before any tensor data, so whatever is
#: wrong with it is something `validate` finds. The kind says which error class reports it.
DAMAGED, UNSUPPORTED = CorruptCheckpointError, UnsupportedCheckpointError
REFUSED = [
    ("header-beyond-file", st_bytes({"a": A}, D8, n=4096),
     "header length 4096 runs beyond the end of the file (80 bytes); the file is truncated or "
     "not safetensors; download or convert it again", DAMAGED, True),
    ("header-absurd", st_bytes({"a": A}, D8, n=1 << 62),
     f"header length {1 << 62} exceeds the safetensors limit of 100000000 bytes; {NOT_ST}", DAMAGED,
     True),
    ("short-file", b"\x05\x00\x00",
     "file is 3 bytes, shorter than a safetensors header; the file is truncated or not "
     "safetensors; download or convert it again", DAMAGED, True),
    ("non-utf8", st_bytes(raw=b'{"a\xff":' + json.dumps(A).encode() + b"}", data=D8),
     f"header is not valid UTF-8 (byte 3); {NOT_ST}", DAMAGED, True),
    ("utf16", st_bytes(raw=json.dumps({"a": A}).encode("utf-16"), data=D8),
     f"header is not valid UTF-8 (byte 0); {NOT_ST}", DAMAGED, True),
    ("non-json", st_bytes(raw=b'{"a": nope}', data=D8),
     f"header is not valid JSON (Expecting value: line 1 column 7 (char 6)); {NOT_ST}",
     DAMAGED, True),
    ("nan", st_bytes(raw=raw_entries(("a", A))[:-1] + b',"x":NaN}', data=D8),
     f"header is not valid JSON (NaN is not a JSON value); {NOT_ST}", DAMAGED, True),
    ("deep-nesting", st_bytes(raw=b'{"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
     f"header is nested too deeply to be JSON from a model checkpoint; {NOT_ST}", DAMAGED, True),
    ("number-with-5000-digits", st_bytes(raw=b'{"a":{"dtype":"F32","shape":[' + b"1" * 5000
                                         + b'],"data_offsets":[0,8]}}', data=D8),
     f"header is not valid JSON (a number has thousands of digits); {NOT_ST}", DAMAGED, True),
    ("lone-surrogate-name", st_bytes(raw=b'{"a\\ud800":' + json.dumps(A).encode() + b"}",
                                     data=D8),
     f"header holds a lone UTF-16 surrogate escape (\\ud800-\\udfff), which is not valid "
     f"Unicode; {NOT_ST}", DAMAGED, True),
    ("not-an-object", st_bytes([1, 2], D8), f"header is a list, not a JSON object; {NOT_ST}",
     DAMAGED,
     True),
    ("entry-not-object", st_bytes({"a": [1]}, D8),
     f"the header entry of tensor `a` is a list, not an object; {NOT_ST}", DAMAGED, True),
    ("entry-missing-field", st_bytes({"a": {"dtype": "F32", "shape": [2]}}, D8),
     f"the header entry of tensor `a` has no `data_offsets`; {NOT_ST}", DAMAGED, True),
    ("dtype-not-string", st_bytes({"a": e(5, [2], [0, 8])}, D8),
     f"tensor `a` has the dtype the number 5, not a dtype name; {NOT_ST}", DAMAGED, True),
    ("negative-dim", st_bytes({"a": e("F32", [-2], [0, 8])}, D8),
     "tensor `a` has an invalid shape: the number -2 is not a dimension (dimensions are "
     f"integers from 0 to 2**64-1); {NOT_ST}", DAMAGED, True),
    ("float-dim", st_bytes({"a": e("F32", [2.0], [0, 8])}, D8),
     "tensor `a` has an invalid shape: the number 2.0 is not a dimension (dimensions are "
     f"integers from 0 to 2**64-1); {NOT_ST}", DAMAGED, True),
    ("string-dim", st_bytes({"a": e("F32", ["2"], [0, 8])}, D8),
     "tensor `a` has an invalid shape: '2' is not a dimension (dimensions are integers from 0 "
     f"to 2**64-1); {NOT_ST}", DAMAGED, True),
    ("bool-dim", st_bytes({"a": e("F32", [True, 2], [0, 8])}, D8),
     "tensor `a` has an invalid shape: true is not a dimension (dimensions are integers from 0 "
     f"to 2**64-1); {NOT_ST}", DAMAGED, True),
    ("shape-not-list", st_bytes({"a": e("F32", 2, [0, 8])}, D8),
     "tensor `a` has an invalid shape: the number 2 is not a dimension (dimensions are "
     f"integers from 0 to 2**64-1); {NOT_ST}", DAMAGED, True),
    ("dim-2**64", st_bytes({"a": e("F32", [U64], [0, 8])}, D8),
     f"tensor `a` has an invalid shape: the number {U64} is not a dimension (dimensions are "
     f"integers from 0 to 2**64-1); {NOT_ST}", DAMAGED, True),
    ("numel-overflows", st_bytes({"a": e("F32", [1 << 32, 1 << 32], [0, 8])}, D8),
     f"tensor `a` has shape [4294967296, 4294967296], whose size in bytes overflows 64 bits; "
     f"{NOT_ST}", DAMAGED, True),
    ("bytes-overflow", st_bytes({"a": e("F32", [1 << 62], [0, 8])}, D8),
     f"tensor `a` has shape [{1 << 62}], whose size in bytes overflows 64 bits; {NOT_ST}", DAMAGED,
     True),
    ("thousand-huge-dims", st_bytes({"a": e("F32", [1 << 40] * 1000, [0, 8])}, D8),
     "tensor `a` has shape [" + ", ".join([str(1 << 40)] * 8) + ", ...], whose size in bytes "
     f"overflows 64 bits; {NOT_ST}", DAMAGED, True),
    ("offsets-three", st_bytes({"a": e("F32", [2], [0, 8, 9])}, D8),
     "tensor `a` has invalid `data_offsets` ([0, 8, 9]); they are two integers [begin, end] "
     f"from 0 to 2**64-1; {NOT_ST}", DAMAGED, True),
    ("offsets-2**64", st_bytes({"a": e("U8", [U64 - 1], [1, U64])}, D8),
     f"tensor `a` has invalid `data_offsets` ([1, the number {U64}]); they are two integers "
     f"[begin, end] from 0 to 2**64-1; {NOT_ST}", DAMAGED, True),
    ("offsets-negative", st_bytes({"a": e("F32", [2], [-8, 0])}, D8),
     "tensor `a` has invalid `data_offsets` ([the number -8, 0]); they are two integers "
     f"[begin, end] from 0 to 2**64-1; {NOT_ST}", DAMAGED, True),
    ("offsets-reversed", st_bytes({"a": e("F32", [0], [8, 0])}, D8),
     f"tensor `a` has `data_offsets` [8, 0] that end before they begin; {NOT_ST}", DAMAGED, True),
    ("offsets-not-shape", st_bytes({"a": e("F32", [3], [0, 8])}, D8),
     "tensor `a` occupies 8 bytes but F32[3] needs 12; the file is damaged", DAMAGED, True),
    ("offsets-past-end", st_bytes({"a": e("F32", [2], [8, 16])}, D8),
     "file is truncated: tensor `a` ends at byte 88 but the file has 80 bytes; download or "
     "convert the checkpoint again", DAMAGED, True),
    ("offsets-huge", HUGE, f"file is truncated: tensor `a` ends at byte {len(HUGE) - 9 + U64} "
     f"but the file has {len(HUGE)} bytes; "
     "download or convert the checkpoint again", DAMAGED, True),
    ("overlap", st_bytes({"a": A, "b": e("F32", [2], [4, 12])}, bytes(12)),
     f"tensor `b` (data bytes 4-12) overlaps tensor `a`, which ends at data byte 8; {CRAFTED}",
     DAMAGED, True),
    ("alias", st_bytes({"a": A, "b": A}, D8),
     f"tensor `b` (data bytes 0-8) overlaps tensor `a`, which ends at data byte 8; {CRAFTED}",
     DAMAGED, True),
    ("empty-inside-another", st_bytes({"a": e("F32", [4], [0, 16]), "z": e("F32", [0], [8, 8])},
                                      bytes(16)),
     f"tensor `z` (data bytes 8-8) overlaps tensor `a`, which ends at data byte 16; {CRAFTED}",
     DAMAGED, True),
    ("gap", st_bytes({"a": A, "b": e("F32", [2], [16, 24])}, bytes(24)),
     "8 bytes after tensor `a` belong to no tensor (tensor `b` starts at data byte 16, "
     f"expected 8); {CRAFTED}", DAMAGED, True),
    ("gap-at-start", st_bytes({"a": e("F32", [2], [8, 16])}, bytes(16)),
     "8 bytes at the start of the data section belong to no tensor (tensor `a` starts at data "
     f"byte 8, expected 0); {CRAFTED}", DAMAGED, True),
    ("trailing-bytes", st_bytes({"a": A}, bytes(16)),
     "the last 8 bytes of the file (from byte 80) belong to no tensor; the file is damaged or "
     "has data appended; the safetensors library refuses it too", DAMAGED, True),
    ("unknown-dtype", st_bytes({"a": e("Q32", [2], [0, 8])}, D8),
     "tensor `a` has unknown dtype 'Q32'; supported: BOOL, U8, I8, I16, U16, I32, U32, I64, U64, "
     "F16, BF16, F32, F64", UNSUPPORTED, True),
    ("complex-dtype", st_bytes({"a": e("C64", [1], [0, 8])}, D8),
     "tensor `a` has unknown dtype 'C64'; supported: BOOL, U8, I8, I16, U16, I32, U32, I64, U64, "
     "F16, BF16, F32, F64", UNSUPPORTED, False),
    ("fp4", st_bytes({"a": e("F4", [2], [0, 1])}, bytes(8)),
     "tensor `a` is F4: fp4/fp6 checkpoints are not supported in version 1; use the unquantized "
     "(bf16/fp16/fp32) checkpoint", UNSUPPORTED, False),
    ("duplicate-tensor", st_bytes(raw=raw_entries(("a", A), ("a", e("F32", [2], [8, 16]))),
                                  data=bytes(16)),
     "header lists tensor `a` twice; JSON readers would silently keep only the last; "
     f"{NOT_ST}", DAMAGED, True),
    ("duplicate-identical-tensor", st_bytes(raw=raw_entries(("a", A), ("a", A)), data=D8),
     "header lists tensor `a` twice; JSON readers would silently keep only the last; "
     f"{NOT_ST}", DAMAGED, False),
    ("duplicate-field", st_bytes(raw=b'{"a":{"dtype":"F16","dtype":"F32","shape":[2],'
                                     b'"data_offsets":[0,8]}}', data=D8),
     "header has the key `dtype` twice in the entry for `a`; JSON readers would silently keep "
     f"only the last; {NOT_ST}", DAMAGED, True),
    ("duplicate-metadata", st_bytes(raw=raw_entries(("__metadata__", {"x": "1"}),
                                                    ("__metadata__", {}), ("a", A)), data=D8),
     "header lists `__metadata__` twice; JSON readers would silently keep only the last; "
     f"{NOT_ST}", DAMAGED, True),
    ("metadata-not-map", st_bytes({"__metadata__": ["pt"], "a": A}, D8),
     f"header `__metadata__` is a list, not an object of strings; {NOT_ST}", DAMAGED, True),
    ("metadata-value-not-string", st_bytes({"__metadata__": {"format": 1}, "a": A}, D8),
     f"header `__metadata__` maps `format` to the number 1, not a string; {NOT_ST}", DAMAGED, True),
    ("control-chars-in-name-are-escaped", st_bytes({"x\n\x00y": e("F32", [3], [0, 8])}, D8),
     "tensor `x\\n\\x00y` occupies 8 bytes but F32[3] needs 12; the file is damaged",
     DAMAGED, True),
    ("long-name-is-cut", st_bytes({"n" * 1000: e("F32", [3], [0, 8])}, D8),
     f"tensor `{'n' * 160}...` occupies 8 bytes but F32[3] needs 12; the file is damaged", DAMAGED,
     True),
]


@pytest.mark.parametrize("blob,message,kind,ref_refuses",
                         [pytest.param(*c[1:], id=c[0]) for c in REFUSED])
def test_refused_headers(tmp_path, blob, message, kind, ref_refuses):
    path = tmp_path / "x.safetensors"
    path.write_bytes(blob)
    with pytest.raises(RecipekitError) as info:
        read_header(path)
    assert str(info.value) == f"{display_path(path)}: {message}"
    assert info.value.exit_code == 2
    assert type(info.value) is kind
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


# -- through the CLI: a damaged tiny Llama ---------------------------------------------------

def run_fails(cli, recipe: Path, code: int, command: str = "run") -> str:
    result = cli(command, recipe, *(["-q"] if command == "run" else []))
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert "internal error" not in result.output
    return result.stderr


def first_line(text: str) -> str:
    return text.splitlines()[0]


def split_file(f: Path) -> tuple[list[tuple[str, dict]], bytes]:
    """A safetensors file's header items (in file order) and data section."""
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return list(json.loads(raw[8:8 + n]).items()), raw[8 + n:]


def tensors_by_offset(items: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    return sorted((kv for kv in items if kv[0] != "__metadata__"),
                  key=lambda kv: kv[1]["data_offsets"])


@pytest.fixture
def recipe(tmp_path: Path, model_copy: Path) -> Path:
    return write_recipe(tmp_path, solar_recipe())


@pytest.fixture
def weights(model_copy: Path) -> Path:
    return model_copy / "model.safetensors"


class TestDamagedCheckpoint:
    """Exit code 2 (a damaged header is found before any tensor data is read: issue 17 item
    10), the file and the tensor named, nothing written."""

    def test_duplicate_tensor_name(self, cli, recipe, weights):
        items, data = split_file(weights)
        name, entry = tensors_by_offset(items)[-1]
        weights.write_bytes(st_bytes(raw=raw_entries(*items, (name, entry)), data=data))
        assert first_line(run_fails(cli, recipe, 2)) == (
            f"{display_path(weights)}: header lists tensor `{name}` twice; JSON readers would "
            f"silently keep only the last; {NOT_ST}")
        assert not (recipe.parent / "out").exists()

    def test_overlapping_tensors(self, cli, recipe, weights):
        items, data = split_file(weights)
        (a, ea), (b, eb) = tensors_by_offset(items)[:2]
        size = eb["data_offsets"][1] - eb["data_offsets"][0]
        assert size <= ea["data_offsets"][1]
        eb["data_offsets"] = [0, size]  # b now aliases the first bytes of a
        weights.write_bytes(st_bytes(raw=raw_entries(*items), data=data))
        first, second = sorted([(0, ea["data_offsets"][1], a), (0, size, b)])[:2]
        assert first_line(run_fails(cli, recipe, 2)) == (
            f"{display_path(weights)}: tensor `{second[2]}` (data bytes 0-{second[1]}) overlaps "
            f"tensor `{first[2]}`, which ends at data byte {first[1]}; {CRAFTED}")

    def test_data_appended(self, cli, recipe, weights):
        size = weights.stat().st_size
        with open(weights, "ab") as f:
            f.write(b"\x00" * 24)
        assert first_line(run_fails(cli, recipe, 2)) == (
            f"{display_path(weights)}: the last 24 bytes of the file (from byte {size}) belong to "
            "no tensor; the file is damaged or has data appended; the safetensors library "
            "refuses it too")

    def test_non_utf8_header(self, cli, recipe, weights):
        raw = bytearray(weights.read_bytes())
        at = raw.index(b"lm_head")
        raw[at] = 0xFF
        weights.write_bytes(bytes(raw))
        assert first_line(run_fails(cli, recipe, 2, "validate")) == (
            f"{display_path(weights)}: header is not valid UTF-8 (byte {at - 8}); {NOT_ST}")

    def test_absurd_header_length(self, cli, recipe, weights):
        raw = bytearray(weights.read_bytes())
        raw[:8] = struct.pack("<Q", U64 - 1)
        weights.write_bytes(bytes(raw))
        assert first_line(run_fails(cli, recipe, 2, "plan")) == (
            f"{display_path(weights)}: header length {U64 - 1} exceeds the safetensors limit of "
            f"100000000 bytes; {NOT_ST}")

    def test_metadata_not_a_string_map(self, cli, recipe, weights):
        items, data = split_file(weights)
        items = [(k, {"format": ["pt"]} if k == "__metadata__" else v) for k, v in items]
        weights.write_bytes(st_bytes(raw=raw_entries(*items), data=data))
        assert first_line(run_fails(cli, recipe, 2)) == (
            f"{display_path(weights)}: header `__metadata__` maps `format` to a list, not a "
            f"string; {NOT_ST}")

    def test_shape_and_offsets_disagree(self, cli, recipe, weights):
        items, data = split_file(weights)
        name, entry = tensors_by_offset(items)[0]
        entry["shape"] = [entry["shape"][0] + 1, *entry["shape"][1:]]
        weights.write_bytes(st_bytes(raw=raw_entries(*items), data=data))
        err = first_line(run_fails(cli, recipe, 2))
        assert err.startswith(f"{display_path(weights)}: tensor `{name}` occupies ")
        assert err.endswith("; the file is damaged")


class TestHostileTensorNames:
    """Names are opaque strings: never paths, written back byte for byte, shown escaped."""

    NAMES = ["../../etc/passwd", "/abs/x", "a\x00b\nc", "", "model.layers.0/../../x"]

    def test_path_like_names_pass_through_untouched(self, cli, tmp_path, tiny_llama):
        from safetensors.torch import load_file, save_file

        model = tmp_path / "model"
        shutil.copytree(tiny_llama, model)
        tensors = load_file(model / "model.safetensors")
        for k, name in enumerate(self.NAMES):
            tensors[name] = tensors["model.norm.weight"][:k + 1].clone()
        save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
        r = write_recipe(tmp_path, solar_recipe(output="  path: ./out\n  shard_size: 20KB"))
        result = cli("run", r, "-q")
        assert result.exit_code == 0, result.output
        out = tmp_path / "out"
        index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
        shards = sorted(set(index.values()))
        assert all(s.startswith("model-") and s.endswith(".safetensors") for s in shards)
        assert sorted(p.name for p in out.iterdir()) == sorted(
            [*shards, "model.safetensors.index.json", "config.json", "README.md",
             "generation_config.json", "recipekit.json"])  # a finished run keeps no state
        created = {p.relative_to(tmp_path) for p in tmp_path.rglob("*")}
        assert not any("passwd" in str(p) or p.name in ("abs", "x") for p in created)
        for k, name in enumerate(self.NAMES):
            with safe_open(out / index[name], "pt") as f:
                assert f.get_tensor(name).equal(tensors["model.norm.weight"][:k + 1])
        manifest = json.loads((out / "recipekit.json").read_text())
        assert sorted(manifest["shards"]) == shards

    def test_names_in_messages_cannot_forge_lines(self, cli, tmp_path, model_copy):
        from safetensors.torch import load_file, save_file

        tensors = load_file(model_copy / "model.safetensors")
        name = "model.layers.03.mlp.up_proj.weight\nok: all good"
        tensors[name] = tensors["model.norm.weight"].clone()
        save_file(tensors, model_copy / "model.safetensors")
        err = run_fails(cli, write_recipe(tmp_path, solar_recipe()), 2, "validate")
        assert err == (
            f"{display_path(model_copy / 'model.safetensors')}: tensor "
            "`model.layers.03.mlp.up_proj.weight\\nok: all good` has the layer index '03', "
            "which is not a plain decimal number; layer indices are written 0, 1, 2, ... "
            "without leading zeros; rename the tensors\n")

    @pytest.mark.parametrize("index", ["٣", "²", "003"])
    def test_layer_index_that_is_not_plain_decimal(self, cli, tmp_path, model_copy, index):
        """`03` or non-ASCII digits would alias layer 3 (or fail to renumber)."""
        from safetensors.torch import load_file, save_file

        tensors = load_file(model_copy / "model.safetensors")
        tensors[f"model.layers.{index}.mlp.up_proj.weight"] = tensors["model.norm.weight"].clone()
        save_file(tensors, model_copy / "model.safetensors")
        err = first_line(run_fails(cli, write_recipe(tmp_path, solar_recipe()), 2, "validate"))
        assert f"has the layer index {index!r}, which is not a plain decimal number" in err


# -- sharded checkpoints: the index ---------------------------------------------------------

SHARD = "model-00001-of-00001.safetensors"
INDEX = "model.safetensors.index.json"
DAMAGED = "the checkpoint is damaged; download or convert it again"


@pytest.fixture
def sharded(model_copy: Path) -> Path:
    """The tiny Llama as a one-shard indexed checkpoint."""
    names = list(read_header(model_copy / "model.safetensors"))
    (model_copy / "model.safetensors").rename(model_copy / SHARD)
    (model_copy / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": {
        n: SHARD for n in names}}))
    return model_copy


def with_weight_map(model: Path, change) -> str:
    doc = json.loads((model / INDEX).read_text())
    name = sorted(doc["weight_map"])[0]
    change(doc["weight_map"], name)
    (model / INDEX).write_text(json.dumps(doc))
    return name


class TestIndex:
    def test_sharded_copy_runs(self, cli, recipe, sharded):
        result = cli("validate", recipe)
        assert result.exit_code == 0, result.output

    @pytest.mark.parametrize("target", ["../model.safetensors", "/etc/passwd", "sub/x",
                                        "a\x00b", "..", ".", ""])
    def test_shard_names_that_leave_the_directory(self, cli, recipe, sharded, target):
        name = with_weight_map(sharded, lambda m, n: m.__setitem__(n, target))
        shown = "`" + target.replace("\x00", "\\x00") + "`"
        assert first_line(run_fails(cli, recipe, 2)) == (
            f"{display_path(sharded / INDEX)}: `weight_map` maps tensor `{name}` to {shown}, "
            "which is not a file beside the index; shard names cannot contain '/' or NUL or be "
            "'.' or '..'; the index is damaged or crafted")

    @pytest.mark.parametrize("doc,message", [
        ([1], "the index is a list, not a JSON object"),
        ({"metadata": {}}, "the index has no `weight_map`"),
        ({"weight_map": [SHARD]}, "`weight_map` is a list, not an object mapping tensor names to "
                                  "shard files"),
        ({"weight_map": {"lm_head.weight": 1}}, "`weight_map` maps tensor `lm_head.weight` to "
                                                "the number 1, not a file name"),
        ({"weight_map": {"lm_head.weight": None}}, "`weight_map` maps tensor `lm_head.weight` to "
                                                   "null, not a file name"),
    ])
    def test_malformed(self, cli, recipe, sharded, doc, message):
        (sharded / INDEX).write_text(json.dumps(doc))
        assert first_line(run_fails(cli, recipe, 2)) == (
            f"{display_path(sharded / INDEX)}: {message}; {DAMAGED}")

    def test_duplicate_tensor_in_weight_map(self, cli, recipe, sharded):
        text = (sharded / INDEX).read_text()
        (sharded / INDEX).write_text(text.replace('"lm_head.weight": ',
                                                  '"lm_head.weight": "other.safetensors", '
                                                  '"lm_head.weight": ', 1))
        assert first_line(run_fails(cli, recipe, 2)) == (
            f"{display_path(sharded / INDEX)}: {INDEX} has the key `lm_head.weight` twice in "
            "the entry for `weight_map`; JSON readers would silently keep only the last; "
            f"{DAMAGED}")

    def test_not_utf8(self, cli, recipe, sharded):
        (sharded / INDEX).write_bytes(b'{"weight_map": {"\xc3(": "x"}}')
        assert first_line(run_fails(cli, recipe, 2)) == (
            f"{display_path(sharded / INDEX)}: {INDEX} is not valid UTF-8 (byte 17); {DAMAGED}")

    def test_huge_index(self, cli, recipe, sharded):
        with open(sharded / INDEX, "r+b") as f:
            f.truncate(100_000_001)  # sparse: refused from its size alone
        assert first_line(run_fails(cli, recipe, 2)) == (
            f"{display_path(sharded / INDEX)}: {INDEX} is 95.37 MiB, larger than the 95.37 MiB "
            f"any real {INDEX} stays under; the file is damaged or not a {INDEX}; download the "
            "checkpoint again")

    def test_missing_shard(self, cli, recipe, sharded):
        with_weight_map(sharded, lambda m, n: m.__setitem__(n, "model-00002-of-00002.safetensors"))
        assert first_line(run_fails(cli, recipe, 2)) == (
            f"{display_path(sharded / 'model-00002-of-00002.safetensors')}: shard "
            f"'model-00002-of-00002.safetensors' listed in {INDEX} is missing; the checkpoint "
            "download is incomplete")

    def test_shard_that_is_a_directory(self, cli, recipe, sharded):
        (sharded / "sub.safetensors").mkdir()
        with_weight_map(sharded, lambda m, n: m.__setitem__(n, "sub.safetensors"))
        assert first_line(run_fails(cli, recipe, 2)) == (
            f"{display_path(sharded / 'sub.safetensors')}: is a directory, not a regular file; "
            "a checkpoint directory holds regular files (or hub cache links)")

    def test_shard_that_is_a_fifo(self, cli, recipe, sharded):
        """A named pipe would block a reader forever: refused from its type, never opened."""
        os.mkfifo(sharded / "pipe.safetensors")
        with_weight_map(sharded, lambda m, n: m.__setitem__(n, "pipe.safetensors"))
        assert first_line(run_fails(cli, recipe, 2)) == (
            f"{display_path(sharded / 'pipe.safetensors')}: is a named pipe, not a regular file; "
            "a checkpoint directory holds regular files (or hub cache links)")


# -- config.json -----------------------------------------------------------------------------

class TestConfig:
    def config(self, model: Path) -> dict:
        return json.loads((model / "config.json").read_text())

    @pytest.mark.parametrize("raw,message", [
        (b"[1, 2]", "config.json is a list, not a JSON object"),
        (b'"llama"', "config.json is 'llama', not a JSON object"),
        (b'{"model_type": "ll\xe9ma"}', "config.json is not valid UTF-8 (byte 18)"),
        (b'{"model_type": "\\udc00"}', "config.json holds a lone UTF-16 surrogate escape "
                                        "(\\ud800-\\udfff), which is not valid Unicode"),
        (b'{"a":' + b"[" * 50_000 + b"]" * 50_000 + b"}",
         "config.json is nested too deeply to be JSON from a model checkpoint"),
        (b'{"a":' + b"[" * 100 + b"]" * 100 + b"}",
         "config.json nests objects or lists more than 64 levels deep"),
        (b'{"model_type": ', "config.json is not valid JSON (Expecting value: line 1 column 16 "
                             "(char 15))"),
    ])
    def test_not_a_config(self, cli, recipe, model_copy, raw, message):
        (model_copy / "config.json").write_bytes(raw)
        assert first_line(run_fails(cli, recipe, 2)) == (
            f"{display_path(model_copy / 'config.json')}: {message}; {DAMAGED}")

    def test_huge_config(self, cli, recipe, model_copy):
        with open(model_copy / "config.json", "r+b") as f:
            f.truncate(2 << 30)  # sparse 2 GiB: refused from its size, never read
        assert first_line(run_fails(cli, recipe, 2)) == (
            f"{display_path(model_copy / 'config.json')}: config.json is 2.00 GiB, larger than "
            "the 16.00 MiB any real config.json stays under; the file is damaged or not a "
            "config.json; download the checkpoint again")

    @pytest.mark.parametrize("value,shown", [("8", "'8'"), (8.0, "the number 8.0"),
                                             (True, "true"), (-8, "the number -8"),
                                             ([8], "a list")])
    def test_layer_count_not_an_integer(self, cli, recipe, model_copy, value, shown):
        cfg = self.config(model_copy)
        cfg["num_hidden_layers"] = value
        (model_copy / "config.json").write_text(json.dumps(cfg))
        assert first_line(run_fails(cli, recipe, 2)) == (
            f"{display_path(model_copy / 'config.json')}: `num_hidden_layers` is {shown}, not a "
            "layer count; write the number of layers as a JSON integer")

    def test_nested_layer_count_not_an_integer(self, cli, recipe, model_copy):
        cfg = self.config(model_copy)
        cfg["text_config"] = {"n_layer": "8"}
        (model_copy / "config.json").write_text(json.dumps(cfg))
        assert "`text_config.n_layer` is '8', not a layer count" in run_fails(cli, recipe, 2)

    @pytest.mark.parametrize("key,value,message", [
        ("architectures", 5, "`architectures` is the number 5, not a list of class names; fix "
                             'config.json (e.g. ["LlamaForCausalLM"])'),
        ("architectures", [["LlamaForCausalLM"]], "`architectures` is a list, not a list of "
                                                  'class names; fix config.json (e.g. '
                                                  '["LlamaForCausalLM"])'),
        ("model_type", ["llama"], '`model_type` is a list, not a string; fix config.json (e.g. '
                                  '"llama")'),
    ])
    def test_config_values_of_the_wrong_type(self, cli, recipe, model_copy, key, value,
                                             message):
        cfg = self.config(model_copy)
        cfg[key] = value
        (model_copy / "config.json").write_text(json.dumps(cfg))
        assert first_line(run_fails(cli, recipe, 2)) == (
            f"{display_path(model_copy / 'config.json')}: {message}")

    def test_duplicate_keys_and_nan_read_as_transformers_does(self, cli, recipe, model_copy):
        text = (model_copy / "config.json").read_text().rstrip().rstrip("}")
        (model_copy / "config.json").write_text(text + ', "x": NaN, "x": 1}')
        result = cli("validate", recipe)
        assert result.exit_code == 0, result.output


# -- symlinks --------------------------------------------------------------------------------

OUTSIDE_HINT = ("recipekit does not follow links out of a checkpoint directory; copy the file "
                "into it, or name the directory that holds the real files")


class TestSymlinks:
    @pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
    def test_file_linking_out_of_a_local_model_is_refused(self, cli, tmp_path, recipe,
                                                          model_copy, name):
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        (model_copy / name).rename(elsewhere / name)
        (model_copy / name).symlink_to(elsewhere / name)
        assert first_line(run_fails(cli, recipe, 2)) == (
            f"{display_path(model_copy / name)}: is a symlink to {elsewhere / name}, outside the "
            f"model directory {model_copy}; {OUTSIDE_HINT}")
        assert not (tmp_path / "out").exists()

    def test_shard_linking_out_is_refused(self, cli, tmp_path, recipe, sharded):
        (sharded / SHARD).rename(tmp_path / SHARD)
        (sharded / SHARD).symlink_to(Path("..") / SHARD)
        assert first_line(run_fails(cli, recipe, 2)) == (
            f"{display_path(sharded / SHARD)}: is a symlink to {tmp_path / SHARD}, outside the "
            f"model directory {sharded}; {OUTSIDE_HINT}")

    def test_index_linking_out_is_refused(self, cli, tmp_path, recipe, sharded):
        (sharded / INDEX).rename(tmp_path / INDEX)
        (sharded / INDEX).symlink_to(tmp_path / INDEX)
        assert f"{display_path(sharded / INDEX)}: is a symlink to {tmp_path / INDEX}, outside " \
            in run_fails(cli, recipe, 2)

    def test_broken_link_and_loop(self, cli, tmp_path, recipe, model_copy):
        (model_copy / "model.safetensors").unlink()
        (model_copy / "model.safetensors").symlink_to("gone.safetensors")
        assert first_line(run_fails(cli, recipe, 2)) == (
            f"{display_path(model_copy / 'model.safetensors')}: is a broken symlink (to "
            f"{model_copy / 'gone.safetensors'}); a checkpoint directory holds regular files (or "
            "hub cache links)")
        (model_copy / "model.safetensors").unlink()
        (model_copy / "model.safetensors").symlink_to("model.safetensors")
        assert "model.safetensors: is a symlink loop;" in run_fails(cli, recipe, 2)

    def test_links_inside_the_model_directory_work(self, cli, tmp_path, model_copy):
        (model_copy / "real").mkdir()
        for name in ("config.json", "model.safetensors"):
            (model_copy / name).rename(model_copy / "real" / name)
            (model_copy / name).symlink_to(Path("real") / name)
        (tmp_path / "link").symlink_to(model_copy)  # the model directory itself may be a link
        r = write_recipe(tmp_path, solar_recipe("./link"))
        result = cli("run", r, "-q")
        assert result.exit_code == 0, result.output

    def test_a_hub_cache_snapshot_named_as_a_local_path_works(self, cli, tmp_path, tiny_llama):
        """Snapshots link to ../../blobs: inside the repo's cache folder, so allowed."""
        from tests.helpers.hub import add_to_cache

        snap = add_to_cache(tmp_path / "cache", "org/tiny",
                            {p.name: p for p in tiny_llama.iterdir()})
        assert (snap / "config.json").is_symlink()
        r = write_recipe(tmp_path, solar_recipe(os.path.relpath(snap, tmp_path)))
        result = cli("run", r, "-q")
        assert result.exit_code == 0, result.output
        assert result.stderr == ""
        assert (tmp_path / "out" / "generation_config.json").read_bytes() == (
            tiny_llama / "generation_config.json").read_bytes()

    def test_hub_blob_linking_out_of_the_cache_is_refused(self, cli, tmp_path, tiny_llama,
                                                          monkeypatch):
        from tests.helpers.hub import add_to_cache

        cache = tmp_path / "cache"
        snap = add_to_cache(cache, "org/tiny", {p.name: p for p in tiny_llama.iterdir()})
        (snap / "config.json").unlink()
        (snap / "config.json").symlink_to(tiny_llama / "config.json")
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
        r = write_recipe(tmp_path, solar_recipe("{hub: org/tiny}"))
        assert first_line(run_fails(cli, r, 2)) == (
            f"{display_path(snap / 'config.json')}: is a symlink to {tiny_llama / 'config.json'}, "
            f"outside the model directory {cache / 'models--org--tiny'}; {OUTSIDE_HINT}")


class TestDonorFiles:
    """Non-weight files of the donor that are not the donor's own are skipped with a warning."""

    def test_unsafe_donor_files_are_skipped_with_a_warning(self, cli, tmp_path, recipe,
                                                           model_copy):
        secret = tmp_path / "secret.txt"
        secret.write_text("not yours")
        (tmp_path / "shared").mkdir()
        (tmp_path / "shared" / "vocab.txt").write_text("shared")
        (model_copy / "tokenizer.json").symlink_to(secret)
        (model_copy / "merges.txt").symlink_to("missing.txt")
        os.mkfifo(model_copy / "pipe.json")
        (model_copy / "shared").symlink_to(tmp_path / "shared", target_is_directory=True)
        (model_copy / "special_tokens_map.json").write_text("{}")
        (model_copy / "alias.json").symlink_to("special_tokens_map.json")  # inside: copied
        result = cli("run", recipe, "-q")
        assert result.exit_code == 0, result.output
        m = display_path(model_copy)
        assert result.stderr.splitlines() == [
            f"warning: {m}/shared: not copied to the output: it is a symlinked directory "
            "(recipekit copies only the donor's own files)",
            f"warning: {m}/merges.txt: not copied to the output: it is a broken symlink (to "
            f"{model_copy / 'missing.txt'})",
            f"warning: {m}/pipe.json: not copied to the output: it is a named pipe, not a "
            "regular file",
            f"warning: {m}/tokenizer.json: not copied to the output: it is a symlink to "
            f"{secret}, outside the model directory {model_copy}",
        ]
        out = tmp_path / "out"
        copied = sorted(p.name for p in out.iterdir())
        assert "alias.json" in copied and "special_tokens_map.json" in copied
        for name in ("tokenizer.json", "merges.txt", "pipe.json", "shared", "vocab.txt"):
            assert name not in copied
        assert not (out / "alias.json").is_symlink()
        assert all("not yours" not in p.read_text(errors="replace") for p in out.iterdir()
                   if p.is_file())


# -- outputs: never over an input ------------------------------------------------------------

def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (links not followed) and its bytes: what must not change."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.is_symlink()}


class TestOutputOverlapsInput:
    """Issue 17 item 1: an output that is, lies inside or contains an input is refused (exit 2)
    with or without --force, and the message does not suggest --force."""

    @pytest.fixture
    def made(self, cli, tmp_path, model_copy) -> Path:
        """A recipekit output (it has a state file listing its weights) used as an input."""
        first = write_recipe(tmp_path, solar_recipe(output="  path: ./made"), "first.yaml")
        assert cli("run", first, "-q").exit_code == 0
        return tmp_path / "made"

    @pytest.mark.parametrize("force", [False, True])
    @pytest.mark.parametrize("where,relation", [(".", "is"), ("sub", "lies inside"),
                                                ("..", "contains")])
    def test_output_over_an_input_model(self, cli, tmp_path, made, where, relation, force):
        (tmp_path / "inputs").mkdir()
        moved = tmp_path / "inputs" / "made"
        made.rename(moved)
        r = write_recipe(tmp_path, solar_recipe("./inputs/made", layers='["range(0,4)"]',
                                                output=f"  path: ./inputs/made/{where}"))
        before = snapshot(tmp_path / "inputs")
        err = run_fails(cli, r, 2, "run") if not force else None
        if force:
            result = cli("run", r, "-q", "--force")
            assert result.exit_code == 2, result.output
            err = result.stderr
        assert f" {relation} input `models.tiny` ({display_path(moved)})" in first_line(err)
        assert "--force" not in err
        assert snapshot(tmp_path / "inputs") == before

    def test_plan_and_validate_refuse_too(self, cli, tmp_path, made):
        r = write_recipe(tmp_path, solar_recipe("./made", output="  path: ./made"))
        for command in ("plan", "validate"):
            assert "output path" in first_line(run_fails(cli, r, 2, command))

    def test_through_a_symlink(self, cli, tmp_path, made):
        (tmp_path / "alias").symlink_to(made, target_is_directory=True)
        r = write_recipe(tmp_path, solar_recipe("./made", output="  path: ./alias/x"))
        before = snapshot(made)
        assert " lies inside input `models.tiny`" in run_fails(cli, r, 2)
        result = cli("run", r, "-q", "--force")
        assert result.exit_code == 2 and snapshot(made) == before

    @pytest.mark.parametrize("force", [[], ["--force"]])
    def test_through_a_bind_mount(self, cli, tmp_path, made, force):
        """A bind mount shows the input directory under a path no symlink resolves to: the
        check compares (device, inode) too. Before, `--force` deleted the input's files."""
        import subprocess

        alias = tmp_path / "alias"
        alias.mkdir()
        if subprocess.run(["mount", "--bind", str(made), str(alias)],
                          capture_output=True).returncode != 0:
            pytest.skip("bind mounts need privileges this test run does not have")
        try:
            r = write_recipe(tmp_path, solar_recipe("./made", layers='["range(0,4)"]',
                                                    output="  path: ./alias"))
            before = snapshot(made)
            result = cli("run", r, "-q", *force)
            assert result.exit_code == 2, result.output
            assert f" is input `models.tiny` ({display_path(made)})" in result.stderr
            assert snapshot(made) == before
        finally:
            subprocess.run(["umount", str(alias)], check=True)

    def test_same_files_by_identity(self, tmp_path, monkeypatch):
        """The (device, inode) comparison behind the bind-mount refusal, where mounting is not
        allowed: another spelling of a directory (here its identity given to a second folder)
        is, lies inside or contains the input as the real one would."""
        from recipekit.plan import overlap

        data, other = tmp_path / "data" / "model", tmp_path / "mnt"
        data.mkdir(parents=True)
        other.mkdir()
        alias = {other: data, other / "model": data}  # `other` as the bind of `data`'s parent
        identity = overlap._identity
        monkeypatch.setattr(overlap, "_identity", lambda p: identity(alias.get(p, p)))
        inputs = [("the model", data)]
        assert overlap.overlapping_input(other / "model", inputs) == ("is", "the model")
        assert overlap.overlapping_input(other / "model" / "x", inputs) == \
            ("lies inside", "the model")
        alias[other] = data.parent
        assert overlap.overlapping_input(other, inputs) == ("contains", "the model")
        assert overlap.overlapping_input(tmp_path / "elsewhere", inputs) is None

    def test_output_containing_a_hub_cache_repo(self, cli, tmp_path, hub_cache):
        r = write_recipe(tmp_path, solar_recipe("{hub: org/tiny}", output=f"  path: {hub_cache}"))
        before = snapshot(hub_cache)
        for extra in ([], ["--force"]):
            result = cli("run", r, "-q", *extra)
            assert result.exit_code == 2, result.output
            assert " contains input `models.tiny`" in result.stderr
        repo = hub_cache / "models--org--tiny"
        r = write_recipe(tmp_path, solar_recipe("{hub: org/tiny}", output=f"  path: {repo}/x"))
        assert " lies inside input `models.tiny`" in run_fails(cli, r, 2)
        assert snapshot(hub_cache) == before

    @pytest.mark.parametrize("force", [[], ["--force"]])
    def test_output_inside_an_adapter(self, cli, tmp_path, model_copy, force):
        from tests.helpers.adapter_builders import make_adapter

        lora = make_adapter("llama", model_copy, tmp_path / "lora", r=2,
                            target_modules=["q_proj"])
        before = snapshot(lora)
        r = write_recipe(tmp_path, """
            recipekit: 1
            models: {base: ./model}
            adapters: {a: ./lora}
            steps:
              - {name: f, op: adapters, from: base, adapters: [a]}
            output: {path: ./lora/merged}
            """)
        result = cli("run", r, "-q", *force)
        assert result.exit_code == 2, result.output
        assert f" lies inside input `adapters.a` ({display_path(lora)})" in result.stderr
        assert "--force" not in result.stderr
        assert snapshot(lora) == before and not (lora / "merged").exists()

    def test_output_containing_the_recipe(self, cli, tmp_path, model_copy):
        (tmp_path / "sub").mkdir()
        r = write_recipe(tmp_path / "sub", solar_recipe("../model", output="  path: ."))
        err = run_fails(cli, r, 2)
        assert f"output path {display_path(tmp_path / 'sub')} contains the recipe" in err

    def test_side_files_are_inputs(self, tmp_path):
        from types import SimpleNamespace

        from recipekit.plan.overlap import check_output_apart, input_paths

        recipe = SimpleNamespace(
            file=tmp_path / "r.yaml", models={}, adapters={},
            steps={"c": SimpleNamespace(name="c", spec={"width": {"file": "out/s.json"}}),
                   "g": SimpleNamespace(name="g", spec={"gating": {"log": "logs/x"}})})
        paths = input_paths(recipe, {}, {"g": {"gating": {"log": "logs/x",
                                                          "files": {"x-0.npy": "..."}}}})
        real = tmp_path.resolve()
        assert {p for _, p in paths} >= {real / "out/s.json", real / "logs/x.npy",
                                          real / "logs/x-mapping.json", real / "logs/x-0.npy"}
        for out, shown in ((tmp_path / "out", "out/s.json"), (tmp_path / "logs", "logs/x")):
            with pytest.raises(RecipekitError, match=f"contains the file .*{shown}") as info:
                check_output_apart(out, paths)
            assert info.value.exit_code == 2
        check_output_apart(tmp_path / "elsewhere", paths)


class TestForceRefusesBeforeDeleting:
    """Issue 17 item 2: a --force that refuses (files recipekit did not write are there) deletes
    nothing."""

    @pytest.mark.parametrize("foreign", ["notes.txt", "sub/notes.txt", "empty_dir/"])
    def test_foreign_file_keeps_everything(self, cli, tmp_path, model_copy, foreign):
        assert cli("run", write_recipe(tmp_path, solar_recipe()), "-q").exit_code == 0
        out = tmp_path / "out"
        if foreign.endswith("/"):
            (out / foreign).mkdir()
        else:
            (out / foreign).parent.mkdir(exist_ok=True)
            (out / foreign).write_text("mine")
        before = snapshot(out)
        other = write_recipe(tmp_path, solar_recipe(layers='["range(0,4)"]'))
        result = cli("run", other, "-q", "--force")
        assert result.exit_code == 2, result.output
        assert "holds files recipekit did not write" in result.stderr
        assert snapshot(out) == before
        assert (out / foreign).exists()

    @pytest.mark.parametrize("edited", ["README.md", "config.json", "1_Pooling/config.json"])
    def test_a_file_edited_since_it_was_written_is_not_ours(self, cli, tmp_path, model_copy,
                                                             edited):
        """A model card or config the user edited in a finished output (the manifest records
        what recipekit wrote) is theirs now: `--force` with another plan refuses and deletes
        nothing; put back as written, it is replaced."""
        (model_copy / "1_Pooling").mkdir()
        (model_copy / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
        assert cli("run", write_recipe(tmp_path, solar_recipe()), "-q").exit_code == 0
        out = tmp_path / "out"
        written = (out / edited).read_bytes()
        (out / edited).write_bytes(written + b"\n")
        before = snapshot(out)
        other = write_recipe(tmp_path, solar_recipe(layers='["range(0,4)"]'))
        result = cli("run", other, "-q", "--force")
        assert result.exit_code == 2, result.output
        assert f"({edited} (changed since recipekit wrote it))" in result.stderr
        assert snapshot(out) == before
        (out / edited).write_bytes(written)
        assert cli("run", other, "-q", "--force").exit_code == 0

    def test_donor_subfolder_of_listed_files_is_ours(self, cli, tmp_path, model_copy):
        (model_copy / "1_Pooling").mkdir()
        (model_copy / "1_Pooling" / "config.json").write_text("{}")
        assert cli("run", write_recipe(tmp_path, solar_recipe()), "-q").exit_code == 0
        other = write_recipe(tmp_path, solar_recipe(layers='["range(0,4)"]'))
        result = cli("run", other, "-q", "--force")
        assert result.exit_code == 0, result.output


class TestPlantedLinks:
    """Issue 17 item 3: no write follows a link planted under a temp name (or a folder link):
    files are created exclusively without following links, and a temp name that is not our
    own regular file is refused (exit 2)."""

    TEMP = ".model.safetensors.recipekit-partial"

    @pytest.fixture
    def victim(self, tmp_path) -> Path:
        v = tmp_path / "victim"
        v.write_bytes(b"precious")
        return v

    def test_in_a_new_output(self, cli, tmp_path, recipe, victim):
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / self.TEMP).symlink_to(Path("..") / "victim")
        for extra in ([], ["--force"]):
            result = cli("run", recipe, "-q", *extra)
            assert result.exit_code == 2, result.output
            assert f"holds files recipekit did not write ({self.TEMP})" in result.stderr
        assert victim.read_bytes() == b"precious"

    @pytest.mark.parametrize("name", [TEMP, "..recipekit-state.json.recipekit-partial",
                                      ".config.json.recipekit-partial"])
    def test_while_resuming(self, cli, tmp_path, recipe, victim, model_copy, name):
        assert cli("run", recipe, "-q").exit_code == 0
        out = tmp_path / "out"
        (out / "model.safetensors").unlink()  # the rerun writes it (and the state, config) again
        (out / name).symlink_to(victim)
        err = run_fails(cli, recipe, 2)
        assert first_line(err) == (
            f"{display_path(out / name)}: the temporary file name is a symlink; recipekit creates "
            "its temporary files itself and never writes through one it did not create; remove "
            "it yourself (it is not recipekit's) and run again")
        assert victim.read_bytes() == b"precious"

    def test_a_stale_temp_file_of_ours_is_replaced(self, cli, tmp_path, recipe, model_copy):
        assert cli("run", recipe, "-q").exit_code == 0
        out = tmp_path / "out"
        (out / "model.safetensors").unlink()
        (out / self.TEMP).write_bytes(b"half a shard")
        result = cli("run", recipe, "-q")
        assert result.exit_code == 0, result.output
        assert not (out / self.TEMP).exists()

    def test_donor_subfolder_link_while_resuming(self, cli, tmp_path, recipe, model_copy):
        (model_copy / "1_Pooling").mkdir()
        (model_copy / "1_Pooling" / "config.json").write_text('{"x": 1}')
        assert cli("run", recipe, "-q").exit_code == 0
        out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
        elsewhere.mkdir()
        shutil.rmtree(out / "1_Pooling")
        (out / "1_Pooling").symlink_to(elsewhere, target_is_directory=True)
        (out / "model.safetensors").unlink()
        assert "1_Pooling is a symlink or leaves the output directory" in run_fails(cli, recipe, 2)
        assert list(elsewhere.iterdir()) == []

    def test_a_file_where_a_donor_subfolder_goes(self, cli, tmp_path, recipe, model_copy):
        """A plain file where the donor's folder goes was exit 1, "cannot create a folder", a
        runtime error for what is the user's file in the way: now exit 2, naming it, kept."""
        (model_copy / "1_Pooling").mkdir()
        (model_copy / "1_Pooling" / "config.json").write_text('{"x": 1}')
        assert cli("run", recipe, "-q").exit_code == 0
        out = tmp_path / "out"
        shutil.rmtree(out / "1_Pooling")
        (out / "1_Pooling").write_text("my notes")
        (out / "model.safetensors").unlink()
        assert "1_Pooling is a file where the output's folder 1_Pooling/ goes" in \
            run_fails(cli, recipe, 2)
        assert (out / "1_Pooling").read_text() == "my notes"

    def test_temp_name_owned_by_the_helper_only(self, tmp_path, victim):
        from recipekit.io.writer import write_file_atomic

        (tmp_path / ".f.recipekit-partial").symlink_to(victim)
        with pytest.raises(RecipekitError, match="is a symlink") as info:
            write_file_atomic(tmp_path / "f", b"data")
        assert info.value.exit_code == 2 and victim.read_bytes() == b"precious"
        os.mkfifo(tmp_path / ".g.recipekit-partial")
        with pytest.raises(RecipekitError, match="is a named pipe"):
            write_file_atomic(tmp_path / "g", b"data")
        (tmp_path / "h").symlink_to(victim)  # the final name: the link is replaced, not followed
        write_file_atomic(tmp_path / "h", b"data")
        assert victim.read_bytes() == b"precious" and (tmp_path / "h").read_bytes() == b"data"
        assert not (tmp_path / "h").is_symlink()


# -- side commands: lock, import-mergekit, convert -------------------------------------------

class TestLockWrites:
    """Issue 17 item 3: `recipekit lock` writes through the safe-write helper."""

    def test_planted_temp_link_is_refused(self, cli, tmp_path, recipe):
        victim = tmp_path / "victim"
        victim.write_bytes(b"precious")
        (tmp_path / ".recipe.lock.json.recipekit-partial").symlink_to(victim)
        (tmp_path / "recipe.lock.json.tmp").symlink_to(victim)  # the old temp name
        assert "temporary file name is a symlink" in run_fails(cli, recipe, 2, "lock")
        (tmp_path / ".recipe.lock.json.recipekit-partial").unlink()
        assert cli("lock", recipe).exit_code == 0
        assert victim.read_bytes() == b"precious"
        assert json.loads((tmp_path / "recipe.lock.json").read_text())["recipekit_lock"] == 1


@pytest.fixture
def mergekit_config(tmp_path, tiny_llama, monkeypatch) -> Path:
    """A mergekit passthrough config over the tiny Llama, the working directory beside it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m").symlink_to(tiny_llama, target_is_directory=True)
    cfg = tmp_path / "mk.yml"
    cfg.write_text("slices:\n  - sources:\n      - model: ./m\n        layer_range: [0, 6]\n"
                   "merge_method: passthrough\n")
    return cfg


class TestImportMergekitOutput:
    """Issue 17 items 3-4: `import-mergekit -o` refuses an existing path without --force and
    its own config always; --force replaces a link rather than writing through it."""

    def test_existing_file_needs_force(self, cli, tmp_path, mergekit_config):
        mine = tmp_path / "mine.yaml"
        mine.write_text("my notes")
        result = cli("import-mergekit", mergekit_config, "-o", mine)
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith(f"{display_path(mine)}: exists; rerun with --force")
        assert mine.read_text() == "my notes"
        assert cli("import-mergekit", mergekit_config, "-o", mine, "--force").exit_code == 0
        assert mine.read_text().startswith("# Converted by")

    @pytest.mark.parametrize("force", [[], ["--force"]])
    @pytest.mark.parametrize("how", ["same", "symlink", "hardlink"])
    def test_never_its_own_config(self, cli, tmp_path, mergekit_config, how, force):
        before = mergekit_config.read_bytes()
        target = mergekit_config
        if how != "same":
            target = tmp_path / "r.yaml"
            (target.symlink_to if how == "symlink" else target.hardlink_to)(mergekit_config)
        result = cli("import-mergekit", mergekit_config, "-o", target, *force)
        assert result.exit_code == 2, result.output
        assert "is the mergekit config being imported" in result.stderr
        assert mergekit_config.read_bytes() == before

    def test_force_replaces_a_link_not_its_target(self, cli, tmp_path, mergekit_config):
        victim = tmp_path / "victim"
        victim.write_bytes(b"precious")
        (tmp_path / "r.yaml").symlink_to(victim)
        assert cli("import-mergekit", mergekit_config, "-o", tmp_path / "r.yaml").exit_code == 2
        assert cli("import-mergekit", mergekit_config, "-o", tmp_path / "r.yaml",
                   "--force").exit_code == 0
        assert victim.read_bytes() == b"precious"
        assert not (tmp_path / "r.yaml").is_symlink()

    def test_planted_temp_link(self, cli, tmp_path, mergekit_config):
        victim = tmp_path / "victim"
        victim.write_bytes(b"precious")
        (tmp_path / ".r.yaml.recipekit-partial").symlink_to(victim)
        result = cli("import-mergekit", mergekit_config, "-o", tmp_path / "r.yaml")
        assert result.exit_code == 2 and "temporary file name is a symlink" in result.stderr
        assert victim.read_bytes() == b"precious"


class TestConvert:
    """Issue 17 item 5: `convert` reads like `run` (confined to the source, regular files only,
    index entries beside the index) and writes like `run` (temp names, state file, resume)."""

    @pytest.fixture
    def src(self, tmp_path) -> Path:
        import torch

        src = tmp_path / "src"
        src.mkdir()
        torch.save({"w": torch.arange(6.0)}, src / "pytorch_model.bin")
        (src / "config.json").write_text('{"model_type": "llama"}')
        (src / "tokenizer.json").write_text('{"tokens": ' + "1, " * 5000 + "1}")
        return src

    def convert(self, src: Path, dst: Path, *opts: str) -> subprocess.CompletedProcess:
        """In a fresh process with a timeout: the attacks used to hang (FIFO, /dev/zero)."""
        from tests.helpers.recipes import ROOT

        cmd = [sys.executable, *opts, "convert", "--allow-pickle", str(src), str(dst)]
        if not opts:
            cmd[1:1] = ["-m", "recipekit.cli"]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        return subprocess.run(cmd, capture_output=True, text=True, timeout=90, env=env)

    def test_files_that_leave_the_source_are_not_copied(self, tmp_path, src):
        secret = tmp_path / "secret"
        secret.write_text("not yours")
        (src / "special_tokens_map.json").symlink_to(secret)
        (src / "vocab.txt").symlink_to("/dev/zero")
        os.mkfifo(src / "merges.txt")
        done = self.convert(src, tmp_path / "out")
        assert done.returncode == 0, done.stderr
        out = tmp_path / "out"
        assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
            "config.json", "model.safetensors", "tokenizer.json"]
        for name, why in (("merges.txt", "is a named pipe, not a regular file"),
                          ("special_tokens_map.json", f"is a symlink to {secret}, outside"),
                          ("vocab.txt", "is a symlink to /dev/zero, outside")):
            assert f"{display_path(src / name)}: not copied to the output: it {why}" in \
                done.stderr
        assert "internal error" not in done.stderr

    def test_weights_that_are_special_or_leave_the_source(self, tmp_path, src):
        (src / "pytorch_model.bin").rename(tmp_path / "elsewhere.bin")
        os.mkfifo(src / "pytorch_model.bin")
        done = self.convert(src, tmp_path / "out")
        assert done.returncode == 2, done.stderr
        assert "pytorch_model.bin: is a named pipe, not a regular file" in done.stderr
        (src / "pytorch_model.bin").unlink()
        (src / "pytorch_model.bin").symlink_to(tmp_path / "elsewhere.bin")
        done = self.convert(src, tmp_path / "out2")
        assert done.returncode == 2 and "outside the model directory" in done.stderr

    def test_index_entry_outside_the_source(self, tmp_path, src):
        (tmp_path / "other").mkdir()
        (src / "pytorch_model.bin").rename(tmp_path / "other" / "pytorch_model.bin")
        (src / "pytorch_model.bin.index.json").write_text(json.dumps(
            {"weight_map": {"w": "../other/pytorch_model.bin"}}))
        done = self.convert(src, tmp_path / "out")
        assert done.returncode != 0 and "Traceback" not in done.stderr
        assert "../other/pytorch_model.bin" in done.stderr
        assert "which is not a file beside the index" in done.stderr
        assert not list((tmp_path / "out").glob("*.safetensors"))

    def test_output_overlapping_the_source(self, cli, tmp_path, src):
        for dst in (src / "st", tmp_path):
            result = cli("convert", "--allow-pickle", src, dst)
            assert result.exit_code == 2, result.output
            assert "the source" in result.stderr
        assert not (src / "st").exists()

    def test_killed_mid_copy_resumes(self, tmp_path, src):
        from tests.helpers.recipes import ROOT

        out = tmp_path / "out"
        wrapper = str(ROOT / "tests" / "helpers" / "crashpoints.py")
        killed = self.convert(src, out, wrapper, "--out", str(out), "--kill-on",
                              "write .tokenizer.json.recipekit-partial", "--")
        assert killed.returncode == -9, killed.stderr
        assert (out / "model.safetensors").is_file()
        assert not (out / "tokenizer.json").exists()  # never a truncated file under its name
        done = self.convert(src, out)
        assert done.returncode == 0, done.stderr
        assert "pytorch_model.bin -> model.safetensors" not in done.stderr  # the shard resumed
        assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
        assert not [p for p in out.iterdir() if p.name.endswith(".recipekit-partial")]
        again = self.convert(src, out)
        assert again.returncode == 0 and "already complete" in again.stdout

    def test_a_changed_source_is_not_resumed(self, cli, tmp_path, src):
        assert cli("convert", "--allow-pickle", src, tmp_path / "out").exit_code == 0
        (src / "config.json").write_text('{"model_type": "llama", "x": 1}')
        result = cli("convert", "--allow-pickle", src, tmp_path / "out")
        assert result.exit_code == 2, result.output
        assert "holds a conversion of other files" in result.stderr
        assert "--force" not in result.stderr


def cli_subprocess(*args: object, timeout: float = 60) -> subprocess.CompletedProcess:
    """The CLI in a fresh process with a timeout: the attacks below used to hang or exhaust
    memory, which an in-process test could not survive."""
    from tests.helpers.recipes import ROOT

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "recipekit.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


class TestResourceExhaustion:
    """Issue 17 item 6: every file a recipe or input names is a regular file read with a cap
    (recipe 16 MiB, README "Reliability"); a device, FIFO or oversized file is a located exit 2
    at once instead of a hang, an OOM kill or a minute of parsing."""

    def test_recipe_that_is_a_device(self):
        done = cli_subprocess("validate", "/dev/zero")
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith("/dev/zero: cannot read the recipe: the file is a "
                                      "character device, not a regular file")

    def test_recipe_that_is_a_fifo(self, tmp_path):
        os.mkfifo(tmp_path / "r.yaml")
        done = cli_subprocess("validate", tmp_path / "r.yaml")
        assert done.returncode == 2, done.stderr
        assert "r.yaml: cannot read the recipe: the file is a named pipe" in done.stderr

    def test_recipe_larger_than_the_cap(self, tmp_path):
        from recipekit.recipe.document import MAX_RECIPE_BYTES

        big = tmp_path / "r.yaml"
        with open(big, "wb") as f:  # sparse: no disk, but reported 150 MB
            f.truncate(150_000_000)
        assert MAX_RECIPE_BYTES == 16 * 1024 * 1024
        done = cli_subprocess("validate", big, timeout=20)
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith(f"{big}: the recipe is 143.05 MiB, larger than the "
                                      "16.00 MiB a recipe may be")

    def test_scheme_file_that_is_a_fifo(self, tmp_path, model_copy):
        os.mkfifo(tmp_path / "s.json")
        recipe = write_recipe(tmp_path, """
            recipekit: 1
            models: {big: ./model}
            steps:
              - {name: small, op: coalesce, from: big, depth: {file: s.json}}
            output: {path: ./out}
            """)
        done = cli_subprocess("validate", recipe)
        assert done.returncode == 2, done.stderr
        assert "named pipe" in done.stderr and "internal error" not in done.stderr

    def test_scalings_log_that_is_a_fifo(self, tmp_path):
        from recipekit.errors import ScalingsLogError
        from recipekit.inputs.scalings import read_scalings_log

        os.mkfifo(tmp_path / "log.npy")
        with pytest.raises(ScalingsLogError, match="log.npy is a named pipe"):
            read_scalings_log(tmp_path / "log.npy")


def chain_recipe(directory: Path, steps: int) -> Path:
    """``steps`` interpolate steps, each from the one before: a ``steps``-deep expression."""
    lines = ["recipekit: 1", "models: {a: ./model, b: ./model}", "steps:",
             "  - {name: s0, op: interpolate, from: [a, b], alpha: 0.5}"]
    lines += [f"  - {{name: s{i}, op: interpolate, from: [s{i - 1}, b], alpha: 0.5}}"
              for i in range(1, steps)]
    return write_recipe(directory, "\n".join([*lines, "output: {path: ./out}", ""]))


class TestOrdinaryConditions:
    """Issue 17 item 11: ordinary conditions never reach "internal error ... please report it":
    deep step chains (graph walks are iterative), a deeply nested lock, an output that is a
    symlink loop, a lock path that is a directory, a write where nothing can be written, a
    device as `import-mergekit -o`, and a DELLA epsilon that only `run` used to refuse."""

    def test_a_chain_of_600_steps(self, cli, tmp_path, model_copy):
        recipe = chain_recipe(tmp_path, 600)
        for args in (["validate"], ["plan", "-v"], ["plan", "--format", "json"],
                     ["run", "-q", "--check-finite"]):
            result = cli(*args[:1], recipe, *args[1:])
            assert result.exit_code == 0, (args, result.output[-300:])
        out = tmp_path / "out" / "model.safetensors"
        assert out.read_bytes()[-64:] == (model_copy / "model.safetensors").read_bytes()[-64:]

    def test_a_deeply_nested_lock(self, cli, recipe):
        (recipe.parent / "recipe.lock.json").write_text("[" * 100_000 + "]" * 100_000)
        err = run_fails(cli, recipe, 2)
        assert "recipe.lock.json: cannot read the lock: it is nested too deeply to be a lock" \
            in err

    def test_an_output_that_is_a_symlink_loop(self, cli, tmp_path, recipe):
        (tmp_path / "out").symlink_to(tmp_path / "loop")
        (tmp_path / "loop").symlink_to(tmp_path / "out")
        for command in ("validate", "run"):
            err = run_fails(cli, recipe, 2, command)
            assert err.startswith(f"output path {tmp_path / 'out'} is a symlink loop; ")

    def test_a_lock_path_that_is_a_directory(self, cli, tmp_path, recipe):
        (tmp_path / "recipe.lock.json").mkdir()
        result = cli("lock", recipe)
        assert result.exit_code in (1, 2) and "internal error" not in result.output
        assert "recipe.lock.json" in result.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            "model", "recipe.lock.json", "recipe.yaml"]  # no temp file left

    @pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
    def test_side_commands_into_a_place_nothing_can_be_written(self, cli, mergekit_config):
        result = cli("import-mergekit", mergekit_config, "-o", "/proc/recipekit-test.yaml")
        assert result.exit_code == 1, result.output
        assert "cannot write" in result.stderr and "internal error" not in result.output
        import torch

        src = mergekit_config.parent / "pickled"
        src.mkdir()
        torch.save({"w": torch.arange(6.0)}, src / "pytorch_model.bin")
        result = cli("convert", "--allow-pickle", src, "/proc/recipekit-test")
        assert result.exit_code == 1, result.output
        assert result.stderr.startswith("/proc/recipekit-test: cannot create the output "
                                        "directory: ")
        assert "internal error" not in result.output

    def test_import_mergekit_never_replaces_a_device_or_fifo(self, cli, tmp_path, mergekit_config):
        fifo = tmp_path / "pipe.yaml"
        os.mkfifo(fifo)
        result = cli("import-mergekit", mergekit_config, "-o", fifo, "--force")
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith(f"{display_path(fifo)}: is a named pipe, not a regular "
                                        "file and is not replaced, even with --force")
        assert fifo.is_fifo()

    def test_della_epsilon_is_checked_by_validate(self, cli, tmp_path, model_copy):
        recipe = write_recipe(tmp_path, """
            recipekit: 1
            models: {a: ./model, b: ./model}
            steps:
              - name: m
                op: merge
                method: della
                base: a
                from: [{model: b, weight: 1.0, density: 0.5}]
                parameters: {epsilon: 0.6}
            output: {path: ./out}
            """)
        for command in ("validate", "run"):
            err = run_fails(cli, recipe, 2, command)
            assert err.startswith(f"{recipe}:9:27: steps[0].parameters.epsilon: DELLA needs "
                                  "density ± epsilon inside (0, 1), but density 0.5 and epsilon "
                                  "0.6 give [-0.1, 1.1] for tensor `"), err
        assert not (tmp_path / "out").exists()

    @pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
    def test_a_negative_dare_density_is_checked_by_validate(self, cli, tmp_path, model_copy,
                                                            method):
        """DARE draws each entry with probability density: a negative one used to pass
        `validate` and end `run` with an internal error."""
        recipe = write_recipe(tmp_path, f"""
            recipekit: 1
            models: {{a: ./model, b: ./model}}
            steps:
              - name: m
                op: merge
                method: {method}
                base: a
                from: [{{model: b, weight: 1.0, density: -0.1}}]
            output: {{path: ./out}}
            """)
        for command in ("validate", "run"):
            err = run_fails(cli, recipe, 2, command)
            assert err.startswith(f"{recipe}:4:5: steps[0]: {method} keeps each entry with "
                                  "probability density, but the density of its input 1 is -0.1 "
                                  "for tensor `"), err
            assert "internal error" not in err
        assert not (tmp_path / "out").exists()
