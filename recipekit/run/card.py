"""The model card (`README.md`) an output carries: Hub metadata in its front matter, then what
was built, from which inputs, and the recipe verbatim.

Why its own module: the front matter is what the Hub indexes (search by base model, tag,
pipeline), so it must say what this recipe did, not the same words for every output. The rules,
checked in tests/run/test_card.py with huggingface_hub's card parser (`ModelCard`,
`metadata_load`) as the oracle:

* ``base_model`` lists Hub repo ids only (a local directory has no id the Hub can link; it is
  named in the body, as the recipe wrote it), and only inputs the output actually read;
* ``tags`` say what the recipe did: ``merge`` (merge, interpolate), ``upscale`` (a layer stack
  that repeats layers), ``frankenmerge`` (layers from several models), ``layer-pruning``,
  ``lora`` (adapters folded, combined or extracted), ``classifier`` (a new head), ``coalesce``;
* ``pipeline_tag`` follows the output's architecture, and a classifier's labels are listed;
* ``library_name`` is ``transformers``, or ``peft`` for an adapter output.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from recipekit import __version__
from recipekit.io.urls import local_path_text
from recipekit.plan import Plan
from recipekit.recipe import Recipe, parse_layer_range, step_references
from recipekit.run.manifest import HUB_ID

log = logging.getLogger(__name__)

#: Architecture name suffix -> the Hub's pipeline tag.
PIPELINES = (
    ("ForCausalLM", "text-generation"),
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForMaskedLM", "fill-mask"),
    ("ForImageClassification", "image-classification"),
)
#: PEFT task types -> the Hub's pipeline tag, for adapter outputs.
PEFT_PIPELINES = {"CAUSAL_LM": "text-generation", "SEQ_CLS": "text-classification",
                  "TOKEN_CLS": "token-classification", "QUESTION_ANS": "question-answering",
                  "FEATURE_EXTRACTION": "feature-extraction"}
#: Op -> the tag it earns (ops not listed add none; `layers` is judged by what it selects).
OP_TAGS = {"merge": "merge", "interpolate": "merge", "adapters": "lora",
           "combine_adapters": "lora", "extract_lora": "lora", "head": "classifier",
           "coalesce": "coalesce", "decoalesce": "coalesce"}


def used_steps(recipe: Recipe) -> list[str]:
    """The steps the output model depends on, in recipe order (a step no path reaches from
    the output leaves no trace in it)."""
    wanted, todo = set(), [recipe.output.model]
    while todo:
        name = todo.pop()
        if name in wanted or name not in recipe.steps:
            continue
        wanted.add(name)
        todo += [ref for ref, _ in step_references(recipe.steps[name].spec)]
    return [name for name in recipe.steps if name in wanted]


def used_inputs(plan: Plan) -> list[str]:
    """Model and adapter inputs the output was built from: every input a tensor was read from,
    and the donor of config.json and the other files; in recipe order."""
    used = {n.source for n in plan.loads()}
    if plan.donor is not None:
        used.add(plan.donor.name)
    return [n for n in [*plan.recipe.models, *plan.recipe.adapters] if n in used]


def _layer_picks(spec: dict[str, Any]) -> Iterator[tuple[str, int]]:
    """(source, layer index) for each layer a `layers` step selects, in order."""
    default = spec.get("from")
    for entry in spec.get("layers", []):
        source, items = default, [entry]
        if isinstance(entry, dict):
            source = entry.get("from", default)
            items = ([f"range({entry['range'][0]},{entry['range'][1]})"] if "range" in entry
                     else list(entry.get("layers", [])))
        for item in items:
            picks = parse_layer_range(item) if isinstance(item, str) else [item]
            yield from ((str(source), int(i)) for i in picks)


def _layers_tag(spec: dict[str, Any], plan: Plan) -> str | None:
    picks = list(_layer_picks(spec))
    if len({s for s, _ in picks}) > 1:
        return "frankenmerge"
    if len(set(picks)) < len(picks):
        return "upscale"  # layers repeated: depth up-scaling (SOLAR)
    source = plan.sources.get(str(spec.get("from")))
    stack = getattr(source, "stack", None)
    if stack is not None and len(picks) < stack.num_layers:
        return "layer-pruning"
    return None


def card_tags(plan: Plan) -> list[str]:
    """``recipekit``, then one tag per kind of work the output's steps did, in first-use
    order."""
    tags = ["recipekit"]
    for name in used_steps(plan.recipe):
        step = plan.recipe.steps[name]
        tag = (_layers_tag(dict(step.spec), plan) if step.op == "layers"
               else OP_TAGS.get(step.op))
        if tag is not None and tag not in tags:
            tags.append(tag)
    return tags


def card_metadata(plan: Plan) -> dict[str, Any]:
    """The front matter, as data: ``library_name``, ``base_model`` (Hub ids of the inputs the
    output used; for an adapter, its base when that is a Hub id), ``tags``, ``pipeline_tag``."""
    r = plan.recipe
    used = used_inputs(plan)
    base = [r.models[n].hub for n in used if n in r.models and r.models[n].hub is not None]
    meta: dict[str, Any] = {"library_name": "peft" if plan.adapter else "transformers"}
    pipeline = None
    if plan.adapter:
        parent = plan.config.get("base_model_name_or_path")
        if not base and isinstance(parent, str) and HUB_ID.match(parent):
            base = [parent]
        pipeline = PEFT_PIPELINES.get(str(plan.config.get("task_type")))
    else:
        for arch in plan.config.get("architectures") or []:
            pipeline = next((tag for suffix, tag in PIPELINES if str(arch).endswith(suffix)),
                            pipeline)
    if base:
        meta["base_model"] = list(dict.fromkeys(base))
    meta["tags"] = card_tags(plan)
    if pipeline is not None:
        meta["pipeline_tag"] = pipeline
    return meta


def class_labels(plan: Plan) -> list[str]:
    """A classifier's labels in id order (``id2label``), else none."""
    id2label = plan.config.get("id2label")
    if plan.adapter or not isinstance(id2label, dict):
        return []
    try:
        return [str(id2label[k]) for k in sorted(id2label, key=int)]
    except (TypeError, ValueError):
        return []


def build_model_card(plan: Plan) -> str:
    """The output's README.md: the `card_metadata` front matter, then what was built, the
    inputs it used (Hub inputs pinned to their commit), a classifier's labels and the recipe
    verbatim."""
    r = plan.recipe
    title = r.name or r.file.stem
    lines = []
    for name in used_inputs(plan):
        ref = r.models.get(name) or r.adapters[name]
        hub = getattr(plan.sources.get(name), "hub", None)
        pinned = f" (commit `{hub.commit}`)" if hub is not None else ""
        lines.append(f"- `{name}`: {ref.written}{pinned}")
    if plan.adapter:
        about = (f"A PEFT LoRA adapter ({len(plan.model.tensors)} tensors) built with recipekit "
                 f"{__version__} from the recipe below.")
    else:
        about = (f"Built with recipekit {__version__} from the recipe below "
                 f"({plan.model.stack.num_layers} layers, config from "
                 f"`{plan.donor.name if plan.donor else '-'}`).")
    labels = class_labels(plan)
    if labels:
        about += "\n\n## Labels\n\n" + "\n".join(f"- {i}: {label}"
                                                for i, label in enumerate(labels))
    _warn_absolute_paths(r)
    front = yaml.safe_dump(card_metadata(plan), sort_keys=False, allow_unicode=True)
    text = "\n".join(r.document.lines)
    lang = "json" if r.file.suffix.lower() == ".json" else "yaml"
    return (
        f"---\n{front}---\n\n# {title}\n\n"
        + (f"{r.description}\n\n" if r.description else "")
        + f"{about}\n\n"
        f"## Inputs\n\n{chr(10).join(lines)}\n\n## Recipe\n\n```{lang}\n{text}\n```\n"
    )


def _warn_absolute_paths(recipe: Recipe) -> None:
    """The card and the manifest quote the recipe as written: say so when it names absolute
    local paths, which publishing the output would publish."""
    named = [ref.written for ref in [*recipe.models.values(), *recipe.adapters.values()]
             if ref.hub is None and ref.url is None
             and Path(local_path_text(ref.written)).expanduser().is_absolute()]
    if named:
        log.warning("the recipe names absolute local path(s) (%s); the model card and "
                    "recipekit.json quote the recipe, so publishing the output publishes them: "
                    "write paths relative to the recipe file", ", ".join(named[:3]))
