"""graph/lora.py's streamed extraction nodes: `RangeFinderFactors` and `PackedFactor`.

Oracles: the factors' product against the difference itself (a full-width sketch is an exact
SVD), the piece cut of `graph.passes` (a reduction streams whole rows, so a multi-piece tensor
gives the same bytes as the same pieces cut again), and the memory the plan is told.
"""

from __future__ import annotations

import torch

from recipekit.graph import Load, PackedFactor, RangeFinderFactors, intern
from recipekit.graph.lora import SvdFactor
from recipekit.graph.passes import PASS_ELEMS, InMemorySource, piece_bounds
from recipekit.steps.extract_lora import OVERSAMPLE, POWER_ITERS


def nodes(rows: int, cols: int, rank: int, *, transposed: bool = False, dtype: str = "F32"):
    base = intern(Load("base", "w", (rows, cols), dtype))
    tuned = intern(Load("tuned", "w", (rows, cols), dtype))
    packed = intern(RangeFinderFactors(tuned, base, rank, transposed, 0.0, 16, 2, 0, "w"))
    in_dim = rows if transposed else cols
    return packed, (intern(PackedFactor(packed, "A", in_dim, "F32")),
                    intern(PackedFactor(packed, "B", in_dim, "F32")))


def test_factors_reproduce_a_full_rank_difference_in_the_module_layout():
    g = torch.Generator().manual_seed(0)
    w0, w1 = torch.randn(48, 20, generator=g), torch.randn(48, 20, generator=g)
    for transposed in (False, True):
        packed, (a, b) = nodes(48, 20, 20, transposed=transposed)
        value = packed.compute((w1, w0))
        assert packed.shape == tuple(value.shape) == (20, 68)
        fa, fb = a.compute((value,)), b.compute((value,))
        assert tuple(fa.shape) == a.shape and tuple(fb.shape) == b.shape
        want = (w1 - w0).T if transposed else w1 - w0
        assert torch.allclose(fb @ fa, want, atol=1e-4)


def test_many_pieces_are_folded_the_same_way_every_time():
    rows, cols = 3000, 700  # several pieces of a pass
    assert len(piece_bounds(rows, cols)) > 1
    g = torch.Generator().manual_seed(1)
    w0, w1 = torch.randn(rows, cols, generator=g), torch.randn(rows, cols, generator=g)
    packed, _ = nodes(rows, cols, 8)
    # `reduce` itself, twice (`compute` would hand back the shared first value)
    runs = [packed.reduce(InMemorySource([w1, w0], piece_bounds(rows, cols)), ()) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_the_plan_is_told_thin_matrices_not_the_whole_difference():
    """Embedding shape, rank 64, the step's defaults: Y and its factorizations' copies
    (32000×L), W, R and B (2048×L) and a piece, L = 5 blocks of 128 columns (under 400 MiB),
    where the exact
    SVD holds three fp32 copies of the 32000×2048 difference (750 MiB); one pass per block."""
    base = intern(Load("base", "w", (32000, 2048), "BF16"))
    tuned = intern(Load("tuned", "w", (32000, 2048), "BF16"))
    packed = intern(RangeFinderFactors(tuned, base, 64, True, 0.0, OVERSAMPLE, POWER_ITERS, 0,
                                       "w"))
    width = (64 + OVERSAMPLE) * (POWER_ITERS + 1)
    assert width == 640
    assert packed.state_bytes == (4 * width * (2 * 32000 + 2 * 2048)
                                  + 8 * width * (2 * 2048 + 4 * width) + 4 * 32000 * 64
                                  + 4 * (2 * 32000 * width + 4 * 2048 * width
                                         + 4 * width * width))
    assert packed.workspace == 4 * 4 * 32000 * 2048  # per value; the plan charges a piece's
    piece = packed.workspace * PASS_ELEMS // packed.base.numel
    assert packed.state_bytes + piece < 400 << 20
    assert packed.passes == POWER_ITERS + 1 == 5
    exact = SvdFactor(Load("d", "w", (32000, 2048), "F32"), "A", 64, True, 0.0, "BF16")
    assert exact.workspace > 700 << 20


def test_the_krylov_width_is_capped_at_the_smaller_side():
    """A 256×2048 projection at the defaults is spanned by two blocks of 128: L = 256, not
    640 (and the passes stop there, tests/ops/test_lowrank.py)."""
    base = intern(Load("base", "w", (256, 2048), "BF16"))
    tuned = intern(Load("tuned", "w", (256, 2048), "BF16"))
    packed = intern(RangeFinderFactors(tuned, base, 64, False, 0.0, OVERSAMPLE, POWER_ITERS, 0,
                                       "w"))
    assert packed._sizes()[2] == 256
