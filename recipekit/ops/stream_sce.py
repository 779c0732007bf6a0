"""SCE in row pieces: the streaming form of `ops.task_arithmetic.sce`.

Why: SCE keeps the k = ⌊nnz(v)·f⌋ entries of largest variance v across the task vectors
(a top-k of the whole tensor), then weighs each task vector by its energy c_i = mean(τ_i²)
over the whole selected tensor — two whole-tensor numbers, so mergekit holds every task vector
in fp32. Here `sce_rules` finds them by passes over row pieces: `ops.select.select_cuts` on
the variance's magnitude key (nnz counted in its histogram pass), then one pass for the
energies; `sce_rows` erases sign conflicts and combines any rows once they are known.

Differences from the whole kernel, by design: the energies sum in fp64 piece by piece (the
kernel: an fp32 mean), so ω agrees to ~1e-7 relative, not bit for bit; the kept set is the
kernel's exactly (its tie rule is `ops.select`'s: lowest flat index first); nnz counts
variances that are nonzero as fp32 (the kernel counts them in the compute dtype: they differ
only for fp64 variances below fp32's smallest subnormal).
Oracle: tests/steps/test_task_vectors_sce.py (streamed against `ops.task_arithmetic.sce`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from recipekit.ops.select import KEEP_ALL, KEEP_NONE, Cut, keep_mask, magnitude_key, select_cuts
from recipekit.ops.sparsify import population_variance
from recipekit.ops.task_arithmetic import sce_combine

__all__ = ["sce_k", "sce_rows", "sce_rules", "variance_key"]

Deltas = Callable[[int, int, tuple[Any, ...]], torch.Tensor]


def variance_key(deltas: torch.Tensor) -> torch.Tensor:
    """The selection key of SCE: |Var_i(τ_i)| as fp32 bits (`magnitude_key`), per row."""
    return magnitude_key(population_variance(deltas))


def sce_k(nonzero: int, fraction: float) -> int:
    """k = ⌊nnz·f⌋ computed as the kernel does: an int64 tensor times a float, in fp32."""
    return int(torch.tensor(nonzero, dtype=torch.int64) * fraction)


def sce_rules(source: Any, deltas: Deltas, *, fraction: float, n: int) -> torch.Tensor:
    """The selection cut and the weights ω, packed fp64 [3 + M]: cut (value, row, count), ω.

    ``deltas(lo, hi, pieces)`` gives the stacked task vectors [M, rows, ...] of one piece in
    the compute dtype; ``n`` is the entries per task vector. Passes: none for the cut when
    f ≥ 1 or f ≤ 0, else 2–3 (`select_cuts`); then one for the energies.
    """
    if fraction >= 1:
        cut = KEEP_ALL
    elif fraction <= 0:
        cut = KEEP_NONE
    else:
        (cut,) = select_cuts(source.map, lambda lo, hi, p: [variance_key(deltas(lo, hi, p))],
                             [(0, 0)], n, source.rows,
                             k_of_nonzero=lambda nnz: sce_k(nnz, fraction))

    def energy(lo: int, hi: int, pieces: tuple[Any, ...]) -> torch.Tensor:
        d = _selected(deltas(lo, hi, pieces), lo, cut)
        return d.reshape(d.shape[0], -1).double().square().sum(dim=1)

    sums: torch.Tensor | None = None
    for part in source.map(energy):
        sums = part.cpu() if sums is None else sums + part.cpu()
    m = sums.shape[0] if sums is not None else 0
    energies = sums / n if sums is not None and n else torch.zeros(m, dtype=torch.float64)
    total = float(energies.sum())
    omega = (torch.full_like(energies, 1.0 / m) if abs(total) < 1e-6 else energies / total)
    return torch.cat([torch.tensor([cut.value, cut.row, cut.count], dtype=torch.float64),
                      omega])


def _selected(deltas: torch.Tensor, lo: int, cut: Cut) -> torch.Tensor:
    """The task vectors with the unselected entries zeroed (as the kernel's mask product)."""
    if cut == KEEP_ALL:
        return deltas
    keep = keep_mask(variance_key(deltas), lo, cut).reshape(deltas.shape[1:])
    return deltas * keep.to(deltas.dtype).unsqueeze(0)


def sce_rows(b: torch.Tensor, deltas: torch.Tensor, lo: int, rules: torch.Tensor, *,
             int8_mask: bool = False) -> torch.Tensor:
    """Rows ``lo:`` of SCE's output from the base rows and the task vectors' rows [M, ...]:
    select, erase (elected sign of Σ τ_i), θ_b + Σ ω_i e_i τ_i / max(Σ ω_i e_i, 1e-6)."""
    cut = Cut(*(int(v) for v in rules[:3].tolist()))
    deltas = _selected(deltas, lo, cut)
    return sce_combine(b, deltas, rules[3:].to(deltas.dtype).to(deltas.device), int8_mask)


def task_vectors(pieces: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """τ_i = θ_i − θ_b of one piece (the base last), stacked [M, ...] in ``dtype``."""
    b = pieces[-1].to(dtype)
    return torch.stack([x.to(dtype) - b for x in pieces[:-1]])
