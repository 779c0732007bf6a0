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


class TestEnergiesOnTheWindowPass:
    """Large tensors place the cut from a sample and a window pass (`ops.select`, lowered here
    by `SAMPLE_MIN`); the energies then ride on that pass (`_EnergyRide`) instead of a pass of
    their own. Oracle: the energy pass (the ride turned off): the same cut and bits, ω within
    an fp64 rounding (the sums add in another order), and the kernel within 1e-6; one pass
    fewer. Every piece repeats the first, so that the sample places the cut inside the window,
    and each value has equal keys in other pieces: the cut falls among equal keys of one row.
    """

    @pytest.fixture(autouse=True)
    def _sample_small_tensors(self, monkeypatch):
        from recipekit.ops import select

        monkeypatch.setattr(select, "SAMPLE_MIN", 0)
        monkeypatch.setattr(select, "SAMPLE_EVERY", 2)

    @staticmethod
    def _rules(pieces: list[torch.Tensor], rows_per_piece: int, fraction: float,
               **keep: bool) -> tuple[torch.Tensor, int]:
        source = _source(pieces, rows_per_piece)
        passes = []
        run = source.map
        source.map = lambda fn, **kw: (passes.append(kw.get("every", 1)), run(fn, **kw))[1]
        rules = sce_rules(source, lambda lo, hi, p: task_vectors(p, torch.float32),
                          fraction=fraction, n=pieces[0].numel(), **keep)
        return rules, len(passes)

    @pytest.mark.parametrize("grid", [False, True])
    @pytest.mark.parametrize("fraction", [0.02, 0.3, 0.77])
    @pytest.mark.parametrize("rows_per_piece", [4, 8])
    @pytest.mark.parametrize("keep", [False, True])
    def test_same_cut_bits_and_weights_as_the_energy_pass(self, monkeypatch, grid, fraction,
                                                          rows_per_piece, keep):
        import recipekit.ops.stream_sce as ss

        pieces = [p[:rows_per_piece].repeat(40 // rows_per_piece, 1)
                  for p in _inputs(grid, seed=4)]
        riding, passes = self._rules(pieces, rows_per_piece, fraction, keep=keep,
                                     keep_bits=True)
        monkeypatch.setattr(ss._EnergyRide, "covers", lambda self, cut: False)
        alone, passes_alone = self._rules(pieces, rows_per_piece, fraction, keep=keep,
                                          keep_bits=True)
        assert passes == passes_alone - 1 == 2  # the sample and the window pass
        assert torch.equal(riding[:3], alone[:3])  # the cut
        assert torch.allclose(riding[3:6], alone[3:6], rtol=1e-15, atol=0)
        assert bool(riding[6]) and torch.equal(riding[6:], alone[6:])  # the kept bits
        deltas = task_vectors(pieces, torch.float32)
        want = sce(pieces[-1], pieces[:-1], select_topk=fraction)
        out = sce_rows(pieces[-1], deltas, 0, riding)
        assert ((out - want).abs().max() / want.abs().max()).item() <= 1e-6
        masked = sce_rows(pieces[-1], deltas, 0, riding[:6])  # the selection from the keys
        assert torch.equal(out, masked)

    def test_a_window_too_full_for_the_ride_falls_back(self, monkeypatch):
        """More entries inside the window than the ride may hold: the energy pass runs."""
        import recipekit.ops.stream_sce as ss

        pieces = [p[:4].repeat(10, 1) for p in _inputs(True, seed=5)]
        want, _ = self._rules(pieces, 4, 0.3, keep=True)
        dropped = []
        start, covers = ss._EnergyRide.__init__, ss._EnergyRide.covers

        def small(self, *args):
            start(self, *args)
            self.limit = 10

        monkeypatch.setattr(ss._EnergyRide, "__init__", small)
        monkeypatch.setattr(ss._EnergyRide, "covers",
                            lambda self, cut: dropped.append(self.inside is None)
                            or covers(self, cut))
        got, passes = self._rules(pieces, 4, 0.3, keep=True)
        assert dropped == [True] and passes == 3
        assert torch.equal(got[:3], want[:3]) and torch.equal(got[6:], want[6:])
        assert torch.allclose(got[3:6], want[3:6], rtol=1e-15, atol=0)
