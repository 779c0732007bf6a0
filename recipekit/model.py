"""Plan nodes and virtual models: what a recipe compiles to, with no tensor computed.

A node is a frozen value that knows its shape and dtype. Equal nodes are one node: `intern`
hash-conses them, so a tensor that two output layers read (SOLAR-style overlaps) is one `Load`
in the plan, and equality checks between deep expressions stop at the first shared child.
A `VirtualModel` is a config plus an ordered map from tensor name to node; every model input
and every step is one. Nothing here imports torch.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

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

    def compute(self, args: tuple[Any, ...]) -> Any:
        """This node's tensor from its inputs' tensors (``args`` aligned with `inputs`, already
        on the compute device). Subclasses import torch here, never at module level, so that
        planning stays torch-free. The executor rounds nothing: the result has ``dtype``."""
        raise NotImplementedError(type(self).__name__)


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
        return 3 * 4 * self.numel  # a, b and the result in fp32

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
        return (len(self.inputs) + 2) * 4 * self.numel  # fp32 copies, deltas and the result

    def compute(self, args: tuple[Any, ...]) -> Any:
        from recipekit.dtypes import torch_dtype
        from recipekit.ops.merge import apply_method
        from recipekit.ops.rng import tensor_generator

        n = len(self.operands)
        base = args[n] if self.base is not None else None
        generator = tensor_generator(self.seed, self.tensor) if self.tensor else None
        return apply_method(self.method, list(args[:n]), base=base, params=dict(self.params),
                            generator=generator).to(torch_dtype(self.dtype))


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
    output's config.json is the donor's with exactly these keys taken from here.
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


def with_config(config: Mapping[str, Any], updates: Mapping[ConfigKey, Any]) -> dict[str, Any]:
    """A deep copy of ``config`` with each (possibly nested) key set to its new value."""
    out = copy.deepcopy(dict(config))
    for key, value in updates.items():
        cur = out
        for part in key[:-1]:
            cur = cur.setdefault(part, {})
        cur[key[-1]] = copy.deepcopy(value)
    return out
