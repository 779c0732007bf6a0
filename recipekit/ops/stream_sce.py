"""SCE in row pieces: the streaming form of `ops.task_arithmetic.sce`.

Why: SCE keeps the k = ⌊nnz(v)·f⌋ entries of largest variance v across the task vectors
(a top-k of the whole tensor), then weighs each task vector by its energy c_i = mean(τ_i²)
over the whole selected tensor — two whole-tensor numbers, so mergekit holds every task vector
in fp32. Here `sce_rules` finds them by passes over row pieces: `ops.select.select_cuts` on
the variance's magnitude key (nnz counted in its histogram pass), the energies summed on the
pass that places the cut (else in a pass of their own); `sce_rows` erases sign conflicts and
combines any rows once they are known.

Differences from the whole kernel, by design: the energies sum in fp64 piece by piece (the
kernel: an fp32 mean), so ω agrees to ~1e-7 relative, not bit for bit; the kept set is the
kernel's exactly (its tie rule is `ops.select`'s: lowest flat index first); nnz counts
variances that are nonzero as fp32 (the kernel counts them in the compute dtype: they differ
only for fp64 variances below fp32's smallest subnormal).
Oracle: tests/steps/test_task_vectors_sce.py (streamed against `ops.task_arithmetic.sce`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from recipekit.graph.passes import mask_words
from recipekit.ops import select as _select
from recipekit.ops.bitmask import bit_view, pack, put, set_bits, unpack_rows
from recipekit.ops.precision import numpy_floats
from recipekit.ops.select import (
    KEEP_ALL,
    KEEP_NONE,
    Cut,
    keep_mask,
    kept_entries,
    magnitude_key,
    select_cuts,
)
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


def sce_rules(source: Any, deltas: Deltas, *, fraction: float, n: int,
              keep: bool = False, keep_bits: bool | None = None) -> torch.Tensor:
    """The selection cut and the weights ω, packed fp64 [3 + M]: cut (value, row, count), ω.

    ``deltas(lo, hi, pieces)`` gives the stacked task vectors [M, rows, ...] of one piece in
    the compute dtype; ``n`` is the entries per task vector. Passes: none for the cut when
    f ≥ 1 or f ≤ 0, else 2–3 (`select_cuts`); then one for the energies, unless they rode on
    the window pass of a large tensor's cut (`_EnergyRide`): usually a sample and one pass.

    ``keep``: each piece's variance key is computed once and kept through the passes (4n
    bytes). ``keep_bits`` (default: ``keep``): the pass that sums the energies keeps the
    selection as bits after the rules ([4 + M + ⌈n/64⌉]: a kept flag, then `np.packbits` of
    the flat mask, padded to 8 bytes; n/8 bytes), which `sce_rows` reads instead of computing
    the variance again; a tensor too large to keep its keys may still keep its bits. Why:
    the variance is exactly torch's fp64 Welford (`population_variance`), ~7 ns a value for
    two task vectors, and it was computed in every pass, three times a value in all (MLP
    tensors of a TinyLlama SCE of three: 62 → 44 ns a value). Pieces may run on several
    threads: each touches its own entries. A source that reads the files forms the task
    vectors and their keys on its read-ahead thread (``prepare``,
    `graph.passes.RowSource.map`): the task vectors there, TinyLlama SCE 30.9 → 27.1 s; their
    keys too, with the energies on the window pass, 23.6 → 22.3 s (one pass fewer, the work
    split more evenly between the two threads).
    """
    if keep_bits is None:
        keep_bits = keep
    cache: dict[int, torch.Tensor] | None = {} if keep else None

    def prepared(lo: int, hi: int, pieces: Any, *, with_key: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A piece's task vectors and (``with_key``) variance key, made where it is read."""
        tau = deltas(lo, hi, pieces)
        if not with_key:
            return tau, None
        key = cache.get(lo) if cache is not None else None
        return tau, variance_key(tau) if key is None else key

    run = functools.partial(source.map, prepare=prepared)

    def keys(lo: int, hi: int, piece: tuple[torch.Tensor, torch.Tensor | None]
             ) -> torch.Tensor:
        key = piece[1]
        assert key is not None
        if cache is not None:
            cache.setdefault(lo, key)
        return key

    room = torch.zeros(mask_words(n), dtype=torch.float64) if keep_bits else None
    bits = bit_view(room) if room is not None else None
    row = n // max(1, source.rows)
    rides: list[_EnergyRide] = []

    def ride(bounds: Mapping[int, tuple[int, int]]) -> _EnergyRide:
        rides.append(_EnergyRide(*bounds[0], row, bits))
        return rides[-1]

    if fraction >= 1:
        cut = KEEP_ALL
    elif fraction <= 0:
        cut = KEEP_NONE
    else:
        (cut,) = select_cuts(run, lambda lo, hi, p: [keys(lo, hi, p)],
                             [(0, 0)], n, source.rows,
                             k_of_nonzero=lambda nnz: sce_k(nnz, fraction), ride=ride)
    sums: torch.Tensor | None = None
    if rides and rides[0].covers(cut):  # the window pass summed the energies: no pass of its own
        if cache is not None:
            cache.clear()
        sums, kept = rides[0].finish(cut), rides[0].kept
    else:
        kept = keep_bits and cut != KEEP_ALL

        def energy(lo: int, hi: int, piece: tuple[torch.Tensor, torch.Tensor | None]
                   ) -> torch.Tensor:
            nonlocal kept
            tau = piece[0]
            chosen = (None if cut == KEEP_ALL else _keep(keys(lo, hi, piece), lo, cut, tau)
                      if cut != KEEP_NONE else torch.zeros(tau.shape[1:], dtype=torch.bool))
            if chosen is not None and not (bits is not None
                                           and put(bits, lo * row, pack(chosen))):
                kept = False
            if cache is not None:
                cache.pop(lo, None)
            return _energies(tau, chosen)

        decided = cut in (KEEP_ALL, KEEP_NONE)
        for part in source.map(energy, prepare=functools.partial(prepared,
                                                                 with_key=not decided)):
            sums = part.cpu() if sums is None else sums + part.cpu()
    m = sums.shape[0] if sums is not None else 0
    energies = sums / n if sums is not None and n else torch.zeros(m, dtype=torch.float64)
    total = float(energies.sum())
    omega = (torch.full_like(energies, 1.0 / m) if abs(total) < 1e-6 else energies / total)
    rules = torch.cat([torch.tensor([cut.value, cut.row, cut.count], dtype=torch.float64),
                       omega])
    if room is None:
        return rules
    return torch.cat([rules, torch.tensor([float(kept)], dtype=torch.float64), room])


class _EnergyRide:
    """The energies, riding on the selection's window pass (`ops.select.Ride`): each piece's
    Σ τ_i² over the entries whose keys lie above the window (kept whatever the cut inside it),
    and the keys, flat positions and task vectors of the entries inside it, whose selection
    the cut decides at the end (`finish`). With ``bits``, the entries above the window as bits,
    the kept ones inside it added at the end. Why: the energy pass read every piece once more
    and formed the task vectors again (a TinyLlama SCE's MLP windows hold up to 6% of their
    entries: ~14 MiB kept, against a pass over 69 MiB of bf16 inputs); the window holds at most
    `WINDOW_MAX` entries (the selection's own bound), past which the energy pass runs instead.
    The sums add in another order than that pass's: ω may differ in its last fp64 bit.
    """

    def __init__(self, lower: int, upper: int, row: int, bits: np.ndarray | None) -> None:
        self.lower, self.upper, self.row, self.bits = lower, upper, row, bits
        self.sums: torch.Tensor | None = None
        self.inside: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = []
        self.count, self.limit = 0, _select.WINDOW_MAX
        self.kept = bits is not None

    def piece(self, lo: int, hi: int, piece: Any, keys: Any, inside: Any, above: Any
              ) -> object:
        """``piece``: the task vectors and key `sce_rules` prepared."""
        tau, key, at, above = piece[0], keys[0], inside[0], above[0]
        flat = tau.reshape(tau.shape[0], -1)
        packed = pack(above) if self.bits is not None else None
        return (lo, _energies(tau, above), packed,
                (key.reshape(-1)[at], at + lo * self.row, flat[:, at]))

    def add(self, part: object) -> None:
        lo, sums, packed, inside = part  # type: ignore[misc]
        self.sums = sums.cpu() if self.sums is None else self.sums + sums.cpu()
        if self.bits is not None and not put(self.bits, lo * self.row, packed):
            self.kept = False
        if self.inside is None:
            return
        self.count += len(inside[0])
        if self.count > self.limit:  # more than the selection's window holds: drop it
            self.inside = None
        else:
            self.inside.append(tuple(t.cpu() for t in inside))  # type: ignore[arg-type]

    def covers(self, cut: Cut) -> bool:
        """Whether this pass tells which entries ``cut`` keeps: the cut fell inside the window,
        and the window did not overflow."""
        return self.inside is not None and self.sums is not None \
            and self.lower <= cut.value < self.upper

    def finish(self, cut: Cut) -> torch.Tensor:
        """Σ τ_i² over the entries ``cut`` keeps (fp64 [M]), where this pass `covers` it."""
        assert self.inside is not None and self.sums is not None
        sums = self.sums
        for keys, flat, tau in self.inside:  # a piece's: its rows whole, the cut's row in one
            chosen = kept_entries(keys, torch.div(flat, self.row, rounding_mode="floor"), cut)
            if self.bits is not None and self.kept:
                set_bits(self.bits, flat[chosen].numpy())
            sums = sums + _energies(tau, chosen)
        self.inside = None
        return sums


def _energies(tau: torch.Tensor, chosen: torch.Tensor | None) -> torch.Tensor:
    """Σ (τ_i·chosen)² over one piece of each task vector [M, ...], in fp64 (torch's sum).

    Why numpy: an fp32 value squared in fp64 is exact, so numpy's cast-and-square gives the
    same fp64 values as torch's ``.double().square()``, in one pass instead of three (and its
    bool product the same IEEE products as torch's after a float conversion): 5.1 → 1.5 ns an
    entry of two task vectors, the same bits (tests/ops/test_stream_sce.py)."""
    m = tau.shape[0]
    if numpy_floats(tau):
        t = tau.reshape(m, -1).contiguous().numpy()
        with np.errstate(invalid="ignore"):  # inf·0 is NaN, as torch's product
            if chosen is not None:
                t = np.multiply(t, chosen.reshape(1, -1).numpy())
            return torch.from_numpy(np.square(t, dtype=np.float64)).sum(dim=1)
    d = tau if chosen is None else tau * chosen.to(tau.dtype).unsqueeze(0)
    return d.reshape(m, -1).double().square().sum(dim=1)


def _keep(key: torch.Tensor, lo: int, cut: Cut, deltas: torch.Tensor) -> torch.Tensor:
    """The selection of rows ``lo:`` (bool, the task vectors' shape without dim 0)."""
    return keep_mask(key, lo, cut).reshape(deltas.shape[1:])


def _kept_selection(deltas: torch.Tensor, lo: int, m: int, rules: torch.Tensor
                    ) -> torch.Tensor | None:
    """The selection of rows ``lo:`` (bool) from the bits `sce_rules` kept, or None when it
    kept none."""
    if rules.numel() <= 3 + m or not bool(rules[3 + m]) or deltas.device.type != "cpu":
        return None
    return unpack_rows(rules[4 + m:], lo, deltas.shape[1:], torch.bool)


def sce_rows(b: torch.Tensor, deltas: torch.Tensor, lo: int, rules: torch.Tensor, *,
             int8_mask: bool = False) -> torch.Tensor:
    """Rows ``lo:`` of SCE's output from the base rows and the task vectors' rows [M, ...]:
    select, erase (elected sign of Σ τ_i), θ_b + Σ ω_i e_i τ_i / max(Σ ω_i e_i, 1e-6)."""
    m = deltas.shape[0]
    cut = Cut(*(int(v) for v in rules[:3].tolist()))
    keep = None
    if cut != KEEP_ALL:
        keep = _kept_selection(deltas, lo, m, rules)
        if keep is None:
            keep = _keep(variance_key(deltas), lo, cut, deltas)
    return sce_combine(b, deltas, rules[3:3 + m].to(deltas.dtype).to(deltas.device),
                       int8_mask, keep)
