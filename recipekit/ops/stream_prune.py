"""Pruning of task vectors in row pieces: the streaming form of `ops.sparsify`.

Why: TIES, breadcrumbs, DARE and DELLA prune each task vector τ_i = θ_i − θ_b by a rule over
the whole tensor (the k largest magnitudes, an L1 rescale, a random mask). `prune_rules` finds
each rule's whole-tensor numbers by passes over row pieces (`ops.select` for the magnitude
cuts; one more pass for the L1 norms of a rescale), packed in a small tensor; `prune_rows` then
prunes any rows of τ_i with them, so the output is computed piece by piece.

Differences from `ops.sparsify` (mergekit's whole-tensor kernels), by design:

* magnitude ties: the k largest by value, then by lowest flat index (`ops.select`); the kept set
  is mergekit's wherever the k-th magnitude is unique;
* random masks: a counter-based draw (`ops.rng.counter_draw`: keep where the 24-bit draw is
  below d·2^24, or p·2^24 for DELLA), the same whole or in pieces, on any device; mergekit's
  `torch.bernoulli` stream cannot be reproduced in pieces (the step's
  `random_masks: mergekit` keeps it, whole tensor);
* the L1 rescale factor's norms: fp32 sums of each row, added in fp64 (mergekit: one fp32 sum
  of the whole tensor).

Formulas otherwise as `ops.sparsify` (reference/merge-methods.md §2.6–2.7). Oracle:
tests/ops/test_stream_prune.py (against `ops.sparsify` where they agree, and statistics).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from recipekit.graph.passes import PRUNE_RULE_WIDTH, mask_words
from recipekit.ops.bitmask import bit_view, pack, put, unpack_rows
from recipekit.ops.rng import DRAW_BITS, counter_draw
from recipekit.ops.select import KEEP_ALL, KEEP_NONE, Cut, keep_mask, magnitude_key, select_cuts
from recipekit.ops.sparsify import RESCALE_EPS, della_keep_mask

__all__ = ["WIDTH", "prune_rows", "prune_rules"]

#: columns of a packed rule: keep cut (3), drop cut (3), L1 scale (NaN: none), all-kept flag,
#: masks-cached flag; with the flag, the task vector's random mask follows as bits
#: (`np.packbits` in flat order, padded to 8 bytes, viewed as fp64: `cached_mask`)
WIDTH = PRUNE_RULE_WIDTH
#: the sparsifiers whose mask is a draw, which the L1 pass of a rescale can hand on
RANDOM_SPARSIFIERS = ("random", "della_magprune")


def _cut_queries(sparsify: str, density: float, gamma: float, n: int
                 ) -> tuple[int | None, int | None, bool]:
    """(k kept from the top, k dropped from the top, keep everything) for one task vector."""
    if density >= 1:
        return None, None, True
    if sparsify == "magnitude":
        return (0, None, False) if density <= 0 or n == 0 else (max(1, int(density * n)),
                                                                None, False)
    if density <= 0:
        return 0, None, False
    keep, top = int(density * n), int(gamma * n)
    bot = max(0, n - keep - top)
    return n - bot, n - bot - keep, False  # ascending positions [bot, bot + keep)


def prune_rules(source: Any, *, deltas: Any, sparsify: str, densities: Sequence[float],
                gammas: Sequence[float], epsilons: Sequence[float], keys: Sequence[int],
                rescale: bool, n: int, cache_masks: bool = False) -> torch.Tensor:
    """Each task vector's pruning rule, packed [M, `WIDTH`] in fp64 (`prune_rows` reads it).

    ``source`` is a `RowSource` over the streamed inputs; ``deltas(lo, hi, pieces)`` gives the
    M task vectors of one piece in the compute dtype. ``n``: entries per task vector.
    ``cache_masks`` (a random sparsifier with rescale): the L1 pass keeps each mask it draws
    as bits after the rule, [M, WIDTH + ⌈n/64⌉] in all, so that the output pass reads it
    instead of drawing it again (and DELLA ranking every row again); on the CPU only.
    """
    m = len(densities)
    bits = rescale and cache_masks and sparsify in RANDOM_SPARSIFIERS
    packed = torch.zeros((m, WIDTH + (mask_words(n) if bits else 0)), dtype=torch.float64)
    packed[:, 6] = float("nan")
    cuts: list[tuple[Cut, Cut | None]] = [(KEEP_ALL, None)] * m
    if sparsify in ("magnitude", "magnitude_outliers"):
        queries, where = [], []
        for i in range(m):
            keep, drop, everything = _cut_queries(sparsify, densities[i], gammas[i], n)
            packed[i, 7] = float(everything)
            for k in (keep, drop):
                if k is not None:
                    where.append(i)
                    queries.append((i, k))
        rows = source.rows
        found = select_cuts(source.map, lambda lo, hi, p: [magnitude_key(t) for t in
                                                          deltas(lo, hi, p)], queries, n, rows)
        got: dict[int, list[Cut]] = {}
        for i, cut in zip(where, found, strict=True):
            got.setdefault(i, []).append(cut)
        for i, cs in got.items():
            cuts[i] = (cs[0], cs[1] if len(cs) > 1 else None)
    else:
        for i in range(m):
            packed[i, 7] = float(densities[i] >= 1)
    for i, (keep, drop) in enumerate(cuts):
        packed[i, 0:3] = torch.tensor([keep.value, keep.row, keep.count], dtype=torch.float64)
        if drop is not None:
            packed[i, 3:6] = torch.tensor([drop.value, drop.row, drop.count],
                                          dtype=torch.float64)
        else:
            packed[i, 3:6] = torch.tensor([KEEP_NONE.value, 0, 0], dtype=torch.float64)
    if rescale:
        packed[:, 6] = _l1_scales(source, deltas, packed, sparsify, densities, epsilons, keys,
                                  n, [bit_view(r[WIDTH:]) for r in packed] if bits else None)
    return packed


def _l1_scales(source: Any, deltas: Any, packed: torch.Tensor, sparsify: str,
               densities: Sequence[float], epsilons: Sequence[float],
               keys: Sequence[int], n: int, bits: list[np.ndarray] | None) -> torch.Tensor:
    """‖τ_i‖₁ / ‖m_i ⊙ τ_i‖₁ per task vector (`_piece_sum`, pieces added in order); NaN
    where either norm is below `RESCALE_EPS` (no rescale) or nothing is pruned. Task vectors
    in bf16/fp16 (a merge step's `compute_dtype:`) round both norms to their dtype and divide
    there, as mergekit's `rescaled_masked_tensor` does on such tensors. Each mask
    drawn on the CPU goes into ``bits`` (when given) at its flat offset, and sets the rule's
    masks-cached flag once every piece has put its own."""
    m = len(densities)
    row = n // max(1, source.rows)
    seen: set[torch.dtype] = set()

    def sums(lo: int, hi: int, pieces: tuple[Any, ...]
             ) -> tuple[int, torch.Tensor, list[np.ndarray | None]]:
        out = torch.zeros((m, 2), dtype=torch.float64)
        drawn: list[np.ndarray | None] = []
        for i, tau in enumerate(deltas(lo, hi, pieces)):
            seen.add(tau.dtype)
            mask = _mask(tau, lo, packed[i], sparsify, densities[i], epsilons[i], keys[i])
            size = tau.abs_()  # τ is the pass's own (``deltas`` gives fresh tensors)
            out[i, 0] = _piece_sum(size)
            out[i, 1] = out[i, 0] if mask is None else _piece_sum(size, mask)
            drawn.append(pack(mask) if bits is not None and mask is not None else None)
        return lo, out, drawn

    total = torch.zeros((m, 2), dtype=torch.float64)
    cached = [bits is not None] * m
    for lo, part, drawn in source.map(sums):
        total += part
        for i, packed_bits in enumerate(drawn):
            cached[i] = cached[i] and bits is not None and put(bits[i], lo * row, packed_bits)
    packed[:, 8] = torch.tensor([float(c) for c in cached], dtype=torch.float64)
    narrow = seen & {torch.bfloat16, torch.float16}
    if narrow:  # a `compute_dtype:` task vector: mergekit's two sums are in that dtype (torch
        # accumulates in fp32 and rounds once), and so is their quotient
        total = total.to(narrow.pop())
    scale = (total[:, 0] / total[:, 1]).double()
    total = total.double()
    small = (total[:, 0] < RESCALE_EPS) | (total[:, 1] < RESCALE_EPS) | (packed[:, 7] == 1)
    return torch.where(small, torch.full_like(scale, float("nan")), scale)


def _piece_sum(size: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Σ size (⊙ mask) over one piece, in fp64. An fp32 piece sums each row in fp32 (the masked
    one as a dot product) and the rows in fp64: within ~1e-9 relative of the exact sum at ~0.1
    ns a value, where widening every value to fp64 cost ~0.9 (two of them were a sixth of
    DARE's L1 pass). Rows, not pieces, are the fp32 unit: where the pieces split changes only
    the order of fp64 additions, as before."""
    if size.dtype != torch.float32:
        return (size if mask is None else size * mask).sum(dtype=torch.float64)
    rows = size.reshape(size.shape[0] if size.dim() > 1 else 1, -1)
    if mask is None:
        return rows.sum(dim=1).sum(dtype=torch.float64)
    return torch.linalg.vecdot(rows, mask.reshape(rows.shape)).sum(dtype=torch.float64)


def cached_mask(tau: torch.Tensor, lo: int, rule: torch.Tensor) -> torch.Tensor | None:
    """The mask of rows ``lo:`` of ``tau`` from the bits the L1 pass kept after ``rule``
    (`prune_rules` ``cache_masks``), 0/1 in τ's dtype; None when it kept none."""
    if rule.numel() <= WIDTH or not bool(rule[8]) or tau.device.type != "cpu":
        return None
    return unpack_rows(rule[WIDTH:], lo, tau.shape, tau.dtype)


def _mask(tau: torch.Tensor, lo: int, rule: torch.Tensor, sparsify: str, density: float,
          epsilon: float, key: int) -> torch.Tensor | None:
    """The 0/1 keep mask (τ's dtype) of rows ``lo:`` of one task vector; None keeps all."""
    if bool(rule[7]):
        return None
    if sparsify in ("magnitude", "magnitude_outliers"):
        keys = magnitude_key(tau)
        keep = keep_mask(keys, lo, Cut(*(int(v) for v in rule[0:3].tolist())))
        if sparsify == "magnitude_outliers":
            keep &= ~keep_mask(keys, lo, Cut(*(int(v) for v in rule[3:6].tolist())))
        return keep.reshape(tau.shape).to(tau.dtype)
    if density <= 0 and sparsify == "della_magprune":
        return torch.zeros_like(tau)
    rows = tau.shape[0] if tau.dim() else 1
    draw = counter_draw(key, lo, lo + rows, tau.numel() // max(1, rows), tau.device)
    if sparsify == "random":
        if density < 0:
            raise ValueError(f"density must be in [0, 1] for random pruning, got {density}")
        limit = int(density * (1 << DRAW_BITS))
        return _below(draw.reshape(tau.shape), limit, tau.dtype)
    return _as_mask(della_keep_mask(tau, draw.reshape(tau.shape), density=density,
                                    epsilon=epsilon, scale=1 << DRAW_BITS), tau.dtype)


def _below(draw: torch.Tensor, limit: int, dtype: torch.dtype) -> torch.Tensor:
    """(draw < limit) as 0/1 in ``dtype``. On the CPU through numpy: torch's compare and bool
    conversion cost ~1.1 ns per value on a piece, numpy's ~0.15 (the same values)."""
    if draw.device.type != "cpu" or dtype not in _NUMPY_MASKS:
        return (draw < limit).to(dtype)
    return _as_mask(torch.from_numpy(np.less(draw.numpy(), limit)), dtype)


_NUMPY_MASKS = {torch.float32: np.float32, torch.float64: np.float64}


def _as_mask(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask as 0/1 in ``dtype`` (through numpy on the CPU, see `_below`)."""
    if keep.device.type != "cpu" or dtype not in _NUMPY_MASKS:
        return keep.to(dtype)
    return torch.from_numpy(keep.numpy().astype(_NUMPY_MASKS[dtype]))


def prune_rows(tau: torch.Tensor, lo: int, rule: torch.Tensor, *, sparsify: str,
               density: float, epsilon: float, key: int) -> torch.Tensor:
    """Rows ``lo:`` of one pruned task vector: τ ⊙ m (times the L1 scale of a rescale).
    ``tau`` is consumed: a random mask multiplies it in place."""
    if sparsify == "della_magprune" and density < 1 and not 0 < density - epsilon < \
            density + epsilon < 1 and density > 0:
        raise ValueError(f"DELLA needs density ± epsilon inside (0, 1); got density {density},"
                         f" epsilon {epsilon}")
    magnitude = sparsify in ("magnitude", "magnitude_outliers")
    if magnitude and density <= 0:
        return torch.zeros_like(tau)  # as the whole kernels (not τ·0, whose zeros are signed)
    out = _magnitude_rows(tau, lo, rule) if magnitude else None
    if out is None:
        mask = cached_mask(tau, lo, rule) if sparsify in RANDOM_SPARSIFIERS else None
        if mask is None:
            mask = _mask(tau, lo, rule, sparsify, density, epsilon, key)
        if mask is None:
            return tau
        out = tau.mul_(mask)
    scale = float(rule[6])
    if scale == scale:  # not NaN
        out *= torch.tensor(scale, dtype=torch.float64).to(tau.dtype)
    return out


def _magnitude_rows(tau: torch.Tensor, lo: int, rule: torch.Tensor) -> torch.Tensor | None:
    """τ ⊙ m for a magnitude rule as shrinks, where a single threshold decides every entry of
    the rows (none of the cuts' boundary rows among them, finite thresholds, fp32): kept
    entries are τ, dropped ones ±0 with τ's sign, as τ·0 gives. None otherwise.

    Why: this is the output pass of TIES and breadcrumbs on every value; a bool mask and its
    conversion cost ~1.7 ns per value, `hardshrink` (|τ| > λ, else 0) and `copysign` ~0.2.
    """
    if bool(rule[7]) or tau.dtype != torch.float32:
        return None
    hi = lo + (tau.shape[0] if tau.dim() else 1)
    keep = _shrink_threshold(Cut(*(int(v) for v in rule[0:3].tolist())), lo, hi)
    drop = Cut(*(int(v) for v in rule[3:6].tolist()))
    top = None if drop.value == KEEP_NONE.value else _shrink_threshold(drop, lo, hi)
    if keep is None or (top is None and drop.value != KEEP_NONE.value):
        return None
    out = torch.nn.functional.hardshrink(tau, keep)
    if top is not None:  # breadcrumbs: the largest are dropped too (τ − τ = 0)
        out -= torch.nn.functional.hardshrink(tau, top)
    return torch.copysign(out, tau, out=out)


def _shrink_threshold(cut: Cut, lo: int, hi: int) -> float | None:
    """The λ with key > λ's key ⇔ `keep_mask` keeps it, for every entry of rows ``lo:hi`` (the
    cut's own row not among them: keys ≥ value before it, > value after), when λ is a finite
    fp32 value ≥ 0; None otherwise (keep-all, NaN or inf thresholds). A cut among the zeros
    (key 0: τ = ±0, most of a light fine-tune's task vector) gives 0 for any rows, its own
    included: a zero kept is τ and a zero dropped is τ·0, the same ±0."""
    if cut.value == 0:
        return 0.0
    if lo <= cut.row < hi:
        return None
    strict = cut.value - 1 if cut.row >= hi else cut.value
    if not 0 <= strict < 0x7F800000:  # below 0: keeps all; from inf's key up: not a float
        return None
    return float(torch.tensor(strict, dtype=torch.int32).view(torch.float32))
