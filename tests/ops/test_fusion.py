"""recipekit/ops/fusion.py: Arcee Fusion.

Oracles: mergekit 0.1.5's own `arcee_fusion` outputs on the committed inputs
(tests/goldens/merge/arcee_fusion.safetensors), bit for bit; the formula of the docstring
recomputed with NumPy-free plain torch in fp64; for tensors of more than 10^6 elements,
mergekit run live in the side venv (marked `mergekit`) with its global generator seeded as
ours, which then draws the same sample.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from recipekit.ops.fusion import QUANTILE_SAMPLE, arcee_fusion, fusion_threshold
from recipekit.ops.merge import apply_method

from tests.helpers.recipes import ROOT

GOLDENS = ROOT / "tests" / "goldens" / "merge"
MERGEKIT_PYTHON = ROOT / "bench" / ".venv-mergekit" / "bin" / "python"


def golden_cases() -> list[tuple[dict, torch.Tensor]]:
    with safe_open(GOLDENS / "arcee_fusion.safetensors", "pt") as f:
        return [(case, f.get_tensor(case["name"]))
                for case in json.loads(f.metadata()["cases"])]


@pytest.mark.parametrize(("case", "expected"), golden_cases(),
                         ids=[c["name"] for c, _ in golden_cases()])
def test_equals_mergekit_bit_for_bit(case, expected):
    inputs = load_file(GOLDENS / "inputs.safetensors")
    tensors = [inputs[k] for k in case["inputs"]]
    b = case["base"]
    ours = apply_method("arcee_fusion", [tensors[1 - b]], base=tensors[b],
                        generator=torch.Generator().manual_seed(0))
    assert torch.equal(ours, expected)


def formula(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The docstring's formula in fp64: row KL, quartiles at ⌊q(n−1)⌋ of the sorted scores."""
    a64, b64 = a.double(), b.double()
    p = torch.softmax(b64, -1) + 1e-8
    q = torch.softmax(a64, -1) + 1e-8
    importance = (b64 - a64).abs() * (p * (p / q).log()).sum(-1, keepdim=True)
    s = sorted(importance.reshape(-1).tolist())
    n = len(s)
    q1, med, q3 = (s[int(f * (n - 1))] for f in (0.25, 0.5, 0.75))
    return a64 + (b64 - a64) * (importance >= med + 1.5 * (q3 - q1))


def test_formula():
    g = torch.Generator().manual_seed(11)
    a = torch.randn(12, 9, generator=g)
    b = a + 0.3 * torch.randn(12, 9, generator=g)
    ours = arcee_fusion(a, b)
    assert torch.equal(ours.double(), formula(a, b))  # each value is a's or b's exactly
    kept = (ours == b).float().mean().item()
    assert 0 < kept < 0.5  # only the upper outliers of importance take b


def test_large_tensors_sample_from_the_generator():
    """Above 10^6 elements the quartiles come from a sample drawn from the generator: the same
    seed gives the same bytes, and the threshold is close to the exact one."""
    g = torch.Generator().manual_seed(12)
    a = torch.randn(1001, 1000, generator=g)
    b = a + 0.1 * torch.randn(1001, 1000, generator=g)
    one = arcee_fusion(a, b, generator=torch.Generator().manual_seed(1))
    assert torch.equal(one, arcee_fusion(a, b, generator=torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="needs a generator"):
        arcee_fusion(a, b)
    from recipekit.ops.fusion import fusion_importance

    importance = fusion_importance(b, a)
    sampled = fusion_threshold(importance, torch.Generator().manual_seed(1))
    s = importance.reshape(-1).sort().values
    n = s.numel() - 1
    exact = s[int(0.5 * n)] + 1.5 * (s[int(0.75 * n)] - s[int(0.25 * n)])
    assert abs(sampled - exact) / exact < 0.01
    assert a.numel() > QUANTILE_SAMPLE


LIVE = """
import sys, torch
from safetensors.torch import load_file, save_file
from mergekit import merge_methods
t = load_file(sys.argv[1])
torch.manual_seed(5)
out = merge_methods.merge_tensors([t["a"], t["b"]], "arcee_fusion", base_index=0)
save_file({"out": out.contiguous()}, sys.argv[2])
"""


@pytest.mark.mergekit
@pytest.mark.skipif(not MERGEKIT_PYTHON.exists(), reason="no bench/.venv-mergekit")
def test_large_tensor_equals_mergekit_with_the_same_generator_state(tmp_path):
    """Oracle: mergekit 0.1.5 on 1001×1000 fp32 tensors, its global generator seeded with 5;
    ours draws from a generator seeded with 5: the same sample, the same bytes."""
    g = torch.Generator().manual_seed(13)
    a = torch.randn(1001, 1000, generator=g)
    b = a + 0.1 * torch.randn(1001, 1000, generator=g)
    save_file({"a": a, "b": b}, tmp_path / "in.safetensors")
    subprocess.run([str(MERGEKIT_PYTHON), "-c", LIVE, str(tmp_path / "in.safetensors"),
                    str(tmp_path / "out.safetensors")], check=True, timeout=300)
    theirs = load_file(tmp_path / "out.safetensors")["out"]
    assert torch.equal(arcee_fusion(a, b, generator=torch.Generator().manual_seed(5)), theirs)


@pytest.mark.parametrize("shape", [(40, 7), (1001, 1000)], ids=["all", "sampled"])
def test_threshold_of_pieces_in_any_order_equals_the_whole(shape):
    """Oracle: `fusion_threshold` of the whole importance, bit for bit, from uneven pieces
    handed over out of order (every element below the sample size, the sampled ones above)."""
    from recipekit.ops.fusion import fusion_importance, fusion_threshold_pieces

    g = torch.Generator().manual_seed(21)
    a = torch.randn(*shape, generator=g)
    importance = fusion_importance(a + 0.2 * torch.randn(*shape, generator=g), a)
    row = shape[1]
    bounds = [(0, 3), (3, 4), (4, 19), (19, shape[0])]
    pieces = [(lo * row, importance[lo:hi]) for lo, hi in reversed(bounds)]
    want = fusion_threshold(importance, torch.Generator().manual_seed(2))
    got = fusion_threshold_pieces(pieces, importance.numel(), torch.Generator().manual_seed(2))
    assert torch.equal(got, want)
