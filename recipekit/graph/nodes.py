"""Plan nodes: frozen values that know their shape and dtype, hash-consed.

A node is a frozen value that knows its shape and dtype. Equal nodes are one node: `intern`
hash-conses them, so a tensor that two output layers read (SOLAR-style overlaps) is one `Load`
in the plan, and equality checks between deep expressions stop at the first shared child.
The nodes every step uses live here (`Load`, `Cast`); an op's own nodes live in its step module
(`recipekit.steps.merge.Merge`, ...), and the adapter-set nodes in `graph.lora`. Nothing here
imports torch.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Container, Iterable, Iterator
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar, TypeVar

from recipekit.dtypes import itemsize, torch_dtype

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
    #: Row pieces hold about this many times `plan.cost.CHUNK_ELEMS` values (`rows_per_piece`).
    piece_scale: ClassVar[int] = 1
    #: The node computes in fp32 (fp64 for fp64 inputs) whatever its ``dtype`` and rounds once
    #: to ``dtype`` at the end, so `round_to` may give it another ``dtype`` instead of casting.
    rounds_once: ClassVar[bool] = False
    #: Computed whole on the CPU at torch's own thread count rather than one thread
    #: (`run.execute._torch_threads`): a dense factorization, whose time is BLAS calls that
    #: scale with the cores. Elementwise kernels run at one thread: their bytes then do not
    #: depend on the cores or `--workers` (a parallel reduction's order does), and on busy cores
    #: a parallel region waits for descheduled peers.
    threaded: ClassVar[bool] = False

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

    def __getstate__(self) -> dict[str, Any]:
        """The fields without the cached hash: str hashes are salted per process, so a node
        unpickled in another process (a Ray task, `recipekit.run.ray`) computes its own."""
        state = dict(self.__dict__)
        state.pop("_hash", None)
        return state

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


def shared_shape(node: Node) -> tuple[int, ...]:
    """The shape of a node whose shape is one of its inputs' (``shape_input``: an
    interpolation, a merge, a cast, a LoRA fold), found by walking down such nodes in a loop
    rather than by recursion: a chain of 2,000 interpolate steps is 2,000 nodes deep."""
    n = node
    while (nxt := getattr(n, "shape_input", None)) is not None:
        n = nxt
    return n.shape


class SameShape(Node):
    """A node shaped like one of its inputs, its ``shape_input`` (an interpolation, a merge, a
    cast, a LoRA fold): the shape is found by `shared_shape`'s loop, so deep chains need no
    recursion, and each such node names only which input it follows."""

    __slots__ = ()

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return shared_shape(self)


def fp32_copies(inputs: tuple[Node, ...]) -> int:
    """Bytes of the fp32 copies a kernel makes of its inputs narrower than fp32."""
    return sum(4 * n.numel for n in inputs if itemsize(n.dtype) < 4)


def iter_post_order(root: Node, done: Container[Node],
                    children: Callable[[Node], Iterable[Node]] | None = None) -> Iterator[Node]:
    """Every node ``root`` depends on, and ``root``, inputs first and left to right, skipping
    those in ``done``; the caller records each yielded node in ``done`` (a label, an id, a
    value) before asking for the next. ``children`` (default: a node's inputs) says which
    inputs to visit: the executor skips those a reduction streams. An explicit stack, not
    recursion: a chain of 2,000 interpolate steps is an expression 2,000 deep."""
    stack = [root]
    while stack:
        n = stack[-1]
        if n in done:
            stack.pop()
            continue
        pending = [i for i in (n.inputs if children is None else children(n)) if i not in done]
        if pending:
            stack.extend(reversed(pending))
            continue
        yield n
        stack.pop()


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
class Cast(SameShape):
    """``input`` converted to ``dtype`` (round to nearest even, as torch's ``.to``)."""

    input: Node
    dtype: str

    @property
    def shape_input(self) -> Node:
        """The input whose shape this node has."""
        return self.input

    @property
    def elementwise(self) -> bool:
        return True

    def compute(self, args: tuple[Any, ...]) -> Any:
        return args[0].to(torch_dtype(self.dtype))


def load(source: str, name: str, shape: tuple[int, ...], dtype: str) -> Load:
    return intern(Load(source, name, tuple(shape), dtype))


def cast(node: Node, dtype: str) -> Node:
    """``node`` as ``dtype``; the node itself when it already is."""
    if node.dtype == dtype:
        return node
    return intern(Cast(node, dtype))


#: Merge methods whose mergekit kernel leaves its compute dtype midway (an fp32 mask or λ
#: promotes the bf16 computation) and returns the fp32 result: under `compute_dtype:` it is not
#: rounded to the compute dtype before the output cast (tests/steps/test_merge.py).
PROMOTED_BY_MERGEKIT = frozenset({"arcee_fusion", "ramplus_tl"})


def round_to(node: Node, dtype: str) -> Node:
    """``node`` rounded once to ``dtype``: a computing node (`Node.rounds_once`) gets ``dtype``
    as its own, so its fp32 result is rounded to ``dtype`` directly (a bf16 merge written as
    fp32 is the fp32 result, not the bf16 one widened: issue 16 item 3); anything else (a
    `Load`, data movement) is cast, bit-exact as before. A node that computes the way
    mergekit does (``native``: a merge step's `compute_dtype:`) is cast too: mergekit rounds
    its result to the compute dtype first, then to `out_dtype` (except `PROMOTED_BY_MERGEKIT`)."""
    if node.dtype == dtype:
        return node
    native = getattr(node, "native", False) and \
        getattr(node, "method", None) not in PROMOTED_BY_MERGEKIT
    if node.rounds_once and not native:
        return intern(replace(node, dtype=dtype))  # type: ignore[type-var]
    return intern(Cast(node, dtype))
