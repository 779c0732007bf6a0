"""The tie band of magnitude pruning: the only places our TIES and breadcrumbs may differ from
mergekit's.

Why: TIES keeps the k = max(1, ⌊d·n⌋) largest |τ| of each task vector, breadcrumbs the ascending
ranks [bot, bot + keep) (reference/merge-methods.md §2.6). When the magnitude at a cut-off is
shared by entries on both sides of it, *which* of them are kept is a tie rule. mergekit's
non-stable argsort breaks such ties arbitrarily; recipekit keeps the lowest flat indices first
(ops/select.py, and the stable sorts of ops/sparsify.py), so that a tensor's kept set depends
on nothing but the tensor. Inputs with many equal magnitudes (the quantized golden inputs, bf16
task vectors) hit such ties, elsewhere the kept set is unique and both agree.

The **tie band** of a merge is the set of output positions where some task vector τ_i has its
fp32 magnitude key |τ_i| (τ_i in the compute dtype) equal to one of its cut-off values *and*
that value straddles the cut-off (entries with it are kept and others dropped, under any sort).
Outside the band every task vector's mask, hence every elementwise step after it, is the same
under both rules. Tests compare with mergekit outside the band, check that the band is a
minority of positions (so the comparison still sees most of the tensor), and check the whole
tensor against the stable rule (`stable_keep`, or the whole-tensor kernels of ops/sparsify.py).

The ordering used here is fp32 |τ| as an integer bit pattern (NaN above inf, as a descending
sort puts it; −0 equal to +0), and the stable order comes from numpy's `lexsort`, not torch's
stable sort, so it is an independent oracle for both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tests.helpers.builders import read_tensors

MAGNITUDE_SPARSIFIERS = ("magnitude", "magnitude_outliers")


def sparsifier(method: str) -> str | None:
    """The sparsifier a merge method prunes with (mergekit's name), or None."""
    from recipekit.merge import METHODS

    return dict(METHODS[method].fixed).get("sparsify")


def magnitude_keys(tau: torch.Tensor) -> np.ndarray:
    """|τ| in fp32 as int64 integers ordered like the magnitudes, flat (row-major)."""
    return tau.detach().abs().float().reshape(-1).view(torch.int32).numpy().astype(np.int64)


def kept_range(sparsify: str, density: float, gamma: float, n: int) -> tuple[int, int] | None:
    """The kept positions [lo, hi) of a descending order of |τ| (ties aside), or None when
    nothing is pruned (d ≥ 1). TIES: [0, k) with k = max(1, ⌊d·n⌋) (none for d ≤ 0 or n = 0);
    breadcrumbs: keep = ⌊d·n⌋, top = ⌊γ·n⌋, bot = max(0, n − keep − top), the ascending
    [bot, bot + keep), i.e. the descending [n − bot − keep, n − bot)."""
    if density >= 1:
        return None
    if sparsify == "magnitude":
        if density <= 0 or n == 0:
            return 0, 0
        return 0, max(1, int(density * n))
    if sparsify != "magnitude_outliers":
        raise ValueError(f"not a magnitude sparsifier: {sparsify!r}")
    if density <= 0:
        return 0, 0
    keep, top = int(density * n), int(gamma * n)
    bot = max(0, n - keep - top)
    return n - bot - keep, n - bot


def descending(keys: np.ndarray) -> np.ndarray:
    """Flat indices by descending key, equal keys by ascending index: the stable rule."""
    return np.lexsort((np.arange(keys.size), -keys))


def cut_band(tau: torch.Tensor, sparsify: str, density: float, gamma: float = 0.0
             ) -> torch.Tensor:
    """The positions of one task vector (bool, τ's shape) whose magnitude equals a cut-off
    value that straddles its cut-off: those a tie rule decides."""
    keys = magnitude_keys(tau)
    n = keys.size
    band = np.zeros(n, dtype=bool)
    span = kept_range(sparsify, density, gamma, n)
    if span is not None and span[0] < span[1]:
        ordered = keys[descending(keys)]
        for edge in span:  # the boundary between descending positions edge − 1 and edge
            if 0 < edge < n and ordered[edge - 1] == ordered[edge]:
                band |= keys == ordered[edge]
    return torch.from_numpy(band).reshape(tau.shape)


def tie_bands(taus: Sequence[torch.Tensor], sparsify: str, densities: Sequence[float],
              gammas: Sequence[float] | None = None) -> list[torch.Tensor]:
    """Each task vector's `cut_band`; their union is the merge's tie band (the output positions
    a tie rule decides: the merge after pruning is elementwise)."""
    gammas = gammas if gammas is not None else [0.0] * len(taus)
    return [cut_band(tau, sparsify, d, g) for tau, d, g in zip(taus, densities, gammas,
                                                               strict=True)]


def stable_keep(tau: torch.Tensor, sparsify: str, density: float, gamma: float = 0.0
                ) -> torch.Tensor:
    """The keep mask (bool, τ's shape) under the stable rule: the descending positions
    `kept_range` of `descending` (equal magnitudes, lowest index first)."""
    keys = magnitude_keys(tau)
    span = kept_range(sparsify, density, gamma, keys.size)
    keep = np.zeros(keys.size, dtype=bool)
    if span is None:
        keep[:] = True
    else:
        keep[descending(keys)[span[0]:span[1]]] = True
    return torch.from_numpy(keep).reshape(tau.shape)


def case_taus(method: str, others: Sequence[torch.Tensor], base: torch.Tensor,
              params: Mapping[str, Any]) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """The task vectors (θ_i − θ_b in the compute dtype of the current context: fp32, or the
    inputs' own inside `ops.precision.native_dtype`) and the resolved parameters
    (`recipekit.merge.resolve_params`) of one merge call."""
    from recipekit.merge import METHODS, resolve_params
    from recipekit.ops.precision import compute_dtype

    kw = resolve_params(METHODS[method], dict(params), len(others))
    dtype = compute_dtype(base, *others)
    b = base.to(dtype)
    return [x.to(dtype) - b for x in others], kw


def call_bands(method: str, others: Sequence[torch.Tensor], base: torch.Tensor | None,
               params: Mapping[str, Any]) -> list[torch.Tensor] | None:
    """The task vectors' tie bands of ``apply_method(method, others, base=base,
    params=params)`` (call it in the same precision context), or None for methods that do
    not prune by magnitude."""
    sparsify = sparsifier(method)
    if sparsify not in MAGNITUDE_SPARSIFIERS or base is None or not others:
        return None
    taus, kw = case_taus(method, others, base, params)
    return tie_bands(taus, sparsify, kw["densities"], kw.get("gamma"))


def stable_formula(method: str, others: Sequence[torch.Tensor], base: torch.Tensor,
                   params: Mapping[str, Any]) -> torch.Tensor:
    """``apply_method(method, ...)`` as the whole-tensor formula with the stable rule's masks:
    each τ_i masked by `stable_keep` (L1 rescale by `ops.sparsify.apply_mask`), then the
    elementwise tail (`ops.task_arithmetic.combine_task_vectors`), in the compute dtype of the
    current context. Exact (`torch.equal`) against our kernels wherever they implement the
    stable rule."""
    from recipekit.merge import METHODS
    from recipekit.ops.sparsify import apply_mask
    from recipekit.ops.task_arithmetic import combine_task_vectors

    taus, kw = case_taus(method, others, base, params)
    sparsify = sparsifier(method)
    assert sparsify in MAGNITUDE_SPARSIFIERS, method
    dtype = taus[0].dtype
    gammas = kw.get("gamma", [0.0] * len(taus))
    deltas = torch.stack([
        apply_mask(t, stable_keep(t, sparsify, d, g).to(dtype), rescale=kw["rescale"])
        for t, d, g in zip(taus, kw["densities"], gammas, strict=True)])
    return combine_task_vectors(base.to(dtype), deltas, kw["weights"],
                                consensus=dict(METHODS[method].fixed).get("consensus"),
                                normalize=kw["normalize"], lambda_=kw["lambda_"],
                                int8_mask=kw["int8_mask"])


def assert_equal_outside_band(ours: torch.Tensor, theirs: torch.Tensor,
                              bands: Sequence[torch.Tensor], *, atol: float = 0.0,
                              what: Any = "") -> None:
    """``ours`` equals ``theirs`` (within ``atol``; NaN where NaN) at every position outside
    the union of ``bands``, each task vector's band is a minority of its positions, and at
    least a quarter of the positions lie outside the union, so the comparison sees a good part
    of the tensor. (The union may pass half: breadcrumbs on the 1/32-grid "quant" inputs,
    ~10 distinct magnitudes, straddles two cut-offs in each of three task vectors.)"""
    band = torch.zeros(ours.shape, dtype=torch.bool)
    for b in bands:
        assert b.shape == ours.shape == theirs.shape, what
        assert int(b.sum()) * 2 < b.numel(), (what, "band", int(b.sum()), b.numel())
        band |= b
    assert int((~band).sum()) * 4 >= band.numel(), (what, "union", int(band.sum()))
    a, b = ours.double()[~band], theirs.double()[~band]
    if atol == 0:
        assert torch.equal(a.isnan(), b.isnan()), what
        assert torch.equal(a.nan_to_num(), b.nan_to_num()), (
            what, (a - b).abs().nan_to_num().max().item())
    else:
        torch.testing.assert_close(a, b, atol=atol, rtol=0, equal_nan=True, msg=str(what))


# --------------------------------------------------------------------------------------------
# recipes: the band of each output tensor of a compiled plan


def compile_recipe(recipe: Path) -> Any:
    """The `Plan` of a recipe file (load, resolve, compile; nothing is run)."""
    from recipekit.inputs.resolve import resolve_sources
    from recipekit.plan import compile_plan
    from recipekit.recipe import load_recipe

    r = load_recipe(recipe)
    return compile_plan(r, resolve_sources(r))


def evaluate_in_memory(node: Any, plan: Any, cache: dict[str, dict[str, torch.Tensor]]) -> Any:
    """``node``'s value computed whole in memory: stored tensors read with safetensors, every
    other node by its own `compute` (for the inputs of a merge: loads and casts)."""
    from recipekit.graph import Load, iter_post_order

    memo: dict[Any, Any] = {}
    for n in iter_post_order(node, memo):
        if isinstance(n, Load):
            if n.source not in cache:
                cache[n.source] = read_tensors(Path(plan.sources[n.source].path))
            memo[n] = cache[n.source][n.name]
        else:
            memo[n] = n.compute(tuple(memo[x] for x in n.inputs))
    return memo[node]


def plan_bands(plan: Any) -> dict[str, list[torch.Tensor]]:
    """The task vectors' tie bands of every output tensor computed by a streamed
    magnitude-pruning merge (`steps.task_vectors.PrunedMerge` of TIES or breadcrumbs): τ_i in
    the node's compute dtype (``work``), parameters as resolved for that tensor (gradients,
    rules)."""
    from recipekit.dtypes import torch_dtype
    from recipekit.graph import expression_nodes
    from recipekit.merge import METHODS, resolve_params
    from recipekit.steps.task_vectors import PrunedMerge

    cache: dict[str, dict[str, torch.Tensor]] = {}
    bands = {}
    for shard in plan.shards:
        for t in shard.tensors:
            merges = [n for n in expression_nodes(t.node) if isinstance(n, PrunedMerge)
                      and sparsifier(n.method) in MAGNITUDE_SPARSIFIERS]
            if not merges:
                continue
            (m,) = merges
            work = torch_dtype(m.work)
            b = evaluate_in_memory(m.base, plan, cache).to(work)
            taus = [evaluate_in_memory(x, plan, cache).to(work) - b for x in m.operands]
            kw = resolve_params(METHODS[m.method], dict(m.params), len(m.operands))
            bands[t.name] = tie_bands(taus, sparsifier(m.method), kw["densities"],
                                      kw.get("gamma"))
    return bands


def whole_tensor_merges(monkeypatch: Any) -> None:
    """Compile merges as before they streamed: one whole-tensor `Merge` node per tensor
    (ops/merge.py `apply_method`, the stable sorts of ops/sparsify.py), the oracle of the
    streamed nodes."""
    monkeypatch.setattr("recipekit.steps.merge.streamed_task_vectors",
                        lambda *args, **kwargs: None)
