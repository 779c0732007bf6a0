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

import torch
import torch.nn.functional as F

from recipekit.ops.operands import check_inputs
from recipekit.ops.sparsify import compute_dtype

#: above this many elements the quartiles come from a sample of this size (mergekit's)
QUANTILE_SAMPLE = 1_000_000


def fusion_importance(other: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Importance |b − a|·KL(softmax(b) ‖ softmax(a)), the KL taken per row (last axis) with
    1e-8 added to both distributions, so every element of a row shares the row's factor."""
    p = F.softmax(other, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (other - base).abs() * kl


def fusion_threshold(importance: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """median + 1.5·(Q3 − Q1) of the importance, each quartile the element at index
    ⌊q·(n − 1)⌋ of the sorted values (q in fp32); above `QUANTILE_SAMPLE` elements, of a
    sample drawn with replacement from `generator`.

    Raises:
        ValueError: a tensor larger than the sample and no generator.
    """
    flat = importance.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:
        if generator is None:
            raise ValueError(f"arcee_fusion needs a generator for tensors of more than "
                             f"{QUANTILE_SAMPLE} elements (it samples their quartiles)")
        flat = flat[torch.randint(flat.numel(), (QUANTILE_SAMPLE,), generator=generator,
                                  device=generator.device).to(flat.device)]
    ordered = torch.sort(flat).values
    at = (torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()
    q1, median, q3 = ordered[at.to(ordered.device)]
    return median + 1.5 * (q3 - q1)


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
    # an fp32 mask, as mergekit's: in bf16 the product and the sum are then fp32 too
    mask = (importance >= fusion_threshold(importance, generator)).float()
    return base + (other - base) * mask
