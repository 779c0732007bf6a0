"""recipekit/ops/sparsify.py: pruning kernels and TIES sign consensus.

Oracles: the formulas of reference/merge-methods.md §2.6–2.7 recomputed directly here (fp64
where it matters), and mergekit 0.1.5's statistics of its random sparsifiers on 256×256
tensors (tests/goldens/merge/random_stats.json, written by make_merge_goldens.py).
"""

from __future__ import annotations

import doctest
import json
import math
from pathlib import Path

import pytest
import torch

from recipekit.ops import sparsify as sp

GOLDENS = Path(__file__).resolve().parent.parent / "goldens" / "merge"


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_docstring_examples_run():
    """Oracle: the outputs written in the docstrings."""
    result = doctest.testmod(sp, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 10


class TestComputeDtype:
    """Oracle: DESIGN.md §2: fp32, or fp64 when an input is fp64."""

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
    def test_fp32(self, dtype):
        assert sp.compute_dtype(torch.zeros(1, dtype=dtype)) == torch.float32
        assert sp.magnitude_prune(torch.ones(4, dtype=dtype), density=0.5).dtype == torch.float32

    def test_fp64(self):
        x = torch.zeros(1, dtype=torch.float64)
        assert sp.compute_dtype(torch.zeros(1), x) == torch.float64
        assert sp.breadcrumbs_prune(randn(8).double(), density=0.5).dtype == torch.float64


class TestApplyMask:
    """Oracle: τ̃ = m⊙τ·‖τ‖₁/‖m⊙τ‖₁, no rescale below 1e-7 (reference §2.6 "Rescale")."""

    def test_l1_identity(self):
        tau = randn(16, 24)
        mask = (randn(16, 24, seed=1) > 0).float()
        out = sp.apply_mask(tau, mask, rescale=True)
        factor = tau.double().abs().sum() / (mask.double() * tau.double()).abs().sum()
        torch.testing.assert_close(out.double(), mask.double() * tau.double() * factor,
                                   atol=1e-6, rtol=0)
        torch.testing.assert_close(out.abs().sum(), tau.abs().sum(), atol=0, rtol=1e-6)

    def test_without_rescale_keeps_values(self):
        tau = randn(10)
        mask = torch.tensor([1.0, 0] * 5)
        assert torch.equal(sp.apply_mask(tau, mask), tau * mask)

    def test_tiny_norms_are_not_rescaled(self):
        tau = torch.full((4,), 1e-9)
        mask = torch.tensor([1.0, 0, 0, 0])
        assert torch.equal(sp.apply_mask(tau, mask, rescale=True), tau * mask)
        tau = torch.tensor([1.0, 1e-9, 0, 0])
        mask = torch.tensor([0.0, 1, 0, 0])
        assert torch.equal(sp.apply_mask(tau, mask, rescale=True), tau * mask)


class TestMagnitude:
    """Oracle: keep the max(1, ⌊d·n⌋) largest |τ| (fp64 sort of distinct magnitudes)."""

    @pytest.mark.parametrize("density", [0.1, 0.33, 0.5, 0.9])
    def test_formula(self, density):
        tau = randn(16, 24)
        k = max(1, math.floor(density * tau.numel()))
        threshold = tau.double().abs().flatten().sort(descending=True).values[k - 1]
        expected = torch.where(tau.double().abs() >= threshold, tau.double(), 0.0)
        out = sp.magnitude_prune(tau, density=density)
        assert torch.equal(out.double(), expected)
        assert int((out != 0).sum()) == k

    def test_keeps_at_least_one(self):
        out = sp.magnitude_prune(torch.tensor([0.1, -5.0, 0.3]), density=0.01)
        assert torch.equal(out, torch.tensor([0.0, -5.0, 0.0]))

    def test_density_one_is_a_no_op(self):
        tau = randn(6, 5)
        for density in (1.0, 1.5):
            out = sp.magnitude_prune(tau, density=density, rescale=True)
            assert torch.equal(out, tau) and out is not tau

    def test_density_zero_and_empty(self):
        assert torch.equal(sp.magnitude_prune(randn(5), density=0.0), torch.zeros(5))
        assert torch.equal(sp.magnitude_prune(randn(5), density=-1.0), torch.zeros(5))
        assert sp.magnitude_prune(torch.zeros(0, 3), density=0.5).shape == (0, 3)

    def test_rescale(self):
        tau = randn(16, 24)
        out = sp.magnitude_prune(tau, density=0.3, rescale=True)
        torch.testing.assert_close(out.abs().sum(), tau.abs().sum(), atol=0, rtol=1e-6)

    def test_input_not_modified(self):
        tau = randn(7)
        copy = tau.clone()
        sp.magnitude_prune(tau, density=0.5, rescale=True)
        assert torch.equal(tau, copy)


class TestBreadcrumbs:
    """Oracle: keep ascending-|τ| positions [bot, bot+keep), keep = ⌊d·n⌋, top = ⌊γ·n⌋,
    bot = max(0, n − keep − top) (reference §2.6, the 0.1.5 slice)."""

    def expected(self, tau, density, gamma):
        n = tau.numel()
        keep, top = math.floor(density * n), math.floor(gamma * n)
        bot = max(0, n - keep - top)
        order = tau.double().abs().flatten().argsort()
        mask = torch.zeros(n, dtype=torch.float64)
        mask[order[bot:bot + keep]] = 1
        return tau.double() * mask.reshape(tau.shape)

    @pytest.mark.parametrize(("density", "gamma"), [(0.8, 0.05), (0.5, 0.1), (0.9, 0.2),
                                                    (0.3, 0.0), (0.5, 0.001)])
    def test_formula(self, density, gamma):
        tau = randn(16, 24, seed=3)
        out = sp.breadcrumbs_prune(tau, density=density, gamma=gamma)
        assert torch.equal(out.double(), self.expected(tau, density, gamma))

    def test_outliers_dropped(self):
        tau = torch.arange(1.0, 11.0)
        out = sp.breadcrumbs_prune(tau, density=0.5, gamma=0.2)
        assert torch.equal(out, torch.tensor([0, 0, 0, 4, 5, 6, 7, 8, 0, 0.0]))

    def test_gamma_below_one_element_keeps_the_top(self):
        """0.1.4's slice [bot:-0] zeroed everything here; 0.1.5 keeps the largest ⌊d·n⌋."""
        tau = torch.arange(1.0, 11.0)
        out = sp.breadcrumbs_prune(tau, density=0.3, gamma=0.01)
        assert torch.equal(out, torch.tensor([0, 0, 0, 0, 0, 0, 0, 8, 9, 10.0]))

    def test_density_wins_over_gamma(self):
        tau = torch.arange(1.0, 11.0)
        out = sp.breadcrumbs_prune(tau, density=0.9, gamma=0.5)
        assert torch.equal(out, torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9, 0.0]))

    def test_density_one_has_no_outlier_removal(self):
        tau = randn(5, 4)
        assert torch.equal(sp.breadcrumbs_prune(tau, density=1.0, gamma=0.3), tau)

    def test_density_zero(self):
        assert torch.equal(sp.breadcrumbs_prune(randn(9), density=0.0), torch.zeros(9))


def load_random_stats() -> dict:
    return json.loads((GOLDENS / "random_stats.json").read_text())


def stats_tau() -> torch.Tensor:
    return torch.randn(256, 256, generator=torch.Generator().manual_seed(7))


class TestBernoulli:
    """Oracles: reproducibility by generator seed; keep rate ≈ d (binomial, 5σ); mergekit's
    statistics in random_stats.json (same seed: identical mask count, since both draw
    torch.bernoulli from a CPU mt19937 seeded alike; other seeds: within 5σ)."""

    def test_same_seed_same_mask_other_seed_other_mask(self):
        tau = randn(64, 64)
        a = sp.bernoulli_prune(tau, density=0.4, generator=gen(3))
        b = sp.bernoulli_prune(tau, density=0.4, generator=gen(3))
        c = sp.bernoulli_prune(tau, density=0.4, generator=gen(4))
        assert torch.equal(a, b)
        assert not torch.equal(a, c)

    def test_global_rng_untouched(self):
        state = torch.random.get_rng_state()
        sp.bernoulli_prune(randn(100), density=0.5, generator=gen(0))
        sp.della_prune(randn(4, 25), density=0.5, epsilon=0.1, generator=gen(0))
        assert torch.equal(torch.random.get_rng_state(), state)

    def test_needs_a_generator(self):
        with pytest.raises(ValueError, match="pass a torch.Generator"):
            sp.bernoulli_prune(randn(4), density=0.5, generator=None)

    def test_negative_density(self):
        with pytest.raises(ValueError, match="density must be in"):
            sp.bernoulli_prune(randn(4), density=-0.1, generator=gen(0))

    def test_density_one_draws_nothing(self):
        g = gen(0)
        state = g.get_state()
        tau = randn(8)
        assert torch.equal(sp.bernoulli_prune(tau, density=1.0, generator=g), tau)
        assert torch.equal(g.get_state(), state)

    def test_density_zero_draws_like_mergekit(self):
        """d = 0 keeps nothing but still consumes the stream, as mergekit's bernoulli does."""
        g = gen(0)
        state = g.get_state()
        assert torch.equal(sp.bernoulli_prune(randn(8), density=0.0, generator=g),
                           torch.zeros(8))
        assert not torch.equal(g.get_state(), state)

    @pytest.mark.parametrize("density", [0.1, 0.3, 0.5, 0.9])
    def test_keep_rate_and_rescale(self, density):
        tau = stats_tau()
        n = tau.numel()
        for seed in (11, 12):
            out = sp.bernoulli_prune(tau, density=density, rescale=True, generator=gen(seed))
            kept = (out != 0).double().mean().item()
            assert abs(kept - density) < 5 * math.sqrt(density * (1 - density) / n)
            mask = out != 0
            factor = (tau.abs().sum() / tau[mask].abs().sum()).item()
            torch.testing.assert_close(out[mask] / tau[mask],
                                       torch.full((int(mask.sum()),), factor),
                                       atol=0, rtol=2e-6)
            # the L1 factor is near 1/d but not equal to it (not DARE's 1/p)
            assert abs(factor * density - 1) < 0.05

    @pytest.mark.parametrize("density", [0.3, 0.7])
    def test_rescale_keeps_the_expected_mean(self, density):
        """E[τ̃] ≈ τ on average: the kept mean matches the full mean within 5σ."""
        tau = 0.5 + stats_tau()
        out = sp.bernoulli_prune(tau, density=density, rescale=True, generator=gen(21))
        sigma = tau.pow(2).mean().sqrt().item() * math.sqrt((1 - density) / density / tau.numel())
        assert abs(out.mean().item() - tau.mean().item()) < 5 * sigma + 1e-3

    def test_matches_mergekit_statistics(self):
        tau = stats_tau()
        n = tau.numel()
        for row in load_random_stats()["bernoulli"]:
            d = row["density"]
            out = sp.bernoulli_prune(tau, density=d, rescale=True, generator=gen(row["seed"]))
            mask = out != 0
            assert mask.double().mean().item() == row["kept"]
            factor = (out[mask] / tau[mask]).mean().item()
            assert factor == pytest.approx(row["l1_ratio"], rel=1e-5)
            other = sp.bernoulli_prune(tau, density=d, generator=gen(row["seed"] + 100))
            kept = (other != 0).double().mean().item()
            assert abs(kept - row["kept"]) < 5 * math.sqrt(2 * d * (1 - d) / n)


class TestDellaProbabilities:
    """Oracle: p = (d − ε) + 2ε·r/(L−1), r the ascending rank of |τ| in its row along dim 1."""

    def test_formula_per_row(self):
        tau = randn(5, 40)
        p = sp.della_keep_probabilities(tau, density=0.4, epsilon=0.1)
        for i in range(5):
            ranks = tau[i].double().abs().argsort().argsort().double()
            expected = 0.3 + 0.2 * ranks / 39
            torch.testing.assert_close(p[i].double(), expected, atol=1e-7, rtol=0)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
    def test_equal_magnitudes_rank_by_index(self, dtype):
        """Tied rows (quantized, signed zeros, inf, NaN): the rank is the stable one, equal
        magnitudes lower index first, for every dtype's key path."""
        tau = torch.round(randn(6, 50) * 2) / 2
        tau[0, :10] = torch.tensor([0.0, -0.0] * 5)
        tau[1, 3], tau[1, 7], tau[1, 9] = float("inf"), float("nan"), -float("inf")
        tau = tau.to(dtype)
        p = sp.della_keep_probabilities(tau, density=0.5, epsilon=0.2)
        mag = tau.double().abs()
        ranks = torch.argsort(torch.argsort(mag, dim=1, stable=True), dim=1, stable=True)
        expected = 0.3 + 0.4 * ranks.double() / 49
        torch.testing.assert_close(p.double(), expected, atol=1e-7, rtol=0)

    def test_range_and_mean(self):
        p = sp.della_keep_probabilities(randn(8, 101), density=0.5, epsilon=0.15)
        assert p.min().item() == pytest.approx(0.35) and p.max().item() == pytest.approx(0.65)
        torch.testing.assert_close(p.double().mean(dim=1), torch.full((8,), 0.5,
                                   dtype=torch.float64), atol=1e-6, rtol=0)

    def test_one_d_is_one_row(self):
        tau = randn(30)
        p1 = sp.della_keep_probabilities(tau, density=0.5, epsilon=0.1)
        p2 = sp.della_keep_probabilities(tau.reshape(1, 30), density=0.5, epsilon=0.1)
        assert torch.equal(p1, p2.reshape(30))

    def test_nd_ranks_along_dim_1(self):
        tau = randn(3, 7, 4)
        p = sp.della_keep_probabilities(tau, density=0.5, epsilon=0.2)
        for i in range(3):
            for k in range(4):
                ranks = tau[i, :, k].double().abs().argsort().argsort().double()
                torch.testing.assert_close(p[i, :, k].double(), 0.3 + 0.4 * ranks / 6,
                                           atol=1e-7, rtol=0)

    @pytest.mark.parametrize("shape", [(16, 1), (1,), ()])
    def test_length_one_rows_raise(self, shape):
        with pytest.raises(ValueError, match="at least 2"):
            sp.della_keep_probabilities(torch.ones(shape), density=0.5, epsilon=0.1)


class TestDella:
    """Oracles: the probability formula; the ε contract (mergekit's ValueError); mergekit's
    kept fraction by rank decile in random_stats.json (same seed: identical; others: 5σ)."""

    @pytest.mark.parametrize(("density", "epsilon"), [(0.1, 0.15), (0.9, 0.15), (0.5, 0.5)])
    def test_epsilon_contract(self, density, epsilon):
        with pytest.raises(ValueError, match="density ± epsilon inside"):
            sp.della_prune(randn(4, 4), density=density, epsilon=epsilon, generator=gen(0))

    def test_density_bounds_draw_nothing(self):
        g = gen(0)
        state = g.get_state()
        tau = randn(4, 4)
        assert torch.equal(sp.della_prune(tau, density=1.0, generator=g), tau)
        assert torch.equal(sp.della_prune(tau, density=0.0, generator=g), torch.zeros(4, 4))
        assert torch.equal(g.get_state(), state)

    def test_needs_a_generator(self):
        with pytest.raises(ValueError, match="pass a torch.Generator"):
            sp.della_prune(randn(4, 4), density=0.5, generator=None)

    def test_mask_is_bernoulli_of_p(self):
        """Given the generator state, the mask is exactly torch.bernoulli(p)."""
        tau = randn(16, 24)
        p = sp.della_keep_probabilities(tau, density=0.5, epsilon=0.15)
        mask = torch.bernoulli(p, generator=gen(5))
        out = sp.della_prune(tau, density=0.5, epsilon=0.15, generator=gen(5))
        assert torch.equal(out, tau * mask)

    def test_matches_mergekit_statistics(self):
        tau = stats_tau()
        ranks = tau.abs().argsort(dim=1).argsort(dim=1)
        low, high = ranks < 26, ranks >= 230
        for row in load_random_stats()["della"]:
            d, e = row["density"], row["epsilon"]
            out = sp.della_prune(tau, density=d, epsilon=e, generator=gen(row["seed"]))
            mask = out != 0
            assert mask.float().mean().item() == row["kept"]
            assert mask[low].float().mean().item() == row["kept_bottom_decile"]
            assert mask[high].float().mean().item() == row["kept_top_decile"]
            other = sp.della_prune(tau, density=d, epsilon=e, generator=gen(row["seed"] + 100))
            m2 = other != 0
            n_dec = int(low.sum())
            p_low, p_high = d - e + 2 * e * 12.5 / 255, d + e - 2 * e * 12.5 / 255
            for sub, p in ((m2[low], p_low), (m2[high], p_high)):
                assert abs(sub.float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n_dec)
            assert abs(m2.float().mean().item() - d) < 5 * math.sqrt(d * (1 - d) / tau.numel())


class TestSignConsensus:
    """Oracle: s = +1 where Σδ ≥ 0 else −1 ("sum"; "count" on signs); m_i = [sign δ_i = s]."""

    def test_sum_election_is_weighted(self):
        deltas = torch.tensor([[3.0, -1.0, 0.0, 1.0], [-1.0, -1.0, 0.0, -1.0],
                               [-1.0, 3.0, 0.0, 0.0]])
        assert torch.equal(sp.elect_sign(deltas), torch.tensor([1.0, 1.0, 1.0, 1.0]))
        assert torch.equal(sp.elect_sign(deltas, method="count"),
                           torch.tensor([-1.0, -1.0, 1.0, 1.0]))

    def test_zeros_never_agree(self):
        deltas = torch.tensor([[0.0, 2.0], [0.0, -1.0]])
        mask = sp.sign_consensus_mask(deltas)
        assert torch.equal(mask, torch.tensor([[False, True], [False, False]]))

    def test_int8_same_mask(self):
        deltas = randn(3, 16, 24)
        assert torch.equal(sp.sign_consensus_mask(deltas),
                           sp.sign_consensus_mask(deltas, int8=True))

    def test_formula_random(self):
        deltas = randn(4, 50)
        s = torch.where(deltas.double().sum(0) >= 0, 1.0, -1.0).to(torch.float64)
        expected = torch.sign(deltas.double()) == s
        assert torch.equal(sp.sign_consensus_mask(deltas), expected)

    @pytest.mark.parametrize("m", [1, 2, 3])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_numpy_path_on_special_values(self, m, dtype):
        """The CPU mask (numpy compares against the sum's sign) is the formula's with torch's
        sign and election: ±0 never agree, NaN never agrees and a NaN or inf − inf sum elects
        −1, ±inf and subnormals keep their signs; a transposed (strided) stack too."""
        special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e38,
                                -1e38, 1e-45, -1e-45, -3.5, 0.25, 7.0], dtype=dtype)
        pick = torch.randint(len(special), (m, 40, 300), generator=torch.Generator().manual_seed(m))
        for deltas in (special[pick], special[pick].transpose(1, 2)):
            expected = torch.sign(deltas) == sp.elect_sign(deltas)
            assert torch.equal(sp.sign_consensus_mask(deltas), expected)

    def test_unknown_method(self):
        with pytest.raises(ValueError, match="unknown sign consensus"):
            sp.elect_sign(randn(2, 2), method="vote")


class TestSceTopk:
    """Oracle: keep the ⌊nnz(v)·f⌋ entries of largest population variance across inputs."""

    def test_formula(self):
        deltas = randn(3, 16, 24)
        v = deltas.double().var(dim=0, unbiased=False)
        k = math.floor(int((v != 0).sum()) * 0.3)
        threshold = v.flatten().sort(descending=True).values[k - 1]
        expected = (v >= threshold).float()
        assert torch.equal(sp.sce_topk_mask(deltas, fraction=0.3), expected)

    def test_bounds(self):
        deltas = randn(2, 5)
        assert torch.equal(sp.sce_topk_mask(deltas, fraction=1.0), torch.ones(5))
        assert torch.equal(sp.sce_topk_mask(deltas, fraction=0.0), torch.zeros(5))
        assert torch.equal(sp.sce_topk_mask(deltas, fraction=0.1), torch.zeros(5))  # k = 0

    def test_zero_variance_entries_do_not_count(self):
        deltas = torch.tensor([[1.0, 1.0, 0.0, 5.0], [1.0, 1.0, 2.0, 1.0]])
        assert torch.equal(sp.sce_topk_mask(deltas, fraction=0.5), torch.tensor([0, 0, 0, 1.0]))


class TestDispatch:
    """Oracle: `sparsify` calls the function its mergekit name stands for."""

    def test_names(self):
        tau = randn(8, 8)
        assert torch.equal(sp.sparsify(tau, "magnitude", density=0.5),
                           sp.magnitude_prune(tau, density=0.5))
        assert torch.equal(sp.sparsify(tau, "magnitude_outliers", density=0.5, gamma=0.1),
                           sp.breadcrumbs_prune(tau, density=0.5, gamma=0.1))
        assert torch.equal(sp.sparsify(tau, "random", density=0.5, generator=gen(1)),
                           sp.bernoulli_prune(tau, density=0.5, generator=gen(1)))
        assert torch.equal(
            sp.sparsify(tau, "della_magprune", density=0.5, epsilon=0.1, generator=gen(1)),
            sp.della_prune(tau, density=0.5, epsilon=0.1, generator=gen(1)))

    def test_unknown(self):
        with pytest.raises(ValueError, match="unknown sparsifier 'topk'"):
            sp.sparsify(randn(3), "topk", density=0.5)


class TestPopulationVariance:
    """Oracle: ``torch.var(x, dim=0, correction=0)``, bit for bit (the SCE selection must not
    move), for M = 1..5 task vectors, fp32 and fp64, with NaN, ±inf, ±0 and tiny values."""

    @pytest.mark.parametrize("m", [1, 2, 3, 5])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_bits_of_torch_var(self, m, dtype):
        x = (randn(m, 33, 70) * 0.01).to(dtype)
        x[:, 0, :6] = torch.tensor([0.0, -0.0, 1e-30, 3.0, float("inf"), float("nan")],
                                   dtype=dtype)
        x[0, 1, :3] = torch.tensor([-float("inf"), 1e38, -1e38], dtype=dtype)
        before = x.clone()
        got, want = sp.population_variance(x), torch.var(x, dim=0, correction=0)
        assert got.dtype == want.dtype
        int_type = torch.int32 if dtype == torch.float32 else torch.int64
        assert torch.equal(got.view(int_type), want.view(int_type))
        assert torch.equal(x.view(int_type), before.view(int_type))  # the input is untouched

    @pytest.mark.parametrize("m", [1, 2, 3, 4])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_bits_of_torch_var_on_mixed_special_values(self, m, dtype):
        """Every task vector draws each entry from ±0, ±inf, NaN, extremes and ordinary
        values independently: the first update's closed form must give torch's bits, but for
        the sign of a NaN (torch's vectorized loop gives −NaN for e.g. [inf, NaN]; SCE keys
        on |v|, where the sign is gone)."""
        special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e38,
                                -1e38, 1e-45, -3.5, 0.25, 7.0], dtype=dtype)
        pick = torch.randint(len(special), (m, 4000), generator=torch.Generator().manual_seed(m))
        x = special[pick]
        got, want = sp.population_variance(x), torch.var(x, dim=0, correction=0)
        int_type = torch.int32 if dtype == torch.float32 else torch.int64
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got.abs().view(int_type), want.abs().view(int_type))

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_two_task_vectors_every_pair(self, dtype):
        """Two task vectors take a shorter sequence of ops (`sparsify._welford_two`): every
        ordered pair of special values, signed zeros, the smallest subnormal beside the
        largest values and pairs whose difference rounds gives torch's bits, NaN for NaN."""
        special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e38,
                                -1e38, 1e-45, -1e-45, 1e-30, -3.5, 0.25, 7.0, 1.0 + 2**-23,
                                -(2.0 ** 40), 3e-8], dtype=dtype)
        first, second = torch.meshgrid(special, special, indexing="ij")
        x = torch.stack([first.reshape(-1), second.reshape(-1)])
        got, want = sp.population_variance(x), torch.var(x, dim=0, correction=0)
        int_type = torch.int32 if dtype == torch.float32 else torch.int64
        assert torch.equal(got.isnan(), want.isnan())
        finite = ~want.isnan()
        assert torch.equal(got[finite].view(int_type), want[finite].view(int_type))

    def test_other_dtypes_and_a_vector(self):
        x = randn(3, 40).bfloat16()
        assert torch.equal(sp.population_variance(x), torch.var(x, dim=0, correction=0))
        v = randn(7)
        assert torch.equal(sp.population_variance(v), torch.var(v, dim=0, correction=0))
