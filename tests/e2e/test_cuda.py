"""`run --device cuda` against `run --device cpu`, for every op and merge method (DESIGN.md §3).

Skipped where torch sees no CUDA device (CI); `bench/gpu.sh` runs it on a GPU machine. The
oracle is the CPU output of the same recipe:

* data movement and elementwise ops (layer slices, casts, linear, task arithmetic, nearswap,
  passthrough, interpolate, seeded re-initialisation, score heads) must give the same bytes on
  any device (DESIGN.md §3), whole and in row pieces, through pinned reads and asynchronous
  copies;
* reductions (norms, sorts, sums over models, matrix products, SVD) must agree within float
  rounding: relative Frobenius error ≤ 1e-5 per fp32 tensor, or per LoRA product B·A where an
  SVD's factors are only defined up to sign.

Each case also checks that the GPU did the work (its allocator served memory).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers.adapter_builders import make_adapter
from tests.helpers.builders import make_model, read_tensors
from tests.helpers.recipes import write_recipe

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

LAYERS = 'op: layers\n    from: a\n    layers: ["range(0,6)", "range(2,8)"]'

#: byte-identical on every device (DESIGN.md §3: data movement and elementwise ops)
EXACT: dict[str, tuple[str, str]] = {
    "layers": (LAYERS, ""),
    "cast": (LAYERS, "  dtype: bfloat16\n"),
    "linear": ("op: merge\n    method: linear\n    from: [{model: a, weight: 0.7}, "
               "{model: b, weight: 0.45}]", "  dtype: bfloat16\n"),
    "task_arithmetic": ("op: merge\n    method: task_arithmetic\n    base: a\n"
                        "    from: [{model: b, weight: {gradient: [0.2, 0.9]}}]", ""),
    "nearswap": ("op: merge\n    method: nearswap\n    from: [a, b]\n    parameters: {t: 0.01}",
                 ""),
    "passthrough": ("op: merge\n    method: passthrough\n    from: [{model: b, scale: 0.3}]", ""),
    "interpolate": ("op: interpolate\n    from: [a, b]\n    alpha: 0.37", ""),
    "reinit": ("op: reinit\n    from: a\n    layers: [2, 5]\n    seed: 7", ""),
    "head": ("op: head\n    from: a\n    num_labels: 3\n    seed: 1", ""),
    "moe": ("op: moe\n    base: a\n    experts: [{model: b, noise_scale: 0.01, "
            "residual_scale: 0.5}, {model: c}]\n    gate_mode: random\n    seed: 4", ""),
}
#: cases that run no kernel on the GPU: copies, and draws from seeded CPU generators (ops/rng.py)
NO_GPU_WORK = {"layers", "reinit", "head"}


def _gta(method: str, extra: str = "") -> str:
    return (f"op: merge\n    method: {method}\n    base: a\n    from: [{{model: b, weight: 0.6, "
            f"density: 0.5{extra}}}, {{model: c, weight: 0.5, density: 0.7{extra}}}]\n"
            "    seed: 3")


#: within float rounding (reductions)
CLOSE: dict[str, str | tuple[str, str]] = {
    "slerp": "op: merge\n    method: slerp\n    from: [a, b]\n"
             "    parameters: {t: 0.3}",
    "nuslerp": "op: merge\n    method: nuslerp\n    from: [{model: a, weight: 0.3}, "
               "{model: b, weight: 0.7}]",
    "multislerp": "op: merge\n    method: multislerp\n    from: [{model: a, weight: 1}, "
                  "{model: b, weight: 2}, {model: c, weight: 1}]",
    "karcher": "op: merge\n    method: karcher\n    from: [a, b, c]",
    "ties": _gta("ties"),
    "dare_linear": _gta("dare_linear"),
    "dare_ties": _gta("dare_ties"),
    "breadcrumbs": _gta("breadcrumbs", ", gamma: 0.05"),
    "breadcrumbs_ties": _gta("breadcrumbs_ties", ", gamma: 0.05"),
    "della": _gta("della", ", epsilon: 0.1"),
    "della_linear": _gta("della_linear", ", epsilon: 0.1"),
    "sce": "op: merge\n    method: sce\n    base: a\n    from: [b, c]\n"
           "    parameters: {select_topk: 0.5}",
    "model_stock": "op: merge\n    method: model_stock\n    base: a\n    from: [b, c]",
    "coalesce": "op: coalesce\n    from: a\n    width: [[0, 2], [1, 3]]\n"
                "    depth: [[0, 4], [1, 5], [2, 6], [3, 7]]",
    "decoalesce": "op: decoalesce\n    from: a\n    width: [[0, 4], [1, 5], [2, 6], [3, 7]]",
    "adapters": "op: adapters\n    from: a\n    adapters: [{use: l1, weight: 0.8}, l2]",
    "adapters_ties": "op: adapters\n    from: a\n    adapters: [l1, l2]\n    combine: ties\n"
                     "    density: 0.5",
    "xlora": "op: adapters\n    from: a\n    adapters: [l1, {use: l2, weight: 0.5}]\n"
             "    gating:\n      layers: [[0.7, 0.3], [0.2, 0.8], [0.5, 0.5], [1, 0], [0, 1], "
             "[0.1, 0.9], [0.3, 0.3], [0.6, 0.4]]",
    "extract_lora": "op: extract_lora\n    base: a\n    tuned: b\n    rank: 6",
    "combine_cat": ("op: combine_adapters\n    adapters: [l1, {use: l2, weight: 0.5}]",
                    "  adapter: {method: cat}\n"),
    "combine_svd": ("op: combine_adapters\n    adapters: [l1, l2]\n    combine: ties\n"
                    "    density: 0.5", "  adapter: {method: svd, rank: 4}\n"),
}
#: an SVD's truncation moves with rounding by about ε / (gap between singular values)
SVD = {"extract_lora", "combine_svd"}


@pytest.fixture(scope="module")
def models(tiny_llama, tiny_llama_b, tmp_path_factory) -> str:
    """The `models:` and `adapters:` sections every case's recipe starts with."""
    root = tmp_path_factory.mktemp("cuda")
    c = make_model("llama", root / "c", layers=8, seed=2)
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    l1 = make_adapter("llama", tiny_llama, root / "l1", seed=5, **lora)
    l2 = make_adapter("llama", tiny_llama, root / "l2", seed=6, **lora)
    return (f"recipekit: 1\nmodels:\n  a: {tiny_llama}\n  b: {tiny_llama_b}\n  c: {c}\n"
            f"adapters:\n  l1: {l1}\n  l2: {l2}\n")


def run(cli, tmp_path: Path, head: str, body: str, device: str, output: str = "",
        gpu_work: bool = True) -> Path:
    out = tmp_path / device
    recipe = write_recipe(tmp_path, f"{head}steps:\n  - name: s\n    {body}\n"
                          f"output:\n  path: ./{device}\n  shard_size: 20KB\n{output}",
                          f"{device}.yaml")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = cli("run", recipe, "-q", "--no-fsync", "--device", device)
    assert result.exit_code == 0, result.output
    if device == "cuda":
        used = torch.cuda.max_memory_allocated() > 0
        assert used == gpu_work, "the GPU did work" if used else "the GPU did no work"
    return out


def shard_bytes(out: Path) -> dict[str, bytes]:
    files = sorted(out.glob("*.safetensors")) + sorted(out.glob("*.index.json"))
    assert files
    return {p.name: p.read_bytes() for p in files}


@pytest.mark.parametrize("name", list(EXACT))
def test_elementwise_and_data_movement_are_byte_identical(cli, tmp_path, models, name):
    body, output = EXACT[name]
    cpu = run(cli, tmp_path, models, body, "cpu", output)
    cuda = run(cli, tmp_path, models, body, "cuda", output, gpu_work=name not in NO_GPU_WORK)
    assert shard_bytes(cuda) == shard_bytes(cpu)
    assert (cuda / "config.json").read_bytes() == (cpu / "config.json").read_bytes()


@pytest.mark.parametrize("name", ["linear", "task_arithmetic", "interpolate", "cast"])
def test_row_pieces_on_the_gpu_are_byte_identical(cli, tmp_path, models, name, monkeypatch):
    """Pieces of 100 values (64× that on the GPU) make every tensor span several pieces: the
    pinned reads, read-ahead and asynchronous copies must not change a byte."""
    import recipekit.plan.cost as pl
    import recipekit.run.execute as ex

    body, output = EXACT[name]
    cpu = run(cli, tmp_path, models, body, "cpu", output)
    calls = []
    real = ex.evaluate_chunks
    monkeypatch.setattr(ex, "evaluate_chunks", lambda *a: calls.append(a[0]) or real(*a))
    monkeypatch.setattr(pl, "CHUNK_ELEMS", 100)
    monkeypatch.setattr(pl, "CHUNKED_OVERHEAD", 0)
    cuda = run(cli, tmp_path, models, body, "cuda", output)
    assert calls
    assert shard_bytes(cuda) == shard_bytes(cpu)


def _products(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """B·A for every LoRA pair, linear (`lora_B.weight`) or embedding (`lora_embedding_B`):
    an SVD's factors are defined up to sign. Other tensors as they are."""
    out = {}
    for name, t in tensors.items():
        if "lora_B" in name or "lora_embedding_B" in name:
            a = tensors[name.replace("lora_B", "lora_A").replace("embedding_B", "embedding_A")]
            out[name + "·A"] = t.double() @ a.double()
        elif "lora_A" not in name and "lora_embedding_A" not in name:
            out[name] = t.double()
    return out


@pytest.mark.parametrize("name", list(CLOSE))
def test_reductions_agree_within_rounding(cli, tmp_path, models, name):
    body, output = CLOSE[name] if isinstance(CLOSE[name], tuple) else (CLOSE[name], "")
    cpu = _products(read_tensors(run(cli, tmp_path, models, body, "cpu", output)))
    cuda = _products(read_tensors(run(cli, tmp_path, models, body, "cuda", output)))
    assert cpu.keys() == cuda.keys()
    tolerance = 1e-4 if name in SVD else 1e-5
    for key, want in cpu.items():
        got = cuda[key]
        assert got.shape == want.shape, key
        scale = max(want.norm().item(), 1e-30)
        assert (got - want).norm().item() / scale <= tolerance, key


@pytest.mark.parametrize("name", ["sce", "ties", "breadcrumbs"])
def test_streamed_selection_agrees(cli, tmp_path, models, name, monkeypatch):
    """The streamed forms of the selecting methods (every tensor streamed in pieces of ~1Ki
    values), each cut placed from a sample and a window pass (`ops.select.SAMPLE_MIN` 0), on
    which SCE's energies ride (`ops.stream_sce._EnergyRide`): the keys, window positions and
    energies taken on the GPU against the CPU's, within rounding."""
    monkeypatch.setattr("recipekit.plan.cost.HOLD_BYTES", 0)
    monkeypatch.setattr("recipekit.plan.cost.EXACT_BYTES", 0)
    monkeypatch.setattr("recipekit.graph.passes.PASS_ELEMS", 1 << 10)
    monkeypatch.setattr("recipekit.ops.select.SAMPLE_MIN", 0)
    monkeypatch.setattr("recipekit.ops.select.SAMPLE_EVERY", 2)
    body = CLOSE[name]
    assert isinstance(body, str)
    cpu = read_tensors(run(cli, tmp_path, models, body, "cpu"))
    cuda = read_tensors(run(cli, tmp_path, models, body, "cuda"))
    assert cpu.keys() == cuda.keys()
    for key, want in cpu.items():
        scale = max(want.double().norm().item(), 1e-30)
        assert (cuda[key].double() - want.double()).norm().item() / scale <= 1e-5, key


def test_auto_picks_the_gpu(cli, tmp_path, models):
    out = run(cli, tmp_path, models, EXACT["linear"][0], "cpu")
    recipe = write_recipe(tmp_path, f"{models}steps:\n  - name: s\n    {EXACT['linear'][0]}\n"
                          "output:\n  path: ./auto\n  shard_size: 20KB\n", "auto.yaml")
    torch.cuda.reset_peak_memory_stats()
    result = cli("run", recipe, "-q", "--no-fsync", "--device", "auto")
    assert result.exit_code == 0, result.output
    assert torch.cuda.max_memory_allocated() > 0
    assert shard_bytes(tmp_path / "auto") == shard_bytes(out)


@pytest.mark.parametrize("family", ["gpt2", "bert", "vit", "qwen2"])
def test_coalescing_other_families_agrees(cli, tmp_path, family):
    """Width coalescing and de-coalescing with compensation on GPT-2's transposed Conv1D
    weights, BERT, ViT and Qwen2's biases: the index tensors must live on the GPU too."""
    src = make_model(family, tmp_path / "src", layers=2, seed=3)
    head = f"recipekit: 1\nmodels:\n  a: {src}\n"
    for op, width in (("coalesce", "[[0, 2], [1, 3]]"),
                      ("decoalesce", "[[0, 4], [1, 5], [2, 6], [3, 7]]")):
        body = f"op: {op}\n    from: a\n    width: {width}"
        cpu = read_tensors(run(cli, tmp_path, head, body, "cpu"))
        cuda = read_tensors(run(cli, tmp_path, head, body, "cuda"))
        assert cpu.keys() == cuda.keys()
        for key, want in cpu.items():
            assert torch.allclose(cuda[key], want, rtol=1e-6, atol=1e-7), (op, key)
        for d in ("cpu", "cuda"):
            shutil.rmtree(tmp_path / d)
