"""Lay a model's output tensors into shards whose safetensors headers are fixed in advance."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from recipekit.graph import Node
from recipekit.io.header import build_header
from recipekit.io.names import WEIGHTS


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    node: Node
    offset: int  # within the shard's data section

    @property
    def nbytes(self) -> int:
        return self.node.nbytes


@dataclass(frozen=True)
class Shard:
    filename: str
    header: bytes
    tensors: tuple[PlannedTensor, ...]

    @property
    def size(self) -> int:
        return len(self.header) + sum(t.nbytes for t in self.tensors)


def natural_key(name: str) -> tuple[Any, ...]:
    """Sort ``layers.2`` before ``layers.10``."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def schedule_shards(tensors: Mapping[str, Node], shard_size: int, *,
                    single: str = WEIGHTS) -> tuple[Shard, ...]:
    """Lay tensors out in natural name order, starting a new shard before one would exceed
    ``shard_size`` (a single larger tensor gets a shard of its own); one shard is named
    ``single``."""
    groups: list[list[tuple[str, Node]]] = [[]]
    size = 0
    for name in sorted(tensors, key=natural_key):
        node = tensors[name]
        if groups[-1] and size + node.nbytes > shard_size:
            groups.append([])
            size = 0
        groups[-1].append((name, node))
        size += node.nbytes
    n = len(groups)
    shards = []
    for k, group in enumerate(groups, 1):
        header, offsets = build_header([(name, node.dtype, node.shape) for name, node in group])
        filename = single if n == 1 else f"model-{k:05d}-of-{n:05d}.safetensors"
        placed = tuple(PlannedTensor(name, node, off)
                       for (name, node), off in zip(group, offsets, strict=True))
        shards.append(Shard(filename, header, placed))
    return tuple(shards)
