"""The `adapters` op (fold PEFT LoRA adapters into a model) and `combine_adapters` (a new
adapter set from several, reading no base weights).

`adapters`: ``from: <model>``, ``adapters: [{use: <adapter set>, weight: w}, ...]``,
``combine:``. Only the tensors an adapter touches get a new node (`LoraFold`: fp32, rounded
once to the base tensor's dtype); every other tensor stays the very `Load` node of `from`, so it
is copied byte for byte. ``weight`` multiplies each module's scaling s, as PEFT's `set_scale`
(for DoRA it enters the norm too). Per tensor, in order (reference/adapters.md §6.6): whole-tensor
replacements (modules_to_save, trained biases, saved embedding copies; weight 1 only), then the
deltas, then `lora_bias` terms.

``combine: sequential`` (default) is PEFT's multi-adapter merge in list order: a DoRA adapter
rescales the deltas before it. ``sum`` adds w_i·ΔW_i; ``ties``, ``dare_linear``, ``dare_ties``
and ``magnitude_prune`` combine the full fp32 deltas with the merge kernels
(`ops.lora.combine_deltas`: mergekit's sign/divisor convention) and refuse DoRA adapters.
``gating:`` folds the adapters as X-LoRA experts with static per-module gates
(`steps.gating`). Oracles: tests/steps/test_adapters.py against PEFT's merge_and_unload,
unmerged forward, set_scale and add_weighted_adapter; tests/steps/test_xlora.py against PEFT's
XLoraModel.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from recipekit.arch.lookup import load_architectures
from recipekit.errors import KeyPath, RecipeError, RecipeErrors, ShapeMismatchError
from recipekit.graph import (
    F32,
    DeltaCombine,
    Load,
    LoraDelta,
    LoraFold,
    Node,
    ScaledSum,
    VirtualModel,
    cast,
    intern,
)
from recipekit.graph.adapterset import (
    BASE_CONFLICT,
    AdapterSet,
    LoraTarget,
    LoraTerm,
    Replacement,
)
from recipekit.io.header import quote_name
from recipekit.io.reader import is_same_data
from recipekit.recipe import Recipe, Step
from recipekit.recipe.types import DEFAULT_REVISION
from recipekit.steps.gating import check_gating_document, resolve_gating
from recipekit.steps.registry import Op

log = logging.getLogger(__name__)

Value = VirtualModel | AdapterSet
RANDOM = ("dare_linear", "dare_ties")
PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
#: Embedding / output-head tensor names that tie_word_embeddings shares.
TIED_NAMES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "lm_head.weight")


def adapter_uses(step: Step, values: Mapping[str, Value], recipe: Recipe
                 ) -> list[tuple[AdapterSet, float, KeyPath]]:
    """The step's ``adapters:`` entries as (adapter set, weight, key path).

    Raises:
        RecipeErrors: an entry names a model instead of an adapter set.
    """
    out, errors = [], []
    for i, item in enumerate(step.spec["adapters"]):
        name, weight = (item, 1.0) if isinstance(item, str) else (
            item["use"], float(item.get("weight", 1.0)))
        path = step.key_path + ("adapters", i) + (() if isinstance(item, str) else ("use",))
        value = values[name]
        if not isinstance(value, AdapterSet):
            errors.append(recipe.error(path, f"'{name}' is a model, not an adapter set",
                                       hint="`use:` names an entry of `adapters:` or a "
                                       "combine_adapters / extract_lora step"))
            continue
        out.append((value, weight, step.key_path + ("adapters", i)))
    if errors:
        raise RecipeErrors(errors)
    return out


def check_combine(step: Step, uses: list[tuple[AdapterSet, float, KeyPath]], combine: str,
                  recipe: Recipe) -> None:
    """DoRA only folds sequentially; pruning modes need `density`, the others refuse it."""
    errors = []
    if combine != "sequential":
        for aset, _, path in uses:
            if aset.has_dora:
                errors.append(recipe.error(path, f"'{aset.name}' is a DoRA adapter, which only "
                                           "combines `sequential` (its magnitude rescales the "
                                           "whole weight)", hint="fold it with `op: adapters` "
                                           "and `combine: sequential`"))
    errors += _density_errors(step, combine, recipe)
    if errors:
        raise RecipeErrors(errors)


def check_adapters(step: Step, recipe: Recipe) -> list[RecipeError]:
    """The `adapters` op's document check: `density` against `combine`, and `gating:`
    (`steps.gating.check_gating_document`), before any adapter is read."""
    errors = _density_errors(step, step.spec.get("combine", "sequential"), recipe)
    if "gating" in step.spec:
        errors += check_gating_document(step, recipe)
        combine = step.spec.get("combine", "sequential")
        if combine not in ("sequential", "sum"):
            errors.append(_gating_combine_error(step, combine, recipe))
    return errors


def check_combine_adapters(step: Step, recipe: Recipe) -> list[RecipeError]:
    """The `combine_adapters` op's document check: `density` against `combine`."""
    return _density_errors(step, step.spec.get("combine", "sum"), recipe)


def _gating_combine_error(step: Step, combine: str, recipe: Recipe) -> RecipeError:
    return recipe.error(step.key_path + ("combine",), f"gating sums the gated deltas; "
                        f"combine: {combine} does not apply",
                        hint="leave out `combine:` (or use sequential / sum)")


def _density_errors(step: Step, combine: str, recipe: Recipe) -> list[RecipeError]:
    """Pruning modes need `density` in (0, 1]; the others refuse it."""
    errors = []
    if combine in PRUNING and "density" not in step.spec:
        errors.append(recipe.error(step.key_path, f"combine: {combine} needs `density:` (the "
                                   "fraction of each delta kept)", key=True))
    if combine not in PRUNING and "density" in step.spec:
        errors.append(recipe.error(step.key_path + ("density",), f"`density` has no effect "
                                   f"with combine: {combine}", hint="use it with ties, "
                                   "dare_linear, dare_ties or magnitude_prune", key=True))
    if "density" in step.spec and not 0 < step.spec["density"] <= 1:
        errors.append(recipe.error(step.key_path + ("density",), "density must be in (0, 1]"))
    return errors


def resolve_target(name: str, tensors: Mapping[str, Node]) -> list[str]:
    """The model tensor(s) an adapter's module name denotes: the exact name, else the one
    tensor whose name ends with it or that it ends with (an adapter trained on a bare backbone
    folded into a ``...ForCausalLM`` checkpoint, or the reverse). More than one is ambiguous."""
    if name in tensors:
        return [name]
    return [t for t in tensors if t.endswith("." + name) or name.endswith("." + t)]


def _is_tied(model: VirtualModel) -> bool:
    has_head = any(n.endswith("lm_head.weight") for n in model.tensors)
    return bool(model.config.get("tie_word_embeddings", not has_head)) and not has_head


def build_adapters(step: Step, models: Mapping[str, Value], recipe: Recipe) -> VirtualModel:
    """Build the `adapters` step's virtual model (see the module docstring).

    Raises:
        RecipeErrors: `from` is not a model, `use` not an adapter set, adapter tensors missing
            from or of another shape than `from`'s, weights ≠ 1 on replacements, conflicting
            replacements, DoRA in a non-sequential mode, tied embeddings touched.
    """
    base_name = step.spec["from"]
    base = models[base_name]
    if not isinstance(base, VirtualModel):
        raise RecipeErrors([recipe.error(step.key_path + ("from",), f"'{base_name}' is an "
                                         "adapter set; `from:` names the model to fold into")])
    uses = [(_without_base_copies(aset, base, models), weight, path)
            for aset, weight, path in adapter_uses(step, models, recipe)]
    combine = step.spec.get("combine", "sequential")
    check_combine(step, uses, combine, recipe)
    placed = _Placement(base, base_name, recipe)
    for index, (aset, weight, path) in enumerate(uses):
        placed.add(index, aset, weight, path)
    if placed.errors:
        raise RecipeErrors(placed.errors)
    if "gating" in step.spec:
        return _build_gated(step, base, uses, placed.expert_targets, recipe)
    tensors: dict[str, Node] = dict(base.tensors)
    for target, (rep, _) in placed.replaced.items():
        tensors[target] = cast(rep.node, base.tensors[target].dtype)
    for target, parts in placed.deltas.items():
        replaced = placed.replaced.get(target)
        tensors[target] = _fold(step, combine, target, parts, base,
                                replaced[0].node if replaced else None)
    return VirtualModel(step.name, base.config, tensors, base.stack, base.donor, base.changed)


def _without_base_copies(aset: AdapterSet, base: VirtualModel, models: Mapping[str, Value]
                         ) -> AdapterSet:
    """``aset`` without the saved base-layer tensors (`Replacement.base_layer`: embedding
    copies, biases of targeted modules) whose bytes are the base tensor's own.

    Why: PEFT saves the embedding (and lm_head) beside every embedding LoRA by default, so
    such an adapter "replaced" the embedding whole: it folded only at weight 1, conflicted
    with a second such adapter and was refused by X-LoRA gating, where PEFT folds it at any
    scale (found by a black-box check). A copy equal to the base changes nothing; one that
    differs (a resized vocabulary) is still a replacement. Compared at plan time in bounded
    memory (`io.reader.is_same_data`), stored tensors only.
    """
    def same(target: str, rep: Replacement) -> bool:
        names = resolve_target(target, base.tensors)
        node = base.tensors[names[0]] if len(names) == 1 else None
        if not (rep.base_layer and rep.info is not None and isinstance(node, Load)):
            return False
        info = getattr(models.get(node.source), "stored", {}).get(node.name)
        return info is not None and is_same_data(info, rep.info)

    kept = {t: r for t, r in aset.replacements.items() if not same(t, r)}
    return aset if len(kept) == len(aset.replacements) else replace(aset, replacements=kept)


def _layout_errors(uses: list[tuple[AdapterSet, float, KeyPath]], recipe: Recipe
                   ) -> list[RecipeError]:
    """Adapters whose linear modules store their weights transposed (fan_in_fan_out: GPT-2's
    `Conv1D`) and adapters whose modules do not were made for different architectures, and one
    adapter_config.json cannot describe both: combined, the output loaded on either base and
    silently skipped the other's modules (found by a black-box check)."""
    first: dict[bool, str] = {}
    errors = []
    for aset, _, path in uses:
        for transposed in sorted({t.transposed for t in aset.targets.values()
                                  if t.kind == "linear"}):
            other = first.get(not transposed)
            if other is not None and other != aset.name:
                a, b = (aset.name, other) if transposed else (other, aset.name)
                errors.append(recipe.error(path, f"'{a}' adapts fan_in_fan_out (GPT-2 "
                                           f"`Conv1D`) modules and '{b}' plain linear ones: "
                                           "their adapter_config.json files disagree on "
                                           "`fan_in_fan_out`", hint="combine adapters of one "
                                           "base model; if both adapt the same model (PEFT "
                                           "goes by its module type, and so does a fold), "
                                           "set `fan_in_fan_out` to the same value in both"))
                return errors
            first.setdefault(transposed, aset.name)
    return errors


def _same_copy(a: Replacement, b: Replacement) -> bool:
    """Two saved base-layer tensors with the same bytes (two embedding LoRAs of one resized
    model): loading either gives the same tensor, so they do not conflict."""
    return (a.base_layer and b.base_layer and a.info is not None and b.info is not None
            and is_same_data(a.info, b.info))


#: one adapter's delta on one tensor: (delta at its weight, DoRA magnitude or None, DoRA norm
#: dimension, weight, delta at weight 1)
_Part = tuple[Node, Node | None, int, float, Node]


class _Placement:
    """Where each adapter's tensors land in the `from` model, and every problem found.

    `replaced` maps a target to its whole-tensor replacement (and the adapter giving it),
    `deltas` to the adapters' updates in order, `expert_targets` to (adapter index, target,
    weight) for gating.
    """

    def __init__(self, base: VirtualModel, base_name: str, recipe: Recipe) -> None:
        self.base, self.base_name, self.recipe = base, base_name, recipe
        self.tied = _is_tied(base)
        arch = load_architectures().get(base.stack.family or "")
        #: the family's `Conv1D` weights (stored (in, out)); None for a model of no known family
        self.conv1d = arch.fan_in_fan_out if arch else None
        self.errors: list[RecipeError] = []
        self.deltas: dict[str, list[_Part]] = {}
        self.replaced: dict[str, tuple[Replacement, str]] = {}
        self.expert_targets: dict[str, list[tuple[int, LoraTarget, float]]] = {}
        self.tied_refused: set[tuple[str, str]] = set()  # (adapter, tensor) reported tied
        # (adapter, kind): the first error, its own message, how many more (`misfit`)
        self.misfits: dict[tuple[str, str], tuple[RecipeError, str, int]] = {}

    def add(self, index: int, aset: AdapterSet, weight: float, path: KeyPath) -> None:
        """Place one adapter set's updates, replacements and lora_bias terms (updates first:
        a tensor refused for a tied model is named by what the adapter was trained to do)."""
        flipped: list[tuple[str, LoraTarget]] = []
        for name, claimed in aset.targets.items():
            t = self.oriented(name, claimed)
            if t is not claimed:
                flipped.append((name, t))
            target = self.place(name, t.shape, aset, path, "updates")
            if target is not None:
                self.deltas.setdefault(target, []).append(
                    (t.delta(weight), t.magnitude, t.norm_dim, weight, t.delta(1.0)))
                self.expert_targets.setdefault(target, []).append((index, t, weight))
        if flipped:
            _warn_flipped(aset, flipped, self.base_name)
        pair = self.tied_pair(aset)
        if pair is not None and not pair[2]:
            self.errors.append(self.recipe.error(
                path, f"adapter '{aset.name}' saves {quote_name(pair[0])} and "
                f"{quote_name(pair[1])} whole with different values, but '{self.base_name}' "
                "ties its input and output embeddings", hint="folding would have to untie "
                "them; version 1 refuses instead"))
        for name, rep in aset.replacements.items():
            if pair is not None and name in pair[:2] and not (pair[2] and name == pair[0]):
                continue  # the head the tie makes of the folded table, or refused above
            target = self.place(name, rep.node.shape, aset, path, "replaces",
                                tie_kept=pair is not None and name == pair[0])
            if target is not None:
                self.replace(target, rep, aset, weight, path)
        for name, terms in aset.biases.items():
            target = self.place(name, terms[0][0].shape, aset, path, "adds lora_bias to")
            if target is not None:
                nodes = tuple(n for n, _ in terms)
                at_one = intern(ScaledSum(nodes, tuple(s for _, s in terms), F32))
                delta = intern(ScaledSum(nodes, tuple(s * weight for _, s in terms), F32))
                self.deltas.setdefault(target, []).append((delta, None, 0, weight, at_one))

    def oriented(self, name: str, t: LoraTarget) -> LoraTarget:
        """``t`` laid out as the `from` model stores the weight ``name``: transposed exactly
        when it is a GPT-2 `Conv1D` weight, whatever the adapter's ``fan_in_fan_out`` says.

        Why: PEFT decides by the wrapped module's type (`Conv1D` always transposed,
        `nn.Linear` never) and only warns when the flag disagrees, so its merge is the same
        with either flag; trusting the flag folded a square `c_proj` (or a Llama `q_proj`)
        silently wrong and refused a non-square `c_attn` as trained on other dimensions
        (found by a black-box check). A known family's data names its `Conv1D` weights; for a
        model of no known family the flag decides unless the base tensor's shape fits only the
        other layout (reference/adapters.md §2.3)."""
        if t.kind != "linear":
            return t  # embeddings are (V, D) tables in every model
        if self.conv1d is not None:
            conv1d = any(name == f or name.endswith("." + f) for f in self.conv1d)
        else:
            hits = resolve_target(name, self.base.tensors)
            stored = tuple(self.base.tensors[hits[0]].shape) if len(hits) == 1 else None
            conv1d = (not t.transposed if stored != t.shape and stored == t.shape[::-1]
                      else t.transposed)
        return t if conv1d == t.transposed else _flipped(t)

    def replace(self, target: str, rep: Replacement, aset: AdapterSet, weight: float,
                path: KeyPath) -> None:
        """Record a whole-tensor replacement. A weight scales a trained tensor's meaning, so
        those fold at weight 1 only; a saved base layer is loaded as it is at any scale
        (PEFT's `set_scale` scales the low-rank update alone)."""
        recipe = self.recipe
        if weight != 1.0 and not rep.base_copy:
            self.errors.append(recipe.error(path, f"adapter '{aset.name}' replaces "
                                            f"{quote_name(target)} whole (modules_to_save or "
                                            "a trained bias), which only folds at weight 1, "
                                            f"not {weight}"))
        elif target in self.replaced and not _same_copy(self.replaced[target][0], rep):
            self.errors.append(recipe.error(path, f"adapters '{self.replaced[target][1]}' and "
                                            f"'{aset.name}' both replace {quote_name(target)}",
                                            hint="fold them in separate steps, or drop one"))
        elif target not in self.replaced:
            self.replaced[target] = (rep, aset.name)

    def tied_pair(self, aset: AdapterSet) -> tuple[str, str, bool] | None:
        """(table, head, same) where an adapter saves a tied model's embedding table and its
        head whole, ``same`` when they hold the same bytes; None otherwise. `extract_lora` (and
        mergekit-extract-lora) saves a tied model's changed table twice so, because PEFT applies
        a saved embedding to the input lookup only: folding the table into the embedding then
        changes both, as PEFT's merge does, and the tie stays. Different ones would untie
        them."""
        if not self.tied:
            return None
        reps = aset.replacements
        tables = [n for n in reps if n.endswith(TIED_NAMES[:3]) and not reps[n].base_layer]
        heads = [n for n in reps if n.endswith("lm_head.weight")]
        if len(tables) != 1 or len(heads) != 1:
            return None
        table, head = reps[tables[0]].info, reps[heads[0]].info
        return tables[0], heads[0], (table is not None and head is not None
                                     and is_same_data(table, head))

    def place(self, name: str, shape: tuple[int, ...], aset: AdapterSet, path: KeyPath,
              what: str, *, tie_kept: bool = False) -> str | None:
        """The `from` tensor an adapter's tensor `name` lands on, or None (and an error).
        ``tie_kept``: a tied table the fold may replace (`tied_pair`)."""
        base, base_name, recipe = self.base, self.base_name, self.recipe
        hits = resolve_target(name, base.tensors)
        if not hits and self.tied and name.endswith("lm_head.weight"):
            # a tied model stores no head: an lm_head LoRA or modules_to_save trained on it
            # changes the embedding too (once "does not have `lm_head.weight`", twice)
            self.refuse_tied(name, aset, path, what)
            return None
        if len(hits) != 1:
            self.misfit(aset, "name", recipe.error(path, (
                f"adapter '{aset.name}' {what} {quote_name(name)}, which model '{base_name}' "
                "does not have" if not hits else f"adapter '{aset.name}' {what} "
                f"{quote_name(name)}, which matches several tensors of '{base_name}' "
                f"({', '.join(hits[:3])})"), hint="fold adapters into the model they were "
                "trained on (same architecture and tensor names)"))
            return None
        target = hits[0]
        if tuple(base.tensors[target].shape) != tuple(shape):
            self.misfit(aset, "shape", recipe.error(
                path, f"adapter '{aset.name}' {what} {quote_name(target)} as {list(shape)}, but "
                f"it is {list(base.tensors[target].shape)} in '{base_name}'", hint="the adapter "
                "was trained on a model of other dimensions (or vocabulary size)",
                cls=ShapeMismatchError))
            return None
        if self.tied and target.endswith(TIED_NAMES) and not tie_kept:
            self.refuse_tied(target, aset, path, what)
            return None
        return target

    def misfit(self, aset: AdapterSet, kind: str, error: RecipeError) -> None:
        """Report a tensor ``aset`` names that `from` lacks (``kind`` "name") or has in
        another shape ("shape") once per adapter and kind: the first, and how many more.
        An adapter of another model misfits on every module, and said so in a message per
        tensor (dozens of screens for one mistake)."""
        seen = self.misfits.get((aset.name, kind))
        if seen is None:
            self.misfits[(aset.name, kind)] = (error, error.message, 0)
            self.errors.append(error)
            return
        first, message, more = seen[0], seen[1], seen[2] + 1
        self.misfits[(aset.name, kind)] = (first, message, more)
        first.message = f"{message} (and {more} more tensor{'s' if more > 1 else ''} like it)"

    def refuse_tied(self, target: str, aset: AdapterSet, path: KeyPath, what: str) -> None:
        """Refuse an adapter's change to a tied embedding or head, once per tensor (an lm_head
        LoRA also carries PEFT's saved copy of the head)."""
        if (aset.name, target) in self.tied_refused:
            return
        self.tied_refused.add((aset.name, target))
        self.errors.append(self.recipe.error(
            path, f"adapter '{aset.name}' {what} {quote_name(target)}, but '{self.base_name}' "
            "ties its input and output embeddings", hint="folding would have to untie them; "
            "version 1 refuses instead"))


def _flipped(t: LoraTarget) -> LoraTarget:
    """``t`` in the other layout: the low-rank factors are the same either way (A (r, in),
    B (out, r)); a combined full delta is rebuilt from its flipped parts, so a DARE mask is
    drawn over the shape the base stores, as it would have been with the right flag."""
    full = None if t.full is None else _flipped_delta(t.full)
    return replace(t, shape=t.shape[::-1], transposed=not t.transposed, full=full)


def _flipped_delta(node: Node) -> Node:
    """A full delta (`LoraDelta`, or a `DeltaCombine` of them) built in the other layout."""
    if isinstance(node, LoraDelta):
        return intern(replace(node, transposed=not node.transposed, shape=node.shape[::-1]))
    assert isinstance(node, DeltaCombine), type(node).__name__  # `LoraTarget.full`'s makers
    return intern(replace(node, deltas=tuple(_flipped_delta(d) for d in node.deltas)))


def _warn_flipped(aset: AdapterSet, flipped: list[tuple[str, LoraTarget]], base_name: str
                  ) -> None:
    """PEFT's warning when the config's ``fan_in_fan_out`` disagrees with the module type,
    once per adapter (the first module, and how many more)."""
    name, t = flipped[0]
    kind = ("a GPT-2 `Conv1D` weight, stored (in, out)" if t.transposed
            else "a linear weight, stored (out, in)")
    more = f" (and {len(flipped) - 1} more like it)" if len(flipped) > 1 else ""
    log.warning("adapter '%s': its config sets fan_in_fan_out to %s, but %s is "
                "%s in '%s'%s; folded as PEFT applies it, with fan_in_fan_out %s",
                aset.name, str(not t.transposed).lower(), quote_name(name), kind, base_name,
                more, str(t.transposed).lower())


def _fold(step: Step, combine: str, target: str, parts: list[_Part], base: VirtualModel,
          replacement: Node | None) -> Node:
    """The folded tensor: the updates applied in order (sequential, sum) or combined first by a
    merge method, on the replacement if there is one, rounded once to the base tensor's dtype."""
    dtype = base.tensors[target].dtype
    w0 = replacement if replacement is not None else base.tensors[target]
    if combine in ("sequential", "sum"):
        fold = LoraFold(w0, tuple(p[0] for p in parts), tuple(p[1] for p in parts),
                        tuple(p[2] for p in parts), dtype)
    else:
        seed = int(step.spec.get("seed", 0))
        combined = intern(DeltaCombine(
            combine, tuple(p[4] for p in parts), tuple(p[3] for p in parts),
            float(step.spec["density"]), seed, target if combine in RANDOM else "", 1.0))
        fold = LoraFold(w0, (combined,), (None,), (0,), dtype)
    return intern(fold)


def check_gating(step: Step, uses: list[tuple[AdapterSet, float, KeyPath]], recipe: Recipe
                 ) -> None:
    """What X-LoRA's forward cannot express, refused: DoRA experts (PEFT raises), whole-tensor
    replacements and `lora_bias` (not gated per token), pruning combinations."""
    errors = []
    combine = step.spec.get("combine", "sequential")
    if combine not in ("sequential", "sum"):
        errors.append(_gating_combine_error(step, combine, recipe))
    def plain(part: str) -> str:
        return (f"X-LoRA gates each expert's low-rank update B·A, and {part} is not part of "
                "it: fold this adapter in an `op: adapters` step without `gating:`")

    for aset, _, path in uses:
        # each refusal gives its own reason (a modules_to_save expert was told about DoRA:
        # a black-box finding)
        what, hint = (("is a DoRA adapter", "X-LoRA gates plain LoRA experts (PEFT's "
                       "XLoraModel refuses DoRA)") if aset.has_dora else
                      ("replaces tensors whole (modules_to_save, trained biases, a saved base "
                       "layer unlike the model's)", plain("a tensor saved whole"))
                      if aset.replacements else
                      ("has lora_bias terms", plain("a lora_bias term")) if aset.biases
                      else (None, None))
        if what:
            errors.append(recipe.error(path, f"'{aset.name}' {what}, which X-LoRA gating "
                                       "cannot fold", hint=hint))
    if errors:
        raise RecipeErrors(errors)


def _build_gated(step: Step, base: VirtualModel, uses: list[tuple[AdapterSet, float, KeyPath]],
                 expert_targets: Mapping[str, list[tuple[int, LoraTarget, float]]],
                 recipe: Recipe) -> VirtualModel:
    """W_l' = W_l + Σ_i g[l, i]·w_i·s_i B_i A_i, one fp32 `LoraFold` per wrapped module (the
    gates include global_scaling_weight; zero gates add nothing; see `steps.gating`)."""
    check_gating(step, uses, recipe)
    gating = resolve_gating(step, recipe, base, list(expert_targets),
                            [aset.name for aset, _, _ in uses])
    table = dict(zip(gating.modules, gating.gates, strict=True))
    tensors: dict[str, Node] = dict(base.tensors)
    for target, experts in expert_targets.items():
        parts = [t.delta(w * g) for i, t, w in experts if (g := table[target][i]) != 0]
        if parts:
            tensors[target] = intern(LoraFold(base.tensors[target], tuple(parts),
                                              (None,) * len(parts), (0,) * len(parts),
                                              base.tensors[target].dtype))
    return VirtualModel(step.name, base.config, tensors, base.stack, base.donor, base.changed,
                        gating.meta)


def build_combine_adapters(step: Step, models: Mapping[str, Value], recipe: Recipe
                           ) -> AdapterSet:
    """Build the `combine_adapters` step's adapter set: ``sum`` keeps the low-rank terms
    (w_i·s_i·B_i A_i, exact), the pruning modes hold one combined full delta per tensor.

    Raises:
        RecipeErrors: a `use` that is a model, DoRA adapters, modules of one name but different
            shapes, replacements at weight ≠ 1 or in two adapters.
    """
    uses = adapter_uses(step, models, recipe)
    combine = step.spec.get("combine", "sum")
    check_combine(step, uses, combine, recipe)
    errors: list[RecipeError] = _layout_errors(uses, recipe)  # (DoRA: check_combine)
    grouped: dict[str, list[tuple[LoraTarget, float]]] = {}
    biases: dict[str, tuple[tuple[Node, float], ...]] = {}
    replacements: dict[str, Replacement] = {}
    owner: dict[str, str] = {}
    for aset, weight, path in uses:
        for name, t in aset.targets.items():
            first = grouped.get(name, [(t, 0.0)])[0][0]
            if (first.kind, first.shape, first.transposed) != (t.kind, t.shape, t.transposed):
                errors.append(recipe.error(path, f"'{aset.name}' updates {quote_name(name)} as "
                                           f"{t.kind} {list(t.shape)}, another adapter as "
                                           f"{first.kind} {list(first.shape)}",
                                           hint="combine adapters of one base model"))
                continue
            grouped.setdefault(name, []).append((t, weight))
        for name, terms in aset.biases.items():
            biases[name] = biases.get(name, ()) + tuple((n, s * weight) for n, s in terms)
        for name, rep in aset.replacements.items():
            if weight != 1.0 and not rep.base_copy:  # as `_Placement.replace`
                errors.append(recipe.error(path, f"adapter '{aset.name}' replaces "
                                           f"{quote_name(name)} whole, which only combines at "
                                           f"weight 1, not {weight}"))
            elif name in replacements and not _same_copy(replacements[name], rep):
                errors.append(recipe.error(path, f"adapters '{owner[name]}' and '{aset.name}' "
                                           f"both replace {quote_name(name)}"))
            elif name not in replacements:
                replacements[name], owner[name] = rep, aset.name
    if errors:
        raise RecipeErrors(errors)
    targets = {name: _combined_target(step, combine, name, items)
               for name, items in grouped.items()}
    return AdapterSet(step.name, targets, biases, replacements, _combined_config(uses))


def _combined_config(uses: list[tuple[AdapterSet, float, KeyPath]]) -> dict[str, Any]:
    """The first input's config, naming the base model (and revision) that every input names,
    or none where they differ.

    Why: the first input's base was written whatever the others named, so a combination of
    adapters of two bases claimed to adapt the first one's."""
    config = dict(uses[0][0].config)
    bases = {aset.name: _base_of(aset.config) for aset, _, _ in uses}
    conflict = [aset.config[BASE_CONFLICT] for aset, _, _ in uses
                if aset.config.get(BASE_CONFLICT)]
    if len(set(bases.values())) > 1 or conflict:
        described = ", ".join(f"'{name}': {_describe_base(base)}" for name, base in
                              bases.items())
        config.update(base_model_name_or_path=None, revision=None, recipekit_own_base=False)
        config[BASE_CONFLICT] = conflict[0] if conflict else described
    else:
        # an extraction names its own local base (`extract_lora`); inputs that agree with it
        # name the same directory
        config["recipekit_own_base"] = any(a.config.get("recipekit_own_base") for a, _, _ in uses)
    return config


def _base_of(config: Mapping[str, Any]) -> tuple[Any, Any]:
    """(base_model_name_or_path, revision) as compared: PEFT writes no revision for `main`."""
    revision = config.get("revision")
    return (config.get("base_model_name_or_path"),
            None if revision == DEFAULT_REVISION else revision)


def _describe_base(base: tuple[Any, Any]) -> str:
    name, revision = base
    if name is None:
        return "none"
    return repr(name) + (f" at revision {revision!r}" if revision is not None else "")


def _combined_target(step: Step, combine: str, name: str,
                     items: list[tuple[LoraTarget, float]]) -> LoraTarget:
    """One module of the combined set: ``sum`` of low-rank sets keeps the terms (exact); a sum
    with a pruned set, and the pruning modes, hold one combined full delta."""
    first = items[0][0]
    if combine == "sum":
        if any(t.full is not None for t, _ in items):  # a pruned set: no longer low rank
            full = intern(DeltaCombine("sum", tuple(t.delta(1.0) for t, _ in items),
                                       tuple(w for _, w in items), 1.0, 0, "", 1.0))
            return LoraTarget(first.kind, first.shape, first.transposed, (), full)
        terms = tuple(LoraTerm(term.a, term.b, term.scale * w)
                      for t, w in items for term in t.terms)
        return LoraTarget(first.kind, first.shape, first.transposed, terms)
    full = intern(DeltaCombine(combine, tuple(t.delta(1.0) for t, _ in items),
                               tuple(w for _, w in items), float(step.spec["density"]),
                               int(step.spec.get("seed", 0)), name if combine in RANDOM else "",
                               1.0))
    return LoraTarget(first.kind, first.shape, first.transposed, (), full)


#: this module's ops (listed once in `recipekit.steps`)
OPS = (
    Op("adapters", build_adapters, "adapters_step", models_only=False, check=check_adapters),
    Op("combine_adapters", build_combine_adapters, "combine_adapters_step",
       check=check_combine_adapters),
)
