"""The `coalesce` and `decoalesce` ops: MLTF's width/depth maps, tensor by tensor.

`coalesce` makes a small model from a large one (Zou et al., "A Multi-Level Framework for
Accelerating Training Transformer Models", ICLR 2024): every weight's output axis is averaged
over the width groups and its input axis summed; layers of a depth group are averaged.
`decoalesce` is the reverse map: output axes copied, input axes copied and divided by the group
size, layers copied into each position of their group; for width it preserves the function of
BERT, GPT-2, ViT/DeiT and Llama/Mistral/Qwen2 (equal groups). coalesce ∘ decoalesce is the
identity (bit-exact for groups of 1, 2, 4, ...). The schemes, the roles of each tensor's axes
(arch/*.json ``coalesce``) and the tied-head compensation turn into one `Coalesce` /
`Decoalesce` node per tensor: gathers and group reductions, never a dense map matrix, never more
than a depth group's tensors at once. Per-layer config lists follow the depth map, `layer_types`
that transformers derives from the layer index included (`arch.layer_types`); a depth group
whose layers differ in one is refused.

Compensation (reference §4.2; issue 5): with a tied LM head a de-coalesced hidden state ``T h``
gives logits ``Σ_i |g_i| h_i e_i``. ``auto`` maps the norm feeding the head (final norm; BERT's
MLM transform LayerNorm) on its input side (split copies), which is exact for every partition;
``mltf`` scales the embedding tables by 0.5 (×2 when coalescing) as MLTF does (exact for BERT,
not for pre-norm models); ``none`` does nothing. Oracles: tests/steps/test_coalesce*.py run
transformers forward passes and compare round trips bit for bit.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from recipekit.arch import (
    Architecture,
    ConfigKey,
    LayerStack,
    config_get,
    load_architectures,
    with_config,
)
from recipekit.arch.layer_types import derived_layer_types
from recipekit.dtypes import is_floating, torch_dtype
from recipekit.errors import RecipeError, RecipeErrors, SchemeError, ShapeMismatchError, UsageError
from recipekit.graph import Load, Node, VirtualModel, intern
from recipekit.graph.gather import RowGather
from recipekit.inputs.schemes import (
    Partition,
    WidthMap,
    check_partition,
    derive_width,
    inline_scheme_problems,
)
from recipekit.recipe import Recipe, Step
from recipekit.steps.registry import Op

log = logging.getLogger(__name__)

#: An axis map of a coalescing node: ``(mode, ((groups, block), ...))`` (see ops/coalesce.py).
AxisMap = tuple[str, tuple[tuple[tuple[tuple[int, ...], ...], int], ...]]


@dataclass(frozen=True, eq=False)
class Coalesce(RowGather):
    """One small-model tensor of the `coalesce` op, rounded once to ``dtype``.

    Each of ``members`` (the same tensor of every large layer in a depth group; one outside the
    layers or without ``depth``) is width-coalesced along ``axes`` (group means on output axes,
    group sums on input axes), the members are averaged, and the result is scaled by ``scale``.
    With dim 0 mapped (a head or neuron partition on the output axis), stored members stream
    as a row gather: a piece of small rows reads only its groups' large rows
    (`ops.coalesce.coalesce_rows`), the same bytes as the whole tensor's.
    """

    rounds_once: ClassVar[bool] = True

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

    @property
    def row_block(self) -> int:  # type: ignore[override]
        """Pieces start at whole units of the dim-0 map (a head's or a 448-neuron block's
        rows): `gather` computes every unit a piece touches, so a piece of part of a unit
        would read and compute the whole unit (at Mistral-7B width, a 128-row piece of an MLP
        matrix held 85 MiB, not the 24 MiB the plan charged, and each unit was computed 3.5
        times over)."""
        if self.axes[0] is None:
            return 1
        return math.lcm(*(block for _, block in self.axes[0][1]))

    def row_inputs(self) -> tuple[bool, ...] | None:
        # rows that no group maps (an embedding's vocabulary) are independent of each other
        return (True,) * len(self.members) if self.axes[0] is None else None

    @property
    def streams(self) -> bool:
        return self.axes[0] is not None and all(isinstance(m, Load) for m in self.members)

    def read_tables(self) -> tuple[Node, ...]:
        return self.members

    def gather(self, read: Callable[[int, int, int], Any], lo: int, hi: int,
               whole: tuple[Any, ...] = ()) -> Any:
        import torch

        from recipekit.ops.coalesce import coalesce, coalesce_rows

        runs, axis, at = coalesce_rows(self.axes[0], lo, hi)  # type: ignore[arg-type]
        parts = [torch.cat([read(t, a, b) for a, b in runs]) for t in range(len(self.members))]
        out = coalesce(parts, (axis, *self.axes[1:]), scale=self.scale)
        return out[at:at + hi - lo].to(torch_dtype(self.dtype))

    def compute(self, args: tuple[Any, ...]) -> Any:
        from recipekit.ops.coalesce import coalesce

        return coalesce(args, self.axes, scale=self.scale).to(torch_dtype(self.dtype))


@dataclass(frozen=True, eq=False)
class Decoalesce(RowGather):
    """One large-model tensor of the `decoalesce` op, rounded once to ``dtype``: ``input``
    copied along output axes, copied and divided by the group size along input axes, then
    scaled by ``scale``. A depth group's large layers share one node per tensor. With dim 0
    mapped, a stored input streams as a row gather (`ops.coalesce.decoalesce_rows`)."""

    rounds_once: ClassVar[bool] = True

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

    @property
    def streams(self) -> bool:
        return self.axes[0] is not None and isinstance(self.input, Load)

    def read_tables(self) -> tuple[Node, ...]:
        return (self.input,)

    def gather(self, read: Callable[[int, int, int], Any], lo: int, hi: int,
               whole: tuple[Any, ...] = ()) -> Any:
        import torch

        from recipekit.ops.coalesce import decoalesce_gathered, decoalesce_rows

        runs, source, sizes = decoalesce_rows(self.axes[0], lo, hi)  # type: ignore[arg-type]
        x = torch.cat([read(0, a, b) for a, b in runs])
        return decoalesce_gathered(x, source, sizes, self.axes, scale=self.scale).to(
            torch_dtype(self.dtype))

    def compute(self, args: tuple[Any, ...]) -> Any:
        from recipekit.ops.coalesce import decoalesce

        return decoalesce(args[0], self.axes, scale=self.scale).to(torch_dtype(self.dtype))


def build_coalesce(step: Step, models: Mapping[str, VirtualModel],
                   recipe: Recipe) -> VirtualModel:
    """Build the `coalesce` step's virtual model (large -> small; see the module docstring).

    Raises:
        RecipeErrors: bad schemes (naming the group), unsupported families, tensors with no rule.
    """
    return _build(step, models, recipe, coalescing=True)


def build_decoalesce(step: Step, models: Mapping[str, VirtualModel],
                     recipe: Recipe) -> VirtualModel:
    """Build the `decoalesce` step's virtual model (small -> large; see the module docstring).

    Raises:
        RecipeErrors: bad schemes (naming the group), unsupported families, tensors with no rule.
    """
    return _build(step, models, recipe, coalescing=False)


def check_coalesce(step: Step, recipe: Recipe) -> list[RecipeError]:
    """The `coalesce` / `decoalesce` document check: inline schemes
    (`inputs.schemes.inline_scheme_problems`), before the model is read."""
    problems = inline_scheme_problems(step.spec)
    return [recipe.error(step.key_path + e.where, e.message, hint=e.hint) for e in problems]


class _Located(Exception):
    def __init__(self, error: RecipeError) -> None:
        self.error = error


def _read_scheme(step: Step, recipe: Recipe, key: str) -> tuple[Any, str | None]:
    """The scheme under ``key`` (inline, or from ``{file: ...}``, read by the inputs layer) and
    its file, if any."""
    value = step.spec.get(key)
    if not isinstance(value, dict):
        return value, None
    written = value["file"]
    try:
        return step.files[(key, "file")].value(), written
    except SchemeError as e:
        raise _Located(recipe.error(step.key_path + (key, "file"), f"{written}: {e.message}",
                                    hint=e.hint)) from None


def _locate(step: Step, recipe: Recipe, e: SchemeError, files: Mapping[str, str | None]
            ) -> RecipeError:
    key = e.where[0] if e.where else None
    file = files.get(key) if isinstance(key, str) else None
    if file is not None:  # the group is in the file: point at `file:` and name it
        return recipe.error(step.key_path + (key, "file"), f"{file}: {e.message}", hint=e.hint)
    return recipe.error(step.key_path + e.where, e.message, hint=e.hint)


def _dims(model: VirtualModel, arch: Architecture) -> dict[str, int]:
    cfg = model.config
    heads = arch.config_value(cfg, "num_heads")
    hidden = arch.config_value(cfg, "hidden_size")
    kv = arch.config_value(cfg, "num_kv_heads")
    head_dim = arch.config_value(cfg, "head_dim")
    inter = arch.config_value(cfg, "intermediate_size")  # GPT-2's n_inner: null is 4 * n_embd
    return {"heads": heads, "hidden": hidden, "kv": kv or heads,
            "head_dim": head_dim or (hidden // heads if heads else 0), "inter": inter}


def _build(step: Step, models: Mapping[str, VirtualModel], recipe: Recipe, *,
           coalescing: bool) -> VirtualModel:
    src_name = step.spec["from"]
    src = models[src_name]
    op = step.op
    arch = load_architectures().get(src.stack.family) if src.stack.family else None
    if arch is None or arch.coalesce is None:
        supported = sorted(a.family for a in load_architectures().values() if a.coalesce)
        raise RecipeErrors([recipe.error(
            step.key_path + ("from",), f"`{op}` does not support model '{src_name}' (family "
            f"{src.stack.family or 'unknown'})", hint="supported families: "
            + ", ".join(supported))])
    errors: list[RecipeError] = []
    files: dict[str, str | None] = {}
    schemes: dict[str, Any] = {}
    for key in ("width", "depth"):
        try:
            schemes[key], files[key] = _read_scheme(step, recipe, key)
        except _Located as e:
            errors.append(e.error)
            schemes[key] = None
    if errors:
        raise RecipeErrors(errors)
    ffn = step.spec.get("ffn")
    if ffn is not None and schemes["width"] is None:
        raise RecipeErrors([recipe.error(step.key_path + ("ffn",), "`ffn:` needs a `width:` "
                                         "scheme", hint="add `width:` or remove `ffn:`")])
    dims = _dims(src, arch)
    width: WidthMap | None = None
    depth: Partition | None = None
    what = f"model '{src_name}'"
    if schemes["width"] is not None:
        try:
            width = derive_width(schemes["width"], ffn, coalescing=coalescing,
                                 num_heads=dims["heads"], num_kv_heads=dims["kv"],
                                 hidden_size=dims["hidden"], head_dim=dims["head_dim"],
                                 intermediate_size=dims["inter"], model=what)
        except SchemeError as e:
            errors.append(_locate(step, recipe, e, files))
    if schemes["depth"] is not None:
        n = src.stack.num_layers
        try:
            depth = (check_partition(schemes["depth"], key="depth", unit="layer", n_large=n,
                                     model=what) if coalescing else
                     check_partition(schemes["depth"], key="depth", unit="layer", n_small=n,
                                     model=what))
        except SchemeError as e:
            errors.append(_locate(step, recipe, e, files))
    if errors:
        raise RecipeErrors(errors)
    if width is not None and not width.h.partition.is_uniform:
        log.warning("step '%s': width groups of unequal sizes; LayerNorm/RMSNorm are exact under "
                    "de-coalescing only for equal group sizes", step.name)
    if width is not None and step.spec.get("compensation") == "mltf" and \
            {len(g) for g in width.h.partition.groups} != {2}:
        log.warning("step '%s': `compensation: mltf` scales the embedding tables by MLTF's "
                    "fixed 0.5 (x2 when coalescing), which compensates width groups of 2 only; "
                    "`auto` is exact for every partition", step.name)

    return _coalesced_model(step, recipe, src, arch, width, depth, dims, coalescing)


def _coalesced_model(step: Step, recipe: Recipe, src: VirtualModel, arch: Architecture,
                     width: WidthMap | None, depth: Partition | None, dims: dict[str, int],
                     coalescing: bool) -> VirtualModel:
    """The step's model from checked width and depth maps: mapped tensors, updated config and
    layer stack, and the maps recorded as metadata for the manifest."""
    compensation = step.spec.get("compensation", "auto") if width is not None else "none"
    tied = _has_tied_head(src, arch)
    mapper = _TensorMapper(arch, src.stack, width, coalescing=coalescing,
                           compensation=compensation, tied=tied)
    tensors, shape_errors = _map_tensors(step, recipe, src, mapper, depth, coalescing)
    if shape_errors:
        raise RecipeErrors(shape_errors)

    updates = _config_updates(step, recipe, src, arch, width, depth, coalescing, dims)
    config = with_config(src.config, updates)
    n_layers = src.stack.num_layers if depth is None else (
        depth.n_small if coalescing else depth.n_large)
    per_layer = src.stack.per_layer_keys + tuple(  # derived `layer_types` written out
        key for key in _per_layer_lists(src) if key in updates
        and key not in src.stack.per_layer_keys)
    stack = LayerStack(src.stack.prefix, n_layers, src.stack.count_key, per_layer,
                       src.stack.family, src.stack.base)
    meta = {
        "op": step.op, "from": step.spec["from"],
        "width": width.q.partition.as_lists() if width else None,
        "kv": width.kv.partition.as_lists() if width else None,
        "ffn": width.ffn.partition.as_lists() if width else None,
        "depth": depth.as_lists() if depth else None,
        "compensation": compensation, "tied_head": tied,
    }
    return VirtualModel(step.name, config, tensors, stack, src.donor,
                        src.changed | frozenset(updates), meta)


def _has_tied_head(model: VirtualModel, arch: Architecture) -> bool:
    """An LM head class whose output weight is the embedding table (tie_word_embeddings)."""
    assert arch.coalesce is not None
    classes = set(model.config.get("architectures") or ())
    if not classes & set(arch.coalesce["lm_head_architectures"]):
        return False
    tie_key = arch.config.get("tie_word_embeddings")
    tie = model.config.get(tie_key) if tie_key else None
    if tie is None:  # not written: tied exactly when the head weight is not stored
        return not any(h in model.tensors for h in arch.tied)
    return bool(tie)


class _TensorMapper:
    """Axis maps and scale of one tensor from its role (arch/*.json ``coalesce.roles``)."""

    def __init__(self, arch: Architecture, stack: LayerStack, width: WidthMap | None, *,
                 coalescing: bool, compensation: str, tied: bool) -> None:
        assert arch.coalesce is not None
        self.arch = arch
        self.roles: Mapping[str, Any] = arch.coalesce["roles"]
        self.stack = stack
        self.width = width
        self.coalescing = coalescing
        self.compensation = compensation
        self.tied = tied
        self.head_names = set(arch.weights["head"])

    def relative(self, name: str) -> str:
        hit = self.stack.split(name)
        if hit is not None:
            return hit[1]
        if name in self.head_names:
            return name
        base = self.stack.base
        return name[len(base):] if base and name.startswith(base) else name

    def role(self, rel: str) -> tuple[Any, bool]:
        """(role, is an embedding table) for a relative name; KeyError when unknown."""
        if self.tied and rel in self.arch.tied:  # a stored copy of the tied head
            rel = self.arch.tied[rel]
        return self.roles[rel], rel in self.arch.coalesce["embeddings"]  # type: ignore[index]

    def axes(self, rel: str, ndim: int) -> tuple[tuple[AxisMap | None, ...], float] | None:
        """Axis maps and scale, or None for a buffer that passes through unchanged (``keep``).

        Without a width map every axis is unmapped but the tensor is still a weight: a depth
        group averages it (MLTF's R matrix; issue 16 item 1), only buffers keep group[0]'s.
        """
        role, embedding = self.role(rel)
        if role == "keep":
            return None
        if self.width is None:
            return (None,) * ndim, 1.0
        if len(role) != ndim:
            raise ValueError(f"has {ndim} axes, but its rule names {len(role)}")
        final_norm = self.tied and self.compensation == "auto" and (
            rel in self.arch.coalesce["final_norm"])  # type: ignore[index]
        axes: list[AxisMap | None] = []
        for spec in role:
            if spec == "-":
                axes.append(None)
                continue
            side, spaces = spec.split(":")
            if final_norm:
                side = "in"
            if self.coalescing:
                mode = "mean" if side == "out" else "sum"
            else:
                mode = "copy" if side == "out" else "split"
            segments = tuple((self.width.space(s).partition.groups, self.width.space(s).block)
                             for s in spaces.split(","))
            axes.append((mode, segments))
        scale = 1.0
        if embedding and self.compensation == "mltf":
            scale = 2.0 if self.coalescing else 0.5
        return tuple(axes), scale


def _out_shape(shape: tuple[int, ...], axes: tuple[AxisMap | None, ...],
               coalescing: bool) -> tuple[int, ...]:
    from_large = coalescing
    out = []
    for n, axis in zip(shape, axes, strict=True):
        if axis is None:
            out.append(n)
            continue
        expected = _axis_length(axis, large=from_large)
        if n != expected:
            raise ValueError(f"axis of length {n} where the scheme expects {expected}")
        out.append(_axis_length(axis, large=not from_large))
    return tuple(out)


def _axis_length(axis: AxisMap, *, large: bool) -> int:
    return sum((sum(len(g) for g in groups) if large else len(groups)) * block
               for groups, block in axis[1])


def _map_tensors(step: Step, recipe: Recipe, src: VirtualModel, mapper: _TensorMapper,
                 depth: Partition | None, coalescing: bool
                 ) -> tuple[dict[str, Node], list[RecipeError]]:
    """Every output tensor's node: tensors outside the layers one to one, layers one to one
    (no depth map), averaged over a depth group (coalesce) or shared by a group (decoalesce)."""
    errors: list[RecipeError] = []
    mapped = _node_mapper(step, recipe, src, mapper, coalescing, errors)
    stack = src.stack
    tensors: dict[str, Node] = {}
    layers = src.layer_tensors()
    for name, node in src.tensors.items():
        if stack.split(name) is not None:
            continue
        out = mapped(name, (node,))
        if out is not None:
            tensors[name] = out
    if depth is None:
        for i, layer in layers.items():
            for rel, node in layer.items():
                out = mapped(stack.name(i, rel), (node,))
                if out is not None:
                    tensors[stack.name(i, rel)] = out
    elif coalescing:
        _map_depth_groups(step, recipe, stack, layers, depth, mapped, tensors, errors)
    else:
        owner = depth.group_of()
        small: dict[tuple[int, str], Node | None] = {}
        for j in range(depth.n_large):
            for rel, node in layers[owner[j]].items():
                key = (owner[j], rel)
                if key not in small:
                    small[key] = mapped(stack.name(owner[j], rel), (node,))
                if small[key] is not None:
                    tensors[stack.name(j, rel)] = small[key]  # type: ignore[assignment]
    return tensors, errors


def _map_depth_groups(step: Step, recipe: Recipe, stack: LayerStack,
                      layers: Mapping[int, Mapping[str, Node]], depth: Partition, mapped: Any,
                      tensors: dict[str, Node], errors: list[RecipeError]) -> None:
    """Coalesce: small layer i averages the same tensor of every large layer in group i."""
    for i, group in enumerate(depth.groups):
        for rel, node in layers[group[0]].items():
            members = tuple(layers[j].get(rel) for j in group)
            if any(m is None or m.shape != node.shape or m.dtype != node.dtype
                   for m in members):
                errors.append(recipe.error(
                    step.key_path + ("depth", i), f"depth group {i} {list(group)} merges "
                    f"layers whose `{rel}` differ in presence, shape or dtype",
                    cls=ShapeMismatchError))
                continue
            out = mapped(stack.name(group[0], rel), members)
            if out is not None:
                tensors[stack.name(i, rel)] = out


def _node_mapper(step: Step, recipe: Recipe, src: VirtualModel, mapper: _TensorMapper,
                 coalescing: bool, errors: list[RecipeError]) -> Any:
    """``mapped(name, members)``: the node of one output tensor from its input members (one, or
    a depth group's), or None after reporting why the tensor cannot be mapped."""
    where = step.key_path + ("from",)

    def fail(name: str, message: str, hint: str | None = None,
             cls: type[UsageError] = RecipeError) -> None:
        errors.append(recipe.error(where, f"`{name}` of '{src.name}': {message}", hint=hint,
                                   cls=cls))

    def mapped(name: str, members: tuple[Node, ...]) -> Node | None:
        node = members[0]
        if not is_floating(node.dtype):
            return node  # integer buffers (position_ids) pass through
        rel = mapper.relative(name)
        try:
            got = mapper.axes(rel, len(node.shape))
        except KeyError:
            fail(name, f"`{step.op}` has no rule for this tensor",
                 hint=f"it is not a known {mapper.arch.family} tensor; remove it or convert the "
                 "checkpoint to the transformers layout")
            return None
        except ValueError as e:
            fail(name, str(e), cls=ShapeMismatchError)
            return None
        if got is None:
            return node  # a depth group's first layer stands for buffers kept as they are
        axes, scale = got
        try:
            shape = _out_shape(node.shape, axes, coalescing)
        except ValueError as e:
            fail(name, f"{e} (config.json and the weights disagree?)", cls=ShapeMismatchError)
            return None
        if coalescing:
            if all(a is None for a in axes) and scale == 1.0 and len(members) == 1:
                return node
            return intern(Coalesce(members, axes, scale, shape, node.dtype))
        if all(a is None for a in axes) and scale == 1.0:
            return node
        return intern(Decoalesce(node, axes, scale, shape, node.dtype))

    return mapped


def _config_updates(step: Step, recipe: Recipe, src: VirtualModel, arch: Architecture,
                    width: WidthMap | None, depth: Partition | None, coalescing: bool,
                    dims: Mapping[str, int]) -> dict[ConfigKey, Any]:
    """hidden_size (and the sizes that follow it: ViT's `pooler_output_size`), heads, kv heads,
    intermediate_size, layer count and per-layer lists."""
    updates: dict[ConfigKey, Any] = {}
    keys = arch.config
    cfg = src.config
    if width is not None:
        def size(space: Any) -> int:
            return space.small if coalescing else space.large

        heads = width.q.partition.n_small if coalescing else width.q.partition.n_large
        kv = width.kv.partition.n_small if coalescing else width.kv.partition.n_large
        hidden = size(width.h)
        updates[(keys["hidden_size"],)] = hidden
        for key in keys.get("follows_hidden_size", ()):  # ViT's pooler: pooler.dense is out:h
            if config_get(cfg, (key,)) == dims["hidden"]:
                updates[(key,)] = hidden
        updates[(keys["num_heads"],)] = heads
        if "num_kv_heads" in keys and config_get(cfg, (keys["num_kv_heads"],)) is not None:
            updates[(keys["num_kv_heads"],)] = kv
        inter = size(width.ffn)
        inter_key = (keys["intermediate_size"],)
        if config_get(cfg, inter_key) is not None or inter != 4 * hidden:
            updates[inter_key] = inter
    if depth is not None:
        n = depth.n_small if coalescing else depth.n_large
        updates[src.stack.count_key] = n
        for key, values in _per_layer_lists(src).items():
            if coalescing:
                new = []
                for i, group in enumerate(depth.groups):
                    picked = {repr(values[j]) for j in group}
                    if len(picked) > 1:
                        raise RecipeErrors([recipe.error(
                            step.key_path + ("depth", i), f"depth group {i} {list(group)} merges "
                            f"layers with different `{key[-1]}` values "
                            f"({', '.join(sorted(picked))})",
                            hint="group layers of the same kind")])
                    new.append(values[group[0]])
            else:
                owner = depth.group_of()
                new = [values[owner[j]] for j in range(depth.n_large)]
            if key in src.stack.per_layer_keys or new != derived_layer_types(
                    _parent_config(src), n):
                updates[key] = new  # derived kinds: written when the new count derives others
    return updates


def _parent_config(model: VirtualModel) -> Mapping[str, Any]:
    """The config mapping that counts the stack's layers (the top level, or a sub-config)."""
    parent = model.stack.count_key[:-1]
    sub = config_get(model.config, parent) if parent else model.config
    return sub if isinstance(sub, Mapping) else {}


def _per_layer_lists(model: VirtualModel) -> dict[ConfigKey, list[Any]]:
    """The stack's per-layer config lists (`LayerStack.per_layer_keys`), and the `layer_types`
    transformers derives from the layer index when config.json has none (`arch.layer_types`:
    an older sliding-window Qwen2 config's kinds follow its layers, and a depth group mixing
    them is refused, as with a listed `layer_types`)."""
    lists = {key: config_get(model.config, key) for key in model.stack.per_layer_keys}
    key = model.stack.count_key[:-1] + ("layer_types",)
    derived = derived_layer_types(_parent_config(model), model.stack.num_layers)
    if key not in lists and derived is not None:
        lists[key] = derived
    return lists



#: this module's ops (listed once in `recipekit.steps`)
OPS = (
    Op("coalesce", build_coalesce, "coalesce_step", check=check_coalesce),
    Op("decoalesce", build_decoalesce, "decoalesce_step", check=check_coalesce),
)
