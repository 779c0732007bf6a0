"""Compile a recipe into a plan, schedule it into shards, and render it.

``compile_plan`` turns models into virtual models, runs each step's builder in dependency
order, applies the output dtype, and lays the output tensors into shards whose safetensors
headers are fixed before any byte is read. Everything here is shapes and dtypes: no torch.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from recipekit import __version__
from recipekit.dtypes import CODE_TO_NAME, NAME_TO_CODE, is_floating
from recipekit.errors import RecipeErrors, RecipekitError
from recipekit.io.header import build_header
from recipekit.model import Load, Node, VirtualModel, cast, load, with_config
from recipekit.recipe import Recipe, step_references
from recipekit.sources import Checkpoint, rewrite_dimension_files
from recipekit.steps import BUILDERS

#: Bytes the executor moves per read when a tensor is copied without compute, and how many such
#: buffers circulate between reading/writing and the hashing worker.
COPY_CHUNK = 8 * 1024 * 1024
COPY_BUFFERS = 4


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


@dataclass(frozen=True)
class Plan:
    """Everything the executor needs, and everything `recipekit plan` shows."""

    recipe: Recipe
    sources: Mapping[str, Checkpoint]
    model: VirtualModel
    donor: Checkpoint
    config: dict[str, Any]
    shards: tuple[Shard, ...]
    #: Step name -> operator metadata (coalescing schemes, compensation), for the manifest.
    operators: Mapping[str, Any] = field(default_factory=dict)
    #: Donor files written with rewritten contents (relative path -> bytes), e.g. the
    #: sentence-transformers pooling dimension after a width change.
    files: Mapping[str, bytes] = field(default_factory=dict)

    @property
    def bytes_written(self) -> int:
        return sum(s.size for s in self.shards)

    @property
    def num_tensors(self) -> int:
        return sum(len(s.tensors) for s in self.shards)

    def loads(self) -> set[Load]:
        """Every distinct stored tensor the plan reads."""
        return {n for s in self.shards for t in s.tensors for n in _expression_nodes(t.node)
                if isinstance(n, Load)}

    @property
    def bytes_read(self) -> int:
        """Distinct input bytes the plan reads."""
        return sum(n.nbytes for n in self.loads())

    @property
    def bytes_read_total(self) -> int:
        """Input bytes read including re-reads (a layer used twice is read twice)."""
        total = 0
        for s in self.shards:
            for t in s.tensors:
                total += sum(n.nbytes for n in _expression_nodes(t.node) if isinstance(n, Load))
        return total

    def peak_memory_estimate(self) -> int:
        """Working set above an idle process: the copy buffers if any tensor is copied as is,
        plus the largest computed tensor's expression (its inputs, intermediates and result)
        and one more result waiting for the hashing worker."""
        copied = [t.nbytes for s in self.shards for t in s.tensors if isinstance(t.node, Load)]
        buffers = COPY_BUFFERS * min(COPY_CHUNK, max(copied)) if copied else 0
        worst = max((_expression_bytes(t.node) + t.nbytes for s in self.shards for t in s.tensors
                     if not isinstance(t.node, Load)), default=0)
        return buffers + worst

    def plan_hash(self) -> str:
        """Identity of what this plan writes: canonical recipe, input identities, tool version."""
        doc = {
            "recipe": self.recipe.canonical(),
            "inputs": {n: c.identity() for n, c in sorted(self.sources.items())},
            "version": __version__,
        }
        if self.operators:  # a scheme read from a file is part of what is written
            doc["operators"] = self.operators
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _expression_nodes(node: Node) -> set[Node]:
    seen: set[Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.inputs)
    return seen


def _expression_bytes(node: Node) -> int:
    return sum(n.nbytes + n.workspace for n in _expression_nodes(node))


def model_from_checkpoint(ckpt: Checkpoint) -> VirtualModel:
    tensors = {name: load(ckpt.name, name, info.shape, info.dtype)
               for name, info in ckpt.tensors.items()}
    return VirtualModel(ckpt.name, ckpt.config, tensors, ckpt.stack, ckpt.name)


def compile_plan(recipe: Recipe, sources: Mapping[str, Checkpoint]) -> Plan:
    """Build every step, then the output: cast, order, shard, header.

    Raises:
        RecipeErrors: every step problem found (steps whose inputs failed are skipped).
    """
    models: dict[str, VirtualModel] = {n: model_from_checkpoint(c) for n, c in sources.items()}
    errors: list[RecipekitError] = []
    failed: set[str] = set()
    for step in recipe.steps.values():
        if any(ref in failed for ref, _ in step_references(step.spec)):
            failed.add(step.name)
            continue
        try:
            models[step.name] = BUILDERS[step.op](step, models, recipe)
        except RecipeErrors as e:
            errors.extend(e.errors)
            failed.add(step.name)
        except RecipekitError as e:
            errors.append(e)
            failed.add(step.name)
    if errors:
        raise RecipeErrors(errors)

    model = models[recipe.output.model]
    out_code = NAME_TO_CODE[recipe.output.dtype] if recipe.output.dtype else None
    tensors: dict[str, Node] = {}
    for name, node in model.tensors.items():
        tensors[name] = cast(node, out_code) if out_code and is_floating(node.dtype) else node

    donor_name = recipe.output.config or model.donor
    if donor_name not in sources:
        donor_name = models[donor_name].donor
    donor = sources[donor_name]
    config = output_config(donor.config, model, tensors, recipe.output.dtype)
    shards = schedule_shards(tensors, recipe.output.shard_size)
    final = VirtualModel(model.name, model.config, tensors, model.stack, donor_name, model.changed)
    operators = {name: dict(models[name].meta) for name in recipe.steps if models[name].meta}
    files = rewrite_dimension_files(donor, config)
    return Plan(recipe, dict(sources), final, donor, config, shards, operators, files)


def output_config(donor: Mapping[str, Any], model: VirtualModel, tensors: Mapping[str, Node],
                  dtype: str | None) -> dict[str, Any]:
    """The donor's config with the keys the steps changed, and both `dtype` and `torch_dtype`
    naming what was written (transformers 5 reads `dtype`, older versions `torch_dtype`)."""
    from recipekit.arch import config_get

    config = with_config(donor, {k: config_get(model.config, k) for k in model.changed})
    if dtype is None:
        floats = {n.dtype for n in tensors.values() if is_floating(n.dtype)}
        dtype = CODE_TO_NAME.get(next(iter(floats))) if len(floats) == 1 else None
    if dtype is None:
        dtype = donor.get("dtype") or donor.get("torch_dtype")
    if dtype is not None:
        config["dtype"] = dtype
        config["torch_dtype"] = dtype
    return config


def natural_key(name: str) -> tuple[Any, ...]:
    """Sort ``layers.2`` before ``layers.10``."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def schedule_shards(tensors: Mapping[str, Node], shard_size: int) -> tuple[Shard, ...]:
    """Lay tensors out in natural name order, starting a new shard before one would exceed
    ``shard_size`` (a single larger tensor gets a shard of its own)."""
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
        filename = "model.safetensors" if n == 1 else f"model-{k:05d}-of-{n:05d}.safetensors"
        placed = tuple(PlannedTensor(name, node, off)
                       for (name, node), off in zip(group, offsets, strict=True))
        shards.append(Shard(filename, header, placed))
    return tuple(shards)
