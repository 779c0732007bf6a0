"""ops/lowrank.py: the streamed randomized SVD against an exact SVD.

Oracle: Eckart–Young. The best rank-k approximation of Δ errs by √Σ_{i>k} σ_i² in Frobenius
norm; Δ is built from known singular vectors and values, so σ is exact. The randomized
factors at the step's defaults (oversample 16, 2 power iterations) must come within 1% of it
on real-shaped matrices whose spectra look like fine-tuning deltas: a slow power-law decay, and
a low-rank signal over a noise floor.
"""

from __future__ import annotations

import math

import pytest
import torch

from recipekit.graph.passes import piece_bounds
from recipekit.ops.lowrank import factors_from_svd, randomized_svd
from recipekit.steps.extract_lora import OVERSAMPLE, POWER_ITERS


def pieces_of(delta: torch.Tensor):
    """A `MapPieces` over ``delta``, cut as the executor cuts a pass."""
    bounds = piece_bounds(delta.shape[0], delta.shape[1])

    def map_pieces(fn):
        return (fn(lo, hi, delta[lo:hi]) for lo, hi in bounds)

    return map_pieces


def spectrum_matrix(rows: int, cols: int, kind: str, seed: int,
                    terms: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(Δ, σ): Δ = U·diag(σ)·Vᵀ with orthonormal U, V (QR of Gaussians) and ``terms``
    singular values shaped like a fine-tuning delta's, so the exact spectrum is known without
    an SVD of Δ (minutes on a shared 2-core machine for 2048×5632)."""
    g = torch.Generator().manual_seed(seed)
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


@pytest.mark.parametrize("kind", ["power-law", "signal+noise"])
@pytest.mark.parametrize("shape", [(2048, 5632), (5632, 2048)])
def test_defaults_are_within_one_percent_of_optimal(shape, kind):
    delta, sigma = spectrum_matrix(*shape, kind, seed=1)
    excess = relative_excess(delta, sigma, 64, oversample=OVERSAMPLE, power_iters=POWER_ITERS)
    assert -1e-4 <= excess <= 0.01, excess


def test_power_iterations_are_what_reaches_the_target():
    """Without power iterations a power-law spectrum misses the target: the test above would
    fail if the iterations did nothing."""
    delta, sigma = spectrum_matrix(1024, 2816, "power-law", seed=2)
    plain = relative_excess(delta, sigma, 64, oversample=OVERSAMPLE, power_iters=0)
    iterated = relative_excess(delta, sigma, 64, oversample=OVERSAMPLE, power_iters=POWER_ITERS)
    assert plain > 0.01 and iterated <= 0.01, (plain, iterated)


@pytest.mark.slow
def test_embedding_shape_within_one_percent():
    delta, sigma = spectrum_matrix(32000, 2048, "power-law", seed=3)
    assert relative_excess(delta, sigma, 64, oversample=OVERSAMPLE, power_iters=POWER_ITERS) <= 0.01


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
