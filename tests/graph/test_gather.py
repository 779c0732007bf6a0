"""Row gathers (recipekit/graph/gather.py). Oracle: the rows written out by hand (index_select,
means of the named rows, zeros), and `torch.mean` for the padding fill."""

from __future__ import annotations

import torch

from recipekit.graph import load
from recipekit.graph.gather import GatherRows, RowMean, segments_of


def test_runs_of_advancing_rows_are_one_segment():
    rows = [((0, i),) for i in range(5)] + [((1, 7),), ((0, 9), (1, 3)), ()]
    assert segments_of(rows) == ((0, 5, ((0, 0),)), (5, 6, ((1, 7),)),
                                 (6, 7, ((0, 9), (1, 3))), (7, 8, ()))


def test_gather_copies_means_zeros_and_fills_by_any_piece():
    torch.manual_seed(0)
    a, b = torch.randn(10, 4), torch.randn(12, 4)
    tables = (load("a", "t", (10, 4), "F32"), load("b", "t", (12, 4), "F32"))
    rows = [((0, i),) for i in range(10)] + [((1, 10),), ((0, 2), (1, 11)), ()]
    want = torch.cat([a, b[10:11], ((a[2] + b[11]) / 2)[None], torch.zeros(1, 4)])
    real = GatherRows(tables, segments_of(rows), 13, "F32")
    assert torch.equal(real.compute((a, b)), want)
    fill = RowMean(real)
    mean = fill.compute((want,))
    torch.testing.assert_close(mean, want.mean(0), atol=1e-7, rtol=0)
    padded = GatherRows(tables, real.segments + ((13, 16, None),), 16, "F32", fill)
    whole = padded.compute((a, b, mean))
    assert torch.equal(whole[:13], want) and torch.equal(whole[13:], mean.expand(3, 4))
    for lo, hi in ((0, 3), (3, 11), (11, 16), (9, 14)):
        piece = padded.gather(lambda t, x, y: (a, b)[t][x:y], lo, hi, (mean,))
        assert torch.equal(piece, whole[lo:hi]), (lo, hi)


def test_a_gather_reads_only_the_rows_it_names():
    a = torch.arange(20.0).reshape(10, 2)
    seen = []

    def read(t, x, y):
        seen.append((t, x, y))
        return a[x:y]

    node = GatherRows((load("a", "t", (10, 2), "F32"),), ((0, 4, ((0, 6),)),), 4, "F32")
    assert torch.equal(node.gather(read, 1, 3), a[7:9])
    assert seen == [(0, 7, 9)]
