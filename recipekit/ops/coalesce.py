"""Coalescing maps as gathers and group reductions: no dense map matrices.

MLTF (Zou et al., ICLR 2024; reference/coalescing.md §1.3) writes one rule per tensor,
``W' = M_a · W · rownorm(M_b^T)``, with 0/1 grouping matrices F (average) and T (copy). Along
one axis that is, for a partition of units of ``block`` features:

* coalescing an output axis (``"mean"``): small unit i = mean of its group's large units;
* coalescing an input axis (``"sum"``): small unit i = sum of its group's large units;
* de-coalescing an output axis (``"copy"``): large unit j = small unit g(j);
* de-coalescing an input axis (``"split"``): large unit j = small unit g(j) / |g(j)|.

Within a block the feature offset is kept. Sums run as a pairwise tree over the group's members,
so that summing 2^m identical copies (a de-coalesced tensor) is exact: coalesce ∘ decoalesce is
bit-exact for groups of 1, 2, 4, ... (reference §4.3). Division, not multiplication by a
reciprocal, so 1/3-groups are correctly rounded once. Everything runs in fp32 (fp64 for fp64
inputs); the caller rounds once. Oracle: tests/ops/test_coalesce.py compares with MLTF's dense
F/T matrices built in the test.

An axis map is ``(mode, segments)``; a segment ``(groups, block)`` covers ``len(units) · block``
consecutive features of the axis (fused tensors such as GPT-2's ``c_attn`` have three).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Groups = tuple[tuple[int, ...], ...]
Segment = tuple[Groups, int]
AxisMap = tuple[str, tuple[Segment, ...]]

COALESCE_MODES = ("mean", "sum")
DECOALESCE_MODES = ("copy", "split")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def pairwise_sum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum over ``dim`` as a balanced pairwise tree (exact for 2^m identical values)."""
    while x.shape[dim] > 1:
        n = x.shape[dim]
        half = n // 2
        s = x.narrow(dim, 0, half) + x.narrow(dim, half, half)
        x = torch.cat([s, x.narrow(dim, 2 * half, 1)], dim) if n % 2 else s
    return x.squeeze(dim)


def coalesce_axis(x: torch.Tensor, dim: int, axis: AxisMap) -> torch.Tensor:
    """Large -> small along ``dim``: group mean (``"mean"``) or sum (``"sum"``) per segment."""
    mode, segments = axis
    if mode not in COALESCE_MODES:
        raise ValueError(f"unknown coalescing mode {mode!r}")
    parts = []
    offset = 0
    for groups, block in segments:
        n_large = sum(len(g) for g in groups)
        seg = x.narrow(dim, offset, n_large * block)
        offset += n_large * block
        parts.append(_coalesce_segment(seg, dim, groups, block, mode, _compute_dtype(x)))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _coalesce_segment(x: torch.Tensor, dim: int, groups: Groups, block: int,
                      mode: str, dtype: torch.dtype) -> torch.Tensor:
    """Group sums/means of the ``block``-sized units of ``x`` along ``dim``, in ``dtype``.

    The units are gathered where they lie (``x`` viewed as (..., units, block, ...), no
    transposed copy) and in ``x``'s own dtype (a gather is exact), then widened to ``dtype``
    for the pairwise sums: the same additions in the same order as widening first.
    """
    pre, post = x.shape[:dim], x.shape[dim + 1:]
    units = x.reshape(*pre, -1, block, *post)
    out = torch.empty((*pre, len(groups), block, *post), dtype=dtype, device=x.device)
    by_size: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        by_size.setdefault(len(g), []).append(i)
    for size, idx in by_size.items():
        members = torch.tensor([j for i in idx for j in groups[i]], dtype=torch.long,
                               device=x.device)
        gathered = units.index_select(dim, members).to(dtype)
        gathered = gathered.view(*pre, len(idx), size, block, *post)
        reduced = pairwise_sum(gathered, dim + 1)
        if mode == "mean" and size > 1:
            reduced = reduced / size
        if len(idx) == len(groups) and idx == list(range(len(groups))):
            out = reduced
        else:
            out.index_copy_(dim, torch.tensor(idx, dtype=torch.long, device=x.device), reduced)
    return out.reshape(*pre, len(groups) * block, *post)


def coalesce_rows(axis: AxisMap, lo: int, hi: int
                  ) -> tuple[list[tuple[int, int]], AxisMap, int]:
    """What rows ``lo:hi`` of a tensor coalesced along dim 0 by ``axis`` need, so that a head
    (or neuron) coalescing runs in row pieces: the large rows to read (sorted runs ``(a, b)``),
    the axis map of those rows alone (each group re-indexed into them, its members in their
    order, so the sums run in the same order: bit for bit the whole map's rows), and where row
    ``lo`` falls in that smaller problem's output (its rows start at the first small unit that
    ``lo:hi`` touches). Oracle: tests/ops/test_coalesce.py, random partitions and pieces."""
    mode, segments = axis
    runs: list[tuple[int, int]] = []
    sub: list[Segment] = []
    first_row: int | None = None
    small_off = large_off = 0
    for groups, block in segments:
        n_small, n_large = len(groups), sum(len(g) for g in groups)
        u_lo = max(0, (lo - small_off) // block)
        u_hi = min(n_small, -(-(hi - small_off) // block))
        if u_lo < u_hi:
            if first_row is None:
                first_row = small_off + u_lo * block
            wanted = sorted({j for g in groups[u_lo:u_hi] for j in g})
            where = {j: k for k, j in enumerate(wanted)}
            sub.append((tuple(tuple(where[j] for j in g) for g in groups[u_lo:u_hi]), block))
            for j in wanted:
                a = large_off + j * block
                if runs and runs[-1][1] == a:
                    runs[-1] = (runs[-1][0], a + block)
                else:
                    runs.append((a, a + block))
        small_off += n_small * block
        large_off += n_large * block
    if first_row is None:
        raise ValueError(f"rows {lo}:{hi} are outside the coalesced axis")
    return runs, (mode, tuple(sub)), lo - first_row


def decoalesce_axis(x: torch.Tensor, dim: int, axis: AxisMap) -> torch.Tensor:
    """Small -> large along ``dim``: copy (``"copy"``) or copy ÷ group size (``"split"``)."""
    mode, segments = axis
    if mode not in DECOALESCE_MODES:
        raise ValueError(f"unknown de-coalescing mode {mode!r}")
    parts = []
    offset = 0
    for groups, block in segments:
        seg = x.narrow(dim, offset, len(groups) * block)
        offset += len(groups) * block
        parts.append(_decoalesce_segment(seg, dim, groups, block, mode))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _decoalesce_segment(x: torch.Tensor, dim: int, groups: Groups, block: int,
                        mode: str) -> torch.Tensor:
    moved = x.movedim(dim, 0)
    rest = moved.shape[1:]
    units = moved.reshape(len(groups), block, *rest)
    n_large = sum(len(g) for g in groups)
    owner = [0] * n_large
    for i, g in enumerate(groups):
        for j in g:
            owner[j] = i
    out = units.index_select(0, torch.tensor(owner, dtype=torch.long, device=x.device))
    if mode == "split" and any(len(g) > 1 for g in groups):
        sizes = torch.tensor([float(len(groups[i])) for i in owner], dtype=out.dtype,
                             device=x.device)
        out = out / sizes.view(-1, *([1] * (out.dim() - 1)))
    return out.reshape(n_large * block, *rest).movedim(0, dim)


def decoalesce_rows(axis: AxisMap, lo: int, hi: int
                    ) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """What rows ``lo:hi`` of a tensor de-coalesced along dim 0 by ``axis`` need, so that
    growing heads or neurons runs in row pieces: the small rows to read (sorted runs
    ``(a, b)``), and for each output row the index of its source among the rows read and the
    size of its group (the divisor of ``"split"``); `decoalesce_gathered` finishes the rows.
    Oracle: tests/ops/test_coalesce.py, random partitions and pieces against `decoalesce`."""
    _, segments = axis
    wanted: list[int] = []  # small rows, in order of first need
    source: list[int] = []
    sizes: list[int] = []
    small_off = large_off = 0
    for groups, block in segments:
        owner: dict[int, int] = {j: i for i, g in enumerate(groups) for j in g}
        n_large = len(owner)
        a, b = max(lo, large_off), min(hi, large_off + n_large * block)
        for row in range(a, b):
            j, f = divmod(row - large_off, block)
            i = owner[j]
            wanted.append(small_off + i * block + f)
            sizes.append(len(groups[i]))
        small_off += len(groups) * block
        large_off += n_large * block
    rows = sorted(set(wanted))
    where = {r: k for k, r in enumerate(rows)}
    source = [where[r] for r in wanted]
    runs: list[tuple[int, int]] = []
    for r in rows:
        if runs and runs[-1][1] == r:
            runs[-1] = (runs[-1][0], r + 1)
        else:
            runs.append((r, r + 1))
    return runs, source, sizes


def decoalesce_gathered(x: torch.Tensor, source: Sequence[int], sizes: Sequence[int],
                        axes: Sequence[AxisMap | None], *, scale: float = 1.0) -> torch.Tensor:
    """Rows of `decoalesce` (dim 0 mapped) from the small rows ``x`` that `decoalesce_rows`
    named: the same widening, copies, divisions (by each row's whole group size) and scale,
    in the same order, so each row is bit for bit the whole tensor's."""
    y = x.to(_compute_dtype(x)).index_select(
        0, torch.tensor(list(source), dtype=torch.long, device=x.device))
    mode = axes[0][0] if axes[0] is not None else "copy"
    if mode == "split" and any(s > 1 for s in sizes):
        div = torch.tensor([float(s) for s in sizes], dtype=y.dtype, device=y.device)
        y = y / div.view(-1, *([1] * (y.dim() - 1)))
    for dim, axis in enumerate(axes):
        if dim and axis is not None:
            y = decoalesce_axis(y, dim, axis)
    return y * scale if scale != 1.0 else y


def coalesce(members: Sequence[torch.Tensor], axes: Sequence[AxisMap | None], *,
             scale: float = 1.0) -> torch.Tensor:
    """One small tensor from the same tensor of each large layer in a depth group.

    Each member is width-coalesced along its mapped axes, then the members are averaged (a
    pairwise tree, exact for 2^m identical members) and the result is multiplied by ``scale``
    (MLTF's ×2 embedding compensation). Returns fp32 (fp64 for fp64 inputs).
    """
    mapped = []
    for m in members:
        y = m  # widened by the first gather (a gather is exact in any dtype)
        for dim, axis in enumerate(axes):
            if axis is not None:
                y = coalesce_axis(y, dim, axis)
        mapped.append(y.to(_compute_dtype(m)))
    out = mapped[0] if len(mapped) == 1 else pairwise_sum(torch.stack(mapped), 0) / len(mapped)
    return out * scale if scale != 1.0 else out


def decoalesce(x: torch.Tensor, axes: Sequence[AxisMap | None], *,
               scale: float = 1.0) -> torch.Tensor:
    """One large tensor from a small one: copies along output axes, split copies along input
    axes, then ``scale`` (MLTF's ×0.5). Returns fp32 (fp64 for fp64 inputs)."""
    y = x.to(_compute_dtype(x))
    for dim, axis in enumerate(axes):
        if axis is not None:
            y = decoalesce_axis(y, dim, axis)
    return y * scale if scale != 1.0 else y

