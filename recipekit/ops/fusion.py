"""Arcee Fusion (mergekit's `arcee_fusion`): take the other model's value only where it matters.

Why a module of its own: the selection is an outlier test on an importance score (a change
weighted by how much it moves the row's softmax), unlike any pruning of the task-arithmetic
family. Numerics as in `recipekit.ops.merge`: fp32 (fp64 if an input is fp64), rounded once
by the caller.

One deliberate difference from mergekit 0.1.5: for a tensor of more than 10^6 elements the
quartiles are estimated from 10^6 elements sampled with replacement, which mergekit draws
from torch's unseeded global generator (so its result changes from run to run); recipekit
draws them from the generator it is given (the per-tensor seeded one, `ops.rng`), so a
merge is reproducible. Up to 10^6 elements nothing is sampled and the result is mergekit's.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from recipekit.ops.operands import check_inputs
from recipekit.ops.sparsify import compute_dtype

#: above this many elements the quartiles come from a sample of this size (mergekit's)
QUANTILE_SAMPLE = 1_000_000


def fusion_importance(other: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Importance |b − a|·KL(softmax(b) ‖ softmax(a)), the KL taken per row (last axis) with
    1e-8 added to both distributions, so every element of a row shares the row's factor."""
    return (other - base).abs() * fusion_kl(other, base)


def fusion_kl(other: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """KL(softmax(b) + 1e-8 ‖ softmax(a) + 1e-8) per row of the last axis, kept as a
    length-1 last axis: the factor `fusion_importance` gives every element of the row."""
    p = F.softmax(other, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    return torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def quantile_sample(n: int, generator: torch.Generator | None) -> torch.Tensor | None:
    """The flat indices whose importance the quartiles are taken over: None (every element)
    up to `QUANTILE_SAMPLE` elements, else `QUANTILE_SAMPLE` indices drawn with replacement
    from ``generator`` (on its device). Both the whole kernel and the streamed threshold
    (`fusion_threshold_pieces`) draw here, so they see the same sample.

    Raises:
        ValueError: a tensor larger than the sample and no generator.
    """
    if n <= QUANTILE_SAMPLE:
        return None
    if generator is None:
        raise ValueError(f"arcee_fusion needs a generator for tensors of more than "
                         f"{QUANTILE_SAMPLE} elements (it samples their quartiles)")
    return torch.randint(n, (QUANTILE_SAMPLE,), generator=generator, device=generator.device)


def outlier_threshold(values: torch.Tensor) -> torch.Tensor:
    """median + 1.5·(Q3 − Q1) of ``values`` (flat, in any order), each quartile the element
    at index ⌊q·(n − 1)⌋ of the sorted values (q in fp32). The order of ``values`` does not
    matter: only their sorted values are read."""
    ordered = torch.sort(values.reshape(-1)).values
    at = (torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()
    q1, median, q3 = ordered[at.to(ordered.device)]
    return median + 1.5 * (q3 - q1)


def fusion_threshold(importance: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """median + 1.5·(Q3 − Q1) of the importance, each quartile the element at index
    ⌊q·(n − 1)⌋ of the sorted values (q in fp32); above `QUANTILE_SAMPLE` elements, of a
    sample drawn with replacement from `generator` (`quantile_sample`).

    Raises:
        ValueError: a tensor larger than the sample and no generator.
    """
    flat = importance.reshape(-1)
    sample = quantile_sample(flat.numel(), generator)
    if sample is not None:
        flat = flat[sample.to(flat.device)]
    return outlier_threshold(flat)


def fusion_threshold_pieces(pieces: Iterable[tuple[int, torch.Tensor]], n: int,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """`fusion_threshold` of an importance given as flat pieces, bit for bit.

    Why: the importance of a row needs only that row (`fusion_importance`), so a tensor can
    be scored in row pieces; the quartiles then need at most `QUANTILE_SAMPLE` values (every
    element of a small tensor, the sampled ones of a large), never the whole tensor. The
    sample's indices are drawn first (`quantile_sample`, the whole kernel's draw), each piece
    gives the values at the indices it holds (with their multiplicity), and the kept values,
    sorted, are the whole kernel's sorted values. ``pieces`` yields (flat offset, importance of
    that piece) in any order covering all ``n`` elements once; memory is the sample.
    Oracle: `fusion_threshold` on the whole importance (tests/ops/test_fusion.py).
    """
    sample = quantile_sample(n, generator)
    ordered = None if sample is None else torch.sort(sample.cpu()).values
    del sample
    # one buffer of the kept size, filled in place: pieces held until the end would pin the
    # allocator's heap under every later piece's temporaries (run/execute.py)
    kept: torch.Tensor | None = None
    for start, piece in pieces:
        flat = piece.reshape(-1)
        if kept is None:
            kept = torch.empty(n if ordered is None else len(ordered), dtype=flat.dtype,
                               device=flat.device)
        if ordered is None:
            kept[start:start + flat.numel()] = flat
            continue
        lo, hi = (int(i) for i in torch.searchsorted(
            ordered, torch.tensor([start, start + flat.numel()])))
        kept[lo:hi] = flat[(ordered[lo:hi] - start).to(flat.device)]
    assert kept is not None, "no pieces"
    return outlier_threshold(kept)


def arcee_fusion(a: torch.Tensor, b: torch.Tensor, *,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Arcee Fusion: a, with b's value where b's change is an upper outlier of importance.

    Formula: I = |b − a|·KL(softmax(b) ‖ softmax(a)) per row of the last axis (each
    distribution + 1e-8); T = median(I) + 1.5·IQR(I) over the whole tensor (quartiles at
    sorted index ⌊q·(n − 1)⌋); out = a + (b − a)·[I ≥ T]. A 1-D tensor is one row.

    Paper: none (mergekit's `arcee_fusion`, https://arcee.ai; reference/mergekit.md).
    Shapes: a, b [...] → [...] (not elementwise: T and the softmax read whole rows and the
    whole tensor). Oracle: mergekit 0.1.5 `arcee_fusion` goldens (a is the base), bit for
    bit up to 10^6 elements (tests/ops/test_fusion.py).

    Args:
        a: the base.
        b: the other input.
        generator: the quartiles' sample above 10^6 elements (module docstring).

    Returns:
        The fp32 (fp64) result.

    Example:
        >>> a = torch.zeros(2, 4)
        >>> b = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 4.0]])
        >>> arcee_fusion(a, b)
        tensor([[0., 0., 0., 0.],
                [0., 0., 0., 4.]])
    """
    check_inputs("arcee_fusion", [a, b])
    dtype = compute_dtype(a, b)
    base, other = a.to(dtype), b.to(dtype)
    if base.numel() == 0:
        return base.clone()
    importance = fusion_importance(other, base)
    return _select(base, other, importance, fusion_threshold(importance, generator))


def _select(base: torch.Tensor, other: torch.Tensor, importance: torch.Tensor,
            threshold: torch.Tensor) -> torch.Tensor:
    # an fp32 mask, as mergekit's: in bf16 the product and the sum are then fp32 too
    mask = (importance >= threshold).float()
    return base + (other - base) * mask


def fusion_scores(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(importance, KL per row) of any whole rows (last axis; a 1-D tensor is one row) of
    a, b, in the kernel's compute dtype: what `arcee_fusion` scores, row by row the same
    bytes. The KL is what `fusion_rows` needs again, so a streamed merge keeps it (one value
    per row) instead of recomputing both softmaxes."""
    dtype = compute_dtype(a, b)
    base, other = a.to(dtype), b.to(dtype)
    kl = fusion_kl(other, base)
    return (other - base).abs() * kl, kl


def fusion_rows(a: torch.Tensor, b: torch.Tensor, threshold: torch.Tensor,
                kl: torch.Tensor) -> torch.Tensor:
    """Any whole rows of `arcee_fusion`, given the whole tensor's threshold
    (`fusion_threshold` or `fusion_threshold_pieces`) and those rows' KL (`fusion_scores`,
    any shape holding one value per row): equal to those rows of the kernel."""
    dtype = compute_dtype(a, b)
    base, other = a.to(dtype), b.to(dtype)
    importance = (other - base).abs() * kl.to(base.device).reshape(*base.shape[:-1], 1)
    return _select(base, other, importance, threshold.to(importance.device))
