"""Adapter-set nodes: LoRA deltas and folds, their sums and combinations, SVD factors.

Why together: the `adapters`, `combine_adapters` and `extract_lora` steps, the adapter-set
reader (`graph.adapterset`) and the adapter output (`run.adapter_output`) all build them.
Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from recipekit.dtypes import torch_dtype
from recipekit.graph.nodes import Node, SameShape
from recipekit.graph.passes import Reduction, RowSource

F32 = "F32"
F64 = "F64"


@dataclass(frozen=True, eq=False)
class LoraDelta(Node):
    """ΔW = Σ_j s_j·B_j@A_j in fp32 (transposed to the base's (in, out) / (V, D) layout when
    ``transposed``): one adapter set's low-rank update of one tensor (ops/lora.py)."""

    factors: tuple[Node, ...]  # A_0, B_0, A_1, B_1, ...
    scales: tuple[float, ...]
    transposed: bool
    shape: tuple[int, ...]
    dtype: str = F32
    #: ΔW is computed in blocks of rows (ops/lora.py), whole or in pieces alike
    row_block: ClassVar[int] = 64

    @property
    def inputs(self) -> tuple[Node, ...]:
        return self.factors

    @property
    def workspace(self) -> int:
        return 4 * self.numel  # one product beside the running sum

    def compute(self, args: tuple[Any, ...]) -> Any:
        from recipekit.ops.lora import lora_delta

        pairs = [(args[i], args[i + 1]) for i in range(0, len(args), 2)]
        return lora_delta(pairs, self.scales, transposed=self.transposed, block=self.row_block)

    def row_inputs(self) -> tuple[bool, ...] | None:
        # rows of B@A are rows of B (A whole); rows of (B@A)ᵀ are columns of A (both whole,
        # and small: rank × width)
        return (False, not self.transposed) * (len(self.factors) // 2)

    def compute_rows(self, args: tuple[Any, ...], lo: int, hi: int) -> Any:
        if not self.transposed:
            return self.compute(args)
        return self.compute(tuple(x[:, lo:hi] if i % 2 == 0 else x for i, x in enumerate(args)))


@dataclass(frozen=True, eq=False)
class ScaledSum(SameShape):
    """Σ_j s_j·v_j, computed in fp32 and rounded once to ``dtype`` (lora_bias updates, scaled
    factors)."""

    rounds_once: ClassVar[bool] = True

    parts: tuple[Node, ...]
    scales: tuple[float, ...]
    dtype: str

    @property
    def shape_input(self) -> Node:
        """The input whose shape this node has."""
        return self.parts[0]

    @property
    def inputs(self) -> tuple[Node, ...]:
        return self.parts

    def compute(self, args: tuple[Any, ...]) -> Any:
        from recipekit.ops.lora import scaled_sum

        return scaled_sum(args, self.scales).to(torch_dtype(self.dtype))


@dataclass(frozen=True, eq=False)
class Concat(Node):
    """``cat([s_j·x_j], dim)``, scaled in fp32 and rounded once to ``dtype`` (the `cat` layout of
    a combined adapter: A' stacks s_j·A_j, B' sets the B_j side by side)."""

    rounds_once: ClassVar[bool] = True

    parts: tuple[Node, ...]
    scales: tuple[float, ...]
    dim: int
    dtype: str

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        first = list(self.parts[0].shape)
        first[self.dim] = sum(p.shape[self.dim] for p in self.parts)
        return tuple(first)

    @property
    def inputs(self) -> tuple[Node, ...]:
        return self.parts

    def compute(self, args: tuple[Any, ...]) -> Any:
        import torch

        work = torch.float64 if any(a.dtype == torch.float64 for a in args) else torch.float32
        return torch.cat([a.to(work) * s for a, s in zip(args, self.scales, strict=True)],
                         dim=self.dim).to(torch_dtype(self.dtype))


@dataclass(frozen=True, eq=False)
class DeltaCombine(SameShape):
    """Several adapters' full fp32 deltas of one tensor combined by a merge kernel (ties, DARE,
    magnitude pruning: ops/merge.py `generalized_task_arithmetic` with a zero base), times
    ``scale``. ``tensor`` seeds DARE's generator (empty for deterministic methods)."""

    method: str
    deltas: tuple[Node, ...]
    weights: tuple[float, ...]
    density: float
    seed: int
    tensor: str
    scale: float
    dtype: str = F32

    @property
    def shape_input(self) -> Node:
        """The input whose shape this node has."""
        return self.deltas[0]

    @property
    def inputs(self) -> tuple[Node, ...]:
        return self.deltas

    @property
    def workspace(self) -> int:
        return (len(self.deltas) + 3) * 4 * self.numel

    def compute(self, args: tuple[Any, ...]) -> Any:
        from recipekit.ops.lora import combine_deltas
        from recipekit.ops.rng import tensor_generator

        generator = tensor_generator(self.seed, self.tensor) if self.tensor else None
        out = combine_deltas(self.method, list(args), weights=self.weights,
                             density=self.density, generator=generator)
        return out.mul_(self.scale) if self.scale != 1 else out


@dataclass(frozen=True, eq=False)
class LoraFold(SameShape):
    """W₀ with adapter deltas folded in, in list order (PEFT's sequential merge; a DoRA entry
    has its magnitude vector and norm axis), computed in fp32 and rounded once to ``dtype``."""

    rounds_once: ClassVar[bool] = True

    base: Node
    deltas: tuple[Node, ...]
    magnitudes: tuple[Node | None, ...]
    norm_dims: tuple[int, ...]
    dtype: str

    @property
    def shape_input(self) -> Node:
        """The input whose shape this node has."""
        return self.base

    @property
    def inputs(self) -> tuple[Node, ...]:
        return (self.base, *self.deltas, *(m for m in self.magnitudes if m is not None))

    @property
    def workspace(self) -> int:
        return 3 * 4 * self.numel  # W₀ and the running result in fp32, one norm operand

    def row_inputs(self) -> tuple[bool, ...] | None:
        # DoRA norms along a row (dim 1) stay within a row piece; norms down columns do not
        if any(m is not None and d != 1 for m, d in zip(self.magnitudes, self.norm_dims,
                                                         strict=True)):
            return None
        return (True,) * len(self.inputs)

    def compute(self, args: tuple[Any, ...]) -> Any:
        from recipekit.ops.lora import fold_sequential

        n = len(self.deltas)
        rest = iter(args[1 + n:])
        mags = [next(rest) if m is not None else None for m in self.magnitudes]
        return fold_sequential(args[0], args[1:1 + n], mags, self.norm_dims).to(
            torch_dtype(self.dtype))


@dataclass(frozen=True, eq=False)
class Difference(SameShape):
    """``a − b`` in fp32 (a task vector: tuned − base, for LoRA extraction)."""

    a: Node
    b: Node
    dtype: str = F32

    @property
    def shape_input(self) -> Node:
        """The input whose shape this node has."""
        return self.a

    def compute(self, args: tuple[Any, ...]) -> Any:
        import torch

        work = torch.float64 if torch.float64 in (args[0].dtype, args[1].dtype) else (
            torch.float32)
        return args[0].to(work) - args[1].to(work)


@dataclass(frozen=True, eq=False)
class SvdFactor(Node):
    """Factor A (rank, in) or B (out, rank) of a truncated SVD of ``delta`` (ops/lora.py
    `svd_factors`), rounded to ``dtype``. A and B are separate nodes: the SVD runs once for
    each (a small adapter's cost, never a model's)."""

    threaded: ClassVar[bool] = True

    delta: Node
    which: str  # "A" or "B"
    rank: int
    transposed: bool
    epsilon: float
    dtype: str

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        rows, cols = self.delta.shape
        out_dim, in_dim = (cols, rows) if self.transposed else (rows, cols)
        return (self.rank, in_dim) if self.which == "A" else (out_dim, self.rank)

    @property
    def workspace(self) -> int:
        return 3 * 4 * self.delta.numel  # U, Vh and the working copy

    def compute(self, args: tuple[Any, ...]) -> Any:
        from recipekit.ops.lora import svd_factors

        a, b = svd_factors(args[0], rank=self.rank, transposed=self.transposed,
                           epsilon=self.epsilon)
        return (a if self.which == "A" else b).to(torch_dtype(self.dtype))


@dataclass(frozen=True, eq=False)
class RangeFinderFactors(Reduction):
    """LoRA factors of tuned − base by a randomized range finder streamed over row pieces
    (ops/lowrank.py `randomized_svd`), packed as one fp32 (rank, in + out) tensor [A | Bᵀ]
    that two `PackedFactor` nodes slice: the passes run once for both factors (the executor
    keeps the last few reductions' values for the output tensors that follow,
    `run.execute.Runtime.shared`).

    Δ = tuned − base is formed per row piece in fp32 (fp64 for fp64 inputs), in the stored
    layout (rows are what streams); ``transposed`` modules (embeddings, `Conv1D`) swap the
    roles of U and Vh afterwards. Ω is drawn from the generator of (``seed``, ``tensor``).
    Memory: Y and its QR (m×L each), W, R and B (n×L), L = (power_iters + 1) blocks of
    rank + oversample columns (at most min(m, n)), and a piece or two, never Δ.
    """

    tuned: Node
    base: Node
    rank: int
    transposed: bool
    epsilon: float
    oversample: int
    power_iters: int
    seed: int
    tensor: str
    dtype: str = F32
    #: stop the passes early once one gains less than this of the residual (0: never)
    tolerance: float = 0.0

    @property
    def inputs(self) -> tuple[Node, ...]:
        return (self.tuned, self.base)

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        rows, cols = self.tuned.shape
        return (self.rank, rows + cols)

    @property
    def passes(self) -> int:  # type: ignore[override]
        """One per Krylov block: each reads Δ once for ΔZ and ΔᵀΔZ (fewer when the blocks
        fill min(m, n) sooner, or the `tolerance` stops them)."""
        return 1 + self.power_iters

    def _sizes(self) -> tuple[int, int, int, int]:
        """(rows m, cols n, Krylov width L, bytes per value of the work dtype)."""
        rows, cols = self.tuned.shape
        item = 8 if F64 in (self.tuned.dtype, self.base.dtype) else 4
        block = min(self.rank + self.oversample, rows, cols)
        return rows, cols, min(block * self.passes, rows, cols), item

    @property
    def state_bytes(self) -> int:
        """Kept from pass to pass: Y (m×L), W and R (n×L); beside them after the last pass
        the fp64 Rayleigh–Ritz: W and B (n×L each), four L×L matrices, U (m×rank); and the
        factorizations' copies: Y's (m×L twice), W, R, B and B's SVD (n×L four times), the
        small SVDs (L×L four times). Whole whatever the piece (not `workspace`, which the
        plan scales to one piece). Y counts twice: extracting TinyLlama's shapes measured a
        210 MiB working set where the other terms come to 175 MiB."""
        rows, cols, width, item = self._sizes()
        return (item * width * (2 * rows + 2 * cols) + 8 * width * (2 * cols + 4 * width)
                + item * rows * self.rank
                + item * (2 * rows * width + 4 * cols * width + 4 * width * width))

    @property
    def workspace(self) -> int:
        """Per piece, the two inputs in the work dtype, their difference and its product:
        four values per element, given for the whole tensor as for every `Reduction` (the
        plan charges one piece's share). Measured: 12-16 MiB above the held inputs for
        4096×1024 to 14336×4096 fp32, against the 24 MiB of `CHUNKED_OVERHEAD` charged."""
        rows, cols, _, item = self._sizes()
        return item * 4 * rows * cols

    def reduce(self, source: RowSource, whole: tuple[Any, ...]) -> Any:
        import torch

        from recipekit.ops.lowrank import factors_from_svd, randomized_svd
        from recipekit.ops.rng import tensor_generator

        rows, cols, _, item = self._sizes()
        work = torch.float64 if item == 8 else torch.float32

        def difference(p: tuple[Any, ...]) -> Any:
            # one fp32 copy, the other operand widened on the fly: the same values as
            # a.to(work) - b.to(work), one conversion fewer per piece and pass
            return p[0].to(work, copy=True).sub_(p[1])

        def map_pieces(fn: Any) -> Any:
            return source.map(lambda lo, hi, p: fn(lo, hi, difference(p)))

        u, s, vh = randomized_svd(map_pieces, rows, cols, rank=self.rank,
                                  oversample=self.oversample, power_iters=self.power_iters,
                                  tolerance=self.tolerance,
                                  generator=tensor_generator(self.seed, self.tensor), dtype=work)
        a, b = factors_from_svd(u, s, vh, rank=self.rank, transposed=self.transposed,
                                epsilon=self.epsilon)
        return torch.cat([a, b.T], dim=1).to(torch_dtype(self.dtype))


@dataclass(frozen=True, eq=False)
class PackedFactor(Node):
    """Factor A (rank, in) or B (out, rank) sliced out of a `RangeFinderFactors` [A | Bᵀ],
    rounded to ``dtype``."""

    packed: Node
    which: str  # "A" or "B"
    in_dim: int
    dtype: str

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        rank, width = self.packed.shape
        return (rank, self.in_dim) if self.which == "A" else (width - self.in_dim, rank)

    def compute(self, args: tuple[Any, ...]) -> Any:
        packed = args[0]
        part = packed[:, :self.in_dim] if self.which == "A" else packed[:, self.in_dim:].T
        return part.contiguous().to(torch_dtype(self.dtype))
