"""plan/cost.py: the executor's chunk and memory policy, shared by estimates and runs.

Oracles: the policy's own definitions (a piece is about `CHUNK_ELEMS` values, 64-value aligned)
and arithmetic over node sizes; no tensor is read.
"""

from __future__ import annotations

import recipekit.plan.cost as cost
from recipekit.graph import cast, load


def test_small_tensors_are_computed_whole():
    node = cast(load("m", "small", (4, 8), "F32"), "BF16")
    assert not cost.chunkable(node)
    assert cost.working_set(node) == cost.expression_bytes(node) + node.nbytes


def test_large_elementwise_tensors_run_in_aligned_row_pieces():
    node = cast(load("m", "large", (65536, 1000), "F32"), "BF16")
    assert cost.chunkable(node)
    rows = cost.rows_per_piece(node)
    assert rows * 1000 % 64 == 0  # every piece starts where the whole tensor's loops would
    assert rows * 1000 >= cost.CHUNK_ELEMS
    assert cost.working_set(node) < cost.expression_bytes(node) + node.nbytes


def test_the_threshold_is_read_where_it_is_defined(monkeypatch):
    """Planning and running share one policy: changing it in plan/cost.py changes both."""
    node = cast(load("m", "mid", (64, 64), "F32"), "BF16")
    assert not cost.chunkable(node)
    monkeypatch.setattr(cost, "CHUNK_ELEMS", 100)
    assert cost.chunkable(node)
    assert cost.rows_per_piece(node) == 1  # 100 values: one 64-value row per piece


def test_piece_workers_is_between_one_and_eight():
    assert 1 <= cost.piece_workers() <= 8


def test_retained_reduction_values_are_the_executors_keep():
    """The plan charges the reduction values the executor keeps for later tensors: as many as
    `run.execute.Runtime.SHARED_KEEP`, the largest of the plan. Oracle: the executor's
    constant, and a hand count."""
    from recipekit.graph import load
    from recipekit.graph.lora import RangeFinderFactors
    from recipekit.run.execute import Runtime

    assert cost.SHARED_KEEP == Runtime.SHARED_KEEP
    nodes = [RangeFinderFactors(load("b", f"w{i}", (64 * (i + 1), 32), "BF16"),
                                load("a", f"w{i}", (64 * (i + 1), 32), "BF16"), 4, False, 0.0,
                                4, 1, 0, f"w{i}") for i in range(10)]
    sizes = sorted((n.nbytes for n in nodes), reverse=True)
    assert cost.retained_bytes([*nodes, *nodes, load("a", "x", (8, 8), "F32")]) == \
        sum(sizes[:cost.SHARED_KEEP])


def test_shared_values_are_the_ones_several_tensors_hold():
    """The executor keeps a reduction's value for later tensors only when more than one output
    tensor holds it: a LoRA module's packed factors (its A and its B), not a value one tensor
    reads. Oracle: a hand count; and `Runtime.remember` keeps those only."""
    from recipekit.graph.lora import PackedFactor, RangeFinderFactors
    from recipekit.run.execute import Runtime

    def factors(name: str) -> RangeFinderFactors:
        return RangeFinderFactors(load("b", name, (64, 32), "BF16"),
                                  load("a", name, (64, 32), "BF16"), 4, False, 0.0, 4, 1, 0, name)

    pair, alone = factors("w0"), factors("w1")
    tensors = [PackedFactor(pair, "A", 32, "F32"), PackedFactor(pair, "B", 32, "F32"),
               PackedFactor(alone, "A", 32, "F32"), load("a", "x", (8, 8), "F32")]
    assert cost.shared_values(tensors) == {pair}
    assert cost.retained_bytes(cost.shared_values(tensors)) == pair.nbytes
    rt = Runtime(None, None, None, None, keep=cost.shared_values(tensors))
    rt.remember(pair, "kept")
    rt.remember(alone, "dropped")
    assert dict(rt.shared) == {pair: "kept"}


def test_kept_heap_follows_the_largest_chunked_working_set(monkeypatch):
    """The free heap the executor keeps between chunked tensors (and the plan charges once):
    none without a chunked tensor, the largest chunked tensor's working set between
    `KEPT_HEAP` and `KEPT_HEAP_MAX` otherwise; tensors computed whole do not count. Oracle:
    the policy's definition over working sets set by hand."""
    small = cast(load("m", "small", (4, 8), "F32"), "BF16")
    light = cast(load("m", "light", (65536, 64), "F32"), "BF16")
    assert not cost.chunkable(small) and cost.chunkable(light)
    assert cost.kept_heap([small]) == 0
    assert cost.working_set(light) < cost.KEPT_HEAP
    assert cost.kept_heap([small, light]) == cost.KEPT_HEAP
    mid, heavy = (cast(load("m", name, (65536, 64), "F32"), "BF16") for name in ("mid", "big"))
    sizes = {small: 10 * cost.KEPT_HEAP_MAX, light: 1 << 20, mid: 3 * cost.KEPT_HEAP // 2,
             heavy: 2 * cost.KEPT_HEAP_MAX}
    monkeypatch.setattr(cost, "working_set", lambda node, workers=1: sizes[node])
    assert cost.kept_heap([small, light, mid]) == 3 * cost.KEPT_HEAP // 2
    assert cost.kept_heap([light, heavy, mid]) == cost.KEPT_HEAP_MAX


def test_computing_bytes_of_a_shard_without_tensors_is_zero():
    """An empty shard once raised `ValueError: zip() argument 2 is longer than argument 1`
    (an extraction with no module; found by a black-box check)."""
    node = cast(load("m", "small", (4, 8), "F32"), "BF16")
    assert cost.computing_bytes([]) == 0
    assert cost.computing_bytes([node]) == cost.working_set(node)
