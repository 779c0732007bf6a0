"""Pruning of task vectors (τ = θ − θ_base) and TIES sign consensus.

These are the pruning steps of the task-arithmetic merge family (`merge.ties`, `merge.dare_*`,
`merge.breadcrumbs*`, `merge.della*`, `merge.sce`), kept apart so adapter combination can reuse
them. Each one selects entries of **one** task vector by its own magnitudes (or at random), and
optionally rescales what it keeps so the L1 norm is unchanged. Formulas, thresholds and
tie-breaking follow mergekit 0.1.5 as described in `reference/merge-methods.md` §2.6–2.7:

* where mergekit sorts, we sort an fp32 key too, but stably and descending: equal magnitudes
  rank by lowest flat index first, the tie rule of the streamed merges (ops/select.py), so
  whole and streamed results agree everywhere; they agree with mergekit's non-stable sort
  wherever the cut-off magnitude is unique;
* random masks are ``torch.bernoulli(p, generator=g)`` over the whole tensor, one draw per task
  vector, so a generator seeded like mergekit's global CPU generator gives its exact mask.

All functions compute in fp32 (fp64 if the input is fp64) and return that dtype.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from recipekit.ops.precision import compute_dtype, numpy_floats
from recipekit.ops.rank_keep import columns_by_rank, keep_by_rank
from recipekit.ops.select import magnitude_key, top_k_mask

__all__ = [
    "CONSENSUS_METHODS",
    "SPARSIFIERS",
    "apply_mask",
    "bernoulli_prune",
    "breadcrumbs_prune",
    "compute_dtype",
    "della_keep_probabilities",
    "della_prune",
    "elect_sign",
    "magnitude_prune",
    "sce_topk_mask",
    "sign_consensus_mask",
    "sparsify",
]

#: sparsifier names as mergekit 0.1.5 spells them (`SparsificationMethod`)
SPARSIFIERS = ("magnitude", "random", "magnitude_outliers", "della_magprune")
#: sign-consensus rules (`ConsensusMethod`); only "sum" is used by a registered method
CONSENSUS_METHODS = ("sum", "count")

#: below this L1 norm (before or after masking) `apply_mask` does not rescale
RESCALE_EPS = 1e-7


def _work(tau: torch.Tensor) -> torch.Tensor:
    return tau.to(compute_dtype(tau))


def apply_mask(tau: torch.Tensor, mask: torch.Tensor, *, rescale: bool = False) -> torch.Tensor:
    """Keep the masked entries of τ; with `rescale`, match the L1 norm of the original.

    Formula: ``τ̃ = m⊙τ · ‖τ‖₁ / ‖m⊙τ‖₁`` (mergekit's L1 `rescaled_masked_tensor`), or
    ``τ̃ = m⊙τ`` without rescale. If either L1 norm is below 1e-7 the mask is applied without
    rescaling. This is neither DARE's 1/p nor DELLA's per-entry 1/p_ij: one factor per tensor.

    Shapes: τ and m are the same shape (m is 0/1 in τ's dtype, or bool). Oracle: the formula
    (tests/ops/test_sparsify.py::TestApplyMask).

    Args:
        tau: the task vector, already in the compute dtype.
        mask: which entries to keep.
        rescale: match ‖τ‖₁ after masking.

    Returns:
        The masked (and maybe rescaled) task vector, τ's dtype.

    Example:
        >>> apply_mask(torch.tensor([1.0, -2.0, 3.0]), torch.tensor([1.0, 0.0, 1.0]), rescale=True)
        tensor([1.5000, -0.0000, 4.5000])
    """
    masked = tau * mask
    if not rescale:
        return masked
    before = tau.abs().sum()
    after = masked.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return masked
    return masked * (before / after)


def magnitude_prune(tau: torch.Tensor, *, density: float, rescale: bool = False) -> torch.Tensor:
    """Keep the ``max(1, ⌊d·n⌋)`` largest-magnitude entries of τ (TIES "trim").

    Formula: k = max(1, ⌊d·n⌋) for n = numel(τ); keep the first k positions of the stable
    descending ``argsort(|τ|)`` (fp32 key; equal magnitudes: lowest index first), then
    `apply_mask`.
    d ≥ 1 returns τ unchanged; d ≤ 0 or an empty τ gives zeros.

    Paper: Yadav et al. 2023, "TIES-Merging", https://arxiv.org/abs/2306.01708.
    Shapes: any; the selection is over the whole tensor. Oracle: the formula, and mergekit
    0.1.5's `ties` goldens (tests/goldens/merge/ties.safetensors).

    Args:
        tau: the task vector.
        density: the fraction of entries to keep.
        rescale: L1 rescaling of what is kept (`apply_mask`).

    Returns:
        The pruned τ in the compute dtype.

    Example:
        >>> magnitude_prune(torch.tensor([0.1, -3.0, 2.0, 0.5]), density=0.5)
        tensor([ 0., -3.,  2.,  0.])
    """
    x = _work(tau)
    if density >= 1:
        return x.clone()
    n = x.numel()
    if density <= 0 or n == 0:
        return torch.zeros_like(x)
    k = max(1, int(density * n))
    order = torch.argsort(x.abs().reshape(-1).float(), descending=True, stable=True)
    mask = torch.zeros(n, dtype=x.dtype, device=x.device)
    mask[order[:k]] = 1
    return apply_mask(x, mask.reshape(x.shape), rescale=rescale)


def breadcrumbs_prune(tau: torch.Tensor, *, density: float, gamma: float = 0.01,
                      rescale: bool = False) -> torch.Tensor:
    """Drop the smallest entries and the largest outliers of τ, keeping ⌊d·n⌋ (breadcrumbs).

    Formula: keep = ⌊d·n⌋ (may be 0), top = ⌊γ·n⌋, bot = max(0, n − keep − top). Sort |τ|
    ascending (fp32 key) and keep the positions [bot, bot + keep): the bottom `bot`
    and the top n − bot − keep entries are dropped, so when d + γ > 1 density wins and fewer
    than `top` outliers go. d ≥ 1 returns τ unchanged (no outlier removal); d ≤ 0 gives zeros.
    Equal magnitudes rank by lowest index first as larger (a stable descending sort, whose
    positions [n − bot − keep, n − bot) are the ascending ones [bot, bot + keep)).

    Paper: Davari & Belilovsky 2023, "Model Breadcrumbs", https://arxiv.org/abs/2312.06795.
    Shapes: any; selection over the whole tensor. Oracle: the formula, and mergekit 0.1.5's
    `breadcrumbs` goldens.

    Args:
        tau: the task vector.
        density: the fraction of entries to keep.
        gamma: the fraction of largest-magnitude entries to drop.
        rescale: L1 rescaling of what is kept.

    Returns:
        The pruned τ in the compute dtype.

    Example:
        >>> breadcrumbs_prune(torch.tensor([0.1, -3.0, 2.0, 0.5]), density=0.5, gamma=0.25)
        tensor([0.0000, -0.0000, 2.0000, 0.5000])
    """
    x = _work(tau)
    if density >= 1:
        return x.clone()
    if density <= 0:
        return torch.zeros_like(x)
    n = x.numel()
    keep = int(density * n)
    top = int(gamma * n)
    bot = max(0, n - keep - top)
    order = torch.sort(x.abs().reshape(-1).float(), descending=True, stable=True).indices
    mask = torch.zeros(n, dtype=x.dtype, device=x.device)
    mask[order[n - bot - keep:n - bot]] = 1
    return apply_mask(x, mask.reshape(x.shape), rescale=rescale)


def _draw(p: torch.Tensor, generator: torch.Generator | None, what: str) -> torch.Tensor:
    """Bernoulli(p) drawn on the generator's device, returned on p's device."""
    if generator is None:
        raise ValueError(f"{what} is random: pass a torch.Generator (seeded by the caller)")
    return torch.bernoulli(p.to(generator.device), generator=generator).to(p.device)


def bernoulli_prune(tau: torch.Tensor, *, density: float, rescale: bool = False,
                    generator: torch.Generator | None) -> torch.Tensor:
    """Keep each entry of τ independently with probability `density` (DARE's drop).

    Formula: m ~ Bernoulli(d) i.i.d., one ``torch.bernoulli`` over the whole tensor from
    `generator`, then `apply_mask` (L1 rescale, not 1/p). d ≥ 1 returns τ unchanged and draws
    nothing; any d < 1 (0 included) consumes one draw per entry, as mergekit does.

    Paper: Yu et al. 2023, "Language Models are Super Mario" (DARE),
    https://arxiv.org/abs/2311.03099.
    Shapes: any. Oracle: mergekit 0.1.5 drawing from ``torch.manual_seed(s)`` equals us drawing
    from ``torch.Generator().manual_seed(s)`` (both CPU mt19937), and the kept fraction is d.

    Args:
        tau: the task vector.
        density: the keep probability, in [0, 1].
        rescale: L1 rescaling of what is kept.
        generator: the source of randomness (the caller seeds it by seed and tensor name).

    Returns:
        The pruned τ in the compute dtype.

    Raises:
        ValueError: no generator, or density < 0.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> bernoulli_prune(torch.ones(6), density=0.5, generator=g)
        tensor([1., 0., 1., 1., 1., 0.])
    """
    x = _work(tau)
    if density >= 1:
        return x.clone()
    if density < 0:
        raise ValueError(f"density must be in [0, 1] for random pruning, got {density}")
    p = torch.full(x.shape, density, dtype=x.dtype, device=x.device)
    mask = _draw(p, generator, "random (DARE) pruning")
    return apply_mask(x, mask, rescale=rescale)


def della_keep_probabilities(tau: torch.Tensor, *, density: float,
                             epsilon: float) -> torch.Tensor:
    """DELLA's keep probability per entry: linear in the entry's magnitude rank in its row.

    Formula: for a row of length L, r is the 0-based ascending rank of |τ| and
    ``p = (d − ε) + (r/(L−1))·2·ε``, so p runs from d − ε (smallest) to d + ε (largest) with
    mean d. A 1-D τ is one row; an N-D τ is ranked along dim 1 (not per tensor, not along the
    last axis). Equal magnitudes rank by index, lower first (mergekit's non-stable double
    argsort orders them arbitrarily; the probabilities of distinct magnitudes are its own).

    Why not argsort: this runs on every value of a DELLA merge, twice when it rescales, and a
    row argsort costs ~35 ns per value on one CPU thread (two of them, ~70). Each entry's fp32
    magnitude key (`ops.select.magnitude_key`, ordered like |τ|) is packed with its column
    into one int64, unique per row, so sorting the values alone orders the row with the tie
    rule built in, and numpy's vectorized sort does that in 4-24 ns per value (by CPU); the
    sorted low halves are the columns by rank, and p is scattered to them. fp64 rows (no 32-bit
    key) take a stable argsort with the same rule. The streamed merges need only the mask a
    draw gives, which `della_keep_mask` finds without sorting every row.

    Paper: Deep et al. 2024, "DELLA-Merging", https://arxiv.org/abs/2406.11617.
    Shapes: τ [n] or [R, L, ...]; returns p of τ's shape. Oracle: the formula on small rows,
    with a stable double argsort for tied rows (tests/ops/test_sparsify.py).

    Args:
        tau: the task vector.
        density: the mean keep probability d.
        epsilon: the half-width ε of the probability range.

    Returns:
        p in the compute dtype, τ's shape.

    Raises:
        ValueError: a row of length 1 (mergekit divides 0 by 0 and torch.bernoulli fails).

    Example:
        >>> della_keep_probabilities(torch.tensor([0.3, -0.1, 0.2]), density=0.5, epsilon=0.1)
        tensor([0.6000, 0.4000, 0.5000])
    """
    return _by_rank(*_della_rows(tau, density, epsilon), tau.shape)


def della_keep_mask(tau: torch.Tensor, draw: torch.Tensor, *, density: float, epsilon: float,
                    scale: int) -> torch.Tensor:
    """``draw < p·scale`` with p = `della_keep_probabilities` (in its dtype), as a bool mask of
    τ's shape: the entries a DELLA draw keeps.

    Why: the probabilities need every entry's rank, a sort of every row; the mask does not. On
    the CPU in fp32, `ops.rank_keep.keep_by_rank` decides most entries from per-row bucket
    counts of their magnitude and ranks exactly only those whose draw falls between the
    thresholds of their bucket's first and last rank (the table p·scale is non-decreasing in
    the rank). The mask is the one from the probabilities, entry for entry (oracle:
    tests/ops/test_rank_keep.py::TestDellaKeepMask). ``draw``: τ's shape, integers exact in
    p's dtype (`ops.rng.counter_draw`).
    """
    rows, flat, by_rank = _della_rows(tau, density, epsilon)
    if flat.device.type != "cpu" or flat.dtype != torch.float32:
        p = _by_rank(rows, flat, by_rank, tau.shape)
        return draw.reshape(p.shape).to(p.dtype) < p * scale
    d = draw.reshape(rows.shape).movedim(1, -1).reshape(flat.shape)
    if d.dtype in (torch.int32, torch.int64):  # an integer draw is below t iff below ceil(t)
        table = _ceiling(flat.shape[1], density, epsilon, scale, d.dtype)  # (cheaper than
        # converting the draw, ~0.3 ns a value)
    else:
        table, d = by_rank * scale, d.to(flat.dtype)
    return _from_rows(keep_by_rank(magnitude_key(flat), d, table), rows, tau.shape)


def _della_rows(tau: torch.Tensor, density: float, epsilon: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(τ in the compute dtype with at least 2 dims, its rank groups as rows [G, L] with the
    ranked dim last, DELLA's probability by rank [L])."""
    x = _work(tau)
    rows = x.reshape(1, -1) if x.dim() < 2 else x
    length = rows.shape[1]
    if length < 2:
        raise ValueError(
            f"DELLA ranks entries along dim 1, which has length {length} in a tensor of "
            f"shape {list(tau.shape)}: it needs at least 2 (mergekit fails here too)")
    flat = rows.movedim(1, -1).reshape(-1, length)  # one row per rank group, ranked along -1
    return rows, flat, _ramp(length, density, epsilon, x.dtype, x.device)


@functools.lru_cache(maxsize=64)
def _ramp(length: int, density: float, epsilon: float, dtype: torch.dtype,
          device: torch.device) -> torch.Tensor:
    """DELLA's probability by rank [L] (read-only: shared by the pieces of a tensor, whose
    five small ops cost ~30 µs a piece of 128Ki values, ~0.25 ns a value)."""
    return (density - epsilon) + (torch.arange(length, device=device).to(dtype)
                                  / (length - 1)) * 2 * epsilon


@functools.lru_cache(maxsize=64)
def _ceiling(length: int, density: float, epsilon: float, scale: int, dtype: torch.dtype
             ) -> torch.Tensor:
    """⌈p·scale⌉ by rank for fp32 p on the CPU, in an integer ``dtype`` (read-only, like
    `_ramp`)."""
    by_rank = _ramp(length, density, epsilon, torch.float32, torch.device("cpu"))
    return torch.ceil(by_rank * scale).to(dtype)


def _by_rank(rows: torch.Tensor, flat: torch.Tensor, by_rank: torch.Tensor,
             shape: torch.Size) -> torch.Tensor:
    """Each entry's value of ``by_rank`` at its rank in its rank group (`_della_rows`'s
    layout), in τ's ``shape``: the probabilities."""
    p = torch.empty_like(flat)
    p.scatter_(1, _columns_by_rank(flat), by_rank.expand_as(flat))
    return _from_rows(p, rows, shape)


def _from_rows(values: torch.Tensor, rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Values laid out as `_della_rows`'s rank groups, back in τ's ``shape``."""
    return values.reshape(rows.movedim(1, -1).shape).movedim(-1, 1).reshape(shape)


def _columns_by_rank(rows: torch.Tensor) -> torch.Tensor:
    """Each row's column indices in ascending order of |value| (equal: lower index first)."""
    if rows.dtype != torch.float32:  # fp64: no 32-bit key to pack
        return torch.argsort(rows.abs(), dim=1, stable=True)
    return columns_by_rank(magnitude_key(rows))


def della_prune(tau: torch.Tensor, *, density: float, epsilon: float = 0.15,
                rescale: bool = False, generator: torch.Generator | None) -> torch.Tensor:
    """DELLA's MAGPRUNE: keep each entry with a probability that grows with its magnitude rank.

    Formula: m ~ Bernoulli(p) with p from `della_keep_probabilities`, drawn in one
    ``torch.bernoulli`` from `generator`, then `apply_mask` (L1 rescale over the whole tensor,
    not DELLA's per-entry 1/p). d ≥ 1 returns τ unchanged; d ≤ 0 gives zeros (neither draws).

    Paper: Deep et al. 2024, "DELLA-Merging", https://arxiv.org/abs/2406.11617.
    Shapes: τ [n] or [R, L, ...] with L ≥ 2. Oracle: mergekit 0.1.5 goldens under the same
    seed, and the kept rate per rank decile (tests/goldens/merge/random_stats.json).

    Args:
        tau: the task vector.
        density: the mean keep probability d.
        epsilon: the half-width ε; d − ε and d + ε must lie strictly inside (0, 1).
        rescale: L1 rescaling of what is kept.
        generator: the source of randomness.

    Returns:
        The pruned τ in the compute dtype.

    Raises:
        ValueError: d ± ε outside (0, 1), a dim-1 length of 1, or no generator.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> della_prune(torch.tensor([0.3, -0.1, 0.2, 0.4]), density=0.5, epsilon=0.1,
        ...             generator=g)
        tensor([0.3000, -0.0000, 0.2000, 0.4000])
    """
    x = _work(tau)
    if density >= 1:
        return x.clone()
    if density <= 0:
        return torch.zeros_like(x)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(
            f"DELLA needs density ± epsilon inside (0, 1); got density {density}, "
            f"epsilon {epsilon}")
    p = della_keep_probabilities(x, density=density, epsilon=epsilon)
    mask = _draw(p, generator, "DELLA pruning")
    return apply_mask(x, mask, rescale=rescale)


def sparsify(tau: torch.Tensor, method: str, *, density: float, rescale: bool = False,
             gamma: float = 0.01, epsilon: float = 0.15,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Prune one task vector with the sparsifier named as mergekit names it.

    `method` is one of `SPARSIFIERS`: "magnitude" (`magnitude_prune`), "random"
    (`bernoulli_prune`), "magnitude_outliers" (`breadcrumbs_prune`, uses `gamma`),
    "della_magprune" (`della_prune`, uses `epsilon`). Oracle: the functions it calls.

    Args:
        tau: the task vector.
        method: the sparsifier.
        density: the fraction to keep.
        rescale: L1 rescaling of what is kept.
        gamma: breadcrumbs' outlier fraction.
        epsilon: DELLA's probability half-width.
        generator: for "random" and "della_magprune".

    Returns:
        The pruned τ in the compute dtype.

    Raises:
        ValueError: an unknown method, or the called function's errors.

    Example:
        >>> sparsify(torch.tensor([0.1, -3.0, 2.0, 0.5]), "magnitude", density=0.25)
        tensor([ 0., -3.,  0.,  0.])
    """
    if method == "magnitude":
        return magnitude_prune(tau, density=density, rescale=rescale)
    if method == "random":
        return bernoulli_prune(tau, density=density, rescale=rescale, generator=generator)
    if method == "magnitude_outliers":
        return breadcrumbs_prune(tau, density=density, gamma=gamma, rescale=rescale)
    if method == "della_magprune":
        return della_prune(tau, density=density, epsilon=epsilon, rescale=rescale,
                           generator=generator)
    raise ValueError(f"unknown sparsifier {method!r}; expected one of {', '.join(SPARSIFIERS)}")


def elect_sign(deltas: torch.Tensor, *, method: str = "sum") -> torch.Tensor:
    """TIES "elect": the majority sign per entry across the stacked task vectors.

    Formula: "sum": s = sign(Σ_i δ_i) with s = +1 where the sum is ≥ 0 (so the election is
    weighted by magnitude, and by the merge weights when δ_i = w_i·τ̃_i). "count":
    s = sign(Σ_i sign δ_i), again +1 on ties. A NaN sum elects −1, as in mergekit.

    Paper: Yadav et al. 2023, "TIES-Merging", https://arxiv.org/abs/2306.01708.
    Shapes: deltas [M, ...] → s [...] of ±1 in deltas' dtype. Oracle: the formula.

    Args:
        deltas: the M task vectors, stacked on dim 0.
        method: "sum" or "count".

    Returns:
        ±1 per entry.

    Raises:
        ValueError: an unknown method.

    Example:
        >>> elect_sign(torch.tensor([[1.0, -1.0, 0.0], [-3.0, 0.5, 0.0]]))
        tensor([-1., -1.,  1.])
    """
    if method == "sum":
        score = deltas.sum(dim=0)
    elif method == "count":
        score = torch.sign(deltas).sum(dim=0)
    else:
        raise ValueError(f"unknown sign consensus {method!r}; expected 'sum' or 'count'")
    # ±1 from the comparison (2·[s ≥ 0] − 1): exactly torch.where(s ≥ 0, 1, −1), several
    # times faster than a where over broadcast 0-d operands
    return (score >= 0).to(deltas.dtype).mul_(2).sub_(1)


def sign_consensus_mask(deltas: torch.Tensor, *, method: str = "sum",
                        int8: bool = False) -> torch.Tensor:
    """TIES "disjoint merge" mask: which entries agree with the elected sign.

    Formula: m_i = [sign(δ_i) = s] with s from `elect_sign`. A zero entry has sign 0 and never
    agrees, so it never counts in the divisor Σ m_i w_i.

    Paper: Yadav et al. 2023, "TIES-Merging", https://arxiv.org/abs/2306.01708.
    Shapes: deltas [M, ...] → bool mask [M, ...]. Oracle: the formula.

    Args:
        deltas: the M task vectors, stacked on dim 0.
        method: "sum" or "count" (`elect_sign`).
        int8: hold the per-entry signs as int8 while comparing (mergekit's `int8_mask`): less
            memory, the same mask.

    Returns:
        A bool mask of deltas' shape.

    Example:
        >>> sign_consensus_mask(torch.tensor([[1.0, -1.0, 0.0], [-3.0, 0.5, 0.0]]))
        tensor([[False,  True, False],
                [ True, False, False]])
    """
    if method == "sum" and deltas.dim() > 1 and numpy_floats(deltas):
        return _agreeing_numpy(deltas)
    elected = elect_sign(deltas, method=method)
    signs = torch.sign(deltas)
    if int8:
        return signs.to(torch.int8) == elected.to(torch.int8)
    return signs == elected


def _agreeing_numpy(deltas: torch.Tensor) -> torch.Tensor:
    """`sign_consensus_mask` for "sum" on the CPU: sign(δ_i) = s is δ_i > 0 where Σδ ≥ 0 and
    δ_i < 0 elsewhere (a zero's sign 0 and a NaN's agree with neither, a NaN sum elects −1),
    so two numpy compares and three bool ops a task vector give the mask; torch's sign, the ±1
    election and the compares cost ~3.1 ns a value of two task vectors, this ~1. Σδ of two is
    their fp32 sum, as torch's (one rounding either way); more keep torch's sum, whose order
    may move the sign of a near-zero sum."""
    d = deltas.numpy()
    with np.errstate(invalid="ignore", over="ignore"):
        total = np.add(d[0], d[1]) if len(d) == 2 else deltas.sum(dim=0).numpy()
        up = total >= 0
        agree = np.greater(d, 0)
        agree &= up
        below = np.less(d, 0)
        below &= ~up
    agree |= below
    return torch.from_numpy(agree)


def population_variance(x: torch.Tensor) -> torch.Tensor:
    """Var_i(x_i) over dim 0 with correction 0, bit for bit ``torch.var(x, dim=0,
    correction=0)`` for fp32 and fp64 inputs but for the sign of a NaN.

    Why not torch.var: a variance across dim 0 (the task vectors) is an outer reduction, which
    torch runs at 75-115 ns per value on the CPU; SCE computes it for every value of the model.
    torch's CPU kernel is Welford's update over x_0, x_1, … accumulated in fp64 from
    (mean 0, m2 0); the same updates as elementwise fp64 ops over [M] slices cost 3-22 ns per
    value for M = 1-5 (about a third less in numpy on the CPU, `_welford_numpy`), and give its
    bits (tests/ops/test_sparsify.py compares them, NaN, inf and signed zeros included). Other
    dtypes keep torch.var.
    """
    if x.dtype not in (torch.float32, torch.float64) or x.dim() == 0 or x.shape[0] == 0:
        return torch.var(x, dim=0, correction=0)
    if x.dim() > 1 and numpy_floats(x):
        return torch.from_numpy(_welford_numpy(x.numpy()))
    # The first update from (0, 0) in closed form: mean = 0 + x₀ (−0 becomes +0), m2 = 0 +
    # x₀·(x₀ − mean) = mean − mean (+0, or NaN where x₀ is not finite); 3 ops instead of 9.
    mean = x[0].to(torch.float64) + 0.0
    m2 = mean - mean
    for k in range(1, x.shape[0]):
        value = x[k].to(torch.float64, copy=True)  # updated in place below
        delta = value - mean
        count = k + 1
        # ÷ a power of two is × its reciprocal exactly (and several times cheaper)
        mean += delta * (1.0 / count) if count & (count - 1) == 0 else delta / count
        m2 += delta * value.sub_(mean)
    return m2.div_(x.shape[0]).to(x.dtype)


def _welford_numpy(x: np.ndarray) -> np.ndarray:
    """`population_variance`'s updates in numpy, op for op (the same IEEE fp64 operations in
    the same order, so the same bits): its fp64 ops on a 128Ki-value piece cost about two
    thirds of torch's (two task vectors: 2.2 against 3.1 ns a value), and every buffer is
    reused in place."""
    if x.shape[0] == 2:
        return _welford_two(x)
    with np.errstate(invalid="ignore", over="ignore"):
        mean = x[0].astype(np.float64)
        mean += 0.0
        m2 = mean - mean
        value, delta = np.empty_like(mean), np.empty_like(mean)
        for k in range(1, x.shape[0]):
            np.copyto(value, x[k])
            np.subtract(value, mean, out=delta)
            count = k + 1
            mean += delta * (1.0 / count) if count & (count - 1) == 0 else delta / count
            value -= mean
            value *= delta
            m2 += value
        m2 /= x.shape[0]
        return m2.astype(x.dtype)


def _welford_two(x: np.ndarray) -> np.ndarray:
    """`_welford_numpy` of two task vectors (SCE's commonest case) with its bits, in 10
    passes over the piece instead of 13: 2.5 → 1.75 ns a value on 128Ki values.

    The mean, delta and product are the loop's ops, in its order. What goes: the +0 that
    turns a first value of −0 into +0 (it changes only a zero delta's sign, and a zero
    product then becomes +0 below either way), and m2's start (0, or NaN where x₀ is not
    finite, where the product is NaN already). m2 = 0 + v is v + 0.0 (IEEE addition
    commutes; −0 becomes +0), and ÷2 is ×0.5, exactly. Oracle: tests/ops/test_sparsify.py
    (torch.var, special values and every pair of them)."""
    with np.errstate(invalid="ignore", over="ignore"):
        mean = x[0].astype(np.float64)
        value = x[1].astype(np.float64)
        delta = value - mean
        mean += np.multiply(delta, 0.5)
        value -= mean
        value *= delta
        value += 0.0
        value *= 0.5
        return value.astype(x.dtype)


def sce_topk_mask(deltas: torch.Tensor, *, fraction: float, piece_elems: int = 1 << 17
                  ) -> torch.Tensor:
    """SCE "select": keep the entries whose values vary most across the task vectors.

    Formula: v = Var_i(δ_i) (population variance, ÷M) per entry; k = ⌊nnz(v)·f⌋ (the product
    in fp32, as mergekit's tensor arithmetic); one shared mask keeps the k entries with the
    largest |v| as fp32, equal values by lowest flat index first (the first k of a stable
    descending sort, found without sorting by `ops.select.top_k_mask`: its tie rule, so the
    streamed SCE keeps the same set; mergekit's ``topk`` breaks ties arbitrarily and agrees
    wherever the k-th value is unique). f ≥ 1 keeps everything;
    f ≤ 0 or k = 0 keeps nothing.

    Paper: Wan et al. 2024, "FuseChat" (SCE), https://arxiv.org/abs/2408.07990.
    Shapes: deltas [M, ...] → mask [...] of 0/1 in deltas' dtype. Oracle: mergekit 0.1.5's
    `sce` goldens with select_topk < 1.

    Why by pieces: the variance is elementwise, so it is computed over pieces of about
    ``piece_elems`` entries (rows of dim 1) into one int32 key: the same bits, from fp64
    temporaries that stay in the cache and are reused from the heap, where whole-tensor ones
    faulted in fresh pages on every op (with `ops.task_arithmetic.sce`'s pieces, the whole
    kernel of two bf16 2048×2048 task vectors: 72 → 43 ns and 109 → 28 bytes of page faults
    a value).

    Args:
        deltas: the M task vectors, stacked on dim 0.
        fraction: the fraction f of nonzero-variance entries to keep.
        piece_elems: entries per piece of the variance.

    Returns:
        The mask.

    Example:
        >>> sce_topk_mask(torch.tensor([[0.0, 1.0, 5.0], [0.0, -1.0, 5.1]]), fraction=0.5)
        tensor([0., 1., 0.])
    """
    shape, dtype, device = deltas.shape[1:], deltas.dtype, deltas.device
    if fraction <= 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    if fraction >= 1:
        return torch.ones(shape, dtype=dtype, device=device)
    if deltas.dim() < 2:  # 0-d task vectors: one piece
        variance = population_variance(deltas)
        nonzero, key = torch.count_nonzero(variance), magnitude_key(variance)
    else:
        rows = deltas.shape[1]
        key = torch.empty((rows, deltas[0, 0].numel()), dtype=torch.int32, device=device)
        step = max(1, piece_elems // max(1, key.shape[1]))
        nonzero = torch.zeros((), dtype=torch.int64, device=device)
        for lo in range(0, rows, step):
            variance = population_variance(deltas[:, lo:lo + step])
            nonzero += torch.count_nonzero(variance)  # in the compute dtype, not as fp32
            key[lo:lo + step] = magnitude_key(variance)
    k = int(nonzero * fraction)
    if k == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    return top_k_mask(key, k).reshape(shape).to(dtype)
