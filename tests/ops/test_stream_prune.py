"""recipekit/ops/stream_prune.py: pruning task vectors in row pieces.

Oracles:
* magnitude (TIES) and magnitude_outliers (breadcrumbs): the whole-tensor kernels of
  ops/sparsify.py (stable sorts: equal magnitudes, lowest flat index first) on the whole τ,
  bit for bit without rescale and within 1e-6 relative with it (the streamed L1 sums are fp32
  per row added in fp64, the whole kernel's one fp32 sum);
* random (DARE): the counter draw of ops/rng.py (kept where draw < ⌊d·2^24⌋) recomputed here,
  its keep rate within 6σ of d, and the L1 rescale within an ulp of ‖τ‖₁/‖m⊙τ‖₁ computed
  exactly (`math.fsum`) for that mask;
* della_magprune: the keep probabilities of `ops.sparsify.della_keep_probabilities` compared
  with the same draw, and the keep rate of each rank decile within 6σ of its mean probability;
* pieces: any row split gives the same bytes (rules with a rescale: within 1e-6).
"""

from __future__ import annotations

import math

import pytest
import torch

from recipekit.graph import passes as graph_passes
from recipekit.graph.passes import InMemorySource
from recipekit.ops import select
from recipekit.ops.rng import DRAW_BITS, counter_draw
from recipekit.ops.sparsify import della_keep_probabilities, sparsify
from recipekit.ops.stream_prune import WIDTH, prune_rows, prune_rules
from recipekit.steps.task_vectors import needs_stats, stat_passes, stream_key

from tests.helpers.builders import split_rows as split
from tests.helpers.l1 import NEIGHBOURS, exact_l1_norms, nudged


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))




def streamed(xs: list[torch.Tensor], base: torch.Tensor, sparsify_: str,
             densities: list[float], bounds: list[tuple[int, int]], *, rescale: bool = False,
             gammas: list[float] | None = None, epsilons: list[float] | None = None,
             keys: list[int] | None = None, passes: list[int] | None = None,
             cache_masks: bool = False, cached: list[bool] | None = None
             ) -> list[torch.Tensor]:
    """Each pruned task vector (fp32 τ_i = x_i − base), rules from `prune_rules` over the
    pieces ``bounds``, then `prune_rows` piece by piece. ``cached`` receives each task
    vector's masks-cached flag."""
    m = len(xs)
    gammas = gammas or [0.0] * m
    epsilons = epsilons or [0.0] * m
    keys = keys or [0] * m
    source = InMemorySource([*xs, base], bounds)

    class Counting:
        rows = source.rows

        @staticmethod
        def map(fn, every=1):
            if passes is not None:
                passes.append(1)
            return source.map(fn, every=every)

    def deltas(lo, hi, pieces):
        return [p.float() - pieces[-1].float() for p in pieces[:-1]]

    rules = prune_rules(Counting, deltas=deltas, sparsify=sparsify_, densities=densities,
                        gammas=gammas, epsilons=epsilons, keys=keys, rescale=rescale,
                        n=base.numel(), cache_masks=cache_masks)
    bits = -(-base.numel() // 64) if cache_masks and rescale and sparsify_ in (
        "random", "della_magprune") else 0
    assert rules.shape == (m, WIDTH + bits) and rules.dtype == torch.float64
    if cached is not None:
        cached.extend(bool(r[8]) for r in rules)
    out = []
    for i, x in enumerate(xs):
        parts = [prune_rows(x[lo:hi].float() - base[lo:hi].float(), lo, rules[i],
                            sparsify=sparsify_, density=densities[i], epsilon=epsilons[i],
                            key=keys[i]) for lo, hi in bounds]
        out.append(torch.cat(parts))
    return out


def models(kind: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base [40, 24] and three fine-tunes: random fp32, on a coarse grid (many tied |τ|), or
    bf16 weights (τ exact in fp32, on bf16's grid: ties at the cut-off, as in real merges),
    70% of them unchanged ("finetune")."""
    base = randn(40, 24, seed=1)
    if kind == "random":
        return base, [base + 0.1 * randn(40, 24, seed=2 + i) for i in range(3)]
    if kind == "grid":
        return base, [base + torch.round(3 * randn(40, 24, seed=5 + i)) / 32 for i in range(3)]
    if kind == "nonfinite":  # ±inf, NaN and signed zeros among the task vectors
        xs = [base + torch.round(3 * randn(40, 24, seed=11 + i)) / 32 for i in range(3)]
        xs[0][3, :4] = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0])
        xs[1][::5] = base[::5]  # τ = +0 in some rows
        xs[2][7] = base[7] - torch.where(base[7] > 0, 1e-30, -1e-30)  # tiny τ of both signs
        return base, xs
    b = (0.02 * base).bfloat16()
    tuned = [(b.float() + 0.002 * randn(40, 24, seed=8 + i)).bfloat16() for i in range(3)]
    if kind == "finetune":  # a light fine-tune: 70% of τ exact zeros, most cuts among them
        changed = [randn(40, 24, seed=20 + i).abs() > 1.04 for i in range(3)]
        return b, [torch.where(c, x, b) for c, x in zip(changed, tuned, strict=True)]
    return b, tuned


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """fp32 tensors equal bit for bit: the sign of a zero and a NaN count, unlike torch.equal."""
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


MAGNITUDE_CASES = {
    "mixed": ([0.3, 0.5, 0.9], [0.01, 0.1, 0.2]),
    "edges": ([1.0, 0.0, -0.2], [0.01, 0.01, 0.01]),
    "tiny": ([0.001, 1e-9, 0.999], [0.0, 0.5, 0.3]),
    "outliers_win": ([0.7, 0.4, 0.5], [0.6, 0.6, 0.0]),  # d + γ > 1: density wins
}


class TestMagnitude:
    """Oracle: `ops.sparsify.sparsify` on the whole τ (fp32), the stable tie rule, bit for bit
    (a dropped negative entry is −0, as τ·0 gives, whether a piece takes the shrink threshold
    or the key mask)."""

    @pytest.mark.parametrize("kind", ["random", "grid", "bf16", "nonfinite", "finetune"])
    @pytest.mark.parametrize("case", list(MAGNITUDE_CASES))
    @pytest.mark.parametrize("method", ["magnitude", "magnitude_outliers"])
    def test_equals_whole_kernel(self, kind, case, method):
        base, xs = models(kind)
        ds, gs = MAGNITUDE_CASES[case]
        for bounds in (split(40, [40]), split(40, [3]), split(40, [7, 1])):
            got = streamed(xs, base, method, ds, bounds, gammas=gs)
            for x, d, g, y in zip(xs, ds, gs, got, strict=True):
                want = sparsify(x.float() - base.float(), method, density=d, gamma=g)
                assert same_bits(y, want), (bounds[:2], d, g, int((y != want).sum()))

    @pytest.mark.parametrize("kind", ["random", "grid", "bf16"])
    @pytest.mark.parametrize("method", ["magnitude", "magnitude_outliers"])
    def test_rescale_within_1e6(self, kind, method):
        base, xs = models(kind)
        ds, gs = MAGNITUDE_CASES["mixed"]
        for bounds in (split(40, [40]), split(40, [3, 11])):
            got = streamed(xs, base, method, ds, bounds, gammas=gs, rescale=True)
            for x, d, g, y in zip(xs, ds, gs, got, strict=True):
                want = sparsify(x.float() - base.float(), method, density=d, gamma=g,
                                rescale=True)
                assert torch.equal(y != 0, want != 0)
                torch.testing.assert_close(y, want, rtol=1e-6, atol=0)

    def test_rescale_skipped_for_zero_task_vectors_and_density_one(self):
        base, xs = models("grid")
        got = streamed([base.clone(), xs[0]], base, "magnitude", [0.5, 1.0], split(40, [9]),
                       rescale=True)
        assert torch.equal(got[0], torch.zeros_like(base))
        assert torch.equal(got[1], xs[0] - base)

    @pytest.mark.parametrize("collect", [True, False])
    def test_passes(self, collect, monkeypatch):
        """Two histogram passes, a third only for a split tie in a bucket too full to collect
        (`COLLECT_MAX`), one more for the L1 sums; the plan's count is the most it takes."""
        if not collect:
            monkeypatch.setattr(select, "COLLECT_MAX", 0)
            monkeypatch.setattr(graph_passes, "COLLECT_MAX", 0)  # the plan's count reads this one
        base, xs = models("random")
        passes: list[int] = []
        streamed(xs[:1], base, "magnitude", [0.5], split(40, [8]), passes=passes)
        assert len(passes) == 2
        base, xs = models("grid")
        for rescale in (False, True):
            passes.clear()
            streamed(xs, base, "magnitude_outliers", [0.5, 0.3, 0.6], split(40, [8]),
                     gammas=[0.1] * 3, rescale=rescale, passes=passes)
            most = stat_passes("magnitude_outliers", rescale, base.numel())
            assert len(passes) == most == (2 if collect else 3) + rescale


def draw_mask(key: int, shape: tuple[int, ...], limit: torch.Tensor | int) -> torch.Tensor:
    rows = shape[0] if shape else 1
    draw = counter_draw(key, 0, rows, math.prod(shape) // max(1, rows)).reshape(shape)
    return draw.to(torch.float64) < limit if isinstance(limit, torch.Tensor) else draw < limit


def assert_l1_rescaled(y: torch.Tensor, tau: torch.Tensor, keep: torch.Tensor) -> None:
    """``y`` is τ ⊙ m times one fp32 factor within an ulp of ‖τ‖₁/‖m⊙τ‖₁ summed exactly
    (tests/helpers/l1.py)."""
    kept = tau * keep.to(tau.dtype)
    before, after = exact_l1_norms(tau, kept)
    assert any(torch.equal(y, kept * nudged(before / after, u)) for u in NEIGHBOURS)


def within(count: int, n: int, p: float, sigmas: float = 6.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


class TestRandom:
    """Oracle: the counter draw recomputed whole (`draw_mask`), keep rates vs d."""

    KEYS = [stream_key(0, "w", i) for i in range(3)]

    @pytest.mark.parametrize(("rescale", "cache_masks"), [(False, False), (True, False),
                                                          (True, True)])
    def test_mask_is_the_counter_draw(self, rescale, cache_masks):
        """With ``cache_masks`` the output pass reads the masks the L1 pass kept: the same
        draw (pieces start on whole bytes of the mask: every one is cached)."""
        base, xs = randn(300, 64, seed=1), [randn(300, 64, seed=2 + i) for i in range(3)]
        ds = [0.1, 0.5, 0.9]
        cached: list[bool] = []
        got = streamed(xs, base, "random", ds, split(300, [17, 64]), keys=self.KEYS,
                       rescale=rescale, cache_masks=cache_masks, cached=cached)
        assert cached == [cache_masks] * 3
        for x, d, key, y in zip(xs, ds, self.KEYS, got, strict=True):
            tau = x - base
            keep = draw_mask(key, tau.shape, int(d * (1 << DRAW_BITS)))
            assert within(int(keep.sum()), keep.numel(), d)
            if rescale:
                assert_l1_rescaled(y, tau, keep)
            else:
                assert torch.equal(y, tau * keep)

    def test_pieces_do_not_matter(self):
        base, xs = randn(64, 33, seed=3), [randn(64, 33, seed=4)]
        outs = [streamed(xs, base, "random", [0.4], split(64, s), keys=self.KEYS[:1],
                         rescale=False)[0] for s in ([64], [1], [5, 2])]
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])

    def test_edges(self):
        base, xs = randn(20, 8, seed=5), [randn(20, 8, seed=6 + i) for i in range(2)]
        got = streamed(xs, base, "random", [1.0, 0.0], split(20, [3]), keys=self.KEYS[:2],
                       rescale=True)
        assert torch.equal(got[0], xs[0] - base)  # d = 1: nothing drawn, nothing rescaled
        assert torch.equal(got[1], torch.zeros_like(base))  # d = 0: all dropped, no rescale
        with pytest.raises(ValueError, match="density must be in"):
            streamed(xs[:1], base, "random", [-0.1], split(20, [3]), keys=self.KEYS[:1])

    def test_operands_draw_independent_masks(self):
        base = torch.zeros(200, 100)
        xs = [torch.ones(200, 100)] * 2
        a, b = streamed(xs, base, "random", [0.5, 0.5], split(200, [200]), keys=self.KEYS[:2])
        both = int(((a != 0) & (b != 0)).sum())
        assert within(both, a.numel(), 0.25)


class TestDella:
    """Oracle: p from `della_keep_probabilities` against the same counter draw; per rank
    decile, the keep rate within 6σ of the decile's mean p."""

    @pytest.mark.parametrize(("sizes", "cache_masks", "cached"), [
        ([7], False, False), ([8], True, True), ([7], True, False), ([60], True, True)])
    def test_mask_and_rescale(self, sizes, cache_masks, cached):
        """Kept masks where pieces start on a whole byte of the mask (8 rows of 50); where
        one does not (7 rows), nothing is kept and the output pass draws again: same output."""
        base, xs = randn(60, 50, seed=1), [randn(60, 50, seed=2 + i) for i in range(2)]
        keys = [stream_key(1, "w", i) for i in range(2)]
        ds, es = [0.5, 0.3], [0.15, 0.2]
        flags: list[bool] = []
        got = streamed(xs, base, "della_magprune", ds, split(60, sizes), epsilons=es,
                       keys=keys, rescale=True, cache_masks=cache_masks, cached=flags)
        assert flags == [cached] * 2
        for x, d, e, key, y in zip(xs, ds, es, keys, got, strict=True):
            tau = x - base
            p = della_keep_probabilities(tau, density=d, epsilon=e)
            keep = draw_mask(key, tau.shape, p.double() * (1 << DRAW_BITS))
            assert_l1_rescaled(y, tau, keep)

    @pytest.mark.parametrize(("d", "e"), [(0.5, 0.15), (0.2, 0.19), (0.7, 0.05)])
    def test_keep_rate_per_rank_decile(self, d, e):
        rows, length = 2000, 40
        base, x = torch.zeros(rows, length), randn(rows, length, seed=3)
        (y,) = streamed([x], base, "della_magprune", [d], split(rows, [256]), epsilons=[e],
                        keys=[stream_key(0, "della", 0)])
        rank = x.abs().argsort(dim=1).argsort(dim=1)  # 0 = smallest in its row
        p = (d - e) + 2 * e * rank.double() / (length - 1)
        kept = y != 0
        for decile in range(10):
            sel = (rank * 10 // length) == decile
            n, mean_p = int(sel.sum()), float(p[sel].mean())
            assert within(int(kept[sel].sum()), n, mean_p), (decile, mean_p)
        assert within(int(kept.sum()), kept.numel(), d)

    def test_edges_and_errors(self):
        base, x = randn(10, 6, seed=4), randn(10, 6, seed=5)
        key = [stream_key(0, "w", 0)]
        (zero,) = streamed([x], base, "della_magprune", [0.0], split(10, [4]), epsilons=[0.1],
                           keys=key)
        assert torch.equal(zero, torch.zeros_like(base))
        (same,) = streamed([x], base, "della_magprune", [1.0], split(10, [4]), epsilons=[0.1],
                           keys=key)
        assert torch.equal(same, x - base)
        with pytest.raises(ValueError, match="density ± epsilon inside"):
            streamed([x], base, "della_magprune", [0.5], split(10, [4]), epsilons=[0.5],
                     keys=key)


def test_needs_stats():
    assert needs_stats("magnitude", False) and needs_stats("magnitude_outliers", False)
    assert needs_stats("random", True) and needs_stats("della_magprune", True)
    assert not needs_stats("random", False) and not needs_stats("della_magprune", False)
    assert stat_passes("random", True) == 1 and stat_passes("magnitude", True) == 5
