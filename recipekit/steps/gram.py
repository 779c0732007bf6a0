"""The streamed angle-based merges: model_stock, karcher, multislerp and nuslerp in row pieces.

`build_merge` (steps/merge.py) asks `streamed_gram` for each tensor. Above `plan.cost.EXACT_BYTES`
of stored inputs per tensor, it gives two nodes instead of one whole `Merge`: `GramStats`, a
reduction that reads row pieces once and turns the inputs' Gram matrix into one coefficient
per input (ops/gram.py), and `LinearCombine`, which writes any rows as [θ_b +] Σ c_i v_i. Below
it (and for mergekit's `compute_dtype:`), the exact whole-tensor `Merge` stays, so small
tensors and the committed mergekit goldens keep their bytes; above it these methods agree
with mergekit to ~1e-6 relative (fp64 dots summed in pieces), not bit for bit.

The row-local variants need no pass: nuslerp with `nuslerp_flatten: false` (last-axis rows) and
model_stock with `filter_wise: true` compute each row from that row alone, so their `Merge`
runs by rows at any size (`is_row_local`), bit for bit the whole kernel's rows. nuslerp's
`nuslerp_row_wise: true` (columns across all rows) streams in steps/stream_merges.py.
Oracle: tests/steps/test_gram.py (streamed against `ops.merge.apply_method`, rows bit-exact).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from recipekit.dtypes import itemsize, torch_dtype
from recipekit.graph import Node, SameShape, cast, intern
from recipekit.graph.passes import Reduction
from recipekit.steps.task_vectors import work_dtype

#: the methods whose whole-tensor reductions become a Gram pass
GRAM_METHODS = ("model_stock", "karcher", "multislerp", "nuslerp")


def is_row_local(method: str, params: Mapping[str, Any], ndim: int) -> bool:
    """Whether each last-axis row of the method's output depends on that row of the inputs
    only: nuslerp per row (`nuslerp_flatten: false`, not `nuslerp_row_wise`) and model_stock
    `filter_wise` — for tensors of 2 dims or more (a vector is one row)."""
    if ndim < 2:
        return False
    if method == "nuslerp":
        return params.get("nuslerp_flatten") is False and not params.get("nuslerp_row_wise")
    return method == "model_stock" and bool(params.get("filter_wise"))


def _vectors(pieces: tuple[Any, ...], n: int, has_base: bool, work: str) -> list[Any]:
    """The kernels' vectors of one piece: x_i − θ_b (with a base) or x_i, in ``work``."""
    dtype = torch_dtype(work)
    xs = [p.to(dtype) for p in pieces[:n]]
    if not has_base:
        return xs
    b = pieces[n].to(dtype)
    return [x - b for x in xs]


@dataclass(frozen=True, eq=False)
class GramStats(Reduction):
    """One coefficient per non-base input of a model_stock, karcher, multislerp or nuslerp
    tensor (fp64 [N]), from the Gram matrix of its vectors in one pass (ops/gram.py)."""

    method: str
    operands: tuple[Node, ...]
    base: Node | None
    params: tuple[tuple[str, Any], ...]
    work: str

    passes: ClassVar[int] = 1

    @property
    def inputs(self) -> tuple[Node, ...]:
        return self.operands + ((self.base,) if self.base is not None else ())

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return (len(self.operands),)

    @property
    def dtype(self) -> str:  # type: ignore[override]
        return "F64"

    @property
    def state_bytes(self) -> int:
        return 8 * len(self.operands) ** 2

    @property
    def workspace(self) -> int:
        # per piece: the inputs and vectors in the compute dtype, and their fp64 matrix
        n = len(self.operands)
        return (2 * n + 1) * itemsize(self.work) * self.operands[0].numel \
            + 8 * n * self.operands[0].numel

    def reduce(self, source: Any, whole: tuple[Any, ...]) -> Any:
        from recipekit.ops.gram import gram

        n = len(self.operands)
        g = gram(source, lambda lo, hi, p: _vectors(p, n, self.base is not None, self.work), n)
        return gram_coefficients(self.method, g, dict(self.params))


def gram_coefficients(method: str, g: Any, params: Mapping[str, Any]) -> Any:
    """The method's coefficients from its Gram matrix, parameters as `Merge` holds them."""
    from recipekit.merge import METHODS, resolve_params
    from recipekit.ops import gram as ops

    kw = resolve_params(METHODS[method], params, g.shape[0])
    if method == "model_stock":
        return ops.model_stock_coefficients(g)
    if method == "nuslerp":
        return ops.nuslerp_coefficients(g, ops.nuslerp_t(*kw["weights"]))
    if method == "multislerp":
        return ops.multislerp_coefficients(g, kw["weights"],
                                           normalize_weights=kw["normalize_weights"],
                                           eps=kw["eps"])
    return ops.karcher_coefficients(g, max_iter=kw["max_iter"], tol=kw["tol"])


@dataclass(frozen=True, eq=False)
class LinearCombine(SameShape):
    """One output tensor of a Gram-streamed merge: [θ_b +] Σ c_i v_i in fp64 from the rows of
    the inputs, rounded once to ``dtype`` (elementwise once ``coefficients`` are known)."""

    rounds_once: ClassVar[bool] = True

    operands: tuple[Node, ...]
    base: Node | None
    coefficients: GramStats
    work: str
    dtype: str

    @property
    def shape_input(self) -> Node:
        """The input whose shape this node has."""
        return self.operands[0]

    @property
    def inputs(self) -> tuple[Node, ...]:
        return self.operands + ((self.base,) if self.base is not None else ()) \
            + (self.coefficients,)

    @property
    def workspace(self) -> int:
        # the vectors in the compute dtype, one fp64 copy at a time and the fp64 sum
        return (len(self.inputs) * itemsize(self.work) + 16) * self.numel

    def row_inputs(self) -> tuple[bool, ...] | None:
        return (True,) * (len(self.inputs) - 1) + (False,)

    def compute(self, args: tuple[Any, ...]) -> Any:
        return self.compute_rows(args, 0, self.shape[0] if self.shape else 1)

    def compute_rows(self, args: tuple[Any, ...], lo: int, hi: int) -> Any:
        from recipekit.ops.gram import linear_combine

        n = len(self.operands)
        has_base = self.base is not None
        vectors = _vectors(args[:-1], n, has_base, self.work)
        base = args[n] if has_base else None
        return linear_combine(vectors, args[-1].cpu(), base).to(torch_dtype(self.dtype))


def streamed_gram(method: str, operands: tuple[Node, ...], base: Node | None,
                  params: Mapping[str, Any], dtype: str) -> Node | None:
    """The streamed nodes of one tensor of a Gram method, or None where the whole `Merge`
    stays: another method, a row-local variant, nuslerp by columns, or inputs that the
    whole-tensor kernel keeps exactly (`plan.cost.keeps_exact_kernel`: at most `EXACT_BYTES`)."""
    from recipekit.plan.cost import keeps_exact_kernel

    if method not in GRAM_METHODS or is_row_local(method, params, len(operands[0].shape)):
        return None
    if method == "nuslerp" and params.get("nuslerp_flatten") is False \
            and len(operands[0].shape) >= 2:
        return None  # per column (`nuslerp_row_wise`): steps/stream_merges.py (a vector: a Gram)
    uses_base = base if method != "karcher" else None
    every = operands + ((uses_base,) if uses_base is not None else ())
    stats = GramStats(method, operands, uses_base, tuple(sorted(params.items())),
                      work_dtype(every, False))
    if keeps_exact_kernel(stats):
        return None
    if len(operands) == 1:  # karcher and multislerp return their single input
        return cast(operands[0], dtype)
    return intern(LinearCombine(operands, uses_base, intern(stats), stats.work, dtype))
