"""Reinforced Agent Merging (RAM) and its tensor-local variant RAM+ (mergekit's `ram`,
`ramplus_tl`).

Why a module of its own: both methods weigh each task vector by how many models change an
element at all (a count of non-negligible deltas), not by sign or magnitude rank as the
task-arithmetic family does. Numerics as in `recipekit.ops.merge`: fp32 (fp64 if an input is
fp64), rounded once by the caller.

Paper: "Reinforced Agent Merging", https://arxiv.org/abs/2601.13572 (mergekit 0.1.5's
reference for both methods). Oracle: mergekit 0.1.5 `ram` / `ramplus_tl` goldens
(tests/goldens/merge/), and the formulas below recomputed in tests/ops/test_ram.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from recipekit.ops.operands import check_inputs
from recipekit.ops.sparsify import compute_dtype


def _counted_deltas(base: torch.Tensor, tensors: Sequence[torch.Tensor], epsilon: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z, nonzero, count): z_i = τ_i·[|τ_i| > ε] stacked [M, n], the mask itself, and
    c = Σ_i [|τ_i| > ε] per element [1, n], in the compute dtype of the inputs."""
    dtype = compute_dtype(base, *tensors)
    b = base.to(dtype)
    tau = torch.stack([t.to(dtype) - b for t in tensors]).reshape(len(tensors), -1)
    nonzero = tau.abs() > epsilon
    return tau * nonzero, nonzero, nonzero.sum(dim=0, keepdim=True)


def _combine(base: torch.Tensor, z: torch.Tensor, count: torch.Tensor,
             unique_scale: torch.Tensor | None) -> torch.Tensor:
    """θ_b + Σ_i (z_i·[c = 1]·λ_i + z_i·[c > 1] / max(c, 1)), summed over models in one
    reduction (the order mergekit sums in)."""
    unique, overlap = count == 1, count > 1
    solo = z * unique if unique_scale is None else z * unique * unique_scale.unsqueeze(-1)
    merged = (solo + z * overlap / count.clamp(min=1)).sum(dim=0, keepdim=True)
    return base.to(z.dtype) + merged.reshape(base.shape)


def ram(base: torch.Tensor, tensors: Sequence[torch.Tensor], *,
        epsilon: float = 1e-5) -> torch.Tensor:
    """RAM: keep a delta that one model alone makes, average the deltas several models share.

    Formula: τ_i = θ_i − θ_b; n_i = [|τ_i| > ε] (a non-negligible change); c = Σ_i n_i per
    element; out = θ_b + Σ_i n_i·τ_i / max(c, 1). So an element changed by one model takes
    that change in full, one changed by k models their mean change, and one no model changes
    stays θ_b. Elementwise (element j depends on element j of the inputs only). No model
    (M = 0) returns θ_b.

    Paper: https://arxiv.org/abs/2601.13572. Shapes: base and M × [...] → [...].
    Oracle: mergekit 0.1.5 `ram` goldens; the formula (tests/ops/test_ram.py).

    Args:
        base: θ_b.
        tensors: θ_1 … θ_M.
        epsilon: the magnitude a delta must exceed to count.

    Returns:
        The fp32 (fp64) merged tensor.

    Example:
        >>> base = torch.zeros(3)
        >>> ram(base, [torch.tensor([1.0, 2.0, 0.0]), torch.tensor([3.0, 0.0, 0.0])])
        tensor([2., 2., 0.])
    """
    check_inputs("ram", [base, *tensors])
    if not tensors:
        return base.to(compute_dtype(base), copy=True)
    z, _, count = _counted_deltas(base, tensors, epsilon)
    return _combine(base, z, count, None)


def ramplus_tl(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, r: float = 0.1,
               alpha: float = 0.2, epsilon: float = 1e-5) -> torch.Tensor:
    """RAM+ (tensor-local): RAM, with each model's lone changes scaled up by how much of its
    change it shares with other models in this tensor.

    Formula: n_i, c as in `ram`. Per model i, over the whole tensor: s_i = #{j: n_ij, c_j > 1}
    (its shared changes), u_i = #{j: n_ij, c_j = 1} (its lone ones), ρ_i = s_i / max(u_i, ε),
    λ_i = 1 + r·clamp(ρ_i, 0, α) (ρ and λ in fp32, as mergekit). out = θ_b + Σ_i n_i·τ_i·
    (λ_i if c = 1, 1/c if c > 1). Not elementwise: λ_i counts over the whole tensor. No model
    returns θ_b.

    Paper: https://arxiv.org/abs/2601.13572 ("tensor-local": the counts are per tensor, not
    per model). Shapes: base and M × [...] → [...].
    Oracle: mergekit 0.1.5 `ramplus_tl` goldens; the formula (tests/ops/test_ram.py).

    Args:
        base: θ_b.
        tensors: θ_1 … θ_M.
        r: the largest relative boost of lone changes is r·α.
        alpha: the clamp on ρ_i.
        epsilon: the magnitude a delta must exceed to count (also ρ's divisor guard).

    Returns:
        The fp32 (fp64) merged tensor.

    Example:
        >>> base = torch.zeros(4)
        >>> a, b = torch.tensor([1.0, 1.0, 1.0, 0.0]), torch.tensor([1.0, 0.0, 0.0, 2.0])
        >>> ramplus_tl(base, [a, b], r=0.5, alpha=1.0)
        tensor([1.0000, 1.2500, 1.2500, 3.0000])
    """
    check_inputs("ramplus_tl", [base, *tensors])
    if not tensors:
        return base.to(compute_dtype(base), copy=True)
    counts = ramplus_counts(base, tensors, epsilon=epsilon)
    return ramplus_rows(base, tensors, ramplus_scales(counts, r=r, alpha=alpha,
                                                      epsilon=epsilon), epsilon=epsilon)


def ramplus_counts(base: torch.Tensor, tensors: Sequence[torch.Tensor], *,
                   epsilon: float = 1e-5) -> torch.Tensor:
    """RAM+'s whole-tensor numbers, of any rows: int64 [2, M], the counts s_i (row 0: shared
    changes) and u_i (row 1: lone ones) of `ramplus_tl` over those rows.

    Why separate: the counts are the only thing RAM+ reads across the whole tensor, and
    counts of row pieces add up exactly, so a streamed merge sums them over pieces
    (steps/stream_merges.py) and gets the whole tensor's bit for bit."""
    dtype = compute_dtype(base, *tensors)
    b = base.to(dtype)
    nonzero = torch.stack([(t.to(dtype) - b).abs() > epsilon for t in tensors])
    nonzero = nonzero.reshape(len(tensors), -1)
    changed = nonzero.sum(dim=1)
    lone = (nonzero & (nonzero.sum(dim=0, dtype=torch.int32) == 1)).sum(dim=1)
    return torch.stack([changed - lone, lone])  # shared: changed but not alone


def ramplus_scales(counts: torch.Tensor, *, r: float = 0.1, alpha: float = 0.2,
                   epsilon: float = 1e-5) -> torch.Tensor:
    """λ_i = 1 + r·clamp(s_i / max(u_i, ε), 0, α) in fp32 (mergekit's), from the
    `ramplus_counts` of the whole tensor (moved to the CPU)."""
    shared, lone = counts.cpu()
    rho = shared / lone.clamp(min=epsilon)
    return 1 + r * rho.clamp(min=0, max=alpha)


def ramplus_rows(base: torch.Tensor, tensors: Sequence[torch.Tensor], scales: torch.Tensor, *,
                 epsilon: float = 1e-5) -> torch.Tensor:
    """Any rows of `ramplus_tl` given the whole tensor's λ (`ramplus_scales`): elementwise
    from there, so rows computed apart equal the whole kernel's rows bit for bit."""
    z, _, count = _counted_deltas(base, tensors, epsilon)
    return _combine(base, z, count, scales.to(z.device))
