"""recipekit/ops/rank_keep.py: ``draw < table[rank in row]`` without sorting every row.

Oracle: each entry's rank from a stable argsort of its row's keys (equal keys by column,
lower first), then the comparison, entry for entry. The inputs are built to reach every path:
rows with ties (small integers, zeros, rows mostly zeros beside subnormals, one constant), keys
spread over more octaves than the buckets cover (the shared lowest bucket), NaN and inf, tables
with long flat stretches and steep steps (many undecided entries), rows too short for the
buckets, rows with fewer and more zeros than `ZERO_RUN`, and the fallback when the involved
buckets cannot be packed into one sort.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recipekit.ops import rank_keep as rk
from recipekit.ops.select import magnitude_key
from recipekit.ops.sparsify import della_keep_mask, della_keep_probabilities


def oracle(key: torch.Tensor, draw: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(key.long(), dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(key.shape[1]).expand_as(order))
    return draw < table[rank]


def values(kind: str, rows: int, length: int, g: torch.Generator) -> torch.Tensor:
    if kind == "gaussian_delta":  # two bf16 checkpoints' difference, as a merge sees it
        a = torch.randn(rows, length, generator=g).bfloat16().float()
        return torch.randn(rows, length, generator=g).bfloat16().float() - a
    if kind == "small_integers":  # long runs of equal keys across bucket boundaries
        return torch.randint(-3, 4, (rows, length), generator=g).float()
    if kind == "zeros":  # an unchanged third, signed zeros among them
        x = torch.randn(rows, length, generator=g)
        x[:, ::3] = 0.0
        x[:, 1::7] = -0.0
        return x
    if kind == "wide":  # 50 octaves: many keys in the shared lowest bucket
        return torch.randn(rows, length, generator=g) * torch.logspace(-15, 0, length)
    if kind == "mostly_zeros":  # a fine-tune's unchanged weights: zeros beside tiny values
        x = torch.randn(rows, length, generator=g) * 1e-3
        x[torch.rand(rows, length, generator=g) < 0.8] = 0.0
        x[:, 7::97] = 1e-40  # subnormals: the smallest keys after zero
        x[:, 3::11] = -0.0
        return x
    if kind == "constant":
        return torch.full((rows, length), 0.25)
    if kind == "nonfinite":
        x = torch.randn(rows, length, generator=g)
        x[:, 5], x[:, 9], x[:, 11] = float("nan"), float("inf"), -float("inf")
        return x
    raise AssertionError(kind)


KINDS = ["gaussian_delta", "small_integers", "zeros", "mostly_zeros", "wide", "constant",
         "nonfinite"]


def ramp(length: int, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's table (p·2^24 by rank) as `ops.sparsify` builds it."""
    return ((density - epsilon) + torch.arange(length).float() / (length - 1) * 2 * epsilon) \
        * (1 << 24)


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(KINDS), rows=st.integers(1, 5),
       length=st.sampled_from([rk.MIN_ROW, rk.MIN_ROW + 37, 2 * rk.MIN_ROW + 5, 4100, 40]),
       table_kind=st.sampled_from(["ramp", "steps"]), seed=st.integers(0, 2**16))
def test_equals_ranking_by_sort(kind, rows, length, table_kind, seed):
    g = torch.Generator().manual_seed(seed)
    key = magnitude_key(values(kind, rows, length, g))
    if table_kind == "ramp":
        table = ramp(length, 0.5, 0.3)
    else:  # flat stretches and jumps: draws land between a bucket's thresholds often
        table = torch.cumsum(torch.randint(0, 2, (length,), generator=g) *
                             torch.randint(0, 1 << 16, (length,), generator=g), 0).float()
    draw = torch.randint(0, int(table.max()) + 2, (rows, length), generator=g).float()
    got = rk.keep_by_rank(key.clone(), draw, table)
    assert torch.equal(got, oracle(key, draw, table))


def test_undecided_entries_are_ranked_exactly():
    """A table that jumps at every rank leaves every entry of a multi-entry bucket undecided
    by its bucket alone: all of them go through the exact ranking."""
    g = torch.Generator().manual_seed(1)
    length = 3 * rk.MIN_ROW
    key = magnitude_key(torch.randint(-40, 41, (3, length), generator=g).float() / 8)
    table = torch.arange(length).float()
    draw = torch.randint(0, length, (3, length), generator=g).float()
    assert torch.equal(rk.keep_by_rank(key.clone(), draw, table), oracle(key, draw, table))


@pytest.mark.parametrize("zeros", [rk.ZERO_RUN - 1, rk.ZERO_RUN, 3 * rk.MIN_ROW - 5])
def test_zeros_rank_first_by_column(zeros):
    """Key 0 has a bin of its own, ranked exactly with the rest below `ZERO_RUN` zeros in a
    row and by a cumulative count from there; the ranks must be the sort's either way, beside
    subnormals (the smallest other keys) and with a table that leaves every zero undecided
    by its bin."""
    g = torch.Generator().manual_seed(5)
    length = 3 * rk.MIN_ROW
    x = torch.randn(2, length, generator=g)
    pick = torch.randperm(length, generator=g)[:zeros]
    x[:, pick] = 0.0
    x[0, pick[::2]] = -0.0
    x[x != 0] = torch.where(torch.rand(x[x != 0].shape, generator=g) < 0.5, 1e-40,
                            x[x != 0])
    key = magnitude_key(x)
    table = torch.arange(length).float()
    draw = torch.randint(0, length, (2, length), generator=g).float()
    assert torch.equal(rk.keep_by_rank(key.clone(), draw, table), oracle(key, draw, table))


def test_rows_ranked_whole_when_the_involved_buckets_cannot_be_packed(monkeypatch):
    monkeypatch.setattr(rk, "PACK_BITS", 40)  # so no (bucket, key, column) triple fits
    g = torch.Generator().manual_seed(2)
    key = magnitude_key(values("small_integers", 4, 2 * rk.MIN_ROW, g))
    table = torch.arange(2 * rk.MIN_ROW).float()
    draw = torch.randint(0, 2 * rk.MIN_ROW, key.shape, generator=g).float()
    assert torch.equal(rk.keep_by_rank(key.clone(), draw, table), oracle(key, draw, table))


class TestDellaKeepMask:
    """Oracle: ``draw < della_keep_probabilities(τ)·2^24``, the mask as it was drawn before."""

    @pytest.mark.parametrize("shape", [(6, 2 * rk.MIN_ROW + 3), (3 * rk.MIN_ROW,),
                                       (2, rk.MIN_ROW + 1, 3), (64, 50)])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
    @pytest.mark.parametrize(("density", "epsilon"), [(0.5, 0.15), (0.2, 0.19), (0.9, 0.05)])
    def test_same_mask_as_the_probabilities(self, shape, dtype, density, epsilon):
        g = torch.Generator().manual_seed(len(shape))
        tau = torch.randn(shape, generator=g).to(dtype)
        tau.reshape(-1)[::5] = 0
        draw = torch.randint(0, 1 << 24, shape, generator=g, dtype=torch.int32)
        p = della_keep_probabilities(tau, density=density, epsilon=epsilon)
        expected = draw.to(p.dtype) < p * (1 << 24)
        got = della_keep_mask(tau, draw, density=density, epsilon=epsilon, scale=1 << 24)
        assert got.dtype == torch.bool and got.shape == tau.shape
        assert torch.equal(got, expected)

    def test_length_one_rows_raise(self):
        with pytest.raises(ValueError, match="at least 2"):
            della_keep_mask(torch.ones(4, 1), torch.zeros(4, 1), density=0.5, epsilon=0.1,
                            scale=1 << 24)
