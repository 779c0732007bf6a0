"""tools/stream_stats.py: chunked, threaded statistics of stored tensors.

Oracle: straightforward whole-tensor fp64 computations in torch (mean, std with correction 1,
amin/amax, vector norm over the finite values; |a - b|, ‖a - b‖ / ‖a‖ and the cosine over the
pairs where both are finite), on tensors that span several chunks (`CHUNK_ELEMENTS` is made
small), in bf16, fp16, fp32, fp64, integer and bool, with zero-size tensors and NaN/Inf planted
in some chunks. Results must not depend on the number of worker threads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import pytest
import torch
from safetensors.torch import save_file

from recipekit.errors import CorruptCheckpointError
from recipekit.io import chunks
from recipekit.io.header import read_header
from recipekit.io.reader import FileReader
from recipekit.tools.stream_stats import hash_and_summarise, iter_diff_stats, iter_tensor_stats

CHUNK = 1000


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", CHUNK)


def value_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(53, 101, generator=g)  # 5353 values: 5 full chunks and a short one
    nan_inf = wide.clone().to(torch.bfloat16)
    nan_inf[0, 3] = nan_inf[40, 7] = float("nan")  # chunks 0 and 4; chunks 1-3 stay finite
    nan_inf[12, 0] = float("-inf")
    all_nan = torch.randn(3 * CHUNK, generator=g).to(torch.float16)
    all_nan[CHUNK:2 * CHUNK] = float("nan")  # a chunk with no finite value
    return {
        "bf16": (wide * 0.02).to(torch.bfloat16),
        "fp16_offset": (1000 + 3 * wide).to(torch.float16),  # large mean, small spread
        "fp32": wide * 5 - 1,
        "fp64": wide.double() * 0.5 + 300,  # mean/std 600: fp64 rounding stays < 1e-12
        "bf16_nan_inf": nan_inf,
        "fp16_nan_chunk": all_nan,
        "constant": torch.full((2500,), 0.375, dtype=torch.bfloat16),
        "empty": torch.zeros(0, 16, dtype=torch.bfloat16),
        "scalar": torch.tensor(2.5),
        "position_ids": torch.arange(2048).reshape(1, 2048),
        "mask": torch.rand(1500, generator=g) > 0.5,
    }


def oracle(t: torch.Tensor) -> dict:
    x = t.double().reshape(-1)
    f = x[torch.isfinite(x)]
    n = f.numel()
    return {"mean": float(f.mean()) if n else None, "std": float(f.std()) if n > 1 else None,
            "min": float(f.min()) if n else None, "max": float(f.max()) if n else None,
            "norm": float(torch.linalg.vector_norm(f)), "nan": int(torch.isnan(x).sum()),
            "inf": int(torch.isinf(x).sum())}


def saved(tmp_path, tensors: dict[str, torch.Tensor], name: str = "m.safetensors") -> dict:
    path = tmp_path / name
    save_file(tensors, path)
    return read_header(path)


class TestTensorStats:
    """Oracle: `oracle` (torch, fp64, whole tensor, finite values)."""

    @pytest.mark.parametrize("workers", [1, 3])
    def test_equals_whole_tensor_fp64(self, tmp_path, workers):
        tensors = value_tensors()
        infos = saved(tmp_path, tensors)
        names = list(tensors)
        with FileReader() as reader:
            got = list(iter_tensor_stats(reader, [infos[n] for n in names], workers=workers))
        assert len(got) == len(names)
        for name, acc in zip(names, got, strict=True):
            s, want = acc.summary(), oracle(tensors[name])
            assert (s["nan"], s["inf"]) == (want["nan"], want["inf"]), name
            assert (s["min"], s["max"]) == (want["min"], want["max"]), name
            for key in ("mean", "std", "norm"):
                if want[key] is None:
                    assert s[key] is None, (name, key)
                else:
                    assert s[key] == pytest.approx(want[key], rel=1e-12, abs=1e-300), (name, key)
        assert got[names.index("constant")].summary()["std"] == 0.0  # no cancellation residue
        assert got[names.index("bf16_nan_inf")].summary()["nan"] == 2

    def test_same_numbers_for_any_worker_count(self, tmp_path):
        tensors = value_tensors()
        infos = list(saved(tmp_path, tensors).values())
        runs = []
        for workers in (1, 2, 5):
            with FileReader() as reader:
                runs.append([a.summary() for a in iter_tensor_stats(reader, infos,
                                                                   workers=workers)])
        assert runs[0] == runs[1] == runs[2]

    def test_truncated_file_is_a_located_error(self, tmp_path):
        infos = saved(tmp_path, {"w": torch.randn(4 * CHUNK)})
        path = tmp_path / "m.safetensors"
        info = infos["w"]
        os.truncate(path, os.path.getsize(path) - 100)  # the header is still read: it is stale
        with FileReader() as reader, pytest.raises(CorruptCheckpointError) as e:
            list(iter_tensor_stats(reader, [info], workers=2))
        assert "file ended at byte" in e.value.message


class TestDiffStats:
    """Oracle: the formulas on the whole tensors in fp64, over pairs where both are finite."""

    def pairs(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(1)
        a = torch.randn(61, 97, generator=g)  # 5917 values: 6 chunks
        b = a + 0.01 * torch.randn(61, 97, generator=g)
        a_nan, b_inf = a.clone().to(torch.bfloat16), b.clone().to(torch.bfloat16)
        a_nan[0, 0] = a_nan[50, 2] = float("nan")
        b_inf[50, 2] = b_inf[10, 10] = float("inf")  # one pair shares its NaN with an Inf
        return {
            "bf16": (a.to(torch.bfloat16), b.to(torch.bfloat16)),
            "fp16_vs_fp32": (a.to(torch.float16), b),  # mixed dtypes compare in fp64
            "fp64": (a.double() + 1e3, b.double() + 1e3),
            "nonfinite": (a_nan, b_inf),
            "identical": (a.to(torch.bfloat16), a.to(torch.bfloat16)),
            "empty": (torch.zeros(0, 3), torch.zeros(0, 3)),
            "ints": (torch.arange(3000), torch.arange(3000).flip(0)),
        }

    @pytest.mark.parametrize("workers", [1, 3])
    def test_equals_formulas(self, tmp_path, workers):
        pairs = self.pairs()
        ia = saved(tmp_path, {k: v[0] for k, v in pairs.items()}, "a.safetensors")
        ib = saved(tmp_path, {k: v[1] for k, v in pairs.items()}, "b.safetensors")
        names = list(pairs)
        with FileReader() as reader:
            got = list(iter_diff_stats(reader, [(ia[n], ib[n]) for n in names],
                                       workers=workers))
        for name, acc in zip(names, got, strict=True):
            x, y = (t.double().reshape(-1) for t in pairs[name])
            both = torch.isfinite(x) & torch.isfinite(y)
            x, y = x[both], y[both]
            s = acc.summary()
            assert s["nonfinite"] == int((~both).sum()), name
            if name in ("identical", "empty"):
                assert s == {"max_abs": 0.0, "mean_abs": 0.0, "rel_norm": 0.0, "cosine": 1.0,
                             "nonfinite": 0, "equal": True}
                continue
            d = (x - y).abs()
            assert s["max_abs"] == float(d.max()), name
            assert s["mean_abs"] == pytest.approx(float(d.mean()), rel=1e-12), name
            assert s["rel_norm"] == pytest.approx(float(d.norm() / x.norm()), rel=1e-12), name
            cos = float(torch.dot(x, y) / (x.norm() * y.norm()))
            assert s["cosine"] == pytest.approx(cos, rel=1e-12), name
        assert got[names.index("nonfinite")].nonfinite == 3

    def test_same_numbers_for_any_worker_count(self, tmp_path):
        pairs = self.pairs()
        ia = saved(tmp_path, {k: v[0] for k, v in pairs.items()}, "a.safetensors")
        ib = saved(tmp_path, {k: v[1] for k, v in pairs.items()}, "b.safetensors")
        runs = []
        for workers in (1, 4):
            with FileReader() as reader:
                runs.append([dataclasses.asdict(acc) for acc in iter_diff_stats(
                    reader, [(ia[n], ib[n]) for n in pairs], workers=workers)])
        assert runs[0] == runs[1]


class TestHashAndSummarise:
    """Oracle: hashlib's sha256 of each whole file and `oracle` (whole-tensor fp64) for each
    floating tensor, from one read (`verify --stats`)."""

    @pytest.mark.parametrize("workers", [1, 3])
    def test_digest_and_statistics_equal_separate_reads(self, tmp_path, workers):
        tensors = value_tensors()
        names = list(tensors)
        half = len(names) // 2
        files = []
        for k, part in enumerate((names[:half], names[half:])):
            infos = saved(tmp_path, {n: tensors[n] for n in part}, f"{k}.safetensors")
            files.append((tmp_path / f"{k}.safetensors", list(infos.values())))
        with FileReader() as reader:
            got = hash_and_summarise(reader, files, workers=workers)
        for (path, infos), (digest, stats) in zip(files, got, strict=True):
            assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
            floating = [i.name for i in infos if i.dtype.startswith(("F", "BF"))]
            assert sorted(stats) == sorted(floating)  # integer tensors are only hashed
            for name in floating:
                s, want = stats[name].summary(), oracle(tensors[name])
                assert (s["nan"], s["inf"], s["min"], s["max"]) == (
                    want["nan"], want["inf"], want["min"], want["max"]), name
                for key in ("mean", "std", "norm"):
                    if want[key] is None:
                        assert s[key] is None, (name, key)
                    else:
                        assert s[key] == pytest.approx(want[key], rel=1e-12, abs=1e-300), name

    def test_same_numbers_for_any_worker_count(self, tmp_path):
        tensors = value_tensors()
        infos = list(saved(tmp_path, tensors).values())
        runs = []
        for workers in (1, 2, 5):
            with FileReader() as reader:
                [(digest, stats)] = hash_and_summarise(
                    reader, [(tmp_path / "m.safetensors", infos)], workers=workers)
            runs.append((digest, {k: v.summary() for k, v in stats.items()}))
        assert runs[0] == runs[1] == runs[2]

    def test_truncated_file_is_a_located_error(self, tmp_path):
        infos = saved(tmp_path, {"w": torch.randn(40 * CHUNK), "v": torch.randn(9 * CHUNK)})
        path = tmp_path / "m.safetensors"
        os.truncate(path, os.path.getsize(path) - 100)
        with FileReader() as reader, pytest.raises(CorruptCheckpointError) as e:
            hash_and_summarise(reader, [(path, list(infos.values()))], workers=2)
        assert "file ended at byte" in e.value.message
