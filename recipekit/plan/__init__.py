"""Compile a recipe into a plan, schedule it into shards, and render it.

``compile_plan`` turns models into virtual models, runs each step's builder in dependency
order, applies the output dtype, and lays the output tensors into shards whose safetensors
headers are fixed before any byte is read. Everything here is shapes and dtypes: no torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from recipekit import __version__
from recipekit.arch import LayerStack
from recipekit.dtypes import CODE_TO_NAME, NAME_TO_CODE, is_floating
from recipekit.errors import RecipeErrors, RecipekitError
from recipekit.graph import (
    Load,
    Node,
    VirtualModel,
    cast,
    expression_nodes,
    load,
    with_config,
    without_config_keys,
)
from recipekit.inputs.models import Checkpoint, rewrite_dimension_files
from recipekit.inputs.side_files import provided
from recipekit.io.header import build_header
from recipekit.io.names import ADAPTER_WEIGHTS, WEIGHTS
from recipekit.recipe import Recipe, step_references
from recipekit.steps import BUILDERS

#: Bytes the executor moves per read when a tensor is copied without compute, and how many such
#: buffers circulate between reading/writing and the hashing worker.
COPY_CHUNK = 8 * 1024 * 1024
COPY_BUFFERS = 4
#: Elements per piece when a large elementwise expression (linear, task arithmetic, lerp, casts)
#: is computed piecewise: 256Ki values, so each fp32 intermediate is 1 MiB whatever the tensor
#: size, and a piece's passes (convert, multiply-add, round) stay in the CPU's L2 cache.
CHUNK_ELEMS = 1 << 18


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
    sources: Mapping[str, Any]  # Checkpoint or AdapterCheckpoint, by recipe name
    model: VirtualModel
    donor: Checkpoint | None  # None for an adapter-set output
    config: dict[str, Any]  # config.json, or adapter_config.json for an adapter output
    shards: tuple[Shard, ...]
    adapter: bool = False  # the output is a PEFT adapter directory
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
        return {n for s in self.shards for t in s.tensors for n in expression_nodes(t.node)
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
                total += sum(n.nbytes for n in expression_nodes(t.node) if isinstance(n, Load))
        return total

    def peak_memory_estimate(self) -> int:
        """Working set above an idle process: the copy buffers if any tensor is copied as is,
        plus the largest computed tensor's working set (`working_set`, with this machine's
        default `piece_workers`)."""
        copied = [t.nbytes for s in self.shards for t in s.tensors if isinstance(t.node, Load)]
        buffers = COPY_BUFFERS * min(COPY_CHUNK, max(copied)) if copied else 0
        workers = piece_workers()
        return buffers + max((working_set(t.node, workers) for s in self.shards
                              for t in s.tensors if not isinstance(t.node, Load)), default=0)

    def largest_whole_tensor_op(self) -> tuple[str, Node, int] | None:
        """(tensor name, node, working set) of the computed tensor that needs the most memory
        because its op reads the whole tensor at once (slerp norms, TIES thresholds, ...);
        None when every computed tensor runs in chunks."""
        worst = None
        for s in self.shards:
            for t in s.tensors:
                if not reads_whole_tensor(t.node):
                    continue
                ws = working_set(t.node)
                if worst is None or ws > worst[2]:
                    worst = (t.name, t.node, ws)
        return worst

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


def expression_bytes(node: Node) -> int:
    return sum(n.nbytes + n.workspace for n in expression_nodes(node))


def reads_whole_tensor(node: Node) -> bool:
    """Some op of ``node``'s expression needs whole input tensors at once (norms, quantiles)."""
    return not all(not n.inputs or n.row_inputs() is not None
                   for n in expression_nodes(node))


def row_sliced(node: Node) -> tuple[set[Node], set[Node]] | None:
    """For row-piece evaluation of ``node``: (the nodes evaluated piece by piece, the nodes
    they read whole), or None when some node on a sliced path needs its whole inputs (or a
    sliced input's rows do not line up with the output's)."""
    sliced: set[Node] = set()
    whole: set[Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in sliced:
            continue
        sliced.add(n)
        if isinstance(n, Load):
            continue
        rows = n.row_inputs()
        if rows is None:
            return None
        for x, by_rows in zip(n.inputs, rows, strict=True):
            if not by_rows:
                whole.add(x)
            elif not x.shape or x.shape[0] != node.shape[0]:
                return None
            else:
                stack.append(x)
    return sliced, whole


def rows_per_piece(node: Node) -> int:
    """Rows of ``node`` per piece: about `CHUNK_ELEMS` values, a multiple of 64 values so that
    every piece starts where the whole tensor's vectorized loops would, and of every sliced
    node's `row_block` (bit-identical results; see `Node.compute_rows`)."""
    row = node.numel // node.shape[0]
    rows = max(1, CHUNK_ELEMS // row)
    align = 64 // math.gcd(row, 64)
    parts = row_sliced(node)
    for n in parts[0] if parts else ():
        align = math.lcm(align, n.row_block)
    return -(-rows // align) * align


def chunkable(node: Node) -> bool:
    """Whether the executor computes ``node`` in row pieces: it is larger than `CHUNK_ELEMS`
    and `row_sliced`. (Generated tensors make their own chunks: ops/init.py.)"""
    return bool(node.shape) and node.numel > CHUNK_ELEMS and row_sliced(node) is not None


#: What chunked evaluation holds besides its pieces and whole inputs, measured
#: (tests/test_execute.py: 16-35 MiB from run to run, and up to 40 MiB above a slerp's inputs
#: and chunk buffers): the worker threads' malloc arenas and the allocator's retained pieces.
CHUNKED_OVERHEAD = 32 * 1024 * 1024


def piece_workers() -> int:
    """Threads that compute row pieces side by side on the CPU by default: half the usable
    cores, at most 8. The other half reads ahead, hashes and writes; on 2 cores that leaves
    one, which measured fastest there (bench/README.md)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores // 2))


def working_set(node: Node, workers: int = 1) -> int:
    """Bytes computing one output tensor holds: its expression (inputs, intermediates, fp32
    scratch) and its result waiting for the hashing worker. For a chunked tensor: the inputs
    it reads whole, plus one piece per worker computing and one read ahead, the writer's
    queue of pieces and `CHUNKED_OVERHEAD`."""
    whole = expression_bytes(node) + node.nbytes
    parts = row_sliced(node) if chunkable(node) else None
    if parts is None:
        return whole
    sliced, whole_inputs = parts
    kept = sum(expression_bytes(x) for x in whole_inputs)
    rows = min(rows_per_piece(node), node.shape[0])
    per_piece = -(-sum(n.nbytes + n.workspace for n in sliced) * rows // node.shape[0])
    queued = 4 * rows * (node.nbytes // node.shape[0])
    return kept + (workers + 1) * per_piece + queued + CHUNKED_OVERHEAD


def model_from_checkpoint(ckpt: Checkpoint) -> VirtualModel:
    tensors = {name: load(ckpt.name, name, info.shape, info.dtype)
               for name, info in ckpt.tensors.items()}
    return VirtualModel(ckpt.name, ckpt.config, tensors, ckpt.stack, ckpt.name)


def compile_plan(recipe: Recipe, sources: Mapping[str, Any]) -> Plan:
    """Build every step, then the output: cast, order, shard, header.

    Raises:
        RecipeErrors: every step problem found (steps whose inputs failed are skipped).
    """
    from recipekit.graph.adapterset import AdapterSet, read_adapter_set
    from recipekit.inputs.adapters import AdapterCheckpoint

    models: dict[str, VirtualModel | AdapterSet] = {}
    errors: list[RecipekitError] = []
    failed: set[str] = set()
    for n, c in sources.items():
        try:
            models[n] = (read_adapter_set(c, recipe) if isinstance(c, AdapterCheckpoint)
                         else model_from_checkpoint(c))
        except RecipeErrors as e:
            errors.extend(e.errors)
            failed.add(n)
    for step in recipe.steps.values():
        if any(ref in failed for ref, _ in step_references(step.spec)):
            failed.add(step.name)
            continue
        wrong = [recipe.error(step.key_path + rel, f"'{ref}' is an adapter set; op "
                              f"{step.op} takes models here", hint="fold adapters into a model "
                              "first with `op: adapters`")
                 for ref, rel in step_references(step.spec) if rel[0] != "adapters"
                 and step.op != "adapters" and isinstance(models.get(ref), AdapterSet)]
        if wrong:
            errors.extend(wrong)
            failed.add(step.name)
            continue
        try:
            with provided(sources):  # steps get the side files resolved with the sources
                models[step.name] = BUILDERS[step.op](step, models, recipe)  # type: ignore[arg-type]
        except RecipeErrors as e:
            errors.extend(e.errors)
            failed.add(step.name)
        except RecipekitError as e:
            errors.append(e)
            failed.add(step.name)
    if errors:
        raise RecipeErrors(errors)

    value = models[recipe.output.model]
    if isinstance(value, AdapterSet):
        return _adapter_plan(recipe, sources, value)
    if recipe.output.adapter is not None:
        raise RecipeErrors([recipe.error(("output", "adapter"), f"output '{value.name}' is a "
                                         "model, not an adapter set", key=True,
                                         hint="`output.adapter` applies when `output.model` "
                                         "names an adapter set")])
    model = value
    out_code = NAME_TO_CODE[recipe.output.dtype] if recipe.output.dtype else None
    tensors: dict[str, Node] = {}
    for name, node in model.tensors.items():
        tensors[name] = cast(node, out_code) if out_code and is_floating(node.dtype) else node

    donor_name = recipe.output.config or model.donor
    if donor_name not in sources:
        donor_name = models[donor_name].donor  # type: ignore[union-attr]
    donor = sources[donor_name]
    config = output_config(donor.config, model, tensors, recipe.output.dtype)
    shards = schedule_shards(tensors, recipe.output.shard_size)
    final = VirtualModel(model.name, model.config, tensors, model.stack, donor_name, model.changed)
    operators = {name: dict(models[name].meta) for name in recipe.steps if models[name].meta}
    files = rewrite_dimension_files(donor, config)
    return Plan(recipe, dict(sources), final, donor, config, shards, operators=operators,
                files=files)


#: The layer stack of an adapter output (it has no layers of its own).
NO_STACK = LayerStack("", 0, ("num_hidden_layers",), (), None, "")


def _adapter_plan(recipe: Recipe, sources: Mapping[str, Any], aset: Any) -> Plan:
    """A plan writing an adapter set as a PEFT adapter directory: one safetensors file."""
    from recipekit.run.adapter_output import adapter_output

    if recipe.output.config is not None:
        raise RecipeErrors([recipe.error(("output", "config"), "an adapter output has no "
                                         "config.json donor", key=True)])
    tensors, config = adapter_output(aset, recipe)
    shards = schedule_shards(tensors, 1 << 62, single=ADAPTER_WEIGHTS)
    model = VirtualModel(aset.name, {}, tensors, NO_STACK, "")
    return Plan(recipe, dict(sources), model, None, config, shards, adapter=True)


def output_config(donor: Mapping[str, Any], model: VirtualModel, tensors: Mapping[str, Node],
                  dtype: str | None) -> dict[str, Any]:
    """The donor's config with the keys the steps changed (set, or removed where the model's
    config lacks them), and both `dtype` and `torch_dtype` naming what was written
    (transformers 5 reads `dtype`, older versions `torch_dtype`)."""
    from recipekit.arch import config_get, config_has

    kept = [k for k in model.changed if config_has(model.config, k)]
    config = with_config(donor, {k: config_get(model.config, k) for k in kept})
    config = without_config_keys(config, [k for k in model.changed if k not in kept])
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
