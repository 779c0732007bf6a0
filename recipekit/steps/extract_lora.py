"""The `extract_lora` op: a LoRA adapter set from a fine-tune's difference to its base.

``base:`` and ``tuned:`` name two models of one architecture; ``rank:`` the largest rank per
module; ``sv_epsilon:`` (default 0) also zeroes singular values not above it. Every 2-D
floating ``*.weight`` of a linear layer or an embedding becomes a LoRA module: ΔW = tuned − base
in fp32, truncated SVD, A = √S_k·Vh_k, B = U_k·√S_k (mergekit-extract-lora's "distribute
scale", reference/adapters.md §5.2), scaling exactly 1. GPT-2 `Conv1D` weights (stored
(in, out)) are fan_in_fan_out modules; embeddings are PEFT embedding LoRA. 1-D tensors (norms,
biases) are not extracted. Oracle: tests/steps/test_extract_lora.py (full rank reproduces the
difference; lower rank errs by exactly the discarded singular values; PEFT loads the output).
"""

from __future__ import annotations

from collections.abc import Mapping

from recipekit.arch import family_names, load_architectures
from recipekit.dtypes import is_floating
from recipekit.errors import RecipeErrors
from recipekit.graph import Difference, SvdFactor, VirtualModel, intern
from recipekit.graph.adapterset import AdapterSet, LoraTarget, LoraTerm
from recipekit.recipe import Recipe, Step
from recipekit.steps.interpolate import check_aligned
from recipekit.steps.registry import Op


def build_extract_lora(step: Step, models: Mapping[str, VirtualModel | AdapterSet],
                       recipe: Recipe) -> AdapterSet:
    """Build the `extract_lora` step's adapter set (see the module docstring).

    Raises:
        RecipeErrors: base/tuned is an adapter set, or their tensors or shapes differ.
    """
    names = [step.spec["base"], step.spec["tuned"]]
    errors = check_aligned(step, names, models, recipe)  # type: ignore[arg-type]
    if errors:
        raise RecipeErrors(errors)
    base, tuned = models[names[0]], models[names[1]]
    assert isinstance(base, VirtualModel) and isinstance(tuned, VirtualModel)
    rank = int(step.spec["rank"])
    epsilon = float(step.spec.get("sv_epsilon", 0.0))
    arch = load_architectures().get(base.stack.family or "")
    fifo = arch.fan_in_fan_out if arch else ()  # the family data says which are Conv1D
    embeddings = family_names(base.stack.family, "embeddings")
    targets: dict[str, LoraTarget] = {}
    for name, b in base.tensors.items():
        t = tuned.tensors[name]
        if len(b.shape) != 2 or not name.endswith(".weight") or not (
                is_floating(b.dtype) and is_floating(t.dtype)) or b == t:
            continue
        embedding = name.endswith(embeddings)
        transposed = embedding or name.endswith(fifo)
        k = min(rank, *b.shape)
        delta = intern(Difference(t, b))
        dtype = t.dtype
        a = intern(SvdFactor(delta, "A", k, transposed, epsilon, dtype))
        bf = intern(SvdFactor(delta, "B", k, transposed, epsilon, dtype))
        targets[name] = LoraTarget("embedding" if embedding else "linear", tuple(b.shape),
                                   transposed, (LoraTerm(a, bf, 1.0),))
    config = {"peft_type": "LORA", "fan_in_fan_out": bool(fifo), "use_rslora": False,
              "use_dora": False, "bias": "none", "lora_bias": False}
    return AdapterSet(step.name, targets, {}, {}, config)


#: this module's ops (listed once in `recipekit.steps`)
OPS = (
    Op("extract_lora", build_extract_lora, "extract_lora_step"),
)
