"""The `head` op: turn a causal-LM (or base) model into a sequence-classification checkpoint.

The LLM-classification workflow (Gemma2, Llama, Mistral fine-tuned with last-token pooling and a
linear ``score``) starts from a checkpoint that ``AutoModelForSequenceClassification`` loads
without re-initializing anything behind the user's back. This op writes one: every task head
of the family (an untied ``lm_head``, an old ``score``) is dropped, the family's classifier
weight (``score.weight``, ``[num_labels, hidden]``, no bias, as transformers'
``*ForSequenceClassification``) is added, and config.json says ``architectures``,
``num_labels``, ``id2label``/``label2id``, ``problem_type`` and ``pad_token_id``.

The score weight starts as ``N(0, initializer_range²)`` (transformers' ``_init_weights`` for a
Linear; seeded by (``seed``, ``score.weight``), drawn chunk-wise), zeros, or a bit-exact copy of
another model's score weight (``init: {from: m}``). ``pad_token_id``: the step's, else the
model's, else its ``eos_token_id`` (the usual ``tokenizer.pad_token = tokenizer.eos_token``),
because last-token pooling of a batch needs one. A bare base-model layout (``layers.0...``) is
renamed to the family's ``model.`` layout. Oracle: tests/steps/test_head.py loads the output with
``AutoModelForSequenceClassification`` and recomputes the logits from the last non-pad token's
hidden state and the score weight.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from typing import Any

from recipekit.arch import (
    ConfigKey,
    LayerStack,
    config_get,
    config_has,
    load_architectures,
    with_config,
    without_config_keys,
)
from recipekit.dtypes import is_floating
from recipekit.errors import RecipeError, RecipeErrors, ShapeMismatchError
from recipekit.graph import Node, VirtualModel, intern
from recipekit.recipe import Recipe, Step
from recipekit.steps.registry import Op
from recipekit.steps.reinit import Fill, Normal, family_of, initializer_range

log = logging.getLogger(__name__)


def _int(value: Any) -> int | None:
    if isinstance(value, list) and value:
        value = value[0]
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _model_dtype(tensors: Mapping[str, Node]) -> str:
    """The dtype most floating tensors have (the model's dtype)."""
    counts = Counter(n.dtype for n in tensors.values() if is_floating(n.dtype))
    return counts.most_common(1)[0][0] if counts else "F32"


def _labels(step: Step, recipe: Recipe, donor_head: Node | None,
            donor_config: Mapping[str, Any] | None) -> tuple[int, list[str]]:
    """(num_labels, label names) from `num_labels`, `labels` and the copied head."""
    errors = check_head(step, recipe)
    if errors:
        raise RecipeErrors(errors)
    labels = step.spec.get("labels")
    n = step.spec.get("num_labels")
    if n is None:
        n = len(labels) if labels is not None else (
            donor_head.shape[0] if donor_head is not None else None)
    assert n is not None  # check_head: labels, num_labels or a copied head
    if labels is None and donor_config is not None:
        theirs = donor_config.get("id2label")
        if isinstance(theirs, Mapping) and {str(k) for k in theirs} == {str(i) for i in range(n)}:
            by_str = {str(k): v for k, v in theirs.items()}
            labels = [str(by_str[str(i)]) for i in range(n)]
    if labels is None:
        labels = [f"LABEL_{i}" for i in range(n)]  # transformers' default names
    return n, list(labels)


def check_head(step: Step, recipe: Recipe) -> list[RecipeError]:
    """The `head` op's document check: the class count is given (``labels``, ``num_labels`` or
    a head copied with ``init: {from: m}``) and ``labels`` and ``num_labels`` agree."""
    labels = step.spec.get("labels")
    n = step.spec.get("num_labels")
    if labels is not None and n is not None and len(labels) != n:
        return [recipe.error(step.key_path + ("num_labels",),
                             f"num_labels is {n} but `labels` names {len(labels)}",
                             hint="drop num_labels: it follows from labels")]
    if labels is None and n is None and not isinstance(step.spec.get("init"), Mapping):
        return [recipe.error(step.key_path, "the head op needs the number of classes",
                             hint="add `labels: [...]` or `num_labels: N`")]
    return []


def _pad_token_id(step: Step, recipe: Recipe, config: Mapping[str, Any],
                  text: ConfigKey, vocab: int | None) -> int:
    given = step.spec.get("pad_token_id")
    pad = given if given is not None else _int(config_get(config, text + ("pad_token_id",)))
    if pad is None:
        pad = _int(config_get(config, text + ("eos_token_id",)))
        if pad is None:
            raise RecipeErrors([recipe.error(
                step.key_path, f"'{step.spec['from']}' has neither pad_token_id nor "
                "eos_token_id in config.json, and last-token pooling needs a pad token",
                hint="add `pad_token_id: <id>` (the tokenizer's pad token)")])
        log.warning("step '%s': the model has no pad_token_id; using its eos_token_id %d (set "
                    "the tokenizer's pad token to it, or give `pad_token_id:`)", step.name, pad)
    if vocab is not None and pad >= vocab:
        where = ("pad_token_id",) if given is not None else ()
        raise RecipeErrors([recipe.error(step.key_path + where, f"pad_token_id {pad} is not "
                                         f"below the vocabulary size {vocab}",
                                         hint="give the tokenizer's pad token id")])
    return pad


def build_head(step: Step, models: Mapping[str, VirtualModel], recipe: Recipe) -> VirtualModel:
    """Build the `head` step's virtual model (see the module docstring).

    Raises:
        RecipeErrors: a family without a sequence-classification head, no class count,
            counts that disagree, a copied head of the wrong shape or missing, a bad pad token.
    """
    base = models[step.spec["from"]]
    arch = family_of(base, step, recipe, "head", lambda a: a.classifier is not None)
    if arch.classifier is None:
        with_head = ", ".join(sorted(f for f, a in load_architectures().items() if a.classifier))
        raise RecipeErrors([recipe.error(
            step.key_path + ("from",), f"'{step.spec['from']}' is a {arch.family} model, which "
            "has no last-token `score` classifier in version 1", hint=f"families the head op "
            f"supports: {with_head}")])
    score_name = arch.classifier["weight"]
    text = base.stack.count_key[:-1]
    hidden = _int(config_get(base.config, text + (arch.config.get("hidden_size", ""),)))
    vocab = _int(config_get(base.config, text + (arch.config.get("vocab_size", ""),)))
    if hidden is None:
        raise RecipeErrors([recipe.error(step.key_path + ("from",), f"config.json of "
                                         f"'{step.spec['from']}' has no hidden size "
                                         f"(`{arch.config.get('hidden_size')}`)")])
    donor_head, num_labels, labels = _donor_and_labels(step, models, recipe, score_name, hidden)
    pad = _pad_token_id(step, recipe, base.config, text, vocab)

    # Tensors: drop every task head; rename a bare base-model layout to the family's own.
    heads = set(arch.weights["head"])
    prefix = arch.base_prefixes[0] if base.stack.base == "" else ""
    tensors: dict[str, Node] = {prefix + n: node for n, node in base.tensors.items()
                                if n not in heads}
    tensors[score_name] = (donor_head if donor_head is not None
                           else _new_head(step, base, (num_labels, hidden), score_name))
    stack = base.stack if not prefix else LayerStack(
        prefix + base.stack.prefix, base.stack.num_layers, base.stack.count_key,
        base.stack.per_layer_keys, base.stack.family, prefix)
    updates: dict[ConfigKey, Any] = {
        ("architectures",): [arch.classifier["architecture"]],
        ("num_labels",): num_labels,
        ("id2label",): {str(i): label for i, label in enumerate(labels)},
        ("label2id",): {label: i for i, label in enumerate(labels)},
        text + ("pad_token_id",): pad,
    }
    removed: list[ConfigKey] = []
    if "problem_type" in step.spec:
        updates[("problem_type",)] = step.spec["problem_type"]
    elif config_has(base.config, ("problem_type",)):
        removed.append(("problem_type",))  # the donor's no longer applies: transformers infers
    config = without_config_keys(with_config(base.config, updates), removed)
    return VirtualModel(step.name, config, tensors, stack, base.donor,
                        base.changed | frozenset(updates) | frozenset(removed))


def _donor_and_labels(step: Step, models: Mapping[str, VirtualModel], recipe: Recipe,
                      score_name: str, hidden: int) -> tuple[Node | None, int, list[str]]:
    """The copied head (``init: {from: m}``) if any, checked against the label count and width,
    and the labels."""
    init = step.spec.get("init", "normal")
    donor_head: Node | None = None
    donor_config: Mapping[str, Any] | None = None
    if isinstance(init, Mapping):
        other = models[init["from"]]
        donor_config = other.config
        donor_head = other.tensors.get(score_name)
        if donor_head is None:
            raise RecipeErrors([recipe.error(
                step.key_path + ("init", "from"), f"'{init['from']}' has no `{score_name}` "
                "to copy", hint="name a sequence-classification checkpoint of this family")])
    num_labels, labels = _labels(step, recipe, donor_head, donor_config)
    if donor_head is not None and donor_head.shape != (num_labels, hidden):
        path = step.key_path + ("init", "from")
        raise RecipeErrors([recipe.error(
            path, f"`{score_name}` of '{init['from']}' is {list(donor_head.shape)}, but this "
            f"head needs [{num_labels}, {hidden}] ([num_labels, hidden])",
            hint="copy a head made for the same width and number of labels",
            cls=ShapeMismatchError)])
    return donor_head, num_labels, labels


def _new_head(step: Step, base: VirtualModel, shape: tuple[int, int], score_name: str) -> Node:
    """A fresh head in the model's dtype: zeros, or seeded N(0, initializer_range²)."""
    dtype = _model_dtype(base.tensors)
    if step.spec.get("init", "normal") == "zeros":
        return intern(Fill(shape, dtype, 0.0))
    return intern(Normal(shape, dtype, initializer_range(base.config, base.stack),
                         int(step.spec.get("seed", 0)), score_name))


#: this module's ops (listed once in `recipekit.steps`)
OPS = (
    Op("head", build_head, "head_step", check=check_head),
)
