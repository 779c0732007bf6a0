"""ops/stream_sce.py: SCE's selection and weights in passes over row pieces.

Oracle: `ops.sparsify.sce_topk_mask` (a stable descending sort of |Var| as fp32: the kept set
bit for bit, ties included) and `ops.task_arithmetic.sce` (within 1e-6 relative: ω sums in
fp64 pieces), for several piece sizes.
"""

from __future__ import annotations

import pytest
import torch

from recipekit.graph.passes import InMemorySource
from recipekit.ops.select import Cut
from recipekit.ops.sparsify import sce_topk_mask
from recipekit.ops.stream_sce import _keep, sce_k, sce_rows, sce_rules, variance_key
from recipekit.ops.task_arithmetic import sce, task_vectors


def _source(tensors: list[torch.Tensor], rows_per_piece: int) -> InMemorySource:
    rows = tensors[0].shape[0]
    bounds = [(lo, min(lo + rows_per_piece, rows)) for lo in range(0, rows, rows_per_piece)]
    return InMemorySource(tensors, bounds)


def _inputs(grid: bool, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(40, 24, generator=g)
    if grid:  # task vectors on a grid: many equal variances, zeros among them
        return [base + 0.25 * torch.randint(-2, 3, base.shape, generator=g).float()
                for _ in range(3)] + [base]
    return [base + 0.1 * torch.randn(base.shape, generator=g) for _ in range(3)] + [base]


class TestSelection:
    """Oracle: `sce_topk_mask`, the kept set exactly."""

    @pytest.mark.parametrize("grid", [False, True])
    @pytest.mark.parametrize("fraction", [0.0, 0.05, 0.3, 0.77, 1.0])
    @pytest.mark.parametrize("rows_per_piece", [1, 7, 40])
    def test_kept_set_is_the_kernels(self, grid, fraction, rows_per_piece):
        pieces = _inputs(grid)
        deltas = task_vectors(pieces, torch.float32)
        rules = sce_rules(_source(pieces, rows_per_piece),
                          lambda lo, hi, p: task_vectors(p, torch.float32),
                          fraction=fraction, n=deltas[0].numel())
        cut = Cut(*(int(v) for v in rules[:3].tolist()))
        got = deltas * _keep(variance_key(deltas), 0, cut, deltas).unsqueeze(0)
        want = deltas * sce_topk_mask(deltas, fraction=fraction).unsqueeze(0) \
            if fraction < 1 else deltas
        assert torch.equal(got, want)

    def test_k_is_the_fp32_product(self):
        # int(fl32(nnz)·fl32(f)) as the kernel's tensor arithmetic, not the double product
        nnz, f = 16777217, 0.3
        assert sce_k(nnz, f) == int(torch.count_nonzero(torch.ones(nnz)) * f)


class TestOutput:
    """Oracle: `sce` on the whole tensors, within 1e-6 relative."""

    @pytest.mark.parametrize("grid", [False, True])
    @pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
    def test_rows_match_kernel(self, grid, fraction):
        pieces = _inputs(grid, seed=1)
        rules = sce_rules(_source(pieces, 5), lambda lo, hi, p: task_vectors(p, torch.float32),
                          fraction=fraction, n=pieces[0].numel())
        out = torch.cat([sce_rows(pieces[-1][lo:lo + 9], task_vectors(
            [p[lo:lo + 9] for p in pieces], torch.float32), lo, rules)
            for lo in range(0, 40, 9)])
        want = sce(pieces[-1], pieces[:-1], select_topk=fraction)
        assert ((out - want).abs().max() / want.abs().max()).item() <= 1e-6


class TestKeptKeys:
    """``keep``: the variance computed once a value, the selection kept as bits. Oracle: the
    same rules and output bytes as without it (which the tests above check against the
    kernel), with the variance computed once per piece instead of once per pass."""

    @pytest.mark.parametrize("grid", [False, True])
    @pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
    @pytest.mark.parametrize("rows_per_piece", [4, 7, 40])
    def test_same_rules_and_output(self, grid, fraction, rows_per_piece, monkeypatch):
        import recipekit.ops.stream_sce as ss

        pieces = _inputs(grid, seed=2)
        n = pieces[0].numel()
        calls = []
        real = ss.variance_key
        monkeypatch.setattr(ss, "variance_key", lambda d: calls.append(d.shape[1]) or real(d))

        def rules(keep: bool) -> torch.Tensor:
            calls.clear()
            return sce_rules(_source(pieces, rows_per_piece),
                             lambda lo, hi, p: task_vectors(p, torch.float32),
                             fraction=fraction, n=n, keep=keep)

        plain = rules(False)
        counted = sum(calls)
        kept = rules(True)
        assert torch.equal(kept[:6], plain)  # cut, ω
        selecting = 0 < fraction < 1
        assert sum(calls) == (40 if selecting else 0)  # each row's variance once
        if selecting:
            assert counted > 40  # without: once per pass
        # the flag: pieces of 4 rows (96 values) start on whole bytes of the mask, 7 (168) too
        assert kept.shape == (7 + -(-n // 64),) and bool(kept[6]) == (fraction < 1)

        def output(r: torch.Tensor) -> torch.Tensor:
            calls.clear()
            return torch.cat([sce_rows(pieces[-1][lo:lo + 9], task_vectors(
                [p[lo:lo + 9] for p in pieces], torch.float32), lo, r)
                for lo in range(0, 40, 9)])

        want = output(plain)
        assert torch.equal(output(kept), want)
        assert not calls  # the selection came from the bits

    def test_bits_without_keys(self, monkeypatch):
        """A tensor too large to keep its keys (``keep_bits`` alone): the passes compute the
        variance as without keeping anything, the output reads the bits, the same bytes."""
        import recipekit.ops.stream_sce as ss

        pieces = _inputs(True, seed=3)
        n = pieces[0].numel()
        calls = []
        real = ss.variance_key
        monkeypatch.setattr(ss, "variance_key", lambda d: calls.append(d.shape[1]) or real(d))

        def rules(**keep: bool) -> torch.Tensor:
            return sce_rules(_source(pieces, 4), lambda lo, hi, p: task_vectors(p, torch.float32),
                             fraction=0.3, n=n, **keep)

        plain = rules()
        counted = sum(calls)
        calls.clear()
        bits = rules(keep=False, keep_bits=True)
        assert sum(calls) == counted > 40 and torch.equal(bits[:6], plain) and bool(bits[6])
        calls.clear()
        outputs = [torch.cat([sce_rows(pieces[-1][lo:lo + 9], task_vectors(
            [p[lo:lo + 9] for p in pieces], torch.float32), lo, r) for lo in range(0, 40, 9)])
            for r in (plain, bits)]
        assert torch.equal(outputs[0], outputs[1])
        assert sum(calls) == 40  # only the plain rules' output computed the variance


class TestEnergies:
    """`_energies` (numpy's cast-and-square) against torch's ``.double().square().sum()`` of
    the masked task vectors: the same fp64 bits, NaN for NaN."""

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    @pytest.mark.parametrize("select", [False, True])
    @pytest.mark.parametrize("shape", [(2, 7, 13), (3, 64, 2048)])
    def test_bits_of_torchs_formula(self, dtype, select, shape):
        from recipekit.ops.stream_sce import _energies

        g = torch.Generator().manual_seed(7)
        tau = (torch.randn(shape, generator=g) * 10.0 ** torch.randint(
            -30, 30, shape, generator=g)).to(dtype)
        flat = tau.view(-1)
        flat[:6] = torch.tensor([0.0, -0.0, 3.4e38, -1e-45, 1e-38, 2.0 ** 64], dtype=dtype)
        chosen = torch.rand(shape[1:], generator=g) < 0.4 if select else None
        masked = tau if chosen is None else tau * chosen.to(dtype).unsqueeze(0)
        want = masked.reshape(shape[0], -1).double().square().sum(dim=1)
        got = _energies(tau, chosen)
        assert got.dtype == torch.float64
        assert torch.equal(got.view(torch.int64), want.view(torch.int64))

    def test_nan_and_inf(self):
        from recipekit.ops.stream_sce import _energies

        tau = torch.zeros(2, 3, 5)
        tau[0, 0, 0] = float("nan")
        tau[1, 2, 4] = float("inf")
        chosen = torch.ones(3, 5, dtype=torch.bool)
        chosen[2, 4] = False  # an unselected inf: inf·0 is NaN, as torch's product
        got = _energies(tau, chosen)
        assert got.isnan().all()
        assert _energies(tau, None)[1].item() == float("inf")
