"""ops/gram.py: coefficients from the Gram matrix against the whole-tensor kernels.

Oracle: `ops.spherical` / `ops.task_arithmetic` kernels run on fp64 copies of the inputs (the
same formulas, rounded less), within 1e-7 relative (the vectors are the kernels' fp32
offsets); the fp32 kernels within 1e-6.
"""

from __future__ import annotations

import pytest
import torch

from recipekit.graph.passes import InMemorySource
from recipekit.ops import gram as G
from recipekit.ops.spherical import karcher, multislerp, nuslerp
from recipekit.ops.task_arithmetic import model_stock


def _gram(vectors: list[torch.Tensor]) -> torch.Tensor:
    rows = vectors[0].shape[0]
    source = InMemorySource(vectors, [(lo, min(lo + 7, rows)) for lo in range(0, rows, 7)])
    return G.gram(source, lambda lo, hi, p: list(p), len(vectors))


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.abs().max()).item()


@pytest.fixture
def inputs() -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(50, 30, generator=g)
    shared = 0.05 * torch.randn(50, 30, generator=g)
    return base, [base + shared + 0.05 * torch.randn(50, 30, generator=g) for _ in range(3)]


class TestGram:
    """Oracle: VVᵀ in fp64 whole; the pieces change only the summation order."""

    def test_equals_whole_product(self, inputs):
        _, xs = inputs
        v = torch.stack([x.reshape(-1) for x in xs]).double()
        assert torch.allclose(_gram(xs), v @ v.T, rtol=1e-12, atol=0)


class TestCoefficients:
    def _check(self, got, kernel, xs, base=None):
        exact = kernel([x.double() for x in xs], None if base is None else base.double())
        assert _rel(got, exact) <= 1e-7
        assert _rel(got, kernel(xs, base)) <= 1e-6

    def test_model_stock(self, inputs):
        base, xs = inputs
        offsets = [x - base for x in xs]
        got = G.linear_combine(offsets, G.model_stock_coefficients(_gram(offsets)), base)
        self._check(got, lambda t, b: model_stock(b, t), xs, base)

    def test_model_stock_singular_denominator_gives_base(self, inputs):
        base, xs = inputs
        offsets = [xs[0] - base, base - xs[0]]  # cos = −1: 1 + (N − 1)cos = 0, t = 0
        assert G.model_stock_coefficients(_gram(offsets)).tolist() == [0.0, 0.0]
        assert torch.equal(model_stock(base, [xs[0], 2 * base - xs[0]]), base)

    @pytest.mark.parametrize("weights", [(0.3, 0.7), (1.0, -1.0)])
    def test_nuslerp(self, inputs, weights):
        base, xs = inputs
        offsets = [xs[0] - base, xs[1] - base]
        c = G.nuslerp_coefficients(_gram(offsets), G.nuslerp_t(*weights))
        got = G.linear_combine(offsets, c, base)
        self._check(got, lambda t, b: nuslerp(t[0], t[1], weight_a=weights[0],
                                              weight_b=weights[1], base=b), xs[:2], base)

    def test_nuslerp_collinear_and_zero(self, inputs):
        _, xs = inputs
        assert G.nuslerp_coefficients(_gram([xs[0], 2 * xs[0]]), 0.25).tolist() == [0.75, 0.25]
        zero = torch.zeros_like(xs[0])  # a zero vector is orthogonal: c = 0, θ = π/2
        got = G.linear_combine([zero, xs[1]], G.nuslerp_coefficients(_gram([zero, xs[1]]), .5))
        assert _rel(got, nuslerp(zero, xs[1], weight_a=1, weight_b=1)) <= 1e-6

    @pytest.mark.parametrize("normalize", [True, False])
    def test_multislerp(self, inputs, normalize):
        base, xs = inputs
        offsets = [x - base for x in xs]
        w = [0.2, 0.3, 0.5]
        c = G.multislerp_coefficients(_gram(offsets), w, normalize_weights=normalize)
        got = G.linear_combine(offsets, c, base)
        self._check(got, lambda t, b: multislerp(t, weights=w, base=b,
                                                 normalize_weights=normalize), xs, base)

    def test_multislerp_vanishing_mean(self, inputs):
        _, xs = inputs
        pair = [xs[0], -xs[0]]
        assert G.multislerp_coefficients(_gram(pair), [1, 1]).tolist() == [0.5, 0.5]
        with pytest.raises(ValueError, match="weighted mean direction"):
            G.multislerp_coefficients(_gram(pair + [xs[1]]), [1, 1, 0])

    @pytest.mark.parametrize("max_iter", [0, 1, 2, 10])
    def test_karcher_iterations(self, inputs, max_iter):
        _, xs = inputs
        spread = [xs[0], -xs[1], xs[2] + 3 * xs[1]]  # far apart: several iterations
        c = G.karcher_coefficients(_gram(spread), max_iter=max_iter)
        got = G.linear_combine(spread, c)
        exact = karcher([x.double() for x in spread], max_iter=max_iter)
        assert _rel(got, exact) <= 1e-7

    def test_karcher_degenerate(self, inputs):
        _, xs = inputs
        zero = torch.zeros_like(xs[0])
        assert G.karcher_coefficients(_gram([zero, zero])).tolist() == [0.0, 0.0]
        got = G.linear_combine([zero, zero], torch.zeros(2, dtype=torch.float64))
        assert torch.equal(got.float(), karcher([zero, zero]))  # +0, as zeros_like
        c = G.karcher_coefficients(_gram([zero, xs[0]]), weights=[0.25, 0.75])
        got = G.linear_combine([zero, xs[0]], c)
        assert _rel(got, karcher([zero, xs[0]], weights=[0.25, 0.75])) <= 1e-6
        opposite = [xs[0], -xs[0]]  # the mean vanishes: the first unit vector
        got = G.linear_combine(opposite, G.karcher_coefficients(_gram(opposite)))
        assert _rel(got, karcher([x.double() for x in opposite])) <= 1e-7


def test_nuslerp_columns_equal_the_row_wise_kernel():
    """Oracle: `nuslerp(..., flatten=False, row_wise=True)` on fp64 inputs: the column sums of
    two row pieces, added, give coefficients whose combination is the kernel's to 1e-12
    (collinear and zero columns included)."""
    g = torch.Generator().manual_seed(30)
    v0 = torch.randn(11, 6, dtype=torch.float64, generator=g)
    v1 = torch.randn(11, 6, dtype=torch.float64, generator=g)
    v1[:, 2] = 3 * v0[:, 2]
    v0[:, 4] = 0
    sums = G.nuslerp_column_sums(v0[:4], v1[:4]) + G.nuslerp_column_sums(v0[4:], v1[4:])
    c = G.nuslerp_column_coefficients(sums, 0.3)
    want = nuslerp(v0, v1, weight_a=0.7, weight_b=0.3, flatten=False, row_wise=True)
    torch.testing.assert_close(c[0] * v0 + c[1] * v1, want, rtol=0, atol=1e-12)
