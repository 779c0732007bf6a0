"""Resolve the recipe's `adapters:` into PEFT adapter directories: config and header only.

A PEFT LoRA adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors``
(reference/adapters.md §1). Resolving one reads the config and the safetensors header, never a
tensor, and refuses what recipekit cannot fold faithfully: pickle adapters (``adapter_model.bin``;
`recipekit convert --allow-pickle` converts them), PEFT types other than LoRA, LoRA variants
whose merge rule differs, initialisations that mutated the base during training (PiSSA, OLoRA,
LoftQ, CorDA, LoRA-GA: the adapter is only right on top of the residual base), and
`layer_replication` (its keys name layers the base lacks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from recipekit.errors import SourceNotFoundError, UnsupportedCheckpointError, display_path
from recipekit.inputs.files import (
    check_confined,
    check_readable_dir,
    is_file,
    lexists,
    model_root,
    read_small,
    relative_paths,
)
from recipekit.inputs.hub import HubSnapshot
from recipekit.inputs.patterns import PatternError, key_matcher
from recipekit.inputs.remote import RemoteSnapshot
from recipekit.inputs.source import (
    InputFiles,
    Located,
    locate_input,
    shard_header,
    split_snapshot,
)
from recipekit.io.header import TensorInfo, kind_of, parse_json
from recipekit.io.names import ADAPTER_CONFIG as CONFIG
from recipekit.io.names import ADAPTER_PICKLE as PICKLE
from recipekit.io.names import ADAPTER_WEIGHTS as WEIGHTS
from recipekit.io.names import CONFIG as MODEL_CONFIG
from recipekit.recipe import ModelRef, Recipe

MAX_ADAPTER_CONFIG = 4 * 1024 * 1024

#: init_lora_weights values whose training subtracted the initial adapter from the base.
MODIFIED_BASE_INITS = ("pissa", "olora", "loftq", "corda", "lora_ga")
#: Config fields of LoRA variants whose merge differs (or that cannot be merged statically).
VARIANT_FIELDS = ("use_bdlora", "arrow_config", "kasa_config", "velora_config",
                  "monteclora_config", "alora_invocation_tokens", "use_qalora", "target_parameters",
                  "trainable_token_indices")


@dataclass(frozen=True)
class AdapterCheckpoint(InputFiles):
    """A resolved adapter input: its adapter_config.json and its tensors' locations.

    It answers the same `identity`/`manifest_entry`/`tensors` questions a model `Checkpoint`
    does, so plan hashing, manifests and the executor's reads treat both alike.
    """

    name: str
    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    weight_files: tuple[Path, ...]
    hub: HubSnapshot | None = None
    remote: RemoteSnapshot | None = None
    CONFIG_NAME: ClassVar[str] = CONFIG


def resolve_adapter(ref: ModelRef, recipe: Recipe) -> AdapterCheckpoint:
    """Read one adapter's config and header, refusing what cannot be folded.

    Raises:
        SourceNotFoundError: no such directory, no adapter_config.json or weights in it.
        SourceUnreadableError: a directory that cannot be listed or searched.
        UnsupportedCheckpointError: pickle-only, not LoRA, a variant or modified-base init,
            layer_replication.
        CorruptCheckpointError: damaged config or header.
    """
    located, path, snap = locate_input(ref, recipe)
    try:
        is_dir = path.is_dir()
    except OSError as e:
        raise located(SourceNotFoundError, f"adapter path {ref.written[:80]!r} cannot be used: "
                      f"{e.strerror or e}", "check the path") from None
    if not is_dir:
        what = "is a file, not" if path.exists() else "does not exist; expected"
        raise located(SourceNotFoundError, f"adapter {ref.written!r} {what} a PEFT adapter "
                      f"directory ({display_path(path)})", "name the directory that holds "
                      f"{CONFIG} ({relative_paths(recipe)})")
    check_readable_dir(path)
    root = model_root(path)
    config_path = path / CONFIG
    if not lexists(config_path):
        hint = ("this is a model checkpoint: list it under `models:`" if is_file(
            path / MODEL_CONFIG) else f"a PEFT adapter directory holds {CONFIG} and "
            f"{WEIGHTS}")
        raise located(SourceNotFoundError, f"no {CONFIG} in {ref.written!r}", hint)
    check_confined(config_path, root)
    shown = display_path(config_path)
    config = parse_json(read_small(config_path, MAX_ADAPTER_CONFIG, CONFIG), shown, CONFIG,
                        strict=False, hint="the adapter is damaged; save or download it again")
    if not isinstance(config, dict):
        raise located(UnsupportedCheckpointError, f"{CONFIG} of {ref.written!r} is "
                      f"{kind_of(config)}, not a JSON object")
    _check_config(config, ref, located)
    _check_pattern_keys(config, ref, located, shown)
    _check_finite(config, ref, located, shown)
    weights = path / WEIGHTS
    if not lexists(weights) and snap is None:
        if is_file(path / PICKLE):
            raise located(UnsupportedCheckpointError,
                          f"{ref.written!r} holds only a pickle adapter ({PICKLE}); `run` does "
                          "not load pickles, which can run code",
                          "if you trust it, convert it once with `recipekit convert "
                          f"--allow-pickle {ref.written} <new dir>` and use the new directory")
        raise located(SourceNotFoundError, f"no {WEIGHTS} in {ref.written!r}",
                      f"a PEFT adapter directory holds {CONFIG} and {WEIGHTS}")
    tensors = shard_header(weights, root, snap)
    return AdapterCheckpoint(ref.name, path, config, tensors, (weights,),
                             **split_snapshot(snap))


def _check_config(config: dict[str, Any], ref: ModelRef, located: Located) -> None:
    """Refuse PEFT types, variants and inits whose merge recipekit does not reproduce."""
    name = ref.written
    if "peft_type" not in config:  # once "has peft_type 'None'" (a black-box finding)
        raise located(UnsupportedCheckpointError, f"adapter {name!r}: {CONFIG} has no "
                      "`peft_type` key, so it does not say which PEFT method made it (PEFT "
                      "does not load it either)", 'a LoRA adapter\'s config holds "peft_type": '
                      '"LORA"')
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        hint = ("an X-LoRA directory is not one adapter: list its experts (the LoRA adapters "
                "it names) under `adapters:` and fold them with `gating:`" if peft_type == "XLORA"
                else
                "recipekit folds LoRA adapters (peft_type LORA, including DoRA)")
        shown = "null" if peft_type is None else repr(str(peft_type)[:40])
        raise located(UnsupportedCheckpointError, f"adapter {name!r} has peft_type {shown}, "
                      "not LORA", hint)
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(MODIFIED_BASE_INITS):
        raise located(UnsupportedCheckpointError,
                      f"adapter {name!r} was initialised with {init!r}, which moves part of the "
                      "base weights into the adapter: it is only correct on top of the residual "
                      "base its trainer saved, not on the original model",
                      "fold it into that residual model, or convert it with PEFT's "
                      "`save_pretrained(path_initial_model_for_weight_conversion=...)`, which "
                      "writes an adapter for the original base")
    if isinstance(init, str) and init.lower() == "mica":
        raise located(UnsupportedCheckpointError, f"adapter {name!r} uses the MiCA variant "
                      "(init_lora_weights 'mica'), whose merge recipekit does not implement")
    if config.get("layer_replication"):
        raise located(UnsupportedCheckpointError,
                      f"adapter {name!r} was trained with layer_replication: its tensors name "
                      "layers the base checkpoint does not have",
                      "build the expanded model with a `layers` step first and fold an adapter "
                      "trained on it, or fold with PEFT")
    for key in VARIANT_FIELDS:
        if config.get(key):
            raise located(UnsupportedCheckpointError,
                          f"adapter {name!r} sets `{key}`, a LoRA feature whose merge recipekit "
                          "does not implement", "fold it with PEFT's merge_and_unload")
    if config.get("use_dora") and config.get("lora_bias"):
        raise located(UnsupportedCheckpointError, f"adapter {name!r} combines DoRA with "
                      "lora_bias, which recipekit does not fold")
    for key, ok in (("r", _is_pos_int), ("lora_alpha", _is_number),
                    ("rank_pattern", _is_number_map), ("alpha_pattern", _is_number_map)):
        if key in config and (config[key] is not None or key in ("r", "lora_alpha")) and \
                not ok(config[key]):
            raise located(UnsupportedCheckpointError, f"adapter {name!r}: `{key}` in {CONFIG} "
                          f"is {kind_of(config[key])}, which PEFT would not accept",
                          "the adapter config is damaged")
    if config.get("bias", "none") not in ("none", "all", "lora_only"):
        raise located(UnsupportedCheckpointError, f"adapter {name!r}: `bias` is "
                      f"{str(config.get('bias'))[:40]!r}; PEFT knows none, all and lora_only")


def _check_pattern_keys(config: dict[str, Any], ref: ModelRef, located: Located,
                        shown: str) -> None:
    """Refuse `rank_pattern`/`alpha_pattern` keys that are not regexes or that could not be
    matched in bounded time (inputs/patterns.py; issue 17 item 7)."""
    for field in ("rank_pattern", "alpha_pattern"):
        for key in config.get(field) or {}:
            try:
                key_matcher(key)
            except PatternError as e:
                raise located(UnsupportedCheckpointError,
                              f"adapter {ref.written!r}: `{field}` key {key[:80]!r} in {shown} "
                              f"{e}", "PEFT matches these keys as regexes against module "
                              "names; use a module name, a suffix of one, or a simple regex"
                              ) from None
def _check_finite(config: dict[str, Any], ref: ModelRef, located: Located, shown: str) -> None:
    """Refuse a scaling that is NaN or infinite: Python's JSON reader accepts ``NaN`` and
    ``Infinity``, and PEFT would scale every delta to NaN (an all-NaN output with exit 0)."""
    for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern"):
        value = config.get(key)
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for pattern, v in items:
            if isinstance(v, float) and not math.isfinite(v):
                where = f"`{key}`" + ("" if pattern is None else f" entry {str(pattern)[:60]!r}")
                raise located(UnsupportedCheckpointError, f"adapter {ref.written!r}: {where} "
                              f"in {shown} is {v}, not a finite number",
                              "the adapter config is damaged; save or download it again")


def _is_number(v: Any) -> bool:
    """A JSON number PEFT can use as a float (an integer past float range is not one)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        float(v)
    except OverflowError:
        return False
    return True


def _is_pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _is_number_map(v: Any) -> bool:
    return isinstance(v, dict) and all(_is_number(x) for x in v.values())
