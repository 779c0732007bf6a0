"""`recipekit import-mergekit` for mergekit-moe configs (`base_model` + `experts:` + `gate_mode`).

Why: a mergekit-moe config used to get four unrelated errors from the importer (no
`merge_method`, unknown keys `experts`, `gate_mode`, ...). It converts to one `op: moe` step
with mergekit-moe 0.1.5's field meanings (reference/moe.md §1): `source_model` → `model:`
(``model+lora`` → an adapters fold, as for merges), prompts and modifiers as they are,
`gate_mode` (``hidden_last`` is ``hidden``), `experts_per_token`, `shared_experts`,
`architecture` (mergekit's case-insensitive prefix of "Mixtral", "DeepSeek MoE", "Qwen MoE",
"Qwen3 MoE"), `dtype` → `output.dtype`. Refused, naming the key:
the DeepSeek-MoE output (remote code; recipekit does not write it, also where mergekit would
pick it on its own: Llama/Mistral experts with a prompt-less shared expert), unknown keys
(which mergekit silently ignores). mergekit's `--random-seed` is a command-line flag: the
recipe's ``seed`` is 0 unless ``seed`` is given to `convert_moe`. Oracle:
tests/tools/test_mergekit_import_moe.py converts configs and compares the recipe's output with
mergekit-moe's own.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from recipekit.errors import ConversionError, KeyPath
from recipekit.tools.mergekit_params import ImportState

MOE_KEYS = ("base_model", "experts", "gate_mode", "dtype", "experts_per_token",
            "shared_experts", "architecture")
EXPERT_KEYS = ("source_model", "positive_prompts", "negative_prompts", "noise_scale",
               "residual_scale")
#: mergekit-moe's output names (matched by case-insensitive prefix) → recipekit's
ARCHITECTURES = {"mixtral": "mixtral", "deepseek moe": None, "qwen moe": "qwen2_moe",
                 "qwen3 moe": "qwen3_moe"}
GATE_MODES = {"hidden": "hidden", "hidden_last": "hidden", "hidden_avg": "hidden_avg",
              "cheap_embed": "cheap_embed", "random": "random", "uniform_random": "uniform_random"}
DTYPES = ("float32", "float16", "bfloat16", "float64")

ModelName = Callable[[ImportState, Any, KeyPath], str]


def is_moe_config(data: Any) -> bool:
    """A mergekit-moe config: `experts:` and no `merge_method`."""
    return isinstance(data, dict) and "experts" in data and "merge_method" not in data


def _check_keys(st: ImportState, data: dict[str, Any], path: KeyPath, known: tuple[str, ...],
                errors: list[Any]) -> None:
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            errors.append(st.doc.error(path + (key,), f"unknown mergekit-moe key `{key}` "
                                       "(mergekit would silently ignore it)", key=True,
                                       hint=f"did you mean '{close[0]}'?" if close else None))


def _architectures(st: ImportState, value: Any, errors: list[Any]) -> list[str] | None:
    """recipekit's output architectures that mergekit's prefix ``value`` names (None: auto)."""
    if value is None:
        return None
    hits = [n for n in ARCHITECTURES if n.startswith(str(value).lower())]
    if not hits:
        errors.append(st.doc.error(("architecture",), f"no mergekit-moe output architecture "
                                   f"matches {value!r}", hint="one of Mixtral, DeepSeek MoE, "
                                   "Qwen MoE, Qwen3 MoE (a prefix)"))
        return None
    if hits == ["deepseek moe"]:
        errors.append(st.doc.error(("architecture",), "cannot convert the DeepSeek-MoE output: "
                                   "it needs remote code, and recipekit writes Mixtral, "
                                   "Qwen2-MoE and Qwen3-MoE", hint="use `architecture: qwen` "
                                   "for a shared expert"))
        return None
    return [a for n in hits if (a := ARCHITECTURES[n]) is not None]


def _check_expert(st: ImportState, entry: Any, path: KeyPath, errors: list[Any]) -> None:
    """An expert entry's keys and value types, located."""
    if not isinstance(entry, dict) or "source_model" not in entry:
        errors.append(st.doc.error(path, "an expert is a mapping with `source_model`"))
        return
    _check_keys(st, entry, path, EXPERT_KEYS, errors)
    for key in EXPERT_KEYS[1:]:
        value = entry.get(key)
        if value is None:
            continue
        if key.endswith("_prompts"):
            if not (isinstance(value, list) and all(isinstance(p, str) for p in value)):
                errors.append(st.doc.error(path + (key,), f"`{key}` is a list of strings"))
        elif not isinstance(value, (int, float)) or isinstance(value, bool):
            errors.append(st.doc.error(path + (key,), f"`{key}` is a number, not {value!r}"))


def _expert(st: ImportState, entry: dict[str, Any], path: KeyPath, model_name: ModelName
            ) -> dict[str, Any]:
    out: dict[str, Any] = {"model": model_name(st, entry["source_model"],
                                               path + ("source_model",))}
    out.update((k, entry[k]) for k in EXPERT_KEYS[1:] if entry.get(k) is not None)
    return out


def moe_step(st: ImportState, data: dict[str, Any], model_name: ModelName
             ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the `moe` step, the output section) for a mergekit-moe config; models are registered
    in ``st`` through ``model_name`` (the importer's reference resolver).

    Raises:
        ConversionError: every key that cannot be converted, located.
    """
    errors: list[Any] = []
    _check_keys(st, data, (), MOE_KEYS, errors)
    if not isinstance(data.get("base_model"), str):
        errors.append(st.doc.error((), "a mergekit-moe config needs `base_model`"))
    experts = data.get("experts")
    if not isinstance(experts, list) or not experts:
        errors.append(st.doc.error(("experts",), "`experts` is a non-empty list"))
        experts = []
    shared = data.get("shared_experts") or []
    if not isinstance(shared, list):
        errors.append(st.doc.error(("shared_experts",), "`shared_experts` is a list"))
        shared = []
    for key, entries in (("experts", experts), ("shared_experts", shared)):
        for i, entry in enumerate(entries):
            _check_expert(st, entry, (key, i), errors)
    mode = data.get("gate_mode", "hidden")
    if not isinstance(mode, str) or mode not in GATE_MODES:
        errors.append(st.doc.error(("gate_mode",), f"cannot convert gate_mode {mode!r}: "
                                   "recipekit has " + ", ".join(GATE_MODES),
                                   hint="use one of these"))
    dtype = data.get("dtype")
    if dtype is not None and str(dtype).removeprefix("torch.") not in DTYPES:
        errors.append(st.doc.error(("dtype",), f"cannot convert dtype {dtype!r}: recipekit "
                                   "writes " + ", ".join(DTYPES)))
    k = data.get("experts_per_token", 2)
    if isinstance(k, float) and k.is_integer():
        k = int(k)  # mergekit-moe (pydantic) reads 2.0 as 2
    if not isinstance(k, int) or isinstance(k, bool):
        errors.append(st.doc.error(("experts_per_token",), f"experts_per_token is {k!r}; "
                                   "mergekit-moe takes an integer"))
    archs = _architectures(st, data.get("architecture"), errors)
    if errors:
        raise ConversionError(errors)
    step: dict[str, Any] = {"name": "moe", "op": "moe",
                            "base": model_name(st, data["base_model"], ("base_model",))}
    step["experts"] = [_expert(st, e, ("experts", i), model_name)
                       for i, e in enumerate(experts)]
    if shared:
        step["shared_experts"] = [_expert(st, e, ("shared_experts", i), model_name)
                                  for i, e in enumerate(shared)]
    step["gate_mode"] = GATE_MODES[mode]
    step["experts_per_token"] = k
    if archs is not None:
        step["architecture"] = archs  # narrowed by `choose_architecture` once models are read
    if mode != "random" and len({e["model"] for e in step["experts"]}) == 1:
        step["allow_identical_experts"] = True
        st.notes.append("every expert is the same model: `allow_identical_experts: true` "
                        "(mergekit's --i-understand-this-is-not-useful-without-training)")
    step["seed"] = 0
    st.notes.append("mergekit-moe's --random-seed is a command-line flag: `seed: 0` here seeds "
                    "random/uniform_random routers and noise_scale; set it to your seed for "
                    "mergekit's routers")
    output: dict[str, Any] = {"model": "moe"}
    if dtype is not None:
        output["dtype"] = str(dtype).removeprefix("torch.")
    return step, output


def choose_architecture(st: ImportState, step: dict[str, Any]) -> None:
    """Set the step's `architecture` as mergekit picks among the outputs its prefix named:
    the first whose models fit (Mixtral and Qwen3-MoE: no shared expert; Qwen2-MoE: one),
    else the first (recipekit's validation then says why it does not fit). Without
    `architecture`, refuse mergekit's automatic DeepSeek-MoE (Llama/Mistral experts, one
    shared expert without prompts), which recipekit does not write.

    Raises:
        ConversionError: that DeepSeek case, located.
    """
    from recipekit.arch.moe import OUTPUTS

    model_type = st.checkpoint(step["base"]).config.get("model_type")
    shared = step.get("shared_experts") or []
    archs = step.get("architecture")
    if archs is not None:
        fits = [a for a in archs if model_type in OUTPUTS[a].built_from
                and bool(shared) == OUTPUTS[a].shared_expert]
        step["architecture"] = (fits or archs)[0]
        return
    if shared and not shared[0].get("positive_prompts") and model_type in ("llama", "mistral"):
        raise st.fail(("shared_experts",), "mergekit-moe builds a DeepSeek-MoE from these "
                      "models (Llama/Mistral experts with a prompt-less shared expert), which "
                      "recipekit does not write", hint="add `architecture: qwen` to the config "
                      "for Qwen2-MoE")
