"""The `interpolate` op: ``(1 − α)·A + α·B`` tensor by tensor, with α per tensor.

The interpolation step of the multi-level training V-cycle, and the plainest model merge. Defined
as torch's fp32 ``lerp`` rounded once to the output dtype; α = 0 and α = 1 are copies of A and B
(bit-exact when the dtypes agree). α is a numeric parameter (number, gradient or rules; see
params.py). Integer tensors pass through from A. Oracle: tests/steps/test_interpolate.py compares
with ``torch.lerp`` on the loaded tensors and checks the endpoints bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from recipekit.arch import family_names
from recipekit.dtypes import is_floating, promote, torch_dtype
from recipekit.errors import RecipeError, RecipeErrors, ShapeMismatchError
from recipekit.graph import Node, SameShape, VirtualModel, cast, fp32_copies, intern
from recipekit.recipe import Recipe, Step
from recipekit.recipe.params import ParamError, resolve, warn_unmatched_rules
from recipekit.steps.registry import Op
from recipekit.steps.tied import untied_config, with_stand_in_heads


@dataclass(frozen=True, eq=False)
class Lerp(SameShape):
    """``a + t·(b − a)`` computed in fp32 and rounded once to ``dtype`` (the `interpolate` op)."""

    rounds_once: ClassVar[bool] = True

    a: Node
    b: Node
    t: float
    dtype: str

    @property
    def shape_input(self) -> Node:
        """The input whose shape this node has."""
        return self.a

    @property
    def workspace(self) -> int:
        return fp32_copies(self.inputs) + 4 * self.numel  # fp32 copies and the fp32 result

    @property
    def elementwise(self) -> bool:
        return True

    def compute(self, args: tuple[Any, ...]) -> Any:
        from recipekit.ops.merge import lerp

        return lerp(args[0], args[1], t=self.t).to(torch_dtype(self.dtype))


#: How a step that takes `tokenizer:` aligns inputs whose vocabulary sizes differ.
ALIGN_VOCABULARIES = ("add `tokenizer: union` (or `base`, or a model's name) to the step to "
                      "align the vocabularies")


def check_aligned(step: Step, names: list[str], models: Mapping[str, VirtualModel],
                  recipe: Recipe, *, key: str = "from",
                  vocabulary_hint: str = ALIGN_VOCABULARIES) -> list[RecipeError]:
    """Inputs must have the same tensors with the same shapes (e.g. the same vocab size).
    ``key``: the step's key that names the inputs (located there); ``vocabulary_hint``: the
    fix for differing vocabulary sizes (`extract_lora` takes no `tokenizer:`)."""
    errors: list[RecipeError] = []
    first = models[names[0]]
    vocabulary = family_names(first.stack.family, "vocabulary_tensors")
    for other_name in names[1:]:
        other = models[other_name]
        missing = [n for n in first.tensors if n not in other.tensors]
        extra = [n for n in other.tensors if n not in first.tensors]
        if missing or extra:
            errors.append(_unaligned(step, recipe, names[0], first, other_name, other,
                                     missing, extra, key))
            continue
        for n, node in first.tensors.items():
            theirs = other.tensors[n]
            if node.shape != theirs.shape:
                vocab = " (the vocabulary sizes differ)" if n.endswith(vocabulary) else ""
                errors.append(recipe.error(
                    step.key_path + (key,), f"`{n}` is {list(node.shape)} in '{names[0]}' "
                    f"but {list(theirs.shape)} in '{other_name}'{vocab}",
                    hint=vocabulary_hint if vocab else "inputs must have the same shapes",
                    cls=ShapeMismatchError))
                break
    return errors


def _unaligned(step: Step, recipe: Recipe, name: str, model: VirtualModel, other_name: str,
               other: VirtualModel, missing: list[str], extra: list[str],
               key: str) -> RecipeError:
    """The error of two inputs whose tensor names differ. Why the depths first: a model and
    its own up-scaled (or pruned) copy share the architecture, and the first tensor one lacks
    (`model.layers.8.…`) says less than "12 layers against 8" and how to match them."""
    where = step.key_path + (key,)
    depth, theirs = model.stack.num_layers, other.stack.num_layers
    if depth != theirs and model.stack.family == other.stack.family:
        deeper, count = (name, theirs) if depth > theirs else (other_name, depth)
        return recipe.error(
            where, f"the inputs have different numbers of layers: '{name}' has {depth} and "
            f"'{other_name}' has {theirs}",
            hint=f"combine models of the same depth: e.g. keep {count} of the layers of "
            f"'{deeper}' with an `op: layers` step first (layers: [\"range(0,{count})\"]) and "
            "name that step here instead")
    what = (f"`{missing[0]}` is in '{name}' but not in '{other_name}'" if missing
            else f"`{extra[0]}` is in '{other_name}' but not in '{name}'")
    return recipe.error(where, f"the inputs do not have the same tensors: {what}",
                        hint="combine models of the same architecture")


def build_interpolate(step: Step, models: Mapping[str, VirtualModel],
                      recipe: Recipe) -> VirtualModel:
    """Build the `interpolate` step's virtual model (see the module docstring).

    Raises:
        RecipeErrors: inputs whose tensors or shapes differ, rules that miss a tensor.
    """
    names = list(step.spec["from"])
    total, files, ids = None, {}, {}
    stand_ins = with_stand_in_heads(step.name, names, models)  # a tied model's head
    models = {**models, **stand_ins}
    if "tokenizer" in step.spec:  # permute the vocabulary tables first (steps/vocab.py)
        from recipekit.steps.vocab import align_inputs

        aligned, total, files, ids = align_inputs(step, names, models, recipe, names[0])
        models = {**models, **aligned}
    errors = check_aligned(step, names, models, recipe)
    if errors:
        raise RecipeErrors(errors)
    a, b = models[names[0]], models[names[1]]
    tensors: dict[str, Node] = {}
    blended: list[str] = []  # the tensors α is resolved for
    for name, na in a.tensors.items():
        nb = b.tensors[name]
        if not (is_floating(na.dtype) and is_floating(nb.dtype)):
            tensors[name] = na  # integer buffers pass through from A (the donor)
            continue
        blended.append(name)
        try:
            alpha = resolve(step.spec["alpha"], name, a.stack)
        except ParamError as e:
            raise RecipeErrors([recipe.error(step.key_path + ("alpha",), str(e))]) from None
        dtype = promote([na.dtype, nb.dtype])
        if alpha == 0.0:
            tensors[name] = cast(na, dtype)
        elif alpha == 1.0:
            tensors[name] = cast(nb, dtype)
        else:
            tensors[name] = intern(Lerp(na, nb, alpha, dtype))
    warn_unmatched_rules(recipe, step.name, step.key_path + ("alpha",), step.spec["alpha"],
                         blended)
    config, changed = a.config, a.changed
    if total is not None:
        from recipekit.steps.vocab import vocab_config

        config, changed = vocab_config(a, total, ids)
    if stand_ins:  # the interpolated head is stored: not the embedding table
        config, changed = untied_config(config, changed, a.stack.family, tensors)
    return VirtualModel(step.name, config, tensors, a.stack, a.donor, changed, files=files)


def check_interpolate(step: Step, recipe: Recipe) -> list[RecipeError]:
    """The document check: a `tokenizer:` naming only the step's two models."""
    from recipekit.steps.vocab import check_tokenizer

    names = list(step.spec["from"])
    return check_tokenizer(step, recipe, names, names[0] if names else None)


#: this module's ops (listed once in `recipekit.steps`)
OPS = (
    Op("interpolate", build_interpolate, "interpolate_step", check=check_interpolate),
)
