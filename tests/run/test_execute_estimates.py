"""`plan`'s peak-memory estimate is an upper bound of the measured peak for every merge method,
at two sizes: tensors whose inputs the executor holds (exact whole kernels, reductions over
pieces in memory) and tensors whose reductions read row pieces from the files (the thresholds
`plan.cost.HOLD_BYTES` and `EXACT_BYTES` are lowered in the measuring process so that a few
MiB count as large).

Oracle: VmHWM of a fresh process, reset just before the run (Linux clear_refs), minus the RSS
of the idle process that has planned and used torch once.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers.memory import MEASURE

#: method (or op) -> its step body: `op: merge` and then this, unless it names its own op
STEPS = {
    "ties": "method: ties\n    base: a\n    from: [{model: b, weight: 0.6, density: 0.4}, "
            "{model: c, weight: 0.5, density: 0.6}]",
    "dare_ties": "method: dare_ties\n    base: a\n    from: [{model: b, weight: 0.6, density: "
                 "0.4}, {model: c, weight: 0.5, density: 0.6}]",
    "breadcrumbs_ties": "method: breadcrumbs_ties\n    base: a\n    from: [{model: b, weight: "
                        "0.6, density: 0.4}, {model: c, weight: 0.5, density: 0.6}]",
    "della": "method: della\n    base: a\n    from: [{model: b, weight: 0.6, density: 0.4}, "
             "{model: c, weight: 0.5, density: 0.6}]",
    "sce": "method: sce\n    base: a\n    from: [b, c]\n    parameters: {select_topk: 0.5}",
    "model_stock": "method: model_stock\n    base: a\n    from: [b, c]",
    "karcher": "method: karcher\n    from: [a, b, c]",
    "multislerp": "method: multislerp\n    from: [{model: a, weight: 0.3}, {model: b, weight: "
                  "0.7}]",
    "nuslerp": "method: nuslerp\n    base: a\n    from: [{model: b, weight: 0.4}, {model: c, "
               "weight: 0.6}]",
    "slerp": "method: slerp\n    from: [a, b]\n    parameters: {t: 0.3}",
    "dare_ties_mergekit_draw": "method: dare_ties\n    base: a\n    random_masks: mergekit\n"
                              "    from: [{model: b, weight: 0.6, density: 0.4}, {model: c, "
                              "weight: 0.5, density: 0.6}]",
    "nuslerp_row_wise": "method: nuslerp\n    base: a\n    from: [{model: b, weight: 0.4}, "
                        "{model: c, weight: 0.6}]\n    parameters: {nuslerp_flatten: false, "
                        "nuslerp_row_wise: true}",
    "ramplus_tl": "method: ramplus_tl\n    base: a\n    from: [b, c]",
    "arcee_fusion": "method: arcee_fusion\n    from: [a, b]",
    "task_arithmetic": "method: task_arithmetic\n    base: a\n    from: [{model: b, weight: "
                       "0.5}, {model: c, weight: 0.5}]",
    "linear": "method: linear\n    from: [{model: a, weight: 0.3}, {model: b, weight: 0.7}]",
    "dare_linear": "method: dare_linear\n    base: a\n    from: [{model: b, weight: 0.6, "
                   "density: 0.4}, {model: c, weight: 0.5, density: 0.6}]",
    "breadcrumbs": "method: breadcrumbs\n    base: a\n    from: [{model: b, weight: 0.6, "
                   "density: 0.4}, {model: c, weight: 0.5, density: 0.6}]",
    "della_linear": "method: della_linear\n    base: a\n    from: [{model: b, weight: 0.6, "
                    "density: 0.4}, {model: c, weight: 0.5, density: 0.6}]",
    "nuslerp_row_wise_nobase": "method: nuslerp\n    from: [{model: a, weight: 0.4}, "
                               "{model: b, weight: 0.6}]\n    parameters: "
                               "{nuslerp_flatten: false, nuslerp_row_wise: true}",
    "nearswap": "method: nearswap\n    from: [a, b]\n    parameters: {t: 0.5}",
    "ram": "method: ram\n    base: a\n    from: [b, c]",
    "passthrough": "method: passthrough\n    from: [{model: a, scale: 0.5}]",
    "interpolate": "op: interpolate\n    from: [a, b]\n    alpha: 0.3",
    "extract_lora": "op: extract_lora\n    base: a\n    tuned: b\n    rank: 8",
}


def step(method: str) -> str:
    body = STEPS[method]
    return body if body.startswith("op:") else f"op: merge\n    {body}"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Three related checkpoints: a 8 MiB embedding and a 16 MiB MLP matrix in fp32, a bf16
    projection (mixed dtypes) and a 1 MiB fp32 vector (DELLA and arcee_fusion read a vector
    as one row, in one piece)."""
    root = tmp_path_factory.mktemp("estimate")
    g = torch.Generator().manual_seed(0)
    base = {"model.embed_tokens.weight": torch.randn(2048, 1024, generator=g),
            "model.layers.0.mlp.up_proj.weight": torch.randn(4096, 1024, generator=g),
            "model.layers.0.self_attn.q_proj.weight":
                torch.randn(1024, 1024, generator=g).bfloat16(),
            "model.norm.weight": torch.randn(1 << 18, generator=g)}
    for i, name in enumerate("abc"):
        d = root / name
        d.mkdir()
        tensors = {k: (v.float() + 0.1 * i * torch.randn(v.shape, generator=g)).to(v.dtype)
                   for k, v in base.items()}
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps({"model_type": "llama",
                                                   "num_hidden_layers": 1}))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("threshold", [1 << 30, 1 << 20], ids=["held", "streamed"])
@pytest.mark.parametrize("method", list(STEPS))
def test_estimate_bounds_the_measured_peak(models, tmp_path, method, threshold):
    _assert_bounded(tmp_path, f"models:\n  a: {models / 'a'}\n  b: {models / 'b'}\n"
                              f"  c: {models / 'c'}\n", step(method), threshold)


def _assert_bounded(tmp_path, sources: str, step_body: str, threshold: int) -> None:
    """Run a one-step recipe in a fresh measuring process: its peak within the estimate."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"recipekit: 1\n{sources}steps:\n  - name: m\n    {step_body}\n"
                      f"output:\n  path: {tmp_path / 'out'}\n")
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(recipe), str(threshold)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["measured"] <= got["estimate"], got


#: op -> its step over the Llama `a` (and the adapter `lora`) of the `llama` fixture
OPS = {
    "lora_fold": "op: adapters\n    from: a\n    adapters: [lora]",
    "coalesce": "op: coalesce\n    from: a\n    width: [[0, 4], [1, 5], [2, 6], [3, 7]]\n"
                "    depth: [[0, 1]]",
}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A 2-layer Llama (hidden 512, 8/4 heads, MLP 2048, vocab 4096: 8 MiB embeddings, 4 MiB
    MLP matrices in fp32) and a rank-16 PEFT LoRA on all its linear modules."""
    from tests.helpers.adapter_builders import make_adapter
    from tests.helpers.builders import make_model

    root = tmp_path_factory.mktemp("estimate-llama")
    make_model("llama", root / "a", layers=2, hidden_size=512, intermediate_size=2048,
               num_attention_heads=8, num_key_value_heads=4, head_dim=64, vocab_size=4096)
    make_adapter("llama", root / "a", root / "lora", r=16, lora_alpha=32,
                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                 "up_proj", "down_proj"])
    return root


@pytest.mark.slow
@pytest.mark.parametrize("threshold", [1 << 30, 1 << 20], ids=["held", "streamed"])
@pytest.mark.parametrize("op", list(OPS))
def test_estimate_bounds_the_measured_peak_of_ops(llama, tmp_path, op, threshold):
    """The same bound for the computed ops that are not merges (a LoRA fold, coalescing)."""
    _assert_bounded(tmp_path, f"models:\n  a: {llama / 'a'}\nadapters:\n"
                              f"  lora: {llama / 'lora'}\n", OPS[op], threshold)
