"""The `extract_lora` op: a LoRA adapter set from a fine-tune's difference to its base.

``base:`` and ``tuned:`` name two models of one architecture; ``rank:`` the largest rank per
module; ``sv_epsilon:`` (default 0) also zeroes singular values not above it. Every 2-D
floating ``*.weight`` of a linear layer or an embedding becomes a LoRA module: ΔW = tuned −
base in fp32, truncated SVD, A = √S_k·Vh_k, B = U_k·√S_k (mergekit-extract-lora's "distribute
scale", reference/adapters.md §5.2), scaling exactly 1. ``method: randomized`` (the default)
finds the top singular triplets by randomized block Krylov iteration streamed over row pieces
(ops/lowrank.py: ``oversample:``, ``power_iters:``, ``tolerance:``, ``seed:``; at most
``power_iters + 1`` passes, fewer once a pass gains less than ``tolerance`` of the residual),
within 0.05% of the optimal error at the defaults and far faster; ``method: exact`` runs a full
SVD of the whole difference. GPT-2 `Conv1D` weights (stored (in, out)) are fan_in_fan_out
modules; embeddings are PEFT embedding LoRA. 1-D tensors (norms, biases) are not extracted, nor
weights whose stored bytes are equal in both models (no all-zero modules); when no 2-D weight
differs the step is refused (an empty adapter, which PEFT cannot load). Saved whole as
``modules_to_save`` instead of LoRA: a tied embedding table that differs, under both the table
and its head (PEFT applies an embedding LoRA to the lookup only, not to the tied head), and the
classifier heads PEFT's task models wrap by themselves (`SAVED_BY_TASK`). adapter_config.json
names the base (`base_model_reference`) and the task type, so `AutoPeftModelForCausalLM` loads
the output alone. Oracle: tests/steps/test_extract_lora.py (full rank reproduces the
difference; at lower rank the exact method errs by exactly the discarded singular values, the
randomized one by at most 0.05% more; PEFT loads the output, unmerged and merged, for tied
and classifier models too) and tests/ops/test_lowrank.py.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from recipekit.arch import family_names, load_architectures
from recipekit.dtypes import is_floating
from recipekit.errors import RecipeError, RecipeErrors
from recipekit.graph import (
    Difference,
    Load,
    Node,
    PackedFactor,
    RangeFinderFactors,
    SvdFactor,
    VirtualModel,
    intern,
)
from recipekit.graph.adapterset import AdapterSet, LoraTarget, LoraTerm, Replacement
from recipekit.graph.lora import F32, F64
from recipekit.io.header import quote_name
from recipekit.io.reader import is_same_data
from recipekit.recipe import Recipe, Step
from recipekit.recipe.types import DEFAULT_REVISION
from recipekit.steps.interpolate import check_aligned
from recipekit.steps.registry import Op
from recipekit.steps.tied import tied_heads

log = logging.getLogger(__name__)


def build_extract_lora(step: Step, models: Mapping[str, VirtualModel | AdapterSet],
                       recipe: Recipe) -> AdapterSet:
    """Build the `extract_lora` step's adapter set (see the module docstring).

    Raises:
        RecipeErrors: base/tuned is an adapter set, or their tensors or shapes differ.
    """
    names = [step.spec["base"], step.spec["tuned"]]
    errors = check_aligned(  # type: ignore[arg-type]
        step, names, models, recipe, key="tuned", vocabulary_hint="a LoRA adapter cannot "
        "change the vocabulary size; extract from a tuned model with the base's vocabulary "
        "(before its embeddings were resized)")
    if step.spec.get("method", "randomized") == "exact":
        errors += [recipe.error(step.key_path + (key,), f"`{key}` is a parameter of method "
                                "randomized; method exact runs a full SVD", key=True)
                   for key in ("oversample", "power_iters", "tolerance", "seed")
                   if key in step.spec]
    if errors:
        raise RecipeErrors(errors)
    base, tuned = models[names[0]], models[names[1]]
    assert isinstance(base, VirtualModel) and isinstance(tuned, VirtualModel)
    rank = int(step.spec["rank"])
    epsilon = float(step.spec.get("sv_epsilon", 0.0))
    arch = load_architectures().get(base.stack.family or "")
    fifo = arch.fan_in_fan_out if arch else ()  # the family data says which are Conv1D
    embeddings = family_names(base.stack.family, "embeddings")
    task = task_type(base.config)
    # modules PEFT wraps whole for the task (its classifier head) and tied LM heads: both
    # are saved as modules_to_save with the tuned tensors, not as LoRA modules
    saved_names = SAVED_BY_TASK.get(task or "", ())
    tied = tied_heads(base) if task in ("CAUSAL_LM", None) else {}
    targets: dict[str, LoraTarget] = {}
    replacements: dict[str, Replacement] = {}
    saved_modules: dict[str, None] = {}  # ordered set
    unchanged: list[str] = []
    changed_saved: list[str] = []  # 2-D weights that differ and are saved whole
    for name, b in base.tensors.items():
        t = tuned.tensors[name]
        module = saved_module(name, saved_names)
        if module is not None and is_floating(t.dtype):
            replacements[name] = Replacement(t, name)
            saved_modules[module] = None
            if len(b.shape) == 2 and not _is_same(models, b, t):
                changed_saved.append(name)
            continue
        if len(b.shape) != 2 or not name.endswith(".weight") or not (
                is_floating(b.dtype) and is_floating(t.dtype)):
            continue
        if name in tied:
            continue  # a stored head that is the embedding table: saved with it, below
        if _is_same(models, b, t):
            unchanged.append(name)
            continue
        if name in tied.values():
            changed_saved.append(name)
            continue
        embedding = name.endswith(embeddings)
        transposed = embedding or name.endswith(fifo)
        a, bf = _factors(step, name, b, t, transposed, min(rank, *b.shape), epsilon)
        targets[name] = LoraTarget("embedding" if embedding else "linear", tuple(b.shape),
                                   transposed, (LoraTerm(a, bf, 1.0),))
    for head, table in tied.items():
        if table in changed_saved or (head in base.tensors
                                      and not _is_same(models, base.tensors[head],
                                                       tuned.tensors[head])):
            # PEFT applies an embedding LoRA to the lookup only, not to the tied head; the
            # tuned table saved as both modules is right unmerged and merged (mergekit's way)
            replacements[table] = Replacement(tuned.tensors[table], table)
            replacements[head] = Replacement(tuned.tensors[table], head)
            saved_modules.update({table.rsplit(".", 1)[0]: None, head.rsplit(".", 1)[0]: None})
            log.info("step '%s': the embedding table `%s` is tied to `%s`: both are saved "
                     "whole (modules_to_save), which PEFT applies to both, unmerged and merged",
                     step.name, table, head)
    if not targets and not changed_saved:
        raise RecipeErrors([_nothing_differs(step, recipe, models, (base, tuned), names,
                                             set(unchanged))])
    if unchanged:
        log.warning("step '%s': %d weight(s) are equal in '%s' and '%s' (e.g. %s), so they get "
                    "no LoRA module", step.name, len(unchanged), names[1], names[0],
                    quote_name(unchanged[0]))
    config = {"peft_type": "LORA", "fan_in_fan_out": bool(fifo), "use_rslora": False,
              "use_dora": False, "bias": "none", "lora_bias": False,
              "task_type": task, **base_model_reference(recipe, names[0]),
              SAVED_MODULES: list(saved_modules)}
    return AdapterSet(step.name, targets, {}, replacements, config)


#: Modules PEFT's task model classes add to ``modules_to_save`` by themselves (peft_model.py:
#: `PeftModelForSequenceClassification` and `...ForTokenClassification` add "classifier" and
#: "score", `...ForQuestionAnswering` "qa_outputs"), matched as PEFT does: a module whose name
#: ends with one. PEFT then loads their whole weights from the adapter (a KeyError when they
#: are missing), so an extraction saves them whole, changed or not.
SAVED_BY_TASK: Mapping[str, tuple[str, ...]] = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}
#: The AdapterSet config key listing the modules an extraction saves whole (module paths):
#: `run.adapter_output` writes them as ``modules_to_save``.
SAVED_MODULES = "recipekit_modules_to_save"


def saved_module(name: str, suffixes: tuple[str, ...]) -> str | None:
    """The outermost module of tensor ``name`` whose path ends with one of ``suffixes`` (PEFT's
    `_set_trainable` match), or None."""
    parts = name.split(".")
    return next((m for i in range(1, len(parts))
                 if (m := ".".join(parts[:i])).endswith(suffixes)), None) if suffixes else None


def _is_same(models: Mapping[str, VirtualModel | AdapterSet], base: Node, tuned: Node) -> bool:
    """One node, or two stored tensors with equal bytes."""
    return base == tuned or _same_stored(models, base, tuned)


def _nothing_differs(step: Step, recipe: Recipe, models: Mapping[str, VirtualModel | AdapterSet],
                     pair: tuple[VirtualModel, VirtualModel], names: list[str],
                     unchanged: set[str]) -> RecipeError:
    """The error of an extraction in which no 2-D weight differs (``unchanged``: the weights
    already compared): the adapter would be empty, and PEFT loads none without a module."""
    base, tuned = pair
    other = [n for n, b in base.tensors.items()
             if n not in unchanged and not _is_same(models, b, tuned.tensors[n])]
    kind = "1-D tensors" if all(len(base.tensors[n].shape) == 1 for n in other) else "tensors"
    why = (f"only {kind} changed ({len(other)}, e.g. {quote_name(other[0])}), which LoRA "
           "cannot carry" if other else "every tensor is equal byte for byte")
    return recipe.error(step.key_path + ("tuned",), f"no 2-D weight differs between "
                        f"'{names[1]}' and '{names[0]}': {why}, so there is no LoRA to extract",
                        hint="check that `tuned` names the fine-tune; a fine-tune of only biases "
                        "and norms (BitFit) is not a LoRA: merge or copy it instead")


def _same_stored(models: Mapping[str, VirtualModel | AdapterSet], base: Node,
                 tuned: Node) -> bool:
    """Two stored tensors with equal bytes (a frozen weight of a fine-tune), compared in
    bounded memory (`io.reader.is_same_data`). Computed nodes are not compared: that would
    compute them at compile time, so they keep their (possibly zero) module."""
    if not (isinstance(base, Load) and isinstance(tuned, Load)):
        return False
    infos = [getattr(models.get(n.source), "stored", {}).get(n.name) for n in (base, tuned)]
    return None not in infos and is_same_data(*infos)  # type: ignore[misc]


#: PEFT's task type by the suffix of a transformers class name (config `architectures`), the
#: first that matches: what `AutoPeftModel*` and `PeftModel` use to pick the model class.
TASK_TYPES = (
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),  # GPT2LMHeadModel and kin
    ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
    ("Model", "FEATURE_EXTRACTION"),  # a bare encoder (BertModel)
)


def task_type(config: Mapping[str, Any]) -> str | None:
    """The PEFT ``task_type`` of a model with this config, or None when its class has none
    (masked LM, vision-language `ForConditionalGeneration`)."""
    arch = (config.get("architectures") or [""])[0]
    return next((task for suffix, task in TASK_TYPES if str(arch).endswith(suffix)), None)


def base_model_reference(recipe: Recipe, base: str) -> dict[str, Any]:
    """``base_model_name_or_path`` (and ``revision``) for adapter_config.json, so that PEFT
    (`AutoPeftModelForCausalLM`, `verify --load`) finds the base without being told.

    A hub input gives its repo id and, unless it is the default branch, its revision, as PEFT
    records them after training on a hub model. A local input gives its absolute path: what
    `save_pretrained` records for a model loaded from a directory, and unlike a relative path
    it does not depend on where the adapter is loaded from. A base that is a step (layers cut
    or merged) exists nowhere on disk: None, and users pass the base themselves.
    """
    ref = recipe.models.get(base)
    if ref is None:
        return {"base_model_name_or_path": None, "revision": None}
    if ref.hub is not None:
        return {"base_model_name_or_path": ref.hub,
                "revision": None if ref.revision == DEFAULT_REVISION else ref.revision}
    return {"base_model_name_or_path": os.path.abspath(ref.path) if ref.path else None,
            "revision": None, "recipekit_own_base": True}


#: Defaults of the randomized method: blocks of rank + 64 columns and 4 products by ΔΔᵀ (5
#: passes; ops/lowrank.py). Measured at rank 64 (tests/ops/test_lowrank.py, same matrices):
#: on Gaussian differences (flat spectra, the hard case) 5632×2048 errs 0.023% above the
#: Eckart–Young optimum and 2048×2048 0.014% (the subspace iteration these replace, oversample
#: 16 and 2 power iterations in 6 passes: 0.6–0.8%); a power-law spectrum reaches the optimum
#: to rounding.
OVERSAMPLE = 64
POWER_ITERS = 4
#: Stop once a pass takes less than 0.1% off the residual energy ‖Δ‖² − E (ops/lowrank.py):
#: the error then changes by < 0.05% a pass. A decaying spectrum (a fine-tune's) stops after
#: 4 passes at the 5-pass error; a Gaussian difference still gains 0.3-0.7% a pass through the
#: 4th and runs all 5 (tests/ops/test_lowrank.py).
TOLERANCE = 1e-3


def _factors(step: Step, name: str, base: Node, tuned: Node, transposed: bool, k: int,
             epsilon: float) -> tuple[Node, Node]:
    """The (A, B) factor nodes of one module, by the step's ``method``."""
    dtype = tuned.dtype
    if step.spec.get("method", "randomized") == "exact":
        delta = intern(Difference(tuned, base))
        return (intern(SvdFactor(delta, "A", k, transposed, epsilon, dtype)),
                intern(SvdFactor(delta, "B", k, transposed, epsilon, dtype)))
    work = F64 if F64 in (base.dtype, tuned.dtype) else F32
    packed = intern(RangeFinderFactors(
        tuned, base, k, transposed, epsilon, int(step.spec.get("oversample", OVERSAMPLE)),
        int(step.spec.get("power_iters", POWER_ITERS)), int(step.spec.get("seed", 0)), name,
        work, float(step.spec.get("tolerance", TOLERANCE))))
    in_dim = base.shape[0] if transposed else base.shape[1]
    return (intern(PackedFactor(packed, "A", in_dim, dtype)),
            intern(PackedFactor(packed, "B", in_dim, dtype)))


#: this module's ops (listed once in `recipekit.steps`)
OPS = (
    Op("extract_lora", build_extract_lora, "extract_lora_step"),
)
