"""The streamed task-arithmetic merges: TIES, DARE, breadcrumbs and DELLA in row pieces.

`build_merge` (steps/merge.py) gives these methods two nodes per tensor instead of one whole
`Merge`: `PruneStats`, a reduction that finds each task vector's pruning rule by passes over
row pieces of the inputs (ops/stream_prune.py: magnitude cuts by counting, L1 norms), and
`PrunedMerge`, which prunes, elects signs and sums any rows once the rules are known. Memory is
a few pieces and the histograms, whatever the tensor's size; the plan says how many passes.
The kept sets equal mergekit's wherever the k-th magnitude is unique (tie rule: ops/select.py);
random masks are counter-based draws (ops/rng.py), the same whole or in pieces on any device.
Oracle: tests/steps/test_task_vectors.py (whole against pieces, mergekit goldens for TIES and
breadcrumbs, keep-rate statistics for DARE and DELLA).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, ClassVar

from recipekit.dtypes import promote, torch_dtype
from recipekit.graph import Node, SameShape, intern
from recipekit.graph.passes import Reduction

#: the sparsifiers (mergekit's names) whose merges stream (`steps.merge.streamed_task_vectors`)
STREAMED_SPARSIFIERS = ("magnitude", "magnitude_outliers", "random", "della_magprune")


def needs_stats(sparsify: str, rescale: bool) -> bool:
    """Whether pruning needs whole-tensor numbers (a cut, or the L1 norms of a rescale)."""
    return sparsify in ("magnitude", "magnitude_outliers") or rescale


def stat_passes(sparsify: str, rescale: bool, n: int | None = None) -> int:
    """Passes `ops.stream_prune.prune_rules` makes over ``n`` entries at most, for the plan's
    bytes read: a cut's (`ops.select.select_passes`; a large tensor's usually one after its
    sample), and one for the L1 norms of a rescale."""
    from recipekit.ops.select import SAMPLE_MIN, select_passes

    cut = 0
    if sparsify in ("magnitude", "magnitude_outliers"):
        cut = select_passes(n if n is not None else SAMPLE_MIN)
    return cut + (1 if rescale else 0)


def stream_key(seed: int, tensor: str, operand: int) -> int:
    """The 32-bit key of one input's random mask in one tensor (`ops.rng.counter_draw`), from
    (``seed``, ``tensor``, ``operand``) through sha256, as a signed int32 (torch's type)."""
    digest = hashlib.sha256(f"{seed}\0{tensor}\0{operand}".encode()).digest()
    return int.from_bytes(digest[:4], "little", signed=True)


def work_dtype(nodes: tuple[Node, ...], native: bool) -> str:
    """The dtype the kernels compute in: the inputs' promoted dtype for mergekit's way
    (`compute_dtype:` set: the inputs are already cast), else fp32 (fp64 for fp64 inputs)."""
    codes = [n.dtype for n in nodes]
    if native:
        return promote(codes)
    return "F64" if "F64" in codes else "F32"


def _deltas(pieces: tuple[Any, ...], work: str) -> list[Any]:
    """τ_i = θ_i − θ_b of one piece (the base last) in ``work``, each a fresh tensor. The
    stored base is widened inside the subtraction, not copied first: the same values (the
    widening is exact), one pass over the piece fewer."""
    import torch

    dtype = torch_dtype(work)
    b = pieces[-1]
    if torch.promote_types(b.dtype, dtype) != dtype:  # not a widening: round it first
        b = b.to(dtype)
    return [x.to(dtype, copy=True).sub_(b) for x in pieces[:-1]]


@dataclass(frozen=True, eq=False)
class PruneStats(Reduction):
    """Each task vector's pruning rule for one tensor: the magnitude cuts (TIES, breadcrumbs)
    and the L1 rescale factor, packed [M, 8] (ops/stream_prune.py `prune_rules`)."""

    operands: tuple[Node, ...]
    base: Node
    sparsify: str
    densities: tuple[float, ...]
    gammas: tuple[float, ...]
    epsilons: tuple[float, ...]
    keys: tuple[int, ...]
    rescale: bool
    work: str
    #: the L1 pass keeps the random masks it draws, as bits after the rules (n/8 bytes a task
    #: vector, at most `plan.cost.KEPT_BYTES` in all; DARE's where its inputs are held, DELLA's
    #: from the files too: steps/merge.py; `ops.stream_prune.prune_rules`)
    cache_masks: bool = False

    @property
    def passes(self) -> int:  # type: ignore[override]
        return stat_passes(self.sparsify, self.rescale, self.base.numel)

    @property
    def pass_scale(self) -> int:  # type: ignore[override]
        """DARE's L1 pass takes pieces of 512Ki values: its work per piece is a dozen small ops
        (draw, compare, pack, two sums) whose fp32 temporaries stay under the allocator's
        mapping threshold at that size, and fewer calls took its TinyLlama merge from 10.1 to
        9.5 s of user time. DELLA's takes 256Ki: its mask is some forty ops a piece
        (`ops.rank_keep`, ~5 µs of call overhead each), and its per-bin counts and their
        offsets are 8-byte values, 2 MiB there (TinyLlama DELLA: 18.7-18.9 → 17.4-17.5 s of
        user time); at 512Ki its heap grew by 4 MiB a piece (1.4 million page faults a run).
        Magnitude keys are 8-byte values in TIES's passes too."""
        return {"random": 4, "della_magprune": 2}.get(self.sparsify, 1)

    @property
    def inputs(self) -> tuple[Node, ...]:
        return self.operands + (self.base,)

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        from recipekit.graph.passes import PRUNE_RULE_WIDTH, mask_words

        return (len(self.operands),
                PRUNE_RULE_WIDTH + (mask_words(self.base.numel) if self.cache_masks else 0))

    @property
    def dtype(self) -> str:  # type: ignore[override]
        return "F64"

    @property
    def state_bytes(self) -> int:
        # two histograms per cut (32Ki + 64Ki int64), the per-row counts of a tie, and the
        # keys selection collects (two cuts per task vector at most: breadcrumbs)
        from recipekit.graph.passes import selection_bytes

        m = len(self.operands)
        return (2 * m * (3 << 15) * 8 + 2 * m * 8 * self.stream_rows
                + selection_bytes(self.base.numel, 2 * m) + (self.nbytes if self.cache_masks
                                                             else 0))

    @property
    def workspace(self) -> int:
        # per piece: the base and task vectors in the compute dtype, their keys, masks and
        # histogram scratch
        return (4 * len(self.operands) + 2) * 4 * self.base.numel

    def bounds(self) -> list[tuple[int, int]]:
        if _ranks_vector(self.sparsify, self.base):
            return [(0, self.base.shape[0])]  # DELLA ranks a vector as one row: one piece
        return super().bounds()

    def reduce(self, source: Any, whole: tuple[Any, ...]) -> Any:
        from recipekit.ops.stream_prune import prune_rules

        return prune_rules(source, deltas=lambda lo, hi, p: _deltas(p, self.work),
                           sparsify=self.sparsify, densities=self.densities,
                           gammas=self.gammas, epsilons=self.epsilons, keys=self.keys,
                           rescale=self.rescale, n=self.base.numel,
                           cache_masks=self.cache_masks)


class TaskVectorRows(SameShape):
    """An output computed by rows from ``operands`` and ``base`` (its rows, in that order)
    and one value of the whole tensor, `rule` (None: none needed): the streamed merges'
    common shape (`PrunedMerge`, `SceMerge`, steps/stream_merges.py `RamPlusMerge`)."""

    __slots__ = ()
    operands: tuple[Node, ...]
    base: Node

    @property
    def rule(self) -> Node | None:
        """The whole-tensor input a piece reads whole."""
        raise NotImplementedError(type(self).__name__)

    @property
    def shape_input(self) -> Node:
        """The input whose shape this node has."""
        return self.base

    @property
    def inputs(self) -> tuple[Node, ...]:
        rule = self.rule
        return self.operands + (self.base,) + ((rule,) if rule is not None else ())

    def row_inputs(self) -> tuple[bool, ...] | None:
        return (True,) * (len(self.operands) + 1) + ((False,) if self.rule is not None else ())

    def compute(self, args: tuple[Any, ...]) -> Any:
        return self.compute_rows(args, 0, self.shape[0] if self.shape else 1)


@dataclass(frozen=True, eq=False)
class PrunedMerge(TaskVectorRows):
    """One output tensor of a streamed task-arithmetic method, rounded once to ``dtype``:
    each task vector pruned by its rule (``stats``; None when pruning needs no whole-tensor
    number: DARE or DELLA without rescale), then `combine_task_vectors`."""

    rounds_once: ClassVar[bool] = True

    method: str
    operands: tuple[Node, ...]
    base: Node
    stats: PruneStats | None
    params: tuple[tuple[str, Any], ...]
    keys: tuple[int, ...]
    work: str
    dtype: str

    @property
    def rule(self) -> Node | None:
        return self.stats

    @property
    def piece_scale(self) -> int:  # type: ignore[override]
        """Pieces of up to 512Ki values, as long as the fp32 stack of task vectors stays at 2
        MiB (under the allocator's mapping threshold, `run.execute`): a piece's work is two
        dozen small ops, and with one task vector fewer calls took TinyLlama's DARE-TIES from
        8.5 to 7.4 s of user time, TIES 10.1 → 9.7 s and DELLA 33.8 → 31.8 s."""
        return max(1, 4 // len(self.operands))

    @property
    def workspace(self) -> int:
        # the stacked task vectors, their signs/masks and the fp32 sum
        return (2 * len(self.operands) + 2) * 4 * self.numel

    @property
    def row_block(self) -> int:  # type: ignore[override]
        sparsify = dict(_method_spec(self.method).fixed).get("sparsify")
        return self.base.shape[0] if _ranks_vector(sparsify, self.base) else 1

    def compute_rows(self, args: tuple[Any, ...], lo: int, hi: int) -> Any:
        from recipekit.merge import METHODS, resolve_params
        from recipekit.ops.stream_prune import prune_rows
        from recipekit.ops.task_arithmetic import combine_task_vectors, task_vectors

        spec = METHODS[self.method]
        fixed = dict(spec.fixed)
        m = len(self.operands)
        kw = resolve_params(spec, dict(self.params), m)
        rules = args[m + 1].cpu() if self.stats is not None else _no_rules(kw["densities"])
        b = args[m].to(torch_dtype(self.work))
        # each τ_i is pruned in its slot of the stack (in place where the rule allows)
        deltas = task_vectors(args[:m + 1], b.dtype, b)
        for i in range(m):
            tau = deltas[i]
            pruned = prune_rows(tau, lo, rules[i], sparsify=fixed["sparsify"],
                                density=kw["densities"][i],
                                epsilon=kw.get("epsilon", (0.0,) * m)[i], key=self.keys[i])
            if pruned is not tau:
                tau.copy_(pruned)
            del tau, pruned
        out = combine_task_vectors(b, deltas, kw["weights"], consensus=fixed.get("consensus"),
                                   normalize=kw["normalize"], lambda_=kw["lambda_"],
                                   int8_mask=kw["int8_mask"])
        return out.to(torch_dtype(self.dtype))


def _ranks_vector(sparsify: str | None, base: Node) -> bool:
    """DELLA on a vector: it ranks the whole 1-D tensor as one row (`ops.sparsify.
    della_keep_mask`), so its pieces must be the whole vector (`row_block`)."""
    return sparsify == "della_magprune" and len(base.shape) == 1


def _method_spec(method: str) -> Any:
    from recipekit.merge import METHODS

    return METHODS[method]


def _no_rules(densities: list[float]) -> Any:
    """Rules for pruning that needs no whole-tensor number (a random mask without rescale):
    no cut, no rescale; density ≥ 1 keeps everything without drawing."""
    import torch

    from recipekit.graph.passes import PRUNE_RULE_WIDTH

    rules = torch.zeros((len(densities), PRUNE_RULE_WIDTH), dtype=torch.float64)
    rules[:, 6] = float("nan")
    rules[:, 7] = torch.tensor([float(d >= 1) for d in densities], dtype=torch.float64)
    return rules


@dataclass(frozen=True, eq=False)
class SceStats(Reduction):
    """SCE's selection cut and task-vector weights for one tensor, packed fp64 [3 + M]
    (ops/stream_sce.py `sce_rules`)."""

    operands: tuple[Node, ...]
    base: Node
    fraction: float
    work: str
    #: the passes keep each piece's variance key (4n bytes; `ops.stream_sce.sce_rules`
    #: ``keep``), and the value keeps the selection as bits after the rules (n/8 bytes,
    #: ``keep_bits``), each where it holds at most `plan.cost.KEPT_BYTES`
    keep: bool = False
    keep_bits: bool = False

    @property
    def passes(self) -> int:  # type: ignore[override]
        from recipekit.ops.select import select_passes

        # the cut's, then the energies' (at most: they ride on a window pass that places the
        # cut, `ops.stream_sce._EnergyRide`)
        return select_passes(self.base.numel) + 1

    @property
    def inputs(self) -> tuple[Node, ...]:
        return self.operands + (self.base,)

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        from recipekit.graph.passes import mask_words

        return (3 + len(self.operands)
                + (1 + mask_words(self.base.numel) if self.keep_bits else 0),)

    @property
    def dtype(self) -> str:  # type: ignore[override]
        return "F64"

    @property
    def state_bytes(self) -> int:
        # the two histograms of the cut, the per-row counts of a tie and the keys selection
        # collects; the entries inside its window the energies keep (a key, a flat position
        # and each task vector's value: `ops.stream_sce._EnergyRide`); with ``keep``, every
        # piece's int32 variance key; with ``keep_bits``, the selection's bits
        from recipekit.dtypes import itemsize
        from recipekit.graph.passes import WINDOW_MAX, selection_bytes

        n = self.base.numel
        ride = min(n, WINDOW_MAX) * (12 + itemsize(self.work) * len(self.operands))
        return ((3 << 15) * 8 + 8 * self.stream_rows + selection_bytes(n, 1) + ride
                + (4 * n if self.keep else 0) + (self.nbytes if self.keep_bits else 0))

    @property
    def workspace(self) -> int:
        # per piece: the stacked task vectors and their key (made on the read-ahead thread),
        # the variance and the masked copy
        return (2 * len(self.operands) + 4) * 4 * self.base.numel

    def reduce(self, source: Any, whole: tuple[Any, ...]) -> Any:
        from recipekit.ops.stream_sce import sce_rules
        from recipekit.ops.task_arithmetic import task_vectors

        dtype = torch_dtype(self.work)
        return sce_rules(source, lambda lo, hi, p: task_vectors(p, dtype),
                         fraction=self.fraction, n=self.base.numel, keep=self.keep,
                         keep_bits=self.keep_bits)


@dataclass(frozen=True, eq=False)
class SceMerge(TaskVectorRows):
    """One output tensor of a streamed SCE, rounded once to ``dtype``: select by the cut,
    erase sign conflicts, weigh by ω (``stats``), any rows (`ops.stream_sce.sce_rows`)."""

    rounds_once: ClassVar[bool] = True

    operands: tuple[Node, ...]
    base: Node
    stats: SceStats
    int8_mask: bool
    work: str
    dtype: str

    @property
    def rule(self) -> Node | None:
        return self.stats

    @property
    def workspace(self) -> int:
        # the stacked task vectors, their masked and weighted copies, signs and the fp32 sum
        return (3 * len(self.operands) + 4) * 4 * self.numel

    def compute_rows(self, args: tuple[Any, ...], lo: int, hi: int) -> Any:
        from recipekit.ops.stream_sce import sce_rows
        from recipekit.ops.task_arithmetic import task_vectors

        m = len(self.operands)
        dtype = torch_dtype(self.work)
        b = args[m].to(dtype)
        deltas = task_vectors(args[:m + 1], dtype, b)
        out = sce_rows(b, deltas, lo, args[-1].cpu(), int8_mask=self.int8_mask)
        return out.to(torch_dtype(self.dtype))


def streamed_sce(operands: tuple[Node, ...], base: Node | None, params: dict[str, Any],
                 dtype: str) -> Node | None:
    """The streamed nodes of one SCE tensor, or None where the whole `Merge` stays: no
    non-base input, or inputs of at most `plan.cost.EXACT_BYTES` (`keeps_exact_kernel`), which
    keeps small tensors bit for bit mergekit's (the streamed ω differ by fp64 rounding)."""
    from recipekit.graph.passes import mask_words
    from recipekit.plan.cost import KEPT_BYTES, keeps_exact_kernel

    if base is None or not operands:
        return None
    work = work_dtype(operands + (base,), False)
    fraction = float(params.get("select_topk", 1.0))
    stats = SceStats(operands, base, fraction, work)
    if keeps_exact_kernel(stats):
        return None
    stats = SceStats(operands, base, fraction, work, keep=4 * base.numel <= KEPT_BYTES,
                     keep_bits=8 * mask_words(base.numel) <= KEPT_BYTES)
    return intern(SceMerge(operands, base, intern(stats), bool(params.get("int8_mask", False)),
                           work, dtype))
