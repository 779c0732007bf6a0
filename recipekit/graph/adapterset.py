"""Adapter sets: the second value kind of a recipe (DESIGN.md §1), and reading one from a PEFT
LoRA adapter's tensor names and config.

An `AdapterSet` maps each base weight it updates to a `LoraTarget`: low-rank terms
(A, B, scaling) whose sum is the update (or one full fp32 delta node, after a ties/DARE
combination), an optional DoRA magnitude, plus `lora_bias` terms and whole-tensor replacements
(`modules_to_save`, trained biases, saved embedding copies). Names are those of the model PEFT
wrapped (``model.layers.0.self_attn.q_proj.weight``); a step maps them onto its `from` model.
Nothing here reads tensor data or imports torch.

Key grammar and scaling: reference/adapters.md §1.3–1.4 and §2.2 (checked against PEFT 0.21).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from recipekit.dtypes import is_floating
from recipekit.errors import RecipeError, RecipeErrors
from recipekit.graph.lora import LoraDelta
from recipekit.graph.nodes import Node, intern, load
from recipekit.inputs.adapters import AdapterCheckpoint
from recipekit.inputs.patterns import first_match
from recipekit.io.header import TensorInfo, quote_name
from recipekit.recipe import Recipe

log = logging.getLogger(__name__)

PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(.*)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|"
                       r"lora_magnitude_vector)(\.weight|\.bias)?$")
#: Wrapper infixes PEFT puts between a module path and a whole saved tensor.
_INFIXES = (".base_layer.", ".modules_to_save.default.")
#: Config key of a combined set whose inputs name different base models ("'a': 'X', 'b':
#: none"), for the warning `run.adapter_output` gives when it writes the set.
BASE_CONFLICT = "recipekit_base_conflict"


@dataclass(frozen=True)
class LoraTerm:
    """``scale · B @ A``: one adapter's low-rank update (A (r, in), B (out, r))."""

    a: Node
    b: Node
    scale: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass(frozen=True)
class LoraTarget:
    """One adapter set's update of one weight tensor.

    ``transposed``: the base stores (in, out) (fan_in_fan_out, GPT-2 `Conv1D`) or (V, D)
    (embeddings), so ΔW = (B@A)ᵀ. ``full`` replaces ``terms`` when the update is no longer low
    rank (a ties/DARE combination); it is fp32 in the base layout at weight 1.
    """

    kind: str  # "linear" or "embedding": the PEFT module type (output key names)
    shape: tuple[int, ...]  # the base tensor's
    transposed: bool
    terms: tuple[LoraTerm, ...] = ()
    full: Node | None = None
    magnitude: Node | None = None  # DoRA's m

    @property
    def norm_dim(self) -> int:
        """The axis DoRA's norm reduces: the input axis of (out, in); axis 0 otherwise."""
        return 0 if self.transposed else 1

    def delta(self, weight: float = 1.0) -> Node:
        """ΔW at ``weight`` (multiplying every scaling, as PEFT's `set_scale`), fp32."""
        if self.full is not None:
            return intern(replace(self.full, scale=self.full.scale * weight))  # type: ignore
        factors = tuple(x for t in self.terms for x in (t.a, t.b))
        return intern(LoraDelta(factors, tuple(t.scale * weight for t in self.terms),
                                self.transposed, self.shape))

    def scaled(self, weight: float) -> LoraTarget:
        if self.full is not None:
            return replace(self, full=self.delta(weight))
        return replace(self, terms=tuple(LoraTerm(t.a, t.b, t.scale * weight)
                                         for t in self.terms))


@dataclass(frozen=True)
class Replacement:
    """A whole tensor an adapter saved, written in place of the base's (``key``: its name in
    the adapter file without the ``base_model.model.`` prefix; ``info``: where it is stored)."""

    node: Node
    key: str
    info: TensorInfo | None = None

    @property
    def base_layer(self) -> bool:
        """Saved from a wrapped module's base layer (``.base_layer.``): an embedding copy
        (`base_copy`) or a trained bias (``bias="lora_only"``/``"all"``). One whose bytes are
        the base's changes nothing."""
        return ".base_layer." in self.key

    @property
    def base_copy(self) -> bool:
        """A copy of the base layer PEFT saved beside an embedding LoRA
        (``save_embedding_layers``, on by default when embeddings are targeted), not a trained
        tensor: PEFT loads it over the base layer, and the low-rank update scales as usual.

        A ``.base_layer.bias`` is a targeted module's trained bias (reference/adapters.md §1.3),
        so it is not a copy: it folds at weight 1 only, as a bias="all" adapter's (found by a
        black-box check: a bias="lora_only" adapter folded at weight 0 wrote its trained bias)."""
        return self.base_layer and not self.key.endswith(".bias")


@dataclass(frozen=True)
class AdapterSet:
    """A set of LoRA updates keyed by base tensor name (see the module docstring)."""

    name: str
    targets: Mapping[str, LoraTarget]
    biases: Mapping[str, tuple[tuple[Node, float], ...]] = field(default_factory=dict)
    replacements: Mapping[str, Replacement] = field(default_factory=dict)
    config: Mapping[str, Any] = field(default_factory=dict)  # the first input's PEFT config

    @property
    def has_dora(self) -> bool:
        return any(t.magnitude is not None for t in self.targets.values())

    def scaled(self, weight: float) -> AdapterSet:
        """Every scaling times ``weight`` (replacements and DoRA magnitudes unchanged)."""
        return replace(self, targets={k: t.scaled(weight) for k, t in self.targets.items()},
                       biases={k: tuple((n, s * weight) for n, s in v)
                               for k, v in self.biases.items()})


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's `get_pattern_key`: the value of the first pattern key k (in the dict's order) for
    which ``re.match(r"(.*\\.)?(k)$", module)`` matches; k is a regex (reference §2.2),
    matched in bounded time (inputs/patterns.py; invalid keys were refused on reading)."""
    key = first_match(patterns, module)
    return default if key is None else patterns[key]


def module_scaling(config: Mapping[str, Any], module: str) -> tuple[int, float]:
    """(r_M, s_M) of one module: rank and alpha from their patterns independently, then
    α/r, or α/√r with rsLoRA."""
    r = pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8))
    alpha = pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    root = math.sqrt(r) if config.get("use_rslora") else r
    return int(r), float(alpha) / root


def read_adapter_set(ckpt: AdapterCheckpoint, recipe: Recipe) -> AdapterSet:
    """Parse an adapter input's tensor names into an `AdapterSet` (headers and config only).

    The file holds exactly the modules PEFT wrapped, so every one of them is folded: the config
    only gives scalings (r, lora_alpha, rank/alpha patterns, rsLoRA, DoRA, lora_bias).
    `target_modules`, `layers_to_transform` and `layers_pattern` decided the wrapping at
    training time and are not re-applied (reference §2.8; re-implementing them got `[]`, dotted
    patterns and full module names wrong: issue 16 item 2). Oracle: PEFT's `merge_and_unload`
    (tests/steps/test_adapters.py).

    Raises:
        RecipeErrors: a LoRA module with one factor missing, factors whose shapes disagree with
            each other or with the config's rank, DoRA magnitudes of the wrong length, non-float
            tensors, trainable-token rows.
    """
    where = recipe.adapters[ckpt.name].key_path
    errors: list[RecipeError] = []

    def fail(msg: str, hint: str | None = None) -> None:
        errors.append(recipe.error(where, f"adapter '{ckpt.name}': {msg}", hint=hint))

    parts, replacements = _split_keys(ckpt, fail)
    targets: dict[str, LoraTarget] = {}
    biases: dict[str, tuple[tuple[Node, float], ...]] = {}
    for module, p in parts.items():  # every module the file holds: PEFT wrapped it
        read = _read_module(ckpt, module, p, fail)
        if read is not None:
            targets[f"{module}.weight"] = read[0]
            if read[1] is not None:
                biases[f"{module}.bias"] = read[1]
    if errors:
        raise RecipeErrors(errors)
    return AdapterSet(ckpt.name, targets, biases, replacements, dict(ckpt.config))


def _split_keys(ckpt: AdapterCheckpoint, fail: Any
                ) -> tuple[dict[str, dict[str, TensorInfo]], dict[str, Replacement]]:
    """The adapter's tensors as LoRA parts per module (``lora_A.weight``, ...) and whole-tensor
    replacements by target name; non-float and trainable-token tensors are reported."""
    parts: dict[str, dict[str, TensorInfo]] = {}
    replacements: dict[str, Replacement] = {}
    for key, info in ckpt.tensors.items():
        rel = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if not is_floating(info.dtype):
            fail(f"tensor {quote_name(key)} is {info.dtype}, not floating point")
            continue
        m = _LORA_KEY.match(rel)
        if m:
            parts.setdefault(m.group(1), {})[m.group(2) + (m.group(3) or "")] = info
            continue
        if ".token_adapter." in rel or ".original_module." in rel:
            if ".token_adapter." in rel:
                fail(f"tensor {quote_name(key)} holds trainable-token rows, which recipekit "
                     "does not fold")
            continue  # an original_module copy is the untrained base module
        target = rel
        for infix in _INFIXES:
            target = target.replace(infix, ".")
        replacements[target] = Replacement(load(ckpt.name, key, info.shape, info.dtype), rel,
                                           info)
    return parts, replacements


def _read_module(ckpt: AdapterCheckpoint, module: str, p: Mapping[str, TensorInfo], fail: Any
                 ) -> tuple[LoraTarget, tuple[tuple[Node, float], ...] | None] | None:
    """One LoRA module's target (factors, scaling, layout, DoRA magnitude) and its lora_bias
    terms, or None after reporting what is wrong with it."""
    cfg = ckpt.config
    embedding = "lora_embedding_A" in p or "lora_embedding_B" in p
    a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if embedding else (
        "lora_A.weight", "lora_B.weight")
    a, b = p.get(a_key), p.get(b_key)
    if a is None or b is None:
        have, lack = (a_key, b_key) if b is None else (b_key, a_key)
        fail(f"module {quote_name(module)} has {have} but no {lack}")
        return None
    if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
        fail(f"module {quote_name(module)}: {a_key} {list(a.shape)} and {b_key} "
             f"{list(b.shape)} are not (r, in) and (out, r) factors of one rank")
        return None
    r, scale = module_scaling(cfg, module)
    if r != a.shape[0]:
        fail(f"module {quote_name(module)}: the config gives it rank {r} (r / rank_pattern) "
             f"but {a_key} has {a.shape[0]} rows", hint="the adapter config and weights do "
             "not belong together")
        return None
    transposed = (bool(cfg.get("fan_in_fan_out")) and not embedding) or embedding
    out_dim, in_dim = b.shape[0], a.shape[1]
    shape = (in_dim, out_dim) if transposed else (out_dim, in_dim)
    magnitude = None
    mag = p.get("lora_magnitude_vector") or p.get("lora_magnitude_vector.weight")
    if cfg.get("use_dora"):
        if mag is None:
            fail(f"module {quote_name(module)} has no lora_magnitude_vector although the "
                 "config sets use_dora")
            return None
        if tuple(mag.shape) not in ((out_dim,), (1, out_dim)):
            fail(f"module {quote_name(module)}: lora_magnitude_vector is {list(mag.shape)}, "
                 f"expected [{out_dim}]")
            return None
        magnitude = load(ckpt.name, mag.name, mag.shape, mag.dtype)
    term = LoraTerm(load(ckpt.name, a.name, a.shape, a.dtype),
                    load(ckpt.name, b.name, b.shape, b.dtype), scale)
    target = LoraTarget("embedding" if embedding else "linear", shape, transposed, (term,), None,
                        magnitude)
    return target, _read_bias(ckpt, module, p, scale, out_dim, fail)


def _read_bias(ckpt: AdapterCheckpoint, module: str, p: Mapping[str, TensorInfo], scale: float,
               out_dim: int, fail: Any) -> tuple[tuple[Node, float], ...] | None:
    """The module's lora_bias term when the config sets lora_bias (PEFT ignores it otherwise)."""
    bias = p.get("lora_B.bias")
    if bias is not None and ckpt.config.get("lora_bias"):
        if tuple(bias.shape) != (out_dim,):
            fail(f"module {quote_name(module)}: lora_B.bias is {list(bias.shape)}, expected "
                 f"[{out_dim}]")
            return None
        return ((load(ckpt.name, bias.name, bias.shape, bias.dtype), scale),)
    if bias is not None:
        log.warning("adapter '%s': %s.lora_B.bias is ignored because the config does not "
                    "set lora_bias (as PEFT ignores it)", ckpt.name, module)
    return None
