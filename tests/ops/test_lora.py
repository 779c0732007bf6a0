"""ops/lora.py against the reference formulas (reference/adapters.md §2, §5), in float64."""

from __future__ import annotations

import torch

from recipekit.ops.lora import combine_deltas, fold_sequential, lora_delta, svd_factors


def test_lora_delta_sums_scaled_products_and_transposes():
    g = torch.Generator().manual_seed(0)
    a1, b1 = torch.randn(2, 5, generator=g), torch.randn(3, 2, generator=g)
    a2, b2 = torch.randn(4, 5, generator=g), torch.randn(3, 4, generator=g)
    want = 0.5 * b1 @ a1 - 2.0 * b2 @ a2
    got = lora_delta([(a1, b1), (a2, b2)], [0.5, -2.0], transposed=False)
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(lora_delta([(a1, b1)], [1.0], transposed=True), (b1 @ a1).T)


def test_dora_sequential_norm_uses_the_original_weight():
    """W' = f ⊙ (W_prev + Δ_dora), f = m/‖W₀ + Δ_dora‖ (per output row of (out, in))."""
    g = torch.Generator().manual_seed(1)
    w0, d1, d2 = (torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(3))
    m = torch.rand(3, generator=g, dtype=torch.float64) + 0.5
    f = m / torch.linalg.vector_norm(w0 + d2, dim=1)
    want = f[:, None] * (w0 + d1 + d2)
    got = fold_sequential(w0, [d1, d2], [None, m], [1, 1])
    assert torch.allclose(got, want, atol=1e-12)
    # fan_in_fan_out / embeddings: the norm runs over axis 0, one value per column
    f0 = m / torch.linalg.vector_norm(w0.T + d2.T, dim=0)
    got_t = fold_sequential(w0.T, [d2.T], [m], [0])
    assert torch.allclose(got_t, f0[None, :] * (w0.T + d2.T), atol=1e-12)


def test_svd_factors_error_is_the_discarded_singular_values():
    g = torch.Generator().manual_seed(2)
    m = torch.randn(6, 9, generator=g, dtype=torch.float64)
    s = torch.linalg.svdvals(m)
    for k in (1, 3, 6):
        a, b = svd_factors(m, rank=k, transposed=False)
        assert a.shape == (k, 9) and b.shape == (6, k)
        err = torch.linalg.norm(m - b @ a).item()
        assert abs(err - s[k:].pow(2).sum().sqrt().item()) < 1e-10
    a, b = svd_factors(m.T, rank=8, transposed=True)  # padded past the matrix rank
    assert a.shape == (8, 9) and torch.allclose(b @ a, m, atol=1e-10)


def test_combine_sum_is_weighted_sum():
    x, y = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 4.0])
    assert torch.equal(combine_deltas("sum", [x, y], weights=[0.5, 2.0]),
                       torch.tensor([6.5, 7.0]))
