"""Plan nodes and virtual models: what a recipe compiles to, with no tensor computed.

A node is a frozen value that knows its shape and dtype. Equal nodes are one node: `intern`
hash-conses them, so a tensor that two output layers read (SOLAR-style overlaps) is one `Load`
in the plan, and equality checks between deep expressions stop at the first shared child.
A `VirtualModel` is a config plus an ordered map from tensor name to node; every model input
and every step is one. Nothing here imports torch.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeVar

from recipekit.arch import ConfigKey, LayerStack
from recipekit.dtypes import itemsize

N = TypeVar("N", bound="Node")


class Node:
    """Base of plan nodes. Subclasses are ``@dataclass(frozen=True, eq=False)``.

    Equality and hashing are structural over the dataclass fields and cached, so a DAG of
    interned nodes hashes in O(1) per node.
    """

    __slots__ = ("__weakref__", "__dict__")

    shape: tuple[int, ...]
    dtype: str
    #: Row-piece boundaries fall on multiples of this many rows (see `compute_rows`).
    row_block: ClassVar[int] = 1

    def _key(self) -> tuple[Any, ...]:
        return (type(self),) + tuple(getattr(self, f.name) for f in fields(self))  # type: ignore[arg-type]

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if type(other) is not type(self):
            return NotImplemented
        return hash(self) == hash(other) and self._key() == other._key()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash(self._key())
            self.__dict__["_hash"] = h
        return h

    @property
    def inputs(self) -> tuple[Node, ...]:
        return tuple(v for f in fields(self) if isinstance(v := getattr(self, f.name), Node))  # type: ignore[arg-type]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)

    @property
    def workspace(self) -> int:
        """Scratch bytes computing this node needs beyond its inputs and result (fp32 copies)."""
        return 0

    @property
    def elementwise(self) -> bool:
        """Output element i depends only on element i of each input (same shapes)."""
        return False

    def row_inputs(self) -> tuple[bool, ...] | None:
        """How rows ``lo:hi`` of this node depend on its inputs, for row-piece evaluation: per
        input, True when only its rows ``lo:hi`` are needed, False when all of it is; None when
        a piece needs more (norms across rows, quantiles), so the node is computed whole.
        Elementwise nodes need the same rows of every input."""
        return (True,) * len(self.inputs) if self.elementwise else None

    def compute_rows(self, args: tuple[Any, ...], lo: int, hi: int) -> Any:
        """Rows ``lo:hi`` of this node from its inputs as `row_inputs` says (sliced or
        whole). The result must equal those rows of `compute` bit for bit."""
        return self.compute(args)

    def compute(self, args: tuple[Any, ...]) -> Any:
        """This node's tensor from its inputs' tensors (``args`` aligned with `inputs`, already
        on the compute device). Subclasses import torch here, never at module level, so that
        planning stays torch-free. The executor rounds nothing: the result has ``dtype``."""
        raise NotImplementedError(type(self).__name__)


def fp32_copies(inputs: tuple[Node, ...]) -> int:
    """Bytes of the fp32 copies a kernel makes of its inputs narrower than fp32."""
    return sum(4 * n.numel for n in inputs if itemsize(n.dtype) < 4)


def expression_nodes(node: Node) -> set[Node]:
    """``node`` and every node it depends on, each once."""
    seen: set[Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.inputs)
    return seen


_interned: weakref.WeakValueDictionary[Node, Node] = weakref.WeakValueDictionary()


def intern(node: N) -> N:
    """Return the canonical instance equal to ``node`` (hash-consing)."""
    existing = _interned.get(node)
    if existing is not None:
        return existing  # type: ignore[return-value]
    _interned[node] = node
    return node


@dataclass(frozen=True, eq=False)
class Load(Node):
    """A stored tensor of a model input, read when first needed."""

    source: str  # the recipe's model name
    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True, eq=False)
class Cast(Node):
    """``input`` converted to ``dtype`` (round to nearest even, as torch's ``.to``)."""

    input: Node
    dtype: str

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return self.input.shape

    @property
    def elementwise(self) -> bool:
        return True

    def compute(self, args: tuple[Any, ...]) -> Any:
        from recipekit.dtypes import torch_dtype

        return args[0].to(torch_dtype(self.dtype))


@dataclass(frozen=True, eq=False)
class Lerp(Node):
    """``a + t·(b − a)`` computed in fp32 and rounded once to ``dtype`` (the `interpolate` op)."""

    a: Node
    b: Node
    t: float
    dtype: str

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return self.a.shape

    @property
    def workspace(self) -> int:
        return fp32_copies(self.inputs) + 4 * self.numel  # fp32 copies and the fp32 result

    @property
    def elementwise(self) -> bool:
        return True

    def compute(self, args: tuple[Any, ...]) -> Any:
        from recipekit.dtypes import torch_dtype
        from recipekit.ops.merge import lerp

        return lerp(args[0], args[1], t=self.t).to(torch_dtype(self.dtype))


@dataclass(frozen=True, eq=False)
class Merge(Node):
    """One output tensor of a merge method (ops/merge.py), rounded once to ``dtype``.

    ``params`` holds the values resolved for this tensor (shared: a number or bool; per-input:
    a tuple aligned with ``operands``). ``tensor`` names the output tensor for random methods,
    whose generator is seeded by (``seed``, ``tensor``); it is empty for deterministic ones so
    that equal merges of equal inputs stay one node.
    """

    method: str
    operands: tuple[Node, ...]
    base: Node | None
    params: tuple[tuple[str, Any], ...]
    seed: int
    tensor: str
    dtype: str

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return self.operands[0].shape

    @property
    def inputs(self) -> tuple[Node, ...]:
        return self.operands + ((self.base,) if self.base is not None else ())

    @property
    def workspace(self) -> int:
        # fp32 copies of narrower inputs, then about two more tensors: deltas or normalized
        # copies, and the fp32 result (measured for slerp in tests/test_execute.py)
        return fp32_copies(self.inputs) + 2 * 4 * self.numel

    @property
    def elementwise(self) -> bool:
        from recipekit.merge import METHODS

        return METHODS[self.method].elementwise

    def compute(self, args: tuple[Any, ...]) -> Any:
        from recipekit.dtypes import torch_dtype
        from recipekit.ops.merge import apply_method
        from recipekit.ops.rng import tensor_generator

        n = len(self.operands)
        base = args[n] if self.base is not None else None
        generator = tensor_generator(self.seed, self.tensor) if self.tensor else None
        return apply_method(self.method, list(args[:n]), base=base, params=dict(self.params),
                            generator=generator).to(torch_dtype(self.dtype))


@dataclass(frozen=True, eq=False)
class SlerpCoefficients(Node):
    """slerp's two coefficients for one pair of tensors (ops/merge.py `slerp_coefficients`):
    the norms and the dot product read both tensors whole, the result is two numbers."""

    a: Node
    b: Node
    t: float

    #: the reductions run over 2^20-value chunks: two reused fp32 chunk buffers plus the
    #: norms' temporaries (14 MiB measured for fp32 inputs)
    CHUNK_COPIES: ClassVar[int] = 4 * 4 * (1 << 20)

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return (2,)

    @property
    def dtype(self) -> str:  # type: ignore[override]
        return "F64" if "F64" in (self.a.dtype, self.b.dtype) else "F32"

    @property
    def workspace(self) -> int:
        return self.CHUNK_COPIES

    def compute(self, args: tuple[Any, ...]) -> Any:
        from recipekit.ops.merge import slerp_coefficients

        return slerp_coefficients(args[0], args[1], t=self.t)


@dataclass(frozen=True, eq=False)
class Slerp(Node):
    """One output tensor of `slerp`: c_a·a + c_b·b (ops/merge.py `slerp_apply`), rounded once
    to ``dtype``. Elementwise in a and b once the coefficients are known, so large tensors run
    in row pieces sliced from the a and b the coefficients read (execute.evaluate_chunks)
    instead of fp32 copies with an fp32 result. The bytes are those of `slerp` on the whole
    tensors (tests/steps/test_merge.py, tests/test_execute.py::TestChunkedEvaluation)."""

    a: Node
    b: Node
    coefficients: SlerpCoefficients
    dtype: str

    method: ClassVar[str] = "slerp"

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return self.a.shape

    @property
    def workspace(self) -> int:
        return fp32_copies((self.a, self.b)) + 4 * self.numel

    def row_inputs(self) -> tuple[bool, ...] | None:
        return (True, True, False)

    def compute(self, args: tuple[Any, ...]) -> Any:
        from recipekit.dtypes import torch_dtype
        from recipekit.ops.merge import slerp_apply

        return slerp_apply(*args).to(torch_dtype(self.dtype))


@dataclass(frozen=True, eq=False)
class Normal(Node):
    """A fresh ``N(0, std²)`` tensor (ops/init.py), drawn chunk by chunk on the CPU from the
    generator seeded by (``seed``, ``tensor``), so one tensor's draw does not depend on what
    else a recipe touches or on the device; rounded once to ``dtype``."""

    shape: tuple[int, ...]
    dtype: str
    std: float
    seed: int
    tensor: str

    @property
    def workspace(self) -> int:
        from recipekit.ops.init import CHUNK_ELEMENTS  # torch-free: the constant only

        return 4 * min(self.numel, CHUNK_ELEMENTS + 16)  # one fp32 chunk

    def compute(self, args: tuple[Any, ...]) -> Any:
        from recipekit.dtypes import torch_dtype
        from recipekit.ops.init import normal
        from recipekit.ops.rng import tensor_generator

        return normal(self.shape, std=self.std, generator=tensor_generator(self.seed, self.tensor),
                      dtype=torch_dtype(self.dtype))


@dataclass(frozen=True, eq=False)
class Fill(Node):
    """A tensor holding ``value`` everywhere (ones for norms, zeros for biases)."""

    shape: tuple[int, ...]
    dtype: str
    value: float

    def compute(self, args: tuple[Any, ...]) -> Any:
        from recipekit.dtypes import torch_dtype
        from recipekit.ops.init import fill

        return fill(self.shape, value=self.value, dtype=torch_dtype(self.dtype))


F32 = "F32"


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
class ScaledSum(Node):
    """Σ_j s_j·v_j, computed in fp32 and rounded once to ``dtype`` (lora_bias updates, scaled
    factors)."""

    parts: tuple[Node, ...]
    scales: tuple[float, ...]
    dtype: str

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return self.parts[0].shape

    @property
    def inputs(self) -> tuple[Node, ...]:
        return self.parts

    def compute(self, args: tuple[Any, ...]) -> Any:
        from recipekit.dtypes import torch_dtype
        from recipekit.ops.lora import scaled_sum

        return scaled_sum(args, self.scales).to(torch_dtype(self.dtype))


@dataclass(frozen=True, eq=False)
class Concat(Node):
    """``cat([s_j·x_j], dim)``, scaled in fp32 and rounded once to ``dtype`` (the `cat` layout of
    a combined adapter: A' stacks s_j·A_j, B' sets the B_j side by side)."""

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

        from recipekit.dtypes import torch_dtype

        work = torch.float64 if any(a.dtype == torch.float64 for a in args) else torch.float32
        return torch.cat([a.to(work) * s for a, s in zip(args, self.scales, strict=True)],
                         dim=self.dim).to(torch_dtype(self.dtype))


@dataclass(frozen=True, eq=False)
class DeltaCombine(Node):
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
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return self.deltas[0].shape

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
class LoraFold(Node):
    """W₀ with adapter deltas folded in, in list order (PEFT's sequential merge; a DoRA entry
    has its magnitude vector and norm axis), computed in fp32 and rounded once to ``dtype``."""

    base: Node
    deltas: tuple[Node, ...]
    magnitudes: tuple[Node | None, ...]
    norm_dims: tuple[int, ...]
    dtype: str

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return self.base.shape

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
        from recipekit.dtypes import torch_dtype
        from recipekit.ops.lora import fold_sequential

        n = len(self.deltas)
        rest = iter(args[1 + n:])
        mags = [next(rest) if m is not None else None for m in self.magnitudes]
        return fold_sequential(args[0], args[1:1 + n], mags, self.norm_dims).to(
            torch_dtype(self.dtype))


@dataclass(frozen=True, eq=False)
class Difference(Node):
    """``a − b`` in fp32 (a task vector: tuned − base, for LoRA extraction)."""

    a: Node
    b: Node
    dtype: str = F32

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return self.a.shape

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
        from recipekit.dtypes import torch_dtype
        from recipekit.ops.lora import svd_factors

        a, b = svd_factors(args[0], rank=self.rank, transposed=self.transposed,
                           epsilon=self.epsilon)
        return (a if self.which == "A" else b).to(torch_dtype(self.dtype))


#: An axis map of a coalescing node: ``(mode, ((groups, block), ...))`` (see ops/coalesce.py).
AxisMap = tuple[str, tuple[tuple[tuple[tuple[int, ...], ...], int], ...]]


@dataclass(frozen=True, eq=False)
class Coalesce(Node):
    """One small-model tensor of the `coalesce` op, rounded once to ``dtype``.

    Each of ``members`` (the same tensor of every large layer in a depth group; one outside the
    layers or without ``depth``) is width-coalesced along ``axes`` (group means on output axes,
    group sums on input axes), the members are averaged, and the result is scaled by ``scale``.
    """

    members: tuple[Node, ...]
    axes: tuple[AxisMap | None, ...]
    scale: float
    shape: tuple[int, ...]
    dtype: str

    @property
    def inputs(self) -> tuple[Node, ...]:
        return self.members

    @property
    def workspace(self) -> int:
        big = max(m.numel for m in self.members)
        return (2 * len(self.members) + 2) * 4 * big  # fp32 copies, gathers, stacked members

    def row_inputs(self) -> tuple[bool, ...] | None:
        # rows that no group maps (an embedding's vocabulary) are independent of each other
        return (True,) * len(self.members) if self.axes[0] is None else None

    def compute(self, args: tuple[Any, ...]) -> Any:
        from recipekit.dtypes import torch_dtype
        from recipekit.ops.coalesce import coalesce

        return coalesce(args, self.axes, scale=self.scale).to(torch_dtype(self.dtype))


@dataclass(frozen=True, eq=False)
class Decoalesce(Node):
    """One large-model tensor of the `decoalesce` op, rounded once to ``dtype``: ``input``
    copied along output axes, copied and divided by the group size along input axes, then
    scaled by ``scale``. A depth group's large layers share one node per tensor."""

    input: Node
    axes: tuple[AxisMap | None, ...]
    scale: float
    shape: tuple[int, ...]
    dtype: str

    @property
    def workspace(self) -> int:
        return 4 * (self.input.numel + 2 * self.numel)

    def row_inputs(self) -> tuple[bool, ...] | None:
        return (True,) if self.axes[0] is None else None

    def compute(self, args: tuple[Any, ...]) -> Any:
        from recipekit.dtypes import torch_dtype
        from recipekit.ops.coalesce import decoalesce

        return decoalesce(args[0], self.axes, scale=self.scale).to(torch_dtype(self.dtype))


def load(source: str, name: str, shape: tuple[int, ...], dtype: str) -> Load:
    return intern(Load(source, name, tuple(shape), dtype))


def cast(node: Node, dtype: str) -> Node:
    """``node`` as ``dtype``; the node itself when it already is."""
    if node.dtype == dtype:
        return node
    return intern(Cast(node, dtype))


@dataclass(frozen=True)
class VirtualModel:
    """A model that exists only as a plan: config, named nodes, layer stack and file donor.

    ``changed`` lists the config keys steps rewrote (layer count, per-layer lists, ...): the
    output's config.json is the donor's with exactly these keys taken from here, and removed
    where this config lacks them (`without_config_keys`).
    """

    name: str
    config: Mapping[str, Any]
    tensors: Mapping[str, Node]
    stack: LayerStack
    donor: str  # the model input whose config and non-weight files this model inherits
    changed: frozenset[ConfigKey] = field(default_factory=frozenset)
    #: Operator metadata later steps and readers may need (coalescing schemes, compensation),
    #: recorded in the manifest under the step's name.
    meta: Mapping[str, Any] = field(default_factory=dict)

    def layer_tensors(self) -> dict[int, dict[str, Node]]:
        """``{layer index: {name within the layer: node}}``."""
        out: dict[int, dict[str, Node]] = {i: {} for i in range(self.stack.num_layers)}
        for name, node in self.tensors.items():
            hit = self.stack.split(name)
            if hit is not None:
                out[hit[0]][hit[1]] = node
        return out
