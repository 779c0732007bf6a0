"""Tied and untied LM heads in the steps that combine models (`merge`, `interpolate`).

Why: a base with tied embeddings (``tie_word_embeddings: true``, no ``lm_head.weight`` stored)
and its fine-tune with an untied head (``lm_head.weight`` stored) have the same architecture
but not the same tensors. mergekit 0.1.5 merges them: a model without the head loads its
embedding table in its place (``tied_names``, io/tasks.py; reference/tokenizers.md §3.3),
permuted like its embeddings when vocabularies are aligned, and the merged head is written.
recipekit does the same for the heads a family's ``tied`` map names (arch/*.json:
``lm_head.weight`` → ``embed_tokens.weight``, GPT-2's → ``wte.weight``, BERT's decoder) and,
unlike mergekit (which keeps the donor's ``tie_word_embeddings``), writes
``tie_word_embeddings: false``: the stored head is not the embedding table, and a loader that
ties would drop it.

Oracle: tests/steps/test_tied.py (mergekit 0.1.5 on tied + untied picollamas, with and
without `tokenizer:`; transformers forward passes against a hand merge whose tied model's head
is its embedding table).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from recipekit.arch import config_get, load_architectures, with_config
from recipekit.graph import VirtualModel

log = logging.getLogger(__name__)


def _is_tied(vm: VirtualModel, tie_key: str | None) -> bool:
    """Whether ``vm``'s head is its embedding table: `tie_word_embeddings` true, or not written
    (a head that is not stored then is the table, as `steps.coalesce` reads it)."""
    tie = config_get(vm.config, (tie_key,)) if tie_key else None
    return True if tie is None else bool(tie)


def with_stand_in_heads(step_name: str, names: Sequence[str],
                        models: Mapping[str, VirtualModel]) -> dict[str, VirtualModel]:
    """The inputs that lack a tied head another input stores, each with its embedding table
    standing in for that head (mergekit's ``tied_names``); empty when no input needs one.

    An input whose config says ``tie_word_embeddings: false`` and that stores no head, or whose
    embedding table is missing, gets no stand-in: the step then refuses the differing tensors
    (`check_aligned`).
    """
    first = models[names[0]]
    arch = load_architectures().get(first.stack.family or "")
    if arch is None:
        return {}
    tie_key = arch.config.get("tie_word_embeddings")
    out: dict[str, VirtualModel] = {}
    for head, table in arch.tied.items():
        if not any(head in models[m].tensors for m in names):
            continue  # every input is tied: no head is written, as mergekit
        for m in names:
            vm = out.get(m, models[m])
            source = vm.stack.base + table
            if head in vm.tensors or source not in vm.tensors or not _is_tied(vm, tie_key):
                continue
            log.info("step '%s': '%s' has tied embeddings: its `%s` stands in for `%s` "
                     "(as in mergekit); the output stores the merged head untied",
                     step_name, m, source, head)
            out[m] = dataclasses.replace(vm, tensors={**vm.tensors, head: vm.tensors[source]})
    return out


def untied_config(config: Mapping[str, Any], changed: frozenset[Any], family: str | None,
                  tensors: Mapping[str, Any]) -> tuple[Mapping[str, Any], frozenset[Any]]:
    """A step's config and changed keys, with ``tie_word_embeddings: false`` when ``tensors``
    (the step's output) store a head of the family's ``tied`` map: a stand-in was merged into
    it, so it is not the embedding table."""
    arch = load_architectures().get(family or "")
    tie_key = arch.config.get("tie_word_embeddings") if arch else None
    if arch is None or tie_key is None or not any(h in tensors for h in arch.tied):
        return config, changed
    key = (tie_key,)
    return with_config(config, {key: False}), changed | {key}


def tied_heads(vm: VirtualModel) -> dict[str, str]:
    """``vm``'s heads that are its embedding table, by full name: {head: table}.

    A head of the family's ``tied`` map is tied when ``tie_word_embeddings`` is true, or not
    written and the head is not stored (as `with_stand_in_heads` reads it); the table must be
    stored. A head stored beside a true flag is still the table once transformers ties them."""
    arch = load_architectures().get(vm.stack.family or "")
    if arch is None:
        return {}
    tie_key = arch.config.get("tie_word_embeddings")
    tie = config_get(vm.config, (tie_key,)) if tie_key else None
    out: dict[str, str] = {}
    for head, table in arch.tied.items():
        source = vm.stack.base + table
        if source in vm.tensors and (bool(tie) if tie is not None else head not in vm.tensors):
            out[head] = source
    return out
