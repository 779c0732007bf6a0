"""recipekit/ops/ram.py: the RAM kernels.

Oracles: mergekit 0.1.5's own `ram` and `ramplus_tl` outputs on the committed inputs
(tests/goldens/merge/{ram,ramplus_tl}.safetensors, written by
tests/goldens/make_merge_goldens.py), bit for bit; the formulas of the docstrings (RAM, arXiv
2601.13572) recomputed element by element in fp64.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from recipekit.ops.merge import apply_method
from recipekit.ops.ram import ram, ramplus_tl

from tests.helpers.recipes import ROOT

GOLDENS = ROOT / "tests" / "goldens" / "merge"


def goldens(method: str) -> list[tuple[dict, torch.Tensor]]:
    with safe_open(GOLDENS / f"{method}.safetensors", "pt") as f:
        return [(case, f.get_tensor(case["name"]))
                for case in json.loads(f.metadata()["cases"])]


def run_golden(method: str, case: dict) -> torch.Tensor:
    inputs = load_file(GOLDENS / "inputs.safetensors")
    tensors = [inputs[k] for k in case["inputs"]]
    b = case["base"]
    return apply_method(method, [t for i, t in enumerate(tensors) if i != b], base=tensors[b],
                        params=case["params"])


GOLDEN_CASES = [(m, c) for m in ("ram", "ramplus_tl") for c, _ in goldens(m)]


@pytest.mark.parametrize(("method", "case"), GOLDEN_CASES,
                         ids=[f"{m}-{c['name']}" for m, c in GOLDEN_CASES])
def test_equals_mergekit_bit_for_bit(method, case):
    expected = dict((c["name"], t) for c, t in goldens(method))[case["name"]]
    assert torch.equal(run_golden(method, case), expected)


def ram_formula(base: torch.Tensor, tensors: list[torch.Tensor], epsilon: float) -> torch.Tensor:
    """out_j = b_j + Σ_i n_ij τ_ij / max(Σ_i n_ij, 1), n_ij = [|τ_ij| > ε], one element at a
    time in fp64 (the deltas themselves in fp32, as the kernel forms them)."""
    taus = [(t - base).double().reshape(-1) for t in tensors]
    out = base.double().reshape(-1).clone()
    for j in range(out.numel()):
        changed = [tau[j].item() for tau in taus if abs(tau[j].item()) > epsilon]
        if changed:
            out[j] += sum(changed) / len(changed)
    return out.reshape(base.shape)


class TestRam:
    def test_formula(self):
        g = torch.Generator().manual_seed(3)
        base = torch.randn(6, 7, generator=g)
        # deltas of either 0 or about ±1, so each element is changed by 0 to 3 models
        tensors = [base + torch.randn(6, 7, generator=g)
                   * (torch.rand(6, 7, generator=g) < 0.5) for _ in range(3)]
        torch.testing.assert_close(ram(base, tensors, epsilon=1e-5).double(),
                                   ram_formula(base, tensors, 1e-5), atol=1e-6, rtol=0)

    def test_epsilon_decides_what_counts(self):
        base = torch.zeros(2)
        a, b = torch.tensor([0.5, 0.05]), torch.tensor([0.3, 0.2])
        # element 1: only b's 0.2 exceeds ε = 0.1, so it is taken whole (not averaged with 0.05)
        assert ram(base, [a, b], epsilon=0.1).tolist() == pytest.approx([0.4, 0.2])
        assert ram(base, [a, b], epsilon=1e-5).tolist() == pytest.approx([0.4, 0.125])

    def test_unchanged_and_empty(self):
        base = torch.tensor([1.0, -2.0])
        assert torch.equal(ram(base, [base.clone(), base.clone()]), base)
        out = ram(base, [])
        assert torch.equal(out, base) and out.data_ptr() != base.data_ptr()

    def test_elementwise_rows_give_the_same_bytes(self):
        """`elementwise=True` in the registry: any rows of the inputs give those rows."""
        g = torch.Generator().manual_seed(5)
        base = torch.randn(8, 5, generator=g)
        tensors = [base + 0.1 * torch.randn(8, 5, generator=g) for _ in range(3)]
        whole = ram(base, tensors)
        assert torch.equal(ram(base[2:5], [t[2:5] for t in tensors]), whole[2:5])

    def test_dtypes(self):
        base = torch.zeros(3, dtype=torch.bfloat16)
        assert ram(base, [base + 1]).dtype == torch.float32
        assert ram(base.double(), [base.double() + 1]).dtype == torch.float64


class TestRamplusTl:
    def test_formula(self):
        """out_j = b_j + Σ_i n_ij τ_ij·(λ_i if c_j = 1 else 1/c_j), λ_i = 1 + r·clamp(ρ_i, 0, α),
        ρ_i = (model i's shared changes)/(its lone ones), counted in plain Python."""
        g = torch.Generator().manual_seed(4)
        base = torch.randn(5, 6, generator=g)
        tensors = [base + torch.randn(5, 6, generator=g)
                   * (torch.rand(5, 6, generator=g) < p) for p in (0.3, 0.6, 0.8)]
        r, alpha, eps = 0.4, 0.9, 1e-5
        taus = [(t - base).double().reshape(-1) for t in tensors]
        n = [[abs(v) > eps for v in tau.tolist()] for tau in taus]
        c = [sum(col) for col in zip(*n, strict=True)]
        lam = []
        for row in n:
            shared = sum(1 for j, x in enumerate(row) if x and c[j] > 1)
            lone = sum(1 for j, x in enumerate(row) if x and c[j] == 1)
            lam.append(1 + r * min(max(shared / max(lone, eps), 0), alpha))
        expected = base.double().reshape(-1).clone()
        for j in range(expected.numel()):
            for i, tau in enumerate(taus):
                if n[i][j]:
                    expected[j] += tau[j].item() * (lam[i] if c[j] == 1 else 1 / c[j])
        ours = ramplus_tl(base, tensors, r=r, alpha=alpha, epsilon=eps)
        torch.testing.assert_close(ours.double(), expected.reshape(base.shape), atol=1e-6,
                                   rtol=0)

    def test_counts_of_pieces_add_up_to_the_whole(self):
        """Oracle: `ramplus_tl` itself. The counts of row pieces sum to the whole tensor's
        and the rows, computed with its λ, are the kernel's bit for bit (the streamed form,
        steps/stream_merges.py)."""
        from recipekit.ops.ram import ramplus_counts, ramplus_rows, ramplus_scales

        g = torch.Generator().manual_seed(8)
        base = torch.randn(9, 5, generator=g)
        tensors = [base + torch.randn(9, 5, generator=g) * (torch.rand(9, 5, generator=g) < p)
                   for p in (0.3, 0.7)]
        whole = ramplus_counts(base, tensors)
        parts = [ramplus_counts(base[lo:hi], [t[lo:hi] for t in tensors])
                 for lo, hi in ((0, 2), (2, 3), (3, 9))]
        assert torch.equal(sum(parts), whole)
        scales = ramplus_scales(whole, r=0.4, alpha=0.9)
        rows = torch.cat([ramplus_rows(base[lo:hi], [t[lo:hi] for t in tensors], scales)
                          for lo, hi in ((0, 4), (4, 9))])
        assert torch.equal(rows, ramplus_tl(base, tensors, r=0.4, alpha=0.9))

    def test_r_zero_is_ram(self):
        g = torch.Generator().manual_seed(6)
        base = torch.randn(4, 4, generator=g)
        tensors = [base + torch.randn(4, 4, generator=g) * (torch.rand(4, 4, generator=g) < 0.5)
                   for _ in range(3)]
        assert torch.equal(ramplus_tl(base, tensors, r=0.0), ram(base, tensors))

    def test_no_lone_changes_no_boost_needed(self):
        """A model with only shared changes has ρ = s/ε, clamped to α: no division by zero."""
        base = torch.zeros(2)
        x = torch.tensor([1.0, 3.0])
        out = ramplus_tl(base, [x, x.clone()])
        assert torch.equal(out, x)
