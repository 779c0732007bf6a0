"""The output's chat template: which one (`output_chat_template`) and the files that carry it
(`with_chat_template`).

Why here: the template is chosen when the plan is compiled (a file's problems and an unknown
name are validation errors, exit 2, before anything is written), and it changes only non-weight
files, so it is planned as bytes in `Plan.files` like every rewritten donor file.

Written the way transformers 5 reads it (`PreTrainedTokenizerBase.save_pretrained` and
`_from_pretrained`, 5.25): the template is ``chat_template.jinja``, which the loader prefers to
``tokenizer_config.json``'s ``chat_template`` key; the key is removed from whatever
``tokenizer_config.json`` the output gets (the donor's, or one an earlier planning step made),
so no stale template is left beside the new one; the donor's named templates
(``additional_chat_templates/*.jinja``, which the loader would add as a dict beside ours,
``tool_use`` winning when tools are passed) and processors' ``chat_template.json`` are not
copied. That is what mergekit 0.1.5's output holds after ``tokenizer.save_pretrained``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from recipekit.errors import RecipeErrors, UnlocatedError
from recipekit.inputs.chat_template import (
    AUTO,
    ChatTemplate,
    builtin_template,
    is_literal,
    most_common_template,
)
from recipekit.inputs.models import Checkpoint, iter_donor_files, read_donor_json
from recipekit.inputs.side_files import OUTPUT_KEY, resolve_output_file
from recipekit.io.names import (
    CHAT_TEMPLATE,
    CHAT_TEMPLATE_DIR,
    CHAT_TEMPLATE_JSON,
    TOKENIZER_CONFIG,
)
from recipekit.recipe import Recipe, step_references

log = logging.getLogger(__name__)


def output_chat_template(recipe: Recipe, sources: Mapping[str, Any]) -> ChatTemplate | None:
    """The template `output.chat_template` asks for; None when unset, or ``auto`` finds no
    template among the inputs (the donor's files are then written as they are, as mergekit
    leaves the tokenizer unchanged; a warning says so).

    Raises:
        RecipeErrors: the template file cannot be used (located at its key).
    """
    setting = recipe.output.chat_template
    if setting is None:
        return None
    if isinstance(setting, Mapping):
        found = getattr(sources, "side_files", {}).get(("", OUTPUT_KEY))
        side = found if found is not None else resolve_output_file(recipe)
        try:
            return ChatTemplate(side.value(), f"file {side.written}")  # type: ignore[union-attr]
        except UnlocatedError as e:
            raise RecipeErrors([recipe.error(("output", *OUTPUT_KEY), e.message,
                                             hint=e.hint)]) from None
    if setting == AUTO:
        names = input_models(recipe)
        chosen = most_common_template([(n, sources[n].path) for n in names if n in sources])
        if chosen is None:
            log.warning("output.chat_template is auto, but none of the input models (%s) has a "
                        "chat template: the output keeps the donor's tokenizer files as they are",
                        ", ".join(names))
        return chosen
    if is_literal(setting):
        return ChatTemplate(setting, "literal")
    text = builtin_template(setting)
    if text is None:  # the loader refused it already; a Recipe built by hand may not have
        raise RecipeErrors([recipe.error(("output", "chat_template"),
                                         f"{setting!r} is not a built-in chat template")])
    return ChatTemplate(text, f"built-in {setting}")


def input_models(recipe: Recipe) -> list[str]:
    """The `models:` the output is built from (reached from `output.model` through the steps,
    plus `output.config`), in the order `models:` lists them: ``auto``'s candidates."""
    reached: set[str] = set()
    todo = [recipe.output.model, *([recipe.output.config] if recipe.output.config else [])]
    while todo:
        name = todo.pop()
        if name in reached:
            continue
        reached.add(name)
        step = recipe.steps.get(name)
        if step is not None:
            todo += [ref for ref, _ in step_references(step.spec)]
    return [n for n in recipe.models if n in reached]


def with_chat_template(files: Mapping[str, bytes | None], donor: Checkpoint,
                       template: ChatTemplate | None) -> dict[str, bytes | None]:
    """``files`` (the plan's rewritten donor files: rel path -> bytes, None = not written)
    with the template applied over them: ``chat_template.jinja`` written, the key removed from
    the output's ``tokenizer_config.json``, the donor's other template files left out.

    A last, separate step: it reads the ``tokenizer_config.json`` already in ``files`` if an
    earlier step planned one, else the donor's.
    """
    out = dict(files)
    if template is None:
        return out
    out[CHAT_TEMPLATE] = template.text.encode("utf-8")
    donor_files = iter_donor_files(donor.path, warn=False)
    out.update(dict.fromkeys(other_template_files(donor_files)))
    if out.get(TOKENIZER_CONFIG) is not None:
        config = _json(out[TOKENIZER_CONFIG])  # type: ignore[arg-type]
    elif Path(TOKENIZER_CONFIG) in donor_files:
        config = read_donor_json(donor.path, Path(TOKENIZER_CONFIG))
    else:
        log.warning("the donor %s has no %s: the output gets %s without a tokenizer to read it",
                    donor.name, TOKENIZER_CONFIG, CHAT_TEMPLATE)
        return out
    if isinstance(config, dict) and "chat_template" in config:
        del config["chat_template"]
        out[TOKENIZER_CONFIG] = (json.dumps(config, indent=2, ensure_ascii=False)
                                 + "\n").encode("utf-8")
    return out


def other_template_files(donor_files: list[Path]) -> list[str]:
    """The donor's template files besides chat_template.jinja (named templates, a
    processor's chat_template.json): not copied beside another template or tokenizer."""
    return [rel.as_posix() for rel in donor_files if rel.as_posix() == CHAT_TEMPLATE_JSON or (
        rel.parts[0] == CHAT_TEMPLATE_DIR and rel.suffix == ".jinja")]


def _json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return None
