"""recipekit/ops/coalesce.py: gathers and group reductions against MLTF's dense map matrices.

Oracle: reference/coalescing.md §1.2-1.3. MLTF builds a row-stochastic F (small×large) and its
normalised transpose T = rownorm(Fᵀ) (large×small, 0/1) per feature space and maps a weight with
``W' = M_a · W · rownorm(M_bᵀ)``. The dense matrices are built here, in fp64, and compared with
the streaming ops (fp64 inputs, so the comparison is tight); the round trip must be bit-exact in
fp32 and bf16 for groups of 2 and 4.
"""

from __future__ import annotations

import random

import pytest
import torch

from recipekit.ops.coalesce import (
    coalesce,
    coalesce_axis,
    coalesce_rows,
    decoalesce,
    decoalesce_axis,
    decoalesce_gathered,
    decoalesce_rows,
    pairwise_sum,
)

PAIRS = ((0, 2), (1, 3))
FOURS = ((0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14), (3, 7, 11, 15))
UNEVEN = ((0, 1, 2), (3,), (4, 5))


def dense_maps(groups, block):
    """MLTF's F and T = rownorm(Fᵀ) for a partition of units of ``block`` features."""
    n_small, n_large = len(groups), sum(len(g) for g in groups)
    f = torch.zeros(n_small * block, n_large * block, dtype=torch.float64)
    for i, g in enumerate(groups):
        for j in g:
            for d in range(block):
                f[i * block + d, j * block + d] = 1.0 / len(g)
    t = f.t().clone()
    return f, t / t.sum(1, keepdim=True)


def rownorm(m):
    return m / m.sum(1, keepdim=True)


@pytest.mark.parametrize("groups", [PAIRS, FOURS, UNEVEN], ids=["pairs", "fours", "uneven"])
@pytest.mark.parametrize("block", [1, 3])
def test_weight_maps_match_dense_rule(groups, block):
    f, t = dense_maps(groups, block)
    n_large = f.shape[1]
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n_large, n_large, generator=gen, dtype=torch.float64)
    out_axis = ("mean", ((groups, block),))
    in_axis = ("sum", ((groups, block),))
    small = coalesce([w], [out_axis, in_axis])
    torch.testing.assert_close(small, f @ w @ rownorm(f.t()), rtol=1e-12, atol=1e-12)
    s = torch.randn(f.shape[0], f.shape[0], generator=gen, dtype=torch.float64)
    big = decoalesce(s, [("copy", ((groups, block),)), ("split", ((groups, block),))])
    torch.testing.assert_close(big, t @ s @ rownorm(t.t()), rtol=1e-12, atol=1e-12)
    # F T = I: the dense round trip, which the streaming one must reproduce
    torch.testing.assert_close(coalesce([big], [out_axis, in_axis]), s, rtol=1e-12, atol=1e-12)


def test_fused_segments_map_each_part():
    """GPT-2's c_attn output axis is [q | k | v], each with its own partition."""
    q, kv = (PAIRS, 2), (((0, 1),), 2)
    x = torch.randn(3, 8 + 4 + 4, dtype=torch.float64)
    got = coalesce_axis(x, 1, ("mean", (q, kv, kv)))
    fq, _ = dense_maps(*q)
    fkv, _ = dense_maps(*kv)
    want = torch.cat([x[:, :8] @ fq.t(), x[:, 8:12] @ fkv.t(), x[:, 12:] @ fkv.t()], 1)
    torch.testing.assert_close(got, want)
    back = decoalesce_axis(got, 1, ("copy", (q, kv, kv)))
    assert back.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups", [PAIRS, FOURS], ids=["pairs", "fours"])
def test_round_trip_is_bit_exact(groups, dtype):
    """coalesce(decoalesce(W)) == W exactly: ×2^-m and pairwise sums of identical halves."""
    n_small = len(groups)
    s = torch.randn(5, n_small * 4, n_small * 4).to(dtype)
    axes = [None, ("copy", ((groups, 4),)), ("split", ((groups, 4),))]
    big = decoalesce(s, axes).to(dtype)
    depth = [big] * len(groups[0])  # a depth group of identical copies
    back = coalesce(depth, [None, ("mean", ((groups, 4),)), ("sum", ((groups, 4),))]).to(dtype)
    assert torch.equal(back, s)


def test_scale_is_exact_and_inverse():
    s = torch.randn(7, 4)
    axes = [None, ("copy", ((PAIRS, 2),))]
    big = decoalesce(s, axes, scale=0.5)
    assert torch.equal(big[:, :2], s[:, :2] * 0.5)
    assert torch.equal(coalesce([big], [None, ("mean", ((PAIRS, 2),))], scale=2.0), s)


def test_uneven_groups_round_trip_closely():
    s = torch.randn(6, 3, dtype=torch.float32)
    axes = [("split", ((UNEVEN, 2),)), None]
    back = coalesce([decoalesce(s, axes)], [("sum", ((UNEVEN, 2),)), None])
    torch.testing.assert_close(back, s, rtol=1e-6, atol=1e-7)


def test_pairwise_sum_of_identical_powers_of_two_is_exact():
    x = torch.randn(1000) * 1e3
    for k in (2, 4, 8):
        stacked = torch.stack([x / k] * k)
        assert torch.equal(pairwise_sum(stacked, 0), x)
    torch.testing.assert_close(pairwise_sum(torch.stack([x, 2 * x, 3 * x]), 0), 6 * x)


def random_axis(rng: random.Random, modes: tuple[str, str]) -> tuple:
    """An axis map of 1-3 segments, each a partition of 1-8 units (in random order) into
    groups of 1-3, with blocks of 1-4 features."""
    segments = []
    for _ in range(rng.randint(1, 3)):
        units = list(range(rng.randint(1, 8)))
        rng.shuffle(units)
        groups, i = [], 0
        while i < len(units):
            k = rng.randint(1, 3)
            groups.append(tuple(units[i:i + k]))
            i += k
        segments.append((tuple(groups), rng.randint(1, 4)))
    return (rng.choice(modes), tuple(segments))


class TestCoalesceRows:
    """`coalesce_rows`: the rows a piece of a dim-0 coalescing reads, and the smaller map over
    them; oracle: the whole tensor's `coalesce`, bit for bit, for random partitions (groups of
    1-3 units in any order, blocks, fused segments), modes, depth members and pieces."""

    @pytest.mark.parametrize("seed", range(40))
    def test_any_piece_equals_the_whole_rows(self, seed):
        rng = random.Random(seed)
        axis = random_axis(rng, ("mean", "sum"))
        segments = axis[1]
        large = sum(sum(len(g) for g in gs) * b for gs, b in segments)
        small = sum(len(gs) * b for gs, b in segments)
        cols = 2 * rng.randint(1, 3)
        pairs = (tuple(range(0, cols, 2)), tuple(range(1, cols, 2)))  # two column groups
        col_axis = ("sum", ((pairs, 1),))
        g = torch.Generator().manual_seed(seed)
        members = [torch.randn(large, cols, generator=g).bfloat16()
                   for _ in range(rng.randint(1, 3))]
        whole = coalesce(members, (axis, col_axis), scale=0.5)
        for _ in range(5):
            lo = rng.randrange(small)
            hi = rng.randint(lo + 1, small)
            runs, sub, at = coalesce_rows(axis, lo, hi)
            assert all(a < b for a, b in runs) and runs == sorted(runs)
            read = sum(b - a for a, b in runs)
            assert read <= large
            parts = [torch.cat([m[a:b] for a, b in runs]) for m in members]
            got = coalesce(parts, (sub, col_axis), scale=0.5)[at:at + hi - lo]
            assert torch.equal(got, whole[lo:hi]), (axis, lo, hi)

    def test_a_piece_reads_only_its_groups_rows(self):
        # 4 heads of 2 rows into 2: small head 1 = mean of large heads 1 and 3
        runs, sub, at = coalesce_rows(("mean", ((((0, 2), (1, 3)), 2),)), 2, 4)
        assert runs == [(2, 4), (6, 8)] and sub == ("mean", ((((0, 1),), 2),)) and at == 0

    def test_rows_outside_the_axis_are_refused(self):
        with pytest.raises(ValueError, match="outside"):
            coalesce_rows(("mean", ((((0, 1),), 2),)), 2, 3)


class TestDecoalesceRows:
    """`decoalesce_rows` + `decoalesce_gathered`: rows of a dim-0 de-coalescing from the small
    rows they name; oracle: `decoalesce` of the whole tensor, bit for bit (copy and split,
    blocks, fused segments, a mapped second axis, pieces anywhere)."""

    @pytest.mark.parametrize("seed", range(40))
    def test_any_piece_equals_the_whole_rows(self, seed):
        rng = random.Random(seed)
        axis = random_axis(rng, ("copy", "split"))
        segments = axis[1]
        small = sum(len(gs) * b for gs, b in segments)
        large = sum(sum(len(g) for g in gs) * b for gs, b in segments)
        cols = ("split", ((((0,), (1, 2)), 2),)) if seed % 2 else None  # 2 -> 3 blocks of 2
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(small, 4, generator=g).bfloat16()
        whole = decoalesce(x, (axis, cols), scale=0.5)
        for _ in range(5):
            lo = rng.randrange(large)
            hi = rng.randint(lo + 1, large)
            runs, source, sizes = decoalesce_rows(axis, lo, hi)
            part = torch.cat([x[a:b] for a, b in runs])
            got = decoalesce_gathered(part, source, sizes, (axis, cols), scale=0.5)
            assert torch.equal(got, whole[lo:hi]), (axis, lo, hi)
