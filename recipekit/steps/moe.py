"""The `moe` op: a sparse mixture-of-experts checkpoint out of dense models, streamed.

mergekit-moe's "clown-car" MoE (reference/moe.md): attention, norms, embeddings and ``lm_head``
come from ``base``; layer l's MLP becomes a sparse block whose expert e is expert model e's
dense MLP at layer l (``gate_proj``, ``up_proj``, ``down_proj``), with a router (gate) per
layer. Every expert tensor is its source node renamed (a `Load`, or an expert step's node: an
``op: adapters`` fold, a merge): data movement, bit-exact, streamed like any copy, so no expert
is ever loaded whole. Outputs, in the per-expert layout transformers 5 itself saves (and the
Hub's Mixtral/Qwen checkpoints use; transformers fuses the experts at load time):

* ``mixtral`` (Llama/Mistral experts): ``block_sparse_moe.experts.{e}.w1|w3|w2.weight`` = the
  expert's gate/up/down, router ``block_sparse_moe.gate.weight`` (E, H);
* ``qwen2_moe`` (Llama/Mistral/Qwen2 experts, exactly one shared expert): ``mlp.experts.{e}.
  {gate,up,down}_proj.weight``, ``mlp.shared_expert.*`` and its σ-gate ``mlp.shared_expert_gate.
  weight`` (1, H); q/k/v biases a Llama base lacks are zeros, as mergekit writes them;
* ``qwen3_moe`` (Qwen3 experts): as qwen2_moe without the shared expert.

mergekit 0.1.5 writes Mixtral and Qwen3-MoE experts fused (``mlp.experts.gate_up_proj``); the
values are the same (tests/steps/test_moe.py compares them slice by slice). Routers: ``random``
and ``uniform_random`` are mergekit's draws bit for bit (`ops.moe.random_router`, seeded by
``seed``); ``cheap_embed`` and ``hidden`` come from `recipekit.steps.moe_gates`. config.json is
the base's with the MoE keys set as mergekit (and transformers' config classes) set them.
Oracles: tests/steps/test_moe.py — mergekit-moe's output tensor by tensor; transformers loads
the result, an MoE of experts equal to the base gives the base's logits (top-k weights sum to
one), and one layer of distinct experts equals the routed mixture computed by hand.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from recipekit.arch import ConfigKey, LayerStack, with_config
from recipekit.arch.moe import AUTO_WITH_SHARED, OUTPUTS, choose_output, config_keys
from recipekit.dtypes import NAME_TO_CODE, torch_dtype
from recipekit.errors import KeyPath, RecipeError, RecipeErrors
from recipekit.graph import Node, SameShape, VirtualModel, cast, intern
from recipekit.graph.adapterset import AdapterSet
from recipekit.recipe import Recipe, Step
from recipekit.steps.adapters import build_adapters
from recipekit.steps.moe_gates import ExpertPrompts, prompt_gate_nodes, prompt_gates_meta
from recipekit.steps.registry import Op
from recipekit.steps.reinit import Fill

#: gate modes; mergekit's default is ``hidden``, which it also calls ``hidden_last``
GATE_MODES = ("hidden", "hidden_last", "hidden_avg", "cheap_embed", "random", "uniform_random")
#: mergekit-moe's other names for a mode (its router.py: ``hidden_last`` is ``hidden``)
GATE_MODE_ALIASES = {"hidden_last": "hidden"}
RANDOM_MODES = ("random", "uniform_random")
MLP = ("gate_proj", "up_proj", "down_proj")
#: RSS a process gains the first time it runs torch's CPU generator and the elementwise
#: kernels of `uniform_random` (measured: 1.9 MiB for randn, 3.1 MiB more for rand·2a − a);
#: without it a run of copies and routers peaked 1.6-2.5 MiB above the plan's estimate
RNG_KERNELS = 5 * 1024 * 1024


log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class RandomRouter(Node):
    """Rows ``first:first+shape[0]`` of layer ``layer`` of mergekit's (layers, gates, hidden)
    random gate draw (`ops.moe.random_router`), rounded once to ``dtype``."""

    rounds_once: ClassVar[bool] = True

    shape: tuple[int, ...]
    dtype: str
    mode: str
    seed: int
    layers: int
    gates: int
    layer: int
    first: int

    @property
    def workspace(self) -> int:
        # the whole fp32 draw, and the code torch pages in the first time a run draws (a run of
        # copies and random routers computes nothing else): `RNG_KERNELS`
        return 4 * self.layers * self.gates * self.shape[1] + RNG_KERNELS

    def compute(self, args: tuple[Any, ...]) -> Any:
        from recipekit.ops.moe import random_router

        rows = (self.first, self.first + self.shape[0])
        return random_router(self.mode, seed=self.seed, layers=self.layers, gates=self.gates,
                             hidden=self.shape[1], layer=self.layer, rows=rows
                             ).to(torch_dtype(self.dtype))


@dataclass(frozen=True, eq=False)
class GateRows(Node):
    """Rows ``first:first+shape[0]`` of a prompt-gate node (routed or shared rows), rounded
    once to ``dtype``."""

    rounds_once: ClassVar[bool] = True

    input: Node
    first: int
    shape: tuple[int, ...]
    dtype: str

    def compute(self, args: tuple[Any, ...]) -> Any:
        return args[0][self.first:self.first + self.shape[0]].to(torch_dtype(self.dtype))


@dataclass(frozen=True, eq=False)
class PerturbExpert(SameShape):
    """An expert weight after mergekit's ``noise_scale`` / ``residual_scale`` (`ops.moe.
    perturb_expert`); row-sliceable, so it streams like a cast."""

    rounds_once: ClassVar[bool] = True

    input: Node
    dtype: str
    noise_scale: float | None
    residual_scale: float | None
    key: tuple[int, int]

    @property
    def shape_input(self) -> Node:
        return self.input

    @property
    def elementwise(self) -> bool:
        return True

    @property
    def workspace(self) -> int:
        from recipekit.ops.moe import NOISE_BYTES  # torch-free: the module imports torch lazily

        per_value = NOISE_BYTES if self.noise_scale is not None else 4  # the fp32 copy
        return per_value * self.numel

    def compute_rows(self, args: tuple[Any, ...], lo: int, hi: int) -> Any:
        from recipekit.ops.moe import perturb_expert

        return perturb_expert(args[0], lo=lo, noise_scale=self.noise_scale,
                              residual_scale=self.residual_scale, key=self.key,
                              dtype=torch_dtype(self.dtype))

    def compute(self, args: tuple[Any, ...]) -> Any:
        return self.compute_rows(args, 0, self.shape[0])


def noise_key(seed: int, tensor: str) -> tuple[int, int]:
    """Two signed 32-bit keys of one output tensor's noise draw, from (``seed``, ``tensor``)."""
    digest = hashlib.sha256(f"{seed}\0{tensor}\0moe-noise".encode()).digest()
    return (int.from_bytes(digest[:4], "little", signed=True),
            int.from_bytes(digest[4:8], "little", signed=True))


def gate_mode(step: Step) -> str:
    """The step's gate mode, mergekit's aliases read as the mode they name."""
    mode = step.spec.get("gate_mode", "hidden")
    return GATE_MODE_ALIASES.get(mode, mode)


# -- the recipe alone -------------------------------------------------------------------------


def _entries(step: Step) -> list[tuple[Mapping[str, Any], KeyPath, bool]]:
    """(entry, key path, shared?) for every routed and shared expert."""
    out = [(e, step.key_path + ("experts", i), False)
           for i, e in enumerate(step.spec["experts"])]
    out += [(e, step.key_path + ("shared_experts", i), True)
            for i, e in enumerate(step.spec.get("shared_experts", []))]
    return out


def _prompts(entry: Mapping[str, Any]) -> ExpertPrompts:
    return ExpertPrompts(tuple(entry.get("positive_prompts") or ()),
                         tuple(entry.get("negative_prompts") or ()))


def check_moe(step: Step, recipe: Recipe) -> list[RecipeError]:
    """mergekit-moe's config checks (reference/moe.md §1.2), from the recipe alone: top-k
    within the expert count; outside ``random``, positive prompts on every expert, prompts that
    tell experts apart, experts that differ (unless ``allow_identical_experts``); at most one
    shared expert, and only for ``qwen2_moe``."""
    spec, errors = step.spec, []
    experts = spec["experts"]
    mode = spec.get("gate_mode", "hidden")
    k = spec.get("experts_per_token", 2)
    if len(experts) < k:
        errors.append(recipe.error(step.key_path + ("experts_per_token",),
                                   f"experts_per_token is {k} but there are {len(experts)} "
                                   "expert(s)", hint="list at least as many experts as "
                                   "experts_per_token"))
    shared = spec.get("shared_experts", [])
    if len(shared) > 1:
        errors.append(recipe.error(step.key_path + ("shared_experts",), f"{len(shared)} shared "
                                   "experts; Qwen2-MoE has one", hint="keep one"))
    elif spec.get("architecture", "auto") in OUTPUTS:
        errors += _shared_expert_errors(step, recipe, spec["architecture"])
    if mode == "random":
        return errors
    missing = [recipe.error(path, f"{'shared expert' if is_shared else 'expert'} has no "
                            f"positive_prompts, which gate_mode {mode} needs",
                            hint="add `positive_prompts:`, or use `gate_mode: random`")
               for entry, path, is_shared in _entries(step) if not entry.get("positive_prompts")]
    errors += missing
    if not missing and len({_prompts(e) for e in experts}) == 1:
        errors.append(recipe.error(step.key_path + ("experts",), "every expert has the same "
                                   "prompts, so the routers cannot tell them apart",
                                   hint="give each expert prompts of its own, or use "
                                   "`gate_mode: random`"))
    sources = {(e.get("model"), e.get("adapter")) for e in experts}
    if len(sources) == 1 and not spec.get("allow_identical_experts", False):
        errors.append(recipe.error(step.key_path + ("experts",), "every expert is the same "
                                   "model, which is useless without training",
                                   hint="set `allow_identical_experts: true` to build it "
                                   "anyway (sparse upcycling)"))
    return errors


def _shared_expert_errors(step: Step, recipe: Recipe, arch: str, picked_for: str | None = None
                          ) -> list[RecipeError]:
    """A shared expert where ``arch`` has none, or none where it needs one. ``picked_for``:
    the base's model_type when `architecture: auto` chose ``arch`` (said in the message; under
    auto the base's family decides, as mergekit's choice, reference/moe.md §2.1)."""
    has = bool(step.spec.get("shared_experts"))
    if has == OUTPUTS[arch].shared_expert:
        return []
    if picked_for is None:
        what, key = f"architecture {arch}", ("architecture",)
    else:
        what = (f"base '{step.spec['base']}' is a {picked_for!r} model, for which "
                f"`architecture: auto` writes {arch} (mergekit-moe's only MoE output for "
                f"{picked_for} models); {arch}")
        key = ("base",)
    if has:
        return [recipe.error(step.key_path + ("shared_experts",), f"{what} has no shared "
                             "expert", hint="drop `shared_experts`" + (
                                 f", or use `architecture: {AUTO_WITH_SHARED}`"
                                 if picked_for is None else ""))]
    return [recipe.error(step.key_path + key, f"{what} needs one shared expert (it always has "
                         "one)", hint="add `shared_experts: [{model: ...}]`")]


# -- the inputs -------------------------------------------------------------------------------


def _resolve(step: Step, models: Mapping[str, Any], recipe: Recipe, entry: Mapping[str, Any],
             path: KeyPath, base_name: str, index: str) -> VirtualModel:
    """An expert's model: a model or step, or ``base`` with an adapter folded in."""
    if "adapter" in entry:
        name = entry["adapter"]
        if not isinstance(models[name], AdapterSet):
            raise RecipeErrors([recipe.error(path + ("adapter",), f"'{name}' is a model, not "
                                             "an adapter set", hint="use `model:` for a model")])
        fold = replace(step, name=f"{step.name}.{index}", op="adapters",
                       spec={"name": f"{step.name}.{index}", "op": "adapters",
                             "from": base_name, "adapters": [name]})
        try:
            return build_adapters(fold, models, recipe)
        except RecipeErrors as e:
            raise RecipeErrors(_fold_errors(step, recipe, e.errors, path + ("adapter",))
                               ) from None
    value = models[entry["model"]]
    if not isinstance(value, VirtualModel):
        raise RecipeErrors([recipe.error(path + ("model",), f"'{entry['model']}' is an adapter "
                                         "set", hint="write `adapter:` for base + adapter")])
    return value


def _fold_errors(step: Step, recipe: Recipe, errors: list[RecipeError], at: KeyPath
                 ) -> list[RecipeError]:
    """An adapter expert's fold errors as the user wrote it: the fold is a step the recipe does
    not have, whose errors were located at its `adapters[0]` (a key the moe step lacks, so
    the step's line) once per tensor (six errors for a LoRA trained on another intermediate
    size; found by a black-box check). Those become one error at ``at`` (the expert's
    ``adapter`` key) naming the first tensor and how many more; errors located elsewhere (the
    adapter's own files) are kept."""
    ours = [e for e in errors if tuple(e.key_path or ())[:len(step.key_path)] == step.key_path]
    kept = [e for e in errors if e not in ours]
    if not ours:
        return kept
    first = ours[0]
    n = len(ours) - 1
    more = f" (and {n} more tensor{'s' if n > 1 else ''} like it)" if n else ""
    return [recipe.error(at, first.message + more, hint=first.hint), *kept]


def _architecture(step: Step, recipe: Recipe, base: VirtualModel) -> str:
    """The output architecture: the step's, or mergekit's choice for the base's model_type."""
    model_type = base.config.get("model_type")
    wanted = step.spec.get("architecture", "auto")
    auto = wanted == "auto"
    if auto:
        wanted = choose_output(model_type, bool(step.spec.get("shared_experts")))
    if model_type not in OUTPUTS[wanted].built_from:
        # `auto` once wrote a Gemma, OLMo2, Granite... base as a Mixtral, which has no place for
        # their norm offsets, embedding scale and multipliers: mergekit refuses too
        what = f"base '{step.spec['base']}' is a {model_type!r} model"
        if step.spec.get("architecture", "auto") == "auto":
            known = "; ".join(f"{a}: {', '.join(o.built_from)}" for a, o in OUTPUTS.items())
            what += f", which no MoE architecture recipekit writes is built from ({known})"
            hint = "use experts and a base of one of those families"
        else:
            what += f"; {wanted} is built from {', '.join(OUTPUTS[wanted].built_from)} models"
            hint = "use experts and a base of one of those"
        raise RecipeErrors([recipe.error(step.key_path + ("base",), what, hint=hint)])
    if auto:
        # `check_moe` checks the shared expert against an explicit architecture only: a Qwen2
        # base without one wrote a Qwen2-MoE lacking its shared-expert tensors, a Qwen3 base
        # with one wrote tensors Qwen3-MoE drops (found by a black-box check); mergekit-moe
        # finds no output for either
        errors = _shared_expert_errors(step, recipe, wanted, picked_for=model_type)
        if errors:
            raise RecipeErrors(errors)
    return wanted


def _mlp(model: VirtualModel, layer: int, what: str) -> Node | None:
    return model.tensors.get(model.stack.name(layer, f"mlp.{what}.weight"))


def _check_expert(step: Step, recipe: Recipe, base: VirtualModel, expert: VirtualModel,
                  path: KeyPath, label: str) -> list[RecipeError]:
    """The expert's model_type, layer count, and MLP tensors against the base's."""
    if expert.config.get("model_type") != base.config.get("model_type"):
        return [recipe.error(path, f"{label} is a {expert.config.get('model_type')!r} model "
                             f"but the base is {base.config.get('model_type')!r}",
                             hint="experts and base must be of one architecture")]
    if expert.stack.num_layers != base.stack.num_layers:
        return [recipe.error(path, f"{label} has {expert.stack.num_layers} layers but the base "
                             f"has {base.stack.num_layers}", hint="experts and base must have "
                             "the same layer count")]
    for what in MLP:
        want, got = _mlp(base, 0, what), _mlp(expert, 0, what)
        if got is None or want is None or got.shape != want.shape:
            shape = None if got is None else list(got.shape)
            return [recipe.error(path, f"{label}'s layer 0 `mlp.{what}.weight` is {shape}, the "
                                 f"base's {None if want is None else list(want.shape)}",
                                 hint="experts need the base's hidden and intermediate sizes")]
    return []


def _biases(step: Step, recipe: Recipe, base: VirtualModel, arch: str) -> list[RecipeError]:
    """Biases the output would lose: every per-layer bias the output architecture has no
    parameter for (`MoeOutput.biases`: Qwen2-MoE's q/k/v; Mixtral and Qwen3-MoE none).
    mergekit drops them silently and the model breaks; transformers drops them as unexpected
    keys (a Llama base's o_proj bias in a Qwen2-MoE was once kept, and ignored at load)."""
    kinds: dict[str, str] = {}  # relative bias name -> its first full name
    for name in base.tensors:
        hit = base.stack.split(name)
        if hit is not None and hit[1].endswith(".bias") and hit[1] not in OUTPUTS[arch].biases \
                and not hit[1].startswith(_MLP):  # the base's MLP is not in the output
            kinds.setdefault(hit[1], name)
    if not kinds:
        return []
    shared = bool(step.spec.get("shared_experts"))
    fits = [a for a, o in OUTPUTS.items() if a != arch
            and base.config.get("model_type") in o.built_from and set(kinds) <= set(o.biases)]
    hint = "use a base without those biases"
    if fits:
        hint += f", or `architecture: {fits[0]}`" + (
            "" if shared or not OUTPUTS[fits[0]].shared_expert
            else " with one shared expert (`shared_experts: [{model: ...}]`)")
    lost = ", ".join(f"`{rel}`" for rel in kinds)
    return [recipe.error(step.key_path + ("base",), f"base '{step.spec['base']}' has biases "
                         f"that a {arch} model has no place for ({lost} in its layers, first "
                         f"{next(iter(kinds.values()))})", hint=hint)]


#: The per-layer module an expert gives the output (its biases have no place in any MoE here).
_MLP = "mlp."


def _expert_biases(recipe: Recipe, model: VirtualModel, path: KeyPath) -> list[RecipeError]:
    """An expert's MLP biases (`mlp_bias: true`): no MoE output here has a place for them, and
    they were dropped silently (logits 0.9 off a dense model with identical experts; mergekit
    drops them too)."""
    found = next((name for name in model.tensors if (hit := model.stack.split(name)) is not None
                  and hit[1].startswith(_MLP) and hit[1].endswith(".bias")), None)
    if found is None:
        return []
    return [recipe.error(path, f"this expert has MLP biases ({found}), which the experts of a "
                         "MoE model have no place for", hint="use an expert without MLP biases")]


# -- the output -------------------------------------------------------------------------------


def _routers(step: Step, recipe: Recipe, base: VirtualModel, gates: int, dtype: str
             ) -> list[Node]:
    """One (gates, hidden) router node per layer, routed rows first, the shared row last."""
    mode = gate_mode(step)
    layers = base.stack.num_layers
    hidden = _mlp(base, 0, "gate_proj").shape[1]  # type: ignore[union-attr]
    if mode in RANDOM_MODES:
        seed = int(step.spec.get("seed", 0))
        return [intern(RandomRouter((gates, hidden), dtype, mode, seed, layers, gates, layer, 0))
                for layer in range(layers)]
    prompts = [_prompts(e) for e, _, _ in _entries(step)]
    return list(prompt_gate_nodes(step, recipe, base, prompts, mode))


def _rows(node: Node, first: int, count: int, dtype: str) -> Node:
    if isinstance(node, RandomRouter):
        return intern(replace(node, shape=(count, node.shape[1]), dtype=dtype, first=first))
    return intern(GateRows(node, first, (count, node.shape[1]), dtype))


def _expert_node(node: Node, entry: Mapping[str, Any], what: str, name: str, seed: int,
                 dtype: str) -> Node:
    noise = entry.get("noise_scale")
    residual = entry.get("residual_scale") if what == "down_proj" else None
    if noise is None and residual is None:
        return cast(node, dtype)
    return intern(PerturbExpert(node, dtype, None if noise is None else float(noise),
                                None if residual is None else float(residual),
                                noise_key(seed, name)))


def _layer_block(arch: str, prefix: str, router: Node, experts: list[tuple[VirtualModel, Any]],
                 shared: tuple[VirtualModel, Any] | None, layer: int, seed: int, dtype: str
                 ) -> dict[str, Node]:
    """Layer ``layer``'s sparse MLP: router, experts (and shared expert) under their names."""
    e_count = len(experts)
    out: dict[str, Node] = {}
    layout = OUTPUTS[arch]
    block = layout.block
    out[f"{prefix}{block}.gate.weight"] = _rows(router, 0, e_count, dtype)
    for e, (model, entry) in enumerate(experts):
        for what in MLP:
            rel = f"{block}.experts.{e}.{layout.expert_names[what]}.weight"
            out[prefix + rel] = _expert_node(_mlp(model, layer, what),  # type: ignore[arg-type]
                                             entry, what, prefix + rel, seed, dtype)
    if shared is not None:
        model, entry = shared
        for what in MLP:
            name = f"{prefix}mlp.shared_expert.{what}.weight"
            out[name] = _expert_node(_mlp(model, layer, what), entry,  # type: ignore[arg-type]
                                     what, name, seed, dtype)
        out[f"{prefix}mlp.shared_expert_gate.weight"] = _rows(router, e_count, 1, dtype)
    return out


def _config_updates(arch: str, base: VirtualModel, experts: int, k: int) -> dict[ConfigKey, Any]:
    """The MoE keys mergekit sets on the base's config (and the class defaults transformers
    writes), per output architecture (reference/moe.md §2.2-2.4)."""
    inter = _mlp(base, 0, "gate_proj").shape[0]  # type: ignore[union-attr]
    keys = config_keys(arch, experts, k, inter)
    kinds = base.config.get("layer_types")
    if "sliding_window" in keys and keys["sliding_window"] is None and isinstance(kinds, list):
        # The output turns sliding windows off (as mergekit writes it); a base's listed
        # sliding layers kept beside `sliding_window: null` made transformers fail in the
        # forward pass (a Qwen2 base with use_sliding_window; found by a black-box check).
        if "sliding_attention" in kinds:
            log.warning("base '%s' has %d sliding-window layers; the %s output attends fully "
                        "(`sliding_window: null`, as mergekit writes it), which differs beyond "
                        "the window's length", base.name, kinds.count("sliding_attention"), arch)
        keys = {**keys, "layer_types": ["full_attention"] * len(kinds)}
    return {(key,): value for key, value in keys.items()}


def _zero_biases(base: VirtualModel, layer: int, dtype: str) -> dict[str, Node]:
    """Qwen2-MoE's q/k/v biases where the base has none: zeros (mergekit's choice)."""
    out: dict[str, Node] = {}
    for proj in ("q_proj", "k_proj", "v_proj"):
        name = base.stack.name(layer, f"self_attn.{proj}.bias")
        weight = base.tensors[base.stack.name(layer, f"self_attn.{proj}.weight")]
        if name not in base.tensors:
            out[name] = intern(Fill((weight.shape[0],), dtype, 0.0))
    return out


def build_moe(step: Step, models: Mapping[str, Any], recipe: Recipe) -> VirtualModel:
    """Build the `moe` step's virtual model (see the module docstring).

    Raises:
        RecipeErrors: the document checks (`check_moe`), a base or expert of the wrong kind or
            architecture, experts of other shapes or layer counts, biases the output would
            lose, an unavailable gate mode.
    """
    errors = check_moe(step, recipe)
    if errors:
        raise RecipeErrors(errors)
    base_name = step.spec["base"]
    base = models[base_name]
    if not isinstance(base, VirtualModel):
        raise RecipeErrors([recipe.error(step.key_path + ("base",), f"'{base_name}' is an "
                                         "adapter set; `base:` names a model")])
    arch = _architecture(step, recipe, base)
    errors = _biases(step, recipe, base, arch)
    resolved: list[tuple[VirtualModel, Any, bool]] = []
    for entry, path, is_shared in _entries(step):
        index = ".".join(str(p) for p in path[2:])
        try:
            model = _resolve(step, models, recipe, entry, path, base_name, index)
        except RecipeErrors as e:
            errors += e.errors
            continue
        errors += _check_expert(step, recipe, base, model, path, f"expert {index}")
        errors += _expert_biases(recipe, model, path)
        resolved.append((model, entry, is_shared))
    if errors:
        raise RecipeErrors(errors)
    routed = [(m, e) for m, e, s in resolved if not s]
    shared = next(((m, e) for m, e, s in resolved if s), None)
    # mergekit-moe casts every expert tensor and router once, from its source dtype, to its out
    # dtype: `dtype:` (our `output.dtype`), else the base's. Rounding to the base's first made
    # an fp32 expert in a bf16-base MoE written as float32 the bf16-rounded weights (found by
    # a black-box check).
    dtype = (NAME_TO_CODE[recipe.output.dtype] if recipe.output.dtype
             else _mlp(base, 0, "gate_proj").dtype)  # type: ignore[union-attr]
    routers = _routers(step, recipe, base, len(resolved), dtype)
    seed = int(step.spec.get("seed", 0))
    tensors: dict[str, Node] = {}
    done: set[int] = set()
    for name, node in base.tensors.items():
        hit = base.stack.split(name)
        if hit is None:
            tensors[name] = node
            continue
        layer, rel = hit
        if not rel.startswith("mlp."):
            tensors[name] = node
            if OUTPUTS[arch].zero_qkv_biases and rel == "self_attn.v_proj.weight":
                tensors.update(_zero_biases(base, layer, node.dtype))
        elif layer not in done:
            done.add(layer)
            tensors.update(_layer_block(arch, base.stack.name(layer, ""), routers[layer], routed,
                                        shared, layer, seed, dtype))
    updates = _config_updates(arch, base, len(routed), int(step.spec.get("experts_per_token", 2)))
    stack = LayerStack(base.stack.prefix, base.stack.num_layers, base.stack.count_key,
                       base.stack.per_layer_keys, None, base.stack.base)
    return VirtualModel(step.name, with_config(base.config, updates), tensors, stack, base.donor,
                        base.changed | frozenset(updates),
                        meta={"moe": {"architecture": arch, "experts": len(routed),
                                      "gate_mode": gate_mode(step),
                                      **prompt_gates_meta(step)}})


#: this module's ops (listed once in `recipekit.steps`)
OPS = (
    Op("moe", build_moe, "moe_step", models_only=False, check=check_moe),
)
