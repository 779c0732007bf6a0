"""recipekit/ops/select.py: exact top-k by magnitude in passes over row pieces.

Oracle: a stable descending ``torch.argsort`` of |x| as fp32 (equal magnitudes: lowest flat
index first), whose first k positions are the kept set; `select_cuts` + `keep_mask` over any
row pieces (`graph.passes.InMemorySource` with small, uneven bounds) must give exactly that
set: on random, heavily tied (quantized), all-equal, ±0, NaN/inf-containing, 1-D and
one-element inputs, for k = 0, 1, n − 1, n and beyond, and (hypothesis) on random partitions.
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recipekit.graph.passes import InMemorySource, piece_bounds
from recipekit.ops import select
from recipekit.ops.select import KEEP_ALL, KEEP_NONE, keep_mask, magnitude_key, select_cuts

from tests.helpers.builders import split_rows as split


def stable_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """The oracle: the first k of the stable descending argsort of |x| (fp32), as a mask."""
    flat = x.abs().reshape(-1).float()
    order = torch.argsort(flat, descending=True, stable=True)
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[order[:max(0, k)]] = True
    return keep.reshape(x.shape)




def streamed_masks(xs: list[torch.Tensor], queries: list[tuple[int, int]],
                   bounds: list[tuple[int, int]], passes: list[int] | None = None,
                   k_of_nonzero=None) -> list[torch.Tensor]:
    """Each query's kept set found by `select_cuts` over the pieces ``bounds`` of the streams
    ``xs`` (same rows), then `keep_mask` applied piece by piece. ``passes`` counts the passes."""
    rows_of = [x.reshape(1) if x.dim() == 0 else x for x in xs]
    source = InMemorySource(rows_of, bounds)

    def counting_map(fn, every=1):
        if passes is not None:
            passes.append(1 if every == 1 else every)  # a sample pass counts as its stride
        return source.map(fn, every=every)

    n = xs[0].numel()
    cuts = select_cuts(counting_map, lambda lo, hi, p: [magnitude_key(t) for t in p], queries,
                       n, source.rows, k_of_nonzero=k_of_nonzero)
    out = []
    for (s, _), cut in zip(queries, cuts, strict=True):
        parts = [keep_mask(magnitude_key(rows_of[s][lo:hi]), lo, cut) for lo, hi in bounds]
        out.append(torch.cat(parts).reshape(xs[s].shape))
    return out


def check(x: torch.Tensor, ks: list[int], bounds: list[tuple[int, int]]) -> None:
    got = streamed_masks([x], [(0, k) for k in ks], bounds)
    for k, mask in zip(ks, got, strict=True):
        want = stable_topk(x, k)
        assert torch.equal(mask, want), (k, int((mask != want).sum()))
        assert int(mask.sum()) == min(max(k, 0), x.numel())


def edge_ks(n: int) -> list[int]:
    return sorted({0, 1, n // 3, n // 2, n - 1, n})


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


INPUTS = {
    "random": lambda: randn(37, 53),
    "quantized": lambda: torch.round(randn(37, 53, seed=1) * 4) / 4,  # ~15 distinct values
    "two_values": lambda: torch.where(randn(40, 16, seed=2) > 0, 1.0, -1.0),
    "all_equal": lambda: torch.full((23, 11), -0.5),
    "zeros_signed": lambda: torch.where(randn(20, 20, seed=3) > 0, 0.0, -0.0),
    "bf16": lambda: randn(64, 48, seed=4).bfloat16(),
    "nonfinite": lambda: torch.where(
        randn(30, 17, seed=5) > 1.2, float("nan"),
        torch.where(randn(30, 17, seed=6) > 1.5, float("-inf"),
                    torch.round(randn(30, 17, seed=7) * 2) / 2)),
}


class TestAgainstStableArgsort:
    """Oracle: `stable_topk` (a stable descending argsort of the fp32 magnitudes)."""

    @pytest.mark.parametrize("name", list(INPUTS))
    @pytest.mark.parametrize("sizes", [[1], [3], [7, 2, 5], [1000]], ids=str)
    def test_two_dimensional(self, name, sizes):
        x = INPUTS[name]()
        check(x, edge_ks(x.numel()), split(x.shape[0], sizes))

    @pytest.mark.parametrize("sizes", [[1], [64], [5, 128, 31]], ids=str)
    def test_one_dimensional(self, sizes):
        x = torch.round(randn(300, seed=8) * 3) / 3  # a vector: one value per row
        check(x, edge_ks(x.numel()), split(x.shape[0], sizes))

    @pytest.mark.parametrize("shape", [(), (1,), (1, 1), (1, 9)])
    def test_one_element_or_one_row(self, shape):
        x = randn(*shape, seed=9) if shape else torch.tensor(-1.5)
        rows = 1
        check(x, edge_ks(x.numel()) + [2 * x.numel() + 1, -3], [(0, rows)])

    def test_three_dimensional_rows_are_dim0(self):
        x = torch.round(randn(12, 5, 7, seed=10) * 2) / 2
        check(x, edge_ks(x.numel()), split(12, [5, 1, 4]))

    def test_pieces_of_the_reduction_frame(self):
        """Bounds as a reduction cuts them (`piece_bounds`), 64-value aligned."""
        x = torch.round(randn(300, 40, seed=11) * 8) / 8
        check(x, edge_ks(x.numel()) + [5000], piece_bounds(300, 40))

    def test_nan_ranks_above_inf_and_zero_signs_tie(self):
        x = torch.tensor([[0.0, -0.0, float("inf"), float("nan"), 1.0, -float("inf"), -0.0]])
        for k in range(8):
            (mask,) = streamed_masks([x], [(0, k)], [(0, 1)])
            assert torch.equal(mask, stable_topk(x, k)), k
        (one,) = streamed_masks([x], [(0, 1)], [(0, 1)])
        assert one[0, 3]  # the NaN is the largest
        (five,) = streamed_masks([x], [(0, 5)], [(0, 1)])
        assert five.tolist() == [[True, False, True, True, True, True, False]]  # first zero
        (six,) = streamed_masks([x], [(0, 6)], [(0, 1)])
        assert six.tolist() == [[True, True, True, True, True, True, False]]  # +0 and −0 tie


class TestTopKMask:
    """`top_k_mask` (the whole-tensor kernels' top-k: SCE's select) against `stable_topk`."""

    @pytest.mark.parametrize("name", list(INPUTS))
    def test_every_input(self, name):
        x = INPUTS[name]()
        for k in edge_ks(x.numel()):
            assert torch.equal(select.top_k_mask(magnitude_key(x), k).reshape(x.shape),
                               stable_topk(x, k)), (name, k)

    def test_a_tensor_large_enough_to_be_sampled(self):
        """Above `SAMPLE_MIN` the cut is placed from a sample first: same set."""
        x = torch.round(randn(1100, 4000, seed=12) * 64) / 64  # 4.4M values, heavily tied
        assert x.numel() >= select.SAMPLE_MIN
        for k in (1, x.numel() // 2 + 7, x.numel() - 1):
            assert torch.equal(select.top_k_mask(magnitude_key(x), k), stable_topk(x, k)), k


class TestQueries:
    def test_k_of_the_nonzero_count_from_the_histogram_pass(self):
        """SCE's k = f(nonzero keys) on a tensor too small for a sample: the histogram pass
        counts each piece's zeros (pieces of different sizes, some all zero, so that a count
        off by one per piece moves k)."""
        x = torch.round(randn(60, 40, seed=26) * 64) / 64
        x[:, ::3] = 0
        x[10:14] = 0
        for f in (lambda nonzero: nonzero // 2, lambda nonzero: nonzero - 1):
            (mask,) = streamed_masks([x], [(0, 0)], split(60, [3, 4, 7]), k_of_nonzero=f)
            assert torch.equal(mask, stable_topk(x, f(int((x != 0).sum()))))

    def test_many_streams_and_queries_in_one_call(self):
        """Several task vectors (streams) and several k per stream share the passes."""
        a = torch.round(randn(50, 30, seed=12) * 4) / 4
        b = randn(50, 30, seed=13)
        c = torch.full((50, 30), 2.0)
        queries = [(0, 1), (1, 700), (0, 700), (2, 999), (1, 0), (0, 1500), (2, 1), (0, 1499)]
        got = streamed_masks([a, b, c], queries, split(50, [4, 9]))
        for (s, k), mask in zip(queries, got, strict=True):
            assert torch.equal(mask, stable_topk([a, b, c][s], k)), (s, k)

    def test_trivial_queries_make_no_pass(self):
        passes: list[int] = []
        x = randn(8, 8)
        streamed_masks([x], [(0, 0), (0, 64), (0, 100)], [(0, 8)], passes)
        assert passes == []
        assert select_cuts(iter, lambda *a: [], [(0, 0), (0, 9)], 9, 3) == [KEEP_NONE, KEEP_ALL]

    def test_two_passes_when_the_kth_key_is_unique_three_with_a_split_tie(self, monkeypatch):
        """The tie pass runs only when equal keys straddle the cut-off and their bucket holds
        more keys than pass 2 collects (`COLLECT_MAX`, 0 here)."""
        monkeypatch.setattr(select, "COLLECT_MAX", 0)
        x = randn(20, 20, seed=14)  # distinct magnitudes
        passes: list[int] = []
        streamed_masks([x], [(0, 123)], split(20, [3]), passes)
        assert len(passes) == 2
        q = torch.round(randn(20, 20, seed=15) * 2) / 2
        flat = q.abs().reshape(-1).sort(descending=True).values
        k = next(k for k in range(1, 400) if flat[k - 1] == flat[k])  # a split tie
        passes.clear()
        (mask,) = streamed_masks([q], [(0, k)], split(20, [3]), passes)
        assert len(passes) == 3 and torch.equal(mask, stable_topk(q, k))
        k_all = next(k for k in range(1, 400) if flat[k - 1] != flat[k])  # ties all kept
        passes.clear()
        (mask,) = streamed_masks([q], [(0, k_all)], split(20, [3]), passes)
        assert len(passes) == 2 and torch.equal(mask, stable_topk(q, k_all))

    @pytest.mark.parametrize("sampled", [False, True])
    def test_a_cut_among_zeros_and_tiny_keys_of_an_uncollected_bucket(self, monkeypatch,
                                                                      sampled):
        """Bucket 0 (zeros, and subnormals below 2^-126) counts its zeros apart, per row, when
        it is too large to collect: cuts among the subnormals and among the zeros must still be
        the stable argsort's. The histogram pass counts each row's zeros where a cut may fall
        among them (always without a sample; with one, where the sample's bucket 0 is large
        enough), so a cut among the zeros takes that pass alone (after the sample)."""
        monkeypatch.setattr(select, "COLLECT_MAX", 0)
        if sampled:
            monkeypatch.setattr(select, "SAMPLE_MIN", 1)
            monkeypatch.setattr(select, "SAMPLE_EVERY", 2)
        x = randn(30, 40, seed=16)
        g = torch.Generator().manual_seed(16)
        kind = torch.randint(0, 10, x.shape, generator=g)
        x = torch.where(kind < 6, 0.0, x)  # 60% zeros, a fine-tune's unchanged weights
        x = torch.where(kind == 6, torch.tensor([1e-40, -3e-41, 7e-45])[kind % 3], x)
        nonzero, tiny = int((x != 0).sum()), int((kind == 6).sum())
        for k in (nonzero - tiny // 2, nonzero - 1, nonzero, nonzero + 1, nonzero + 300,
                  x.numel() - 1):
            passes: list[int] = []
            (mask,) = streamed_masks([x], [(0, k)], split(30, [4, 9]), passes)
            assert torch.equal(mask, stable_topk(x, k)), k
            if k > nonzero:
                assert passes == ([2, 1] if sampled else [1]), k

    def test_a_split_tie_placed_from_the_collected_bucket_takes_two_passes(self):
        """(One pass where the tie is among zeros: the histogram pass counts each row's.)"""
        q = torch.round(randn(20, 20, seed=15) * 2) / 2
        flat = q.abs().reshape(-1).sort(descending=True).values
        split_ties = [k for k in range(1, 400) if flat[k - 1] == flat[k]][::7]
        assert {bool(flat[k] == 0) for k in split_ties} == {False, True}
        for k in split_ties:
            passes: list[int] = []
            (mask,) = streamed_masks([q], [(0, k)], split(20, [3, 11, 12]), passes)
            assert len(passes) == (1 if flat[k] == 0 else 2), k
            assert torch.equal(mask, stable_topk(q, k)), k


class TestPiecesDoNotMatter:
    """The kept set is a function of the tensor alone: any partition into row pieces gives
    the stable argsort's set (hypothesis: shapes, tied values, partitions and k at random)."""

    @settings(max_examples=150, deadline=None)
    @given(rows=st.integers(1, 24), cols=st.integers(1, 12), levels=st.integers(1, 6),
           seed=st.integers(0, 2**31 - 1), data=st.data())
    def test_random_partitions(self, rows, cols, levels, seed, data):
        g = torch.Generator().manual_seed(seed)
        x = torch.randint(-levels, levels + 1, (rows, cols), generator=g).float() / levels
        n = rows * cols
        k = data.draw(st.integers(-1, n + 1), label="k")
        rng = random.Random(seed)
        cuts = sorted(rng.sample(range(1, rows), rng.randint(0, rows - 1))) if rows > 1 else []
        edges = [0, *cuts, rows]
        bounds = list(zip(edges[:-1], edges[1:], strict=True))
        # ties placed from the collected bucket, or (COLLECT_MAX 0) by a per-row count pass;
        # the cut found after a sample of every 2nd piece (`TestSampledWindow`) or not
        limit = data.draw(st.sampled_from([0, select.COLLECT_MAX]), label="COLLECT_MAX")
        sample = data.draw(st.sampled_from([0, select.SAMPLE_MIN]), label="SAMPLE_MIN")
        saved = select.COLLECT_MAX, select.SAMPLE_MIN, select.SAMPLE_EVERY
        select.COLLECT_MAX, select.SAMPLE_MIN, select.SAMPLE_EVERY = limit, sample, 2
        try:
            (mask,) = streamed_masks([x], [(0, k)], bounds)
        finally:
            select.COLLECT_MAX, select.SAMPLE_MIN, select.SAMPLE_EVERY = saved
        assert torch.equal(mask, stable_topk(x, k))


class TestSampledWindow:
    """Large tensors histogram a sample first and collect the keys around its estimate during
    the histogram pass (`select.SAMPLE_MIN`, lowered here so that small tensors take that
    path): the kept set must stay the stable argsort's whether the window holds the k-th key,
    misses it (a sample unlike the rest) or overflows, and a window that holds it saves the
    second pass."""

    @pytest.fixture(autouse=True)
    def _sample_small_tensors(self, monkeypatch):
        monkeypatch.setattr(select, "SAMPLE_MIN", 0)
        monkeypatch.setattr(select, "SAMPLE_EVERY", 2)

    def test_one_pass_after_the_sample_when_the_window_holds_the_cut(self):
        x = torch.round(randn(64, 40, seed=20) * 64) / 64  # ties at most cut-offs
        for k in [1, 97, 1280, 2000, 2559]:
            passes: list[int] = []
            (mask,) = streamed_masks([x], [(0, k)], split(64, [4]), passes)
            assert torch.equal(mask, stable_topk(x, k)), k
            assert passes == [2, 1], (k, passes)  # the sample (every 2nd piece), one pass

    def test_a_sample_unlike_the_rest_falls_back_to_the_second_pass(self):
        x = randn(64, 40, seed=21)
        x[torch.arange(64) % 8 >= 4] *= 1000  # the sampled pieces (rows 0-3, 8-11, ...) small
        passes: list[int] = []
        (mask,) = streamed_masks([x], [(0, 1000)], split(64, [4]), passes)
        assert torch.equal(mask, stable_topk(x, 1000))
        assert passes == [2, 1, 1, 1]  # the window pass, a whole histogram, the bucket

    def test_k_of_the_nonzero_count_from_the_window_pass(self):
        """SCE's k = f(nonzero keys), counted by the window pass instead of a histogram: a
        third of the entries zero, the k-th key inside the window (every piece alike, so the
        sample places it: one pass after the sample) and, with a sample unlike the rest,
        outside it."""
        block = torch.round(randn(4, 40, seed=25) * 64) / 64
        block[:, ::3] = 0
        x = block.repeat(16, 1)
        for scale_rows in (False, True):
            y = x.clone()
            if scale_rows:
                y[torch.arange(64) % 8 >= 4] *= 1000
            passes: list[int] = []
            (mask,) = streamed_masks([y], [(0, 0)], split(64, [4]), passes,
                                     k_of_nonzero=lambda nonzero: nonzero // 2)
            assert torch.equal(mask, stable_topk(y, int((y != 0).sum()) // 2))
            assert passes == ([2, 1, 1, 1] if scale_rows else [2, 1])

    def test_a_window_that_overflows_falls_back(self, monkeypatch):
        monkeypatch.setattr(select, "WINDOW_MAX", 2 * 40 * 64)
        x = torch.zeros(64, 40)
        x[::2] = torch.round(randn(32, 40, seed=22) * 4) / 4  # the sample sees no zeros
        passes: list[int] = []
        (mask,) = streamed_masks([x], [(0, 2500)], split(64, [2]), passes)
        assert torch.equal(mask, stable_topk(x, 2500))

    def test_several_streams_and_queries(self):
        a = torch.round(randn(50, 30, seed=23) * 4) / 4
        b = randn(50, 30, seed=24)
        queries = [(0, 1), (1, 700), (0, 700), (1, 0), (0, 1499), (1, 1499)]
        got = streamed_masks([a, b], queries, split(50, [3, 7]))
        for (s, k), mask in zip(queries, got, strict=True):
            assert torch.equal(mask, stable_topk([a, b][s], k)), (s, k)
