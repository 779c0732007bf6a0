"""Find a checkpoint's family and its one stack of numbered layers.

Each family file (checked against ``schema.json``) names a family's on-disk tensors relative to
a base-model prefix, so one description covers ``LlamaForCausalLM`` (``model.layers.3...``) and
the bare ``LlamaModel`` layout (``layers.3...``), and says where layer count, width and head
counts live in ``config.json``. `find_layer_stack` is what steps use: it finds the one stack of
numbered layers in a checkpoint — from the family description when one matches, else from
tensor names — and refuses checkpoints with more than one unless the recipe names
``layer_prefix``.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from recipekit.arch.config import ConfigKey, config_get
from recipekit.errors import LayerStackError

#: Layer-count keys tried, in order, when no family description matches.
COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
#: Layer-indexed config lists every family may have, name-detected ones included (a family file
#: adds its own under ``config.per_layer``): entry i describes layer i, so the list follows the
#: layers when a recipe moves, removes or stacks them. A list is per-layer by its NAME (and only
#: when it has one entry per layer), never by its length alone: `architectures` or
#: `eos_token_id` can have as many entries as a stack has layers. The names are transformers 5's
#: (`layer_types`: attention kinds; `mlp_layer_types`: dense or MoE blocks; `no_rope_layers`:
#: SmolLM3/Llama-4's 1 = RoPE, 0 = NoPE). Lists of layer INDICES (`mlp_only_layers`) are not
#: per-layer lists and are left as written.
GENERIC_PER_LAYER = ("layer_types", "mlp_layer_types", "no_rope_layers")
#: Which modules a multimodal config's sub-config describes (`_owns`); any other ``X_config``
#: owns modules named ``X`` / ``X_*``.
SUBCONFIG_MODULES = {"text_config": ("language_model", "text_model", "text", "llm"),
                     "vision_config": ("vision", "vision_tower", "vision_model", "visual"),
                     "audio_config": ("audio", "audio_tower", "audio_model")}
_STACK = re.compile(r"^((?:[^.]+\.)*?(?:layers|layer|h|blocks|block))\.(\d+)\.")


@dataclass(frozen=True)
class Architecture:
    """One family's description (see ``schema.json`` for the fields)."""

    family: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    base_prefixes: tuple[str, ...]
    layer_stack: str
    config: Mapping[str, Any]
    layer_index_dependent: tuple[str, ...]
    weights: Mapping[str, tuple[str, ...]]
    optional: frozenset[str]
    tied: Mapping[str, str]
    init: tuple[Mapping[str, Any], ...]
    classifier: Mapping[str, str] | None = None
    coalesce: Mapping[str, Any] | None = None  # tensor roles for coalesce/decoalesce (schema)
    embeddings: tuple[str, ...] = ()  # embedding tables among the `pre` weights
    vocabulary: tuple[str, ...] = ()  # tensors with a row per token (not position tables)
    fan_in_fan_out: tuple[str, ...] = ()  # layer weights stored (in, out) (GPT-2's Conv1D)
    config_defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def config_value(self, config: Mapping[str, Any], role: str) -> Any:
        """The value of a config role (``hidden_size``, ``intermediate_size``, ...), with the
        family's default when config.json holds null (GPT-2's ``n_inner``)."""
        value = config_get(config, (self.config[role],)) if role in self.config else None
        rule = self.config_defaults.get(role)
        if value is None and rule is not None:
            base = self.config_value(config, rule["times"])
            value = None if base is None else rule["factor"] * base
        return value

    @property
    def vocabulary_tensors(self) -> tuple[str, ...]:
        """Tensors with one row per token: the token embeddings (not GPT-2's `wpe` or BERT's
        position and token-type tables, which `embeddings` also lists), an LM head's bias, and
        the heads tied to them."""
        return (*self.vocabulary, *self.tied)

    def init_rule(self, name: str) -> Mapping[str, Any]:
        """The first ``init`` rule whose pattern matches the full tensor ``name``."""
        for rule in self.init:
            if fnmatch.fnmatchcase(name, rule["match"]):
                return rule
        return {"match": "*", "init": "normal"}

    def expected_names(self, base: str, num_layers: int) -> tuple[set[str], set[str]]:
        """All (required, optional) tensor names for a checkpoint with this base prefix."""
        required: set[str] = set()
        optional: set[str] = set()

        def add(name: str, rel: str) -> None:
            (optional if rel in self.optional else required).add(name)

        for rel in self.weights["pre"] + self.weights["post"]:
            add(base + rel, rel)
        for i in range(num_layers):
            for rel in self.weights["layer"]:
                add(f"{base}{self.layer_stack}.{i}.{rel}", rel)
        for rel in self.weights["head"]:
            add(rel, rel)
        return required, optional


@cache
def load_architectures() -> dict[str, Architecture]:
    """Every bundled family description, by family name, checked against the schema."""
    import jsonschema

    pkg = resources.files("recipekit.arch")
    validator = jsonschema.Draft202012Validator(json.loads((pkg / "schema.json").read_text()))
    out: dict[str, Architecture] = {}
    for entry in sorted(pkg.iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".json") or entry.name == "schema.json":
            continue
        data = json.loads(entry.read_text())
        errors = sorted(validator.iter_errors(data), key=str)
        if errors:
            raise ValueError(f"arch/{entry.name}: {errors[0].message}")
        out[data["family"]] = Architecture(
            family=data["family"],
            model_types=tuple(data["model_types"]),
            architectures=tuple(data["architectures"]),
            base_prefixes=tuple(data["base_prefixes"]),
            layer_stack=data["layer_stack"],
            config=data["config"],
            layer_index_dependent=tuple(data.get("layer_index_dependent", ())),
            weights={k: tuple(v) for k, v in data["weights"].items()},
            optional=frozenset(data["optional"]),
            tied=data["tied"],
            init=tuple(data["init"]),
            classifier=data.get("classifier"),
            coalesce=data.get("coalesce"),
            embeddings=tuple(data.get("embeddings", ())),
            vocabulary=tuple(data["vocabulary"]),
            fan_in_fan_out=tuple(data.get("fan_in_fan_out", ())),
            config_defaults=data.get("config_defaults", {}),
        )
    return out


def family_names(family: str | None, field_name: str) -> tuple[str, ...]:
    """A family's tensor names of one kind (``embeddings``, ``fan_in_fan_out``,
    ``vocabulary_tensors``), relative to the base prefix; for a checkpoint of no known family,
    those of every family, so that name-based detection still recognises them."""
    archs = load_architectures()
    if family in archs:
        return tuple(getattr(archs[family], field_name))
    return tuple(dict.fromkeys(n for a in archs.values() for n in getattr(a, field_name)))


def detect_architecture(config: Mapping[str, Any]) -> Architecture | None:
    """The family whose ``model_type`` (or, failing that, architecture class) matches."""
    archs = load_architectures().values()
    model_type = config.get("model_type")
    for arch in archs:
        if model_type in arch.model_types:
            return arch
    classes = set(config.get("architectures") or ())
    for arch in archs:
        if classes & set(arch.architectures):
            return arch
    return None


@dataclass(frozen=True)
class LayerStack:
    """The numbered layers of one checkpoint: ``<prefix><i>.<rest>`` for i in range(num_layers)."""

    prefix: str  # e.g. "model.layers." (ends with ".")
    num_layers: int
    count_key: ConfigKey
    per_layer_keys: tuple[ConfigKey, ...]  # lists of one entry per layer (`GENERIC_PER_LAYER`)
    family: str | None
    base: str  # base-model prefix ("model.", "" ...) when a family matched, else ""

    def split(self, name: str) -> tuple[int, str] | None:
        """``("model.layers.3.mlp.up_proj.weight")`` -> ``(3, "mlp.up_proj.weight")``."""
        if not name.startswith(self.prefix):
            return None
        index, sep, rest = name[len(self.prefix):].partition(".")
        if not sep or not index.isdigit():
            return None
        return int(index), rest

    def name(self, index: int, rest: str) -> str:
        return f"{self.prefix}{index}.{rest}"



def scan_layer_stacks(names: Iterable[str]) -> dict[str, set[int]]:
    """Outermost numbered stacks in tensor names: ``{"model.layers.": {0, 1, ...}}``.

    Recognises ``*.layers.{i}.*``, ``*.layer.{i}.*``, ``*.h.{i}.*`` and ``blocks.{i}.*``; a stack
    nested inside another (MoE experts) is not a second stack because only the leftmost match
    counts.
    """
    stacks: dict[str, set[int]] = {}
    for n in names:
        m = _STACK.match(n)
        if m:
            stacks.setdefault(m.group(1) + ".", set()).add(int(m.group(2)))
    return stacks



def _count_key_candidates(config: Mapping[str, Any], arch: Architecture | None) -> list[ConfigKey]:
    keys: list[ConfigKey] = []
    if arch is not None:
        keys.append((arch.config["num_layers"],))
    keys += [(k,) for k in COUNT_KEYS]
    for sub, value in config.items():
        if isinstance(value, Mapping):
            keys += [(sub, k) for k in COUNT_KEYS]
    seen: list[ConfigKey] = []
    for k in keys:
        if k not in seen:
            seen.append(k)
    return seen



def find_layer_stack(config: Mapping[str, Any], names: Iterable[str], *,
                     layer_prefix: str | None = None) -> LayerStack:
    """Find the single layer stack of a checkpoint and where config.json counts its layers.

    Raises:
        LayerStackError: no stack, more than one without ``layer_prefix``, a prefix that matches
            nothing, non-contiguous layer indices, or no config key holding the layer count.
    """
    names = list(names)
    stacks = scan_layer_stacks(names)
    arch = detect_architecture(config)
    if layer_prefix is not None:
        prefix, stack_indices = _named_stack(names, stacks, layer_prefix)
        if arch is not None and not any(prefix == b + arch.layer_stack + "." for b in
                                        arch.base_prefixes):
            arch = None  # a sub-model (e.g. a VLM's language model): describe it generically
    else:
        prefix, stack_indices = _only_stack(stacks)
    n = len(stack_indices)
    if stack_indices != set(range(n)):
        missing = sorted(set(range(max(stack_indices) + 1)) - stack_indices)
        raise LayerStackError(f"layer stack `{prefix.rstrip('.')}` is missing layer(s) "
                              f"{missing[:8]}", hint="the checkpoint is incomplete")
    base = ""
    if arch is not None:
        for b in arch.base_prefixes:
            if prefix == b + arch.layer_stack + ".":
                base = b
                break
        else:
            arch = None
    count_key = _count_key(config, arch, prefix, n, named=layer_prefix is not None)
    parent = count_key[:-1]
    per_layer_names = list(GENERIC_PER_LAYER) + (list(arch.config["per_layer"]) if arch else [])
    per_layer = tuple(dict.fromkeys(
        parent + (k,) for k in per_layer_names
        if isinstance(config_get(config, parent + (k,)), list)
        and len(config_get(config, parent + (k,))) == n
    ))
    return LayerStack(prefix, n, count_key, per_layer, arch.family if arch else None, base)


def _named_stack(names: list[str], stacks: Mapping[str, set[int]],
                 layer_prefix: str) -> tuple[str, set[int]]:
    """The stack the recipe's ``layer_prefix`` names, and its layer indices."""
    prefix = layer_prefix.rstrip(".") + "."
    indices = {i for n in names if n.startswith(prefix)
               for i in [n[len(prefix):].partition(".")[0]] if i.isdigit()}
    if not indices:
        found = ", ".join(s.rstrip(".") for s in sorted(stacks)) or "none"
        raise LayerStackError(f"no tensors named `{prefix}<i>.*` (layer_prefix "
                              f"{layer_prefix!r})", hint=f"layer stacks found: {found}")
    return prefix, {int(i) for i in indices}


def _only_stack(stacks: Mapping[str, set[int]]) -> tuple[str, set[int]]:
    """The checkpoint's one layer stack, and its layer indices."""
    if not stacks:
        raise LayerStackError("found no numbered layer stack (`*.layers.<i>.*`, "
                              "`*.layer.<i>.*`, `*.h.<i>.*` or `blocks.<i>.*`) in the tensor "
                              "names", hint="this checkpoint cannot be sliced by layer")
    if len(stacks) > 1:
        listed = ", ".join(f"`{s.rstrip('.')}` ({len(v)} layers)"
                           for s, v in sorted(stacks.items()))
        err = LayerStackError(
            f"has more than one layer stack: {listed}",
            hint="version 1 handles one stack at a time: set `layer_prefix:` on the model "
            "(e.g. `{path: ..., layer_prefix: " + sorted(stacks)[0].rstrip(".") + "}`)")
        err.stacks = tuple(sorted(stacks))
        raise err
    return next(iter(stacks.items()))


def _owns(sub: str, prefix: str) -> bool:
    """Whether sub-config ``sub`` (``text_config``) describes the stack under ``prefix``
    (``language_model.model.layers.``): a component of the prefix is one of its module words
    or starts with one (``vision_tower``), as in transformers' multimodal models (LLaVA,
    Qwen2-VL, Gemma 3, Mistral 3, ...)."""
    words = SUBCONFIG_MODULES.get(sub, (sub.removesuffix("_config"),))
    return any(part == w or part.startswith(w + "_") for part in prefix.split(".")
               for w in words)


def language_stack(stacks: Iterable[str]) -> str | None:
    """The one stack among ``stacks`` that a multimodal config's ``text_config`` owns (the
    language model's, which mergekit's text module merges), or None."""
    owned = [s for s in stacks if _owns("text_config", s)]
    return owned[0] if len(owned) == 1 else None


#: An encoder-decoder's stack named by ``layer_prefix``: the keys that count its own layers,
#: first (T5 counts the encoder in `num_layers`, which the decoder stack's count may equal).
_SIDE_COUNT_KEYS: dict[str, tuple[ConfigKey, ...]] = {
    "decoder": (("num_decoder_layers",), ("decoder_layers",)),
    "encoder": (("encoder_layers",), ("num_layers",)),
}


def _count_key(config: Mapping[str, Any], arch: Architecture | None, prefix: str,
               n: int, named: bool = False) -> ConfigKey:
    """The one config.json key that holds the stack's layer count ``n``.

    With ``named`` (the recipe's ``layer_prefix``), a multimodal config whose sub-configs hold
    the same count (picoLLaVA: text and vision both 2 layers) is read from the sub-config that
    owns the named stack (`_owns`).
    """
    side = prefix.split(".", 1)[0] if named else ""
    for key in _SIDE_COUNT_KEYS.get(side, ()):  # T5's decoder.block: num_decoder_layers
        if config_get(config, key) == n:
            return key
    matches: list[ConfigKey] = []
    for key in _count_key_candidates(config, arch):
        value = config_get(config, key)
        if isinstance(value, int) and not isinstance(value, bool):
            if value == n:
                matches.append(key)
            elif arch is not None and key == (arch.config["num_layers"],):
                raise LayerStackError(
                    f"config.json says {key[-1]} = {value} but the checkpoint has {n} layers "
                    f"under `{prefix.rstrip('.')}`", hint="the config and weights do not belong "
                    "together; fix config.json or use the matching weights")
    if named and len(matches) > 1:
        owned = [k for k in matches if len(k) == 2 and _owns(k[0], prefix)]
        matches = owned if len(owned) == 1 else matches
    top = [k for k in matches if len(k) == 1]
    if len(top) > 1 or (not top and len(matches) > 1):
        raise LayerStackError(
            f"several config.json keys hold the layer count {n} of `{prefix.rstrip('.')}` ("
            + ", ".join(".".join(k) for k in matches) + "); recipekit cannot tell which one "
            "counts these layers", hint="this checkpoint layout is not supported in version 1")
    count_key = (top or matches or [None])[0]
    if count_key is None:
        raise LayerStackError(f"no key in config.json holds the layer count {n} of "
                              f"`{prefix.rstrip('.')}`",
                              hint="expected one of: " + ", ".join(COUNT_KEYS))
    return count_key
