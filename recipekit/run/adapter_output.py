"""An adapter-set output as a PEFT adapter directory: its tensors (plan nodes) and config.

``output: {adapter: {method: cat}}`` (the default) writes each module's low-rank terms side by
side: A' = [s_1·A_1; s_2·A_2; ...] (rows), B' = [B_1, B_2, ...] (columns), so B'A' = Σ s_i B_i A_i
exactly, with rank Σ r_i (PEFT's `add_weighted_adapter(combination_type="cat")`).
``{method: svd, rank: k}`` factors each module's combined fp32 delta by a truncated SVD
(exact when k ≥ its rank). Either way every module's scaling is exactly 1: ``r = lora_alpha``
= the largest rank, and ``rank_pattern = alpha_pattern`` name the others (mergekit's
convention), with rsLoRA and DoRA off. Only adapter tensors are read: no base weights.
Oracle: tests/steps/test_combine_adapters.py loads the directory in PEFT.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from recipekit.dtypes import NAME_TO_CODE, promote
from recipekit.errors import RecipeError, RecipeErrors
from recipekit.graph import F32, Concat, Node, ScaledSum, SvdFactor, cast, intern
from recipekit.graph.adapterset import BASE_CONFLICT, PREFIX, AdapterSet
from recipekit.io.header import quote_name
from recipekit.io.names import is_absolute_local
from recipekit.recipe import Recipe
from recipekit.steps.reinit import Fill

log = logging.getLogger(__name__)


def adapter_output(aset: AdapterSet, recipe: Recipe) -> tuple[dict[str, Node], dict[str, Any]]:
    """The tensors (by adapter key) and adapter_config.json of an adapter-set output.

    Raises:
        RecipeErrors: DoRA modules, full (pruned) deltas written with `cat`, `rank` given with
            `cat` or missing with `svd`.
    """
    spec: Mapping[str, Any] = recipe.output.adapter or {}
    errors = _spec_errors(recipe, spec)
    dtype = _output_dtype(aset, recipe)
    tensors: dict[str, Node] = {}
    ranks: dict[str, int] = {}
    kinds: dict[str, str] = {}
    for name, t in aset.targets.items():
        module = name[:-len(".weight")] if name.endswith(".weight") else name
        factors = _factors(aset, recipe, t, module, spec, dtype, errors)
        if factors is None:
            break
        a, b = factors
        a_key, b_key = ((f"{module}.lora_embedding_A", f"{module}.lora_embedding_B")
                        if t.kind == "embedding" else
                        (f"{module}.lora_A.weight", f"{module}.lora_B.weight"))
        tensors[PREFIX + a_key], tensors[PREFIX + b_key] = a, b
        ranks[module], kinds[module] = a.shape[0], t.kind
    for name, terms in aset.biases.items():
        module = name[:-len(".bias")]
        tensors[f"{PREFIX}{module}.lora_B.bias"] = intern(ScaledSum(
            tuple(n for n, _ in terms), tuple(s for _, s in terms), dtype))
    if aset.biases:
        errors += _zero_biases(aset, recipe, tensors, dtype)
    for rep in aset.replacements.values():
        tensors[PREFIX + rep.key] = rep.node
    if errors:
        raise RecipeErrors(errors)
    config = adapter_config(aset, ranks, kinds)
    _warn_unnamed_base(aset, config)
    return tensors, config


def _zero_biases(aset: AdapterSet, recipe: Recipe, tensors: dict[str, Node], dtype: str
                 ) -> list[RecipeError]:
    """A zero ``lora_B.bias`` for every linear module without one, once any module has one.

    Why: ``lora_bias`` is one flag for every module of a PEFT adapter, so a combination of a
    lora_bias adapter and a plain one gave the plain one's modules a bias PEFT looked for and
    did not find ("Found missing adapter keys", found by a black-box check); zero is what
    those modules add. PEFT refuses lora_bias on embedding modules, so a set with both is
    refused here (folding it into a model needs no config)."""
    embeddings: list[str] = []
    for name, t in aset.targets.items():
        module = name[:-len(".weight")] if name.endswith(".weight") else name
        if t.kind == "embedding":
            embeddings.append(module)
            continue
        key = f"{PREFIX}{module}.lora_B.bias"
        if key not in tensors:
            out_dim = t.shape[1] if t.transposed else t.shape[0]
            tensors[key] = intern(Fill((out_dim,), dtype, 0.0))
    if not embeddings:
        return []
    return [recipe.error(("output", "model"), f"'{aset.name}' has lora_bias terms and embedding "
                         f"LoRA modules ({quote_name(embeddings[0])}): PEFT's lora_bias applies "
                         "to every module of an adapter, and PEFT refuses it on embeddings",
                         hint="write them as separate adapters, or fold them into a model with "
                         "`op: adapters`")]


def _warn_unnamed_base(aset: AdapterSet, config: Mapping[str, Any]) -> None:
    """Say why adapter_config.json names no base model where the inputs named one (combined
    adapters of different bases; an absolute local path, which an output ready for publishing
    does not name): PEFT's `AutoPeftModel` then needs the base passed in, and once tried to
    download a repo named "None" without a word from recipekit (found by a black-box check)."""
    if config["base_model_name_or_path"] is not None:
        return
    load = ("pass the base model to PEFT (`PeftModel.from_pretrained(base, OUT)`) and to "
            "`recipekit verify OUT --load --base BASE`")
    conflict = aset.config.get(BASE_CONFLICT)
    named = aset.config.get("base_model_name_or_path")
    if conflict:
        log.warning("the adapter sets combined into '%s' name different base models (%s), so "
                    "its adapter_config.json names none: %s", aset.name, conflict, load)
    elif named is not None:
        log.warning("'%s' adapts the base model at %s, an absolute local path, which an output "
                    "ready for publishing does not name, so its adapter_config.json names no "
                    "base: %s", aset.name, named, load)


def _spec_errors(recipe: Recipe, spec: Mapping[str, Any]) -> list[RecipeError]:
    """``rank`` missing with svd, or given with cat."""
    method = spec.get("method", "cat")
    where = ("output", "adapter")
    errors: list[RecipeError] = []
    if method == "svd" and "rank" not in spec:
        errors.append(recipe.error(where, "method svd needs `rank:` (the rank of every module)",
                                   key=True))
    if method == "cat" and "rank" in spec:
        errors.append(recipe.error(where + ("rank",), "method cat keeps every rank (the sum of "
                                   "the combined ranks); `rank` is for method svd", key=True))
    return errors


def _output_dtype(aset: AdapterSet, recipe: Recipe) -> str:
    """The recipe's output dtype, else the promoted dtype of every factor."""
    if recipe.output.dtype:
        return NAME_TO_CODE[recipe.output.dtype]
    factor_dtypes = [n.dtype for t in aset.targets.values() for term in t.terms
                     for n in (term.a, term.b)]
    return promote(factor_dtypes) if factor_dtypes else F32


def _factors(aset: AdapterSet, recipe: Recipe, t: Any, module: str, spec: Mapping[str, Any],
             dtype: str, errors: list[RecipeError]) -> tuple[Node, Node] | None:
    """One module's written (A, B) factors; None (with an error) when it cannot be written."""
    if t.magnitude is not None:
        errors.append(recipe.error(("output", "model"), f"'{aset.name}' has DoRA modules "
                                   f"({quote_name(module)}), which recipekit does not write "
                                   "as an adapter", hint="fold it into a model instead"))
        return None
    if spec.get("method", "cat") == "svd":
        k = min(int(spec.get("rank", 1)), *t.shape)
        delta = t.delta(1.0)
        return (intern(SvdFactor(delta, "A", k, t.transposed, 0.0, dtype)),
                intern(SvdFactor(delta, "B", k, t.transposed, 0.0, dtype)))
    if t.full is not None:
        errors.append(recipe.error(("output", "model"), f"'{aset.name}' holds pruned (ties/"
                                   "DARE) deltas, which are not low rank; write it with "
                                   "`output: {adapter: {method: svd, rank: k}}`"))
        return None
    if len(t.terms) == 1 and t.terms[0].scale == 1.0:
        return cast(t.terms[0].a, dtype), cast(t.terms[0].b, dtype)
    return (intern(Concat(tuple(x.a for x in t.terms), tuple(x.scale for x in t.terms), 0,
                          dtype)),
            intern(Concat(tuple(x.b for x in t.terms), (1.0,) * len(t.terms), 1, dtype)))


#: PEFT's `peft.utils.constants.DUMMY_TARGET_MODULES`: target no module (checked with PEFT 0.21).
DUMMY_TARGET_MODULES = "dummy-target-modules"


def publishable_name(value: Any) -> Any:
    """A base model reference fit to publish: a Hub id or a relative path as written; an
    absolute local path (what PEFT records for a base loaded from disk) becomes None, so the
    output names none of the writer's directories (PEFT then needs the base passed in, as
    it does for a path that does not exist on the reader's machine anyway)."""
    return None if is_absolute_local(value) else value


def adapter_config(aset: AdapterSet, ranks: Mapping[str, int],
                   kinds: Mapping[str, str]) -> dict[str, Any]:
    """adapter_config.json for modules of the given ranks, every scaling exactly 1."""
    first = aset.config
    top = max(ranks.values(), default=1)
    pattern = {re.escape(m): k for m, k in ranks.items() if k != top}
    linear_transposed = any(t.transposed and t.kind == "linear" for t in aset.targets.values())
    # an extraction names the modules it saved whole (module paths: a classifier head's
    # tensors sit under one module); other saved tensors are named by their module's last part
    whole = tuple(first.get("recipekit_modules_to_save") or ())
    saved = sorted({next((m for m in whole if rep.key.startswith(m + ".")),
                         rep.key.rsplit(".", 1)[0].rsplit(".", 1)[-1])
                    for rep in aset.replacements.values() if ".base_layer." not in rep.key})
    trained_bias = any(rep.key.endswith(".bias") for rep in aset.replacements.values())
    return {
        "peft_type": "LORA",
        "task_type": first.get("task_type"),
        # an extraction's own local base is kept (PEFT's convention, so the adapter loads
        # where it was made); a path copied from an input adapter's config is not
        "base_model_name_or_path": first.get("base_model_name_or_path")
        if first.get("recipekit_own_base") else publishable_name(
            first.get("base_model_name_or_path")),
        "revision": first.get("revision"),
        "inference_mode": True,
        "r": top,
        "lora_alpha": top,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "use_rslora": False,
        "use_dora": False,
        "lora_dropout": 0.0,
        "fan_in_fan_out": linear_transposed,
        "bias": first.get("bias", "none") if trained_bias else "none",
        "lora_bias": bool(aset.biases),
        # full paths: PEFT wraps exactly these modules; an adapter of saved modules alone
        # names PEFT's placeholder, which it accepts as "no LoRA module" (a list matching
        # nothing is refused: "No modules were targeted for adaptation")
        "target_modules": sorted(ranks) if ranks or not saved else DUMMY_TARGET_MODULES,
        "modules_to_save": saved or None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
