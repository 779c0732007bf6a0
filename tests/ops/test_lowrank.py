"""ops/lowrank.py: the streamed randomized SVD (fused block Krylov) against an exact SVD.

Oracle: Eckart–Young. The best rank-k approximation of Δ errs by √Σ_{i>k} σ_i² in Frobenius
norm. σ is exact either by construction (Δ built from known singular vectors and values: a
slow power-law decay, and a low-rank signal over a noise floor, spectra like fine-tuning
deltas) or from `torch.linalg.svdvals` of the same matrix (a Gaussian difference: a flat
spectrum, the hardest case for a sketch and what the bench fixtures' differences are). At the
step's defaults the randomized factors must come within `TOL` (0.05%) of it on real-shaped
matrices; the subspace iteration these defaults replaced (oversample 16, 2 power iterations, 6
passes) erred 0.84% above it on the flat 2048×2048 case.
"""

from __future__ import annotations

import math

import pytest
import torch

from recipekit.graph.passes import piece_bounds
from recipekit.ops.lowrank import factors_from_svd, randomized_svd
from recipekit.steps.extract_lora import OVERSAMPLE, POWER_ITERS, TOLERANCE

#: the largest relative excess over the optimal error allowed at the defaults (the bench's
#: target: error ratio ≤ 1.0005 against mergekit-extract-lora's full SVD)
TOL = 5e-4


def pieces_of(delta: torch.Tensor, calls: list[int] | None = None):
    """A `MapPieces` over ``delta``, cut as the executor cuts a pass (``calls`` counts passes)."""
    bounds = piece_bounds(delta.shape[0], delta.shape[1])

    def map_pieces(fn):
        if calls is not None:
            calls.append(1)
        return (fn(lo, hi, delta[lo:hi]) for lo, hi in bounds)

    return map_pieces


def spectrum_matrix(rows: int, cols: int, kind: str, seed: int,
                    terms: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(Δ, σ): Δ = U·diag(σ)·Vᵀ with orthonormal U, V (QR of Gaussians) and ``terms``
    singular values shaped like a fine-tuning delta's, so the exact spectrum is known without
    an SVD of Δ (minutes on a shared 2-core machine for 2048×5632). ``kind`` "flat" is a
    Gaussian instead, its σ from `torch.linalg.svdvals`."""
    g = torch.Generator().manual_seed(seed)
    if kind == "flat":
        delta = torch.randn(rows, cols, generator=g)
        return delta, torch.linalg.svdvals(delta)
    u = torch.linalg.qr(torch.randn(rows, terms, generator=g)).Q
    v = torch.linalg.qr(torch.randn(cols, terms, generator=g)).Q
    i = torch.arange(1, terms + 1, dtype=torch.float32)
    if kind == "power-law":  # slow decay: the hard case for a sketch
        sigma = i ** -0.5
    else:  # a strong rank-32 signal over a flat noise floor
        sigma = torch.where(i <= 32, 10.0 * (1.0 - 0.03 * i), torch.full_like(i, 0.05))
    return (u * sigma) @ v.T, sigma


def relative_excess(delta: torch.Tensor, sigma: torch.Tensor, rank: int, **kw) -> float:
    """(randomized error − optimal error) / optimal error at ``rank``."""
    u, s, vh = randomized_svd(pieces_of(delta), *delta.shape, rank=rank,
                              generator=torch.Generator().manual_seed(0), **kw)
    err = torch.linalg.norm((delta - (u * s) @ vh).double()).item()
    best = math.sqrt(float((sigma[rank:].double() ** 2).sum()))
    return (err - best) / best


@pytest.mark.parametrize(("shape", "kind"), [
    ((2048, 5632), "power-law"), ((5632, 2048), "power-law"), ((5632, 2048), "signal+noise"),
    ((2048, 2048), "flat"), ((256, 2048), "flat")])
def test_defaults_reach_the_optimal_error(shape, kind):
    delta, sigma = spectrum_matrix(*shape, kind, seed=1)
    excess = relative_excess(delta, sigma, 64, oversample=OVERSAMPLE, power_iters=POWER_ITERS,
                              tolerance=TOLERANCE)
    assert -1e-4 <= excess <= TOL, excess


def test_power_iterations_are_what_reaches_the_target():
    """Without power iterations (one pass) a flat spectrum misses the target by far: the test
    above would fail if the Krylov blocks did nothing."""
    delta, sigma = spectrum_matrix(1024, 2816, "flat", seed=2)
    plain = relative_excess(delta, sigma, 64, oversample=OVERSAMPLE, power_iters=0)
    iterated = relative_excess(delta, sigma, 64, oversample=OVERSAMPLE, power_iters=POWER_ITERS,
                              tolerance=TOLERANCE)
    assert plain > 10 * TOL and iterated <= TOL, (plain, iterated)


@pytest.mark.slow
@pytest.mark.parametrize(("shape", "kind"), [
    ((32000, 2048), "power-law"), ((5632, 2048), "flat")])
def test_large_shapes_reach_the_optimal_error(shape, kind):
    delta, sigma = spectrum_matrix(*shape, kind, seed=3)
    excess = relative_excess(delta, sigma, 64, oversample=OVERSAMPLE, power_iters=POWER_ITERS,
                              tolerance=TOLERANCE)
    assert -1e-4 <= excess <= TOL, excess


@pytest.mark.parametrize(("kind", "passes"), [("decaying", 4), ("flat", 5)])
def test_tolerance_stops_the_passes_once_they_gain_nothing(kind, passes):
    """A fine-tune-like spectrum (1/i, the bench's `extract-ft`) is found to rounding before
    the last pass: the tolerance stops one pass early at the same error; a Gaussian difference
    keeps gaining and runs every pass. Oracle: the error of all 5 passes (tolerance 0)."""
    g = torch.Generator().manual_seed(4)
    if kind == "flat":
        delta = torch.randn(1024, 2816, generator=g)
    else:
        i = torch.arange(1, 257, dtype=torch.float32)
        delta = (torch.randn(1024, 256, generator=g) / i) @ torch.randn(256, 2816, generator=g)
        delta += 1e-3 * delta.std() * torch.randn(1024, 2816, generator=g)

    def error(tolerance: float, calls: list[int]) -> float:
        u, s, vh = randomized_svd(pieces_of(delta, calls), *delta.shape, rank=64,
                                  oversample=OVERSAMPLE, power_iters=POWER_ITERS,
                                  tolerance=tolerance, generator=torch.Generator().manual_seed(0))
        return torch.linalg.norm((delta - (u * s) @ vh).double()).item()

    every: list[int] = []
    stopped: list[int] = []
    full, early = error(0.0, every), error(TOLERANCE, stopped)
    assert len(every) == POWER_ITERS + 1 and len(stopped) == passes
    assert early <= full * (1 + 1e-5), (early, full)


def test_passes_are_at_most_power_iters_plus_one_and_stop_when_the_blocks_fill():
    """The plan counts ``power_iters + 1`` passes (`RangeFinderFactors.passes`): an upper bound.
    A 300-row Δ is spanned after 3 blocks of 100, and the result is then exact."""
    delta, _ = spectrum_matrix(300, 900, "flat", seed=7)
    calls: list[int] = []
    u, s, vh = randomized_svd(pieces_of(delta, calls), 300, 900, rank=60, oversample=40,
                              power_iters=6, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 3
    exact = torch.linalg.svdvals(delta.double())[:60]
    assert torch.allclose(s.double(), exact, rtol=1e-4)
    calls.clear()
    randomized_svd(pieces_of(delta, calls), 300, 900, rank=8, oversample=8, power_iters=4,
                   generator=torch.Generator().manual_seed(0))
    assert len(calls) == 5


def test_rank_deficient_and_zero_differences_give_fewer_triplets():
    """Δ of rank 5 at rank 16: 5 triplets reproduce it (the rest would be rounding noise, and
    `factors_from_svd` pads with zeros); Δ = 0 gives none rather than dividing by zero."""
    g = torch.Generator().manual_seed(8)
    delta = torch.randn(400, 5, generator=g) @ torch.randn(5, 300, generator=g)
    u, s, vh = randomized_svd(pieces_of(delta), 400, 300, rank=16, oversample=8,
                              power_iters=2, generator=g)
    assert s.shape == (5,) and torch.allclose((u * s) @ vh, delta, atol=1e-4)
    u, s, vh = randomized_svd(pieces_of(torch.zeros(50, 40)), 50, 40, rank=4, oversample=4,
                              power_iters=1, generator=g)
    assert u.shape == (50, 0) and s.shape == (0,) and vh.shape == (0, 40)
    a, b = factors_from_svd(u, s, vh, rank=4, transposed=False)
    assert a.shape == (4, 40) and b.shape == (50, 4) and not a.any() and not b.any()


def test_full_width_sketch_is_an_exact_svd():
    g = torch.Generator().manual_seed(4)
    delta = torch.randn(40, 24, generator=g, dtype=torch.float64)
    u, s, vh = randomized_svd(pieces_of(delta), 40, 24, rank=24, oversample=0, power_iters=0,
                              generator=g, dtype=torch.float64)
    assert torch.allclose((u * s) @ vh, delta, atol=1e-10)
    assert torch.allclose(s, torch.linalg.svdvals(delta), atol=1e-10)


def test_pieces_fold_in_order_so_bytes_do_not_depend_on_the_cut():
    """Whole or in pieces, the same pieces give the same bytes on every call."""
    delta, _ = spectrum_matrix(1500, 700, "signal+noise", seed=5, terms=100)
    run = [randomized_svd(pieces_of(delta), 1500, 700, rank=16, oversample=8, power_iters=1,
                          generator=torch.Generator().manual_seed(9)) for _ in range(2)]
    assert all(torch.equal(x, y) for x, y in zip(*run, strict=True))


@pytest.mark.parametrize("transposed", [False, True])
def test_factors_reproduce_the_product_in_the_module_layout(transposed):
    """B @ A is Δ for a Linear (out, in) and Δᵀ for embeddings / Conv1D stored (in, out);
    ε zeroes small components and a short spectrum is padded to the rank."""
    g = torch.Generator().manual_seed(6)
    delta = torch.randn(7, 5, generator=g, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    a, b = factors_from_svd(u, s, vh, rank=6, transposed=transposed)
    want = delta.T if transposed else delta
    assert a.shape == (6, want.shape[1]) and b.shape == (want.shape[0], 6)
    assert torch.allclose(b @ a, want, atol=1e-12)
    a, b = factors_from_svd(u, s, vh, rank=6, transposed=transposed, epsilon=float(s[2]))
    kept = (u[:, :2] * s[:2]) @ vh[:2]
    assert torch.allclose(b @ a, kept.T if transposed else kept, atol=1e-12)
