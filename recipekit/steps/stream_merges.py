"""The streamed forms of arcee_fusion, ramplus_tl and nuslerp by columns (`nuslerp_row_wise`).

`build_merge` (steps/merge.py) asks `streamed_merge` for each tensor of these methods and gets
two nodes instead of one whole `Merge`: a reduction that reads row pieces of the inputs for
the few whole-tensor numbers the method needs, and an output node that computes any rows
once they are known (`compute_rows`). So no input is held whole, whatever its size.

* arcee_fusion: `FusionThreshold` scores row pieces (the importance of a row needs that row
  only) and keeps the values the quartiles read: all of them up to 10^6 elements, else those
  at the kernel's 10^6 sampled indices, drawn first from the same per-tensor generator
  (`ops.fusion.fusion_threshold_pieces`), and each row's KL; `FusionMerge` selects by rows
  with them. Bit for bit the whole kernel's, in fp32 and in mergekit's `compute_dtype:`.
* ramplus_tl: `RamPlusScales` counts each model's shared and lone changes over pieces (integer
  counts add up exactly) and turns them into λ as the kernel does; `RamPlusMerge` is then
  elementwise. Bit for bit the whole kernel's.
* nuslerp with `nuslerp_flatten: false, nuslerp_row_wise: true` slerps axis-0 vectors (the
  columns W[:, j] of a matrix: every row holds a part of each), so `NuslerpColumns` sums
  ‖v0‖², ‖v1‖² and v0·v1 per column over row pieces in fp64 and gives two coefficients per
  column (`ops.gram.nuslerp_column_coefficients`); `ColumnCombine` writes any rows. The kernel
  reduces in fp32, so the two agree to ~1e-6 relative, not bit for bit: as for the Gram methods
  (steps/gram.py), tensors whose inputs hold at most `plan.cost.EXACT_BYTES` keep the exact
  whole kernel, and so does mergekit's `compute_dtype:`.

A vector (1-D tensor) is one row for arcee_fusion (its softmax spans the vector), so its nodes
read it in one piece (`row_block`); memory is then that row, as for a row of a matrix.
Oracle: tests/steps/test_stream_merges.py (whole kernel against pieces of random sizes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from recipekit.dtypes import itemsize, torch_dtype
from recipekit.graph import Node, SameShape, intern
from recipekit.graph.passes import Reduction
from recipekit.steps.task_vectors import TaskVectorRows, work_dtype

#: the methods this module streams
STREAMED_METHODS = ("arcee_fusion", "ramplus_tl", "nuslerp")
#: elements above which arcee_fusion samples its quartiles (`ops.fusion.QUANTILE_SAMPLE`;
#: planning imports no torch)
QUANTILE_SAMPLE = 1_000_000


@contextlib.contextmanager
def _compute_in(native: bool) -> Iterator[None]:
    """mergekit's compute dtype for the kernels called inside when ``native`` (`ops.precision`;
    entered on the thread that computes: reductions map pieces on worker threads)."""
    if not native:
        yield
        return
    from recipekit.ops.precision import native_dtype

    with native_dtype():
        yield


def _one_row(node: Node) -> int:
    """The row alignment that makes a vector one piece (its length), else 1."""
    return node.shape[0] if len(node.shape) == 1 else 1


@dataclass(frozen=True, eq=False)
class FusionThreshold(Reduction):
    """arcee_fusion's threshold median + 1.5·IQR of the importance of one tensor, then the KL
    of each last-axis row ([1 + rows], the compute dtype), from one pass over row pieces of a
    (the base) and b. The output's pieces read their rows' KL here rather than recompute two
    softmaxes (half the work of the merge)."""

    a: Node
    b: Node
    seed: int
    tensor: str
    work: str
    native: bool

    passes: ClassVar[int] = 1

    @property
    def kl_rows(self) -> int:
        """Last-axis rows of the tensor (one KL each)."""
        return self.a.numel // max(1, self.a.shape[-1])

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return (1 + self.kl_rows,)

    @property
    def dtype(self) -> str:  # type: ignore[override]
        return self.work

    @property
    def state_bytes(self) -> int:
        # the kept importance values (every one, or the sample) and their sort (values and
        # int64 indices); the sample's indices and their sort (values and indices); the KL
        kept = min(self.a.numel, QUANTILE_SAMPLE)
        indices = 3 * 8 * QUANTILE_SAMPLE if self.a.numel > QUANTILE_SAMPLE else 0
        return ((2 * itemsize(self.work) + 8) * kept + indices
                + 2 * itemsize(self.work) * self.kl_rows)

    @property
    def workspace(self) -> int:
        # per piece: both inputs in the compute dtype, two softmaxes and their logs, the log
        # ratio and its product, |b - a|, the importance (measured: 6 was short)
        return 10 * itemsize(self.work) * self.a.numel

    def bounds(self) -> list[tuple[int, int]]:
        if len(self.a.shape) == 1:
            return [(0, self.a.shape[0])]  # a vector is one row: one piece
        return super().bounds()

    def reduce(self, source: Any, whole: tuple[Any, ...]) -> Any:
        import torch

        from recipekit.ops.fusion import fusion_scores, fusion_threshold_pieces
        from recipekit.ops.rng import tensor_generator

        n = self.a.numel
        if n == 0:
            return torch.zeros(self.shape, dtype=torch_dtype(self.work))
        row = n // max(1, source.rows)
        # the threshold, then each row's KL written in place as pieces come (`ops.fusion`)
        out = torch.empty(self.shape, dtype=torch_dtype(self.work))
        filled = 1

        def score(lo: int, hi: int, pieces: tuple[Any, ...]) -> tuple[int, Any, Any]:
            with _compute_in(self.native):
                return (lo * row, *fusion_scores(pieces[0], pieces[1]))

        def scored() -> Iterator[tuple[int, Any]]:
            nonlocal filled
            for start, importance, kl in source.map(score):
                kl = kl.reshape(-1)
                out[filled:filled + kl.numel()] = kl
                filled += kl.numel()
                yield start, importance

        # the kernel's generator, which `quantile_sample` draws from above its sample size
        generator = tensor_generator(self.seed, self.tensor)
        out[0] = fusion_threshold_pieces(scored(), n, generator).reshape(())
        return out


@dataclass(frozen=True, eq=False)
class FusionMerge(SameShape):
    """One output tensor of a streamed arcee_fusion, rounded once to ``dtype``: any whole
    rows of a, with b's value where the importance reaches ``threshold``."""

    rounds_once: ClassVar[bool] = True
    method: ClassVar[str] = "arcee_fusion"

    a: Node
    b: Node
    threshold: FusionThreshold
    dtype: str
    native: bool

    @property
    def shape_input(self) -> Node:
        """The input whose shape this node has."""
        return self.a

    @property
    def row_block(self) -> int:  # type: ignore[override]
        return _one_row(self.a)

    @property
    def workspace(self) -> int:
        # both inputs in the compute dtype, the softmaxes and importance, the mask, the result
        return 8 * itemsize(self.threshold.work) * self.numel

    def row_inputs(self) -> tuple[bool, ...] | None:
        return (True, True, False)

    def compute(self, args: tuple[Any, ...]) -> Any:
        return self.compute_rows(args, 0, self.shape[0] if self.shape else 1)

    def compute_rows(self, args: tuple[Any, ...], lo: int, hi: int) -> Any:
        from recipekit.ops.fusion import fusion_rows

        stats = args[2]
        if len(self.shape) == 1:  # one row, one piece
            kl = stats[1:]
        else:
            per_row = self.threshold.kl_rows // self.shape[0]  # KL rows per dim-0 row
            kl = stats[1 + lo * per_row:1 + hi * per_row]
        with _compute_in(self.native):
            return fusion_rows(args[0], args[1], stats[:1], kl).to(torch_dtype(self.dtype))


@dataclass(frozen=True, eq=False)
class RamPlusScales(Reduction):
    """ramplus_tl's λ_i for one tensor (fp32 [M]), from each model's shared and lone change
    counts summed over row pieces (`ops.ram.ramplus_counts`)."""

    operands: tuple[Node, ...]
    base: Node
    r: float
    alpha: float
    epsilon: float
    native: bool

    passes: ClassVar[int] = 1

    @property
    def inputs(self) -> tuple[Node, ...]:
        return self.operands + (self.base,)

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return (len(self.operands),)

    @property
    def dtype(self) -> str:  # type: ignore[override]
        return "F32"

    @property
    def state_bytes(self) -> int:
        return 16 * len(self.operands)

    @property
    def workspace(self) -> int:
        # per piece: the task vectors in the compute dtype, their masks and the count
        m = len(self.operands)
        return (2 * m + 2) * 8 * self.base.numel

    def reduce(self, source: Any, whole: tuple[Any, ...]) -> Any:
        import torch

        from recipekit.ops.ram import ramplus_counts, ramplus_scales

        m = len(self.operands)

        def count(lo: int, hi: int, pieces: tuple[Any, ...]) -> Any:
            with _compute_in(self.native):
                return ramplus_counts(pieces[m], list(pieces[:m]), epsilon=self.epsilon).cpu()

        total = torch.zeros((2, m), dtype=torch.int64)
        for part in source.map(count):
            total += part
        return ramplus_scales(total, r=self.r, alpha=self.alpha, epsilon=self.epsilon)


@dataclass(frozen=True, eq=False)
class RamPlusMerge(TaskVectorRows):
    """One output tensor of a streamed ramplus_tl, rounded once to ``dtype``: elementwise
    once ``scales`` (the whole tensor's λ) is known (`ops.ram.ramplus_rows`)."""

    rounds_once: ClassVar[bool] = True
    method: ClassVar[str] = "ramplus_tl"

    operands: tuple[Node, ...]
    base: Node
    scales: RamPlusScales
    dtype: str
    native: bool

    @property
    def rule(self) -> Node | None:
        return self.scales

    @property
    def workspace(self) -> int:
        # the stacked task vectors, their masks and masked copies, the count and the sum
        return (3 * len(self.operands) + 3) * 8 * self.numel

    def compute_rows(self, args: tuple[Any, ...], lo: int, hi: int) -> Any:
        from recipekit.ops.ram import ramplus_rows

        m = len(self.operands)
        with _compute_in(self.native):
            out = ramplus_rows(args[m], list(args[:m]), args[-1], epsilon=self.scales.epsilon)
        return out.to(torch_dtype(self.dtype))


def _column_vectors(pieces: tuple[Any, ...], has_base: bool, work: str) -> tuple[Any, Any]:
    """nuslerp's v0, v1 of one piece (a, b[, base]) in ``work``: the inputs, or their task
    vectors with a base."""
    dtype = torch_dtype(work)
    v0, v1 = pieces[0].to(dtype), pieces[1].to(dtype)
    if has_base:
        b = pieces[2].to(dtype)
        v0, v1 = v0 - b, v1 - b
    return v0, v1


@dataclass(frozen=True, eq=False)
class NuslerpColumns(Reduction):
    """nuslerp's `row_wise` coefficients for one tensor, fp64 [2, *shape[1:]]: one pass over
    row pieces summing the column norms and dots (`ops.gram.nuslerp_column_sums`)."""

    a: Node
    b: Node
    base: Node | None
    t: float
    work: str

    passes: ClassVar[int] = 1

    @property
    def inputs(self) -> tuple[Node, ...]:
        return (self.a, self.b) + ((self.base,) if self.base is not None else ())

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return (2, *self.a.shape[1:])

    @property
    def dtype(self) -> str:  # type: ignore[override]
        return "F64"

    @property
    def state_bytes(self) -> int:
        # the running sums and one piece's (3 columns-sized fp64 each), the coefficients
        return 8 * 8 * (self.a.numel // max(1, self.a.shape[0]))

    @property
    def workspace(self) -> int:
        # per piece: the vectors in the compute dtype, their fp64 copies and products
        return (3 * itemsize(self.work) + 3 * 8) * self.a.numel

    def reduce(self, source: Any, whole: tuple[Any, ...]) -> Any:
        from recipekit.ops.gram import nuslerp_column_coefficients, nuslerp_column_sums

        has_base = self.base is not None

        def sums(lo: int, hi: int, pieces: tuple[Any, ...]) -> Any:
            return nuslerp_column_sums(*_column_vectors(pieces, has_base, self.work))

        total = None
        for part in source.map(sums):
            total = part if total is None else total.add_(part)
        assert total is not None
        return nuslerp_column_coefficients(total, self.t)


@dataclass(frozen=True, eq=False)
class ColumnCombine(SameShape):
    """One output tensor of a streamed `row_wise` nuslerp: [θ_b +] c_0 v0 + c_1 v1 per column
    in fp64, any rows, rounded once to ``dtype``."""

    rounds_once: ClassVar[bool] = True

    a: Node
    b: Node
    base: Node | None
    coefficients: NuslerpColumns
    dtype: str

    @property
    def shape_input(self) -> Node:
        """The input whose shape this node has."""
        return self.a

    @property
    def inputs(self) -> tuple[Node, ...]:
        return (self.a, self.b) + ((self.base,) if self.base is not None else ()) \
            + (self.coefficients,)

    @property
    def workspace(self) -> int:
        # the vectors in the compute dtype, an fp64 copy and the fp64 sum
        return (3 * itemsize(self.coefficients.work) + 16) * self.numel

    def row_inputs(self) -> tuple[bool, ...] | None:
        return (True,) * (len(self.inputs) - 1) + (False,)

    def compute(self, args: tuple[Any, ...]) -> Any:
        return self.compute_rows(args, 0, self.shape[0])

    def compute_rows(self, args: tuple[Any, ...], lo: int, hi: int) -> Any:
        import torch

        has_base = self.base is not None
        v0, v1 = _column_vectors(args[:-1], has_base, self.coefficients.work)
        c = args[-1].to(v0.device)
        out = v0.to(torch.float64) * c[0]
        out.add_(v1.to(torch.float64) * c[1])
        if has_base:
            out.add_(args[2].to(torch.float64))
        return out.to(torch_dtype(self.dtype))


def streamed_merge(method: str, operands: tuple[Node, ...], base: Node | None,
                   params: Mapping[str, Any], *, seed: int, tensor: str, dtype: str,
                   native: bool) -> Node | None:
    """The streamed nodes of one tensor of arcee_fusion, ramplus_tl or nuslerp by columns
    (the module docstring), or None where the whole `Merge` stays: another method or variant,
    a 0-D or empty tensor, and for nuslerp by columns mergekit's `compute_dtype:` or inputs of
    at most `plan.cost.EXACT_BYTES` (`keeps_exact_kernel`)."""
    from recipekit.merge import METHODS, resolve_params

    if method not in STREAMED_METHODS or base is None and method != "nuslerp":
        return None
    shape = operands[0].shape
    if not shape or operands[0].numel == 0:
        return None
    every = operands + ((base,) if base is not None else ())
    work = work_dtype(every, native)
    if method == "arcee_fusion":
        assert base is not None
        threshold = intern(FusionThreshold(base, operands[0], seed, tensor, work, native))
        return intern(FusionMerge(base, operands[0], threshold, dtype, native))
    kw = resolve_params(METHODS[method], params, len(operands))
    if method == "ramplus_tl":
        assert base is not None
        scales = intern(RamPlusScales(operands, base, float(kw["r"]), float(kw["alpha"]),
                                      float(kw["epsilon"]), native))
        return intern(RamPlusMerge(operands, base, scales, dtype, native))
    return _streamed_columns(operands, base, kw, work, dtype, native)


def _streamed_columns(operands: tuple[Node, ...], base: Node | None, kw: Mapping[str, Any],
                      work: str, dtype: str, native: bool) -> Node | None:
    """nuslerp by columns (`flatten` false, `row_wise` true, 2 dims or more), streamed."""
    from recipekit.plan.cost import keeps_exact_kernel

    if kw["flatten"] or not kw["row_wise"] or len(operands[0].shape) < 2 or native:
        return None
    weight_a, weight_b = (float(w) for w in kw["weights"])
    total = weight_a + weight_b  # `ops.gram.nuslerp_t` (planning imports no torch)
    t = 0.5 if abs(total) < 1e-6 else weight_b / total
    stats = NuslerpColumns(operands[0], operands[1], base, t, work)
    if keeps_exact_kernel(stats):
        return None
    return intern(ColumnCombine(operands[0], operands[1], base, intern(stats), dtype))
