"""Chat templates for `output.chat_template`: the built-ins, the inputs' own, and Jinja checks.

Why: a merge of chat fine-tunes needs the chat template its users will prompt it with, and the
donor's tokenizer files carry only the donor's. The setting takes mergekit 0.1.5's values
(reference/tokenizers.md §4.3) so that imported configs mean the same:

* ``auto``: the most common template among the input models the output is built from (each
  template stripped, as mergekit compares them); a tie goes to the model listed first under
  `models:` (mergekit's goes to an unordered set's first: a deliberate difference);
* a built-in name (`builtin_names`: alpaca, chatml, exaone, llama3, mistral), our own files
  under ``builtin_chat_templates/`` written from each format's published convention;
* literal Jinja: any text holding ``{{`` or ``{%``;
* ``{file: path}``: a template file beside the recipe (read with the side files, pinned by
  `recipekit lock`).

An input's template is what transformers 5 loads as its default: ``chat_template.jinja`` when
present (it takes priority), else ``tokenizer_config.json``'s ``chat_template`` (a string, or
the entry named ``default`` of a list of named templates). Templates are parsed with Jinja the
way transformers compiles them, so a broken one is a validation error (exit 2) before anything
is written, where mergekit fails after the weights. This module needs no torch and no recipe.
Oracle: tests/run/test_chat_template.py (mergekit 0.1.5 on the configs of its
tests/test_chat_template.py, transformers' `apply_chat_template` on both outputs).
"""

from __future__ import annotations

import difflib
import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from recipekit.errors import ChatTemplateError, display_path
from recipekit.inputs.files import read_bounded
from recipekit.io.names import CHAT_TEMPLATE, TOKENIZER_CONFIG

log = logging.getLogger(__name__)

AUTO = "auto"
#: A chat template is a few KB; one far larger is not one.
MAX_TEMPLATE = 4 * 1024 * 1024
#: tokenizer_config.json holds the template (old layout) beside much else; Gemma's is ~40 MB.
MAX_TOKENIZER_CONFIG = 64 * 1024 * 1024


@dataclass(frozen=True)
class ChatTemplate:
    """The template an output gets: its text, written as ``chat_template.jinja``, and where it
    came from, in words (``built-in chatml``, ``literal``, ``file chat.jinja``, ``auto: ...``),
    for the plan hash and `recipekit plan`."""

    text: str
    source: str


#: The package folder of the built-in templates (one ``<name>.jinja`` each).
BUILTINS = "builtin_chat_templates"


def builtin_names() -> list[str]:
    """The built-in templates, sorted: the ``*.jinja`` files of `BUILTINS`."""
    folder = resources.files("recipekit.inputs") / BUILTINS
    return sorted(f.name.removesuffix(".jinja") for f in folder.iterdir()
                  if f.name.endswith(".jinja"))


def builtin_template(name: str) -> str | None:
    """A built-in template's text, verbatim (None when there is no such built-in)."""
    if name not in builtin_names():
        return None
    return (resources.files("recipekit.inputs") / BUILTINS / f"{name}.jinja").read_text(
        encoding="utf-8")


def is_literal(value: str) -> bool:
    """Whether a setting is Jinja text rather than a name: it holds ``{{`` or ``{%``."""
    return "{{" in value or "{%" in value


def setting_problem(value: str) -> tuple[str, str | None] | None:
    """(message, hint) when a string setting can be neither ``auto``, a built-in nor a valid
    literal template; None when it can. What `recipekit validate --no-inputs` checks."""
    if value == AUTO or (not is_literal(value) and value in builtin_names()):
        return None
    if is_literal(value):
        try:
            check_jinja(value)
        except ChatTemplateError as e:
            return e.message, e.hint
        return None
    names = builtin_names()
    close = difflib.get_close_matches(value, [AUTO, *names], n=1)
    return (f"{value!r} is not a built-in chat template",
            (f"did you mean '{close[0]}'? " if close else "") + f"The built-ins are "
            f"{', '.join(names)}; or write `auto` (the inputs' most common template), Jinja "
            "text (it holds `{{` or `{%`), or `{file: path}`")


def check_jinja(text: str) -> None:
    """Compile ``text`` as transformers compiles chat templates (sandboxed, trim_blocks,
    lstrip_blocks, the loopcontrols extension and its ``{% generation %}`` tag).

    Raises:
        ChatTemplateError: a syntax error, with its line.
    """
    try:
        import jinja2
        import jinja2.ext
        import jinja2.sandbox
    except ImportError:  # torch depends on jinja2; without it, transformers will judge it
        return

    class Generation(jinja2.ext.Extension):
        """transformers' ``{% generation %}...{% endgeneration %}`` (assistant masks)."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body, lineno=lineno)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
    try:
        env.from_string(text)  # compiled, as transformers does: an unknown filter fails here
    except jinja2.TemplateSyntaxError as e:  # (and TemplateAssertionError, its subclass)
        raise ChatTemplateError(f"line {e.lineno} of the chat template is not valid Jinja: "
                                f"{e.message}", hint="see https://huggingface.co/docs/"
                                "transformers/chat_templating_writing") from None


def read_template_file(path: Path) -> str:
    """A template file's text, checked as Jinja.

    Raises:
        ChatTemplateError: unreadable, too large, not UTF-8, empty, without any Jinja, or not
            valid Jinja.
    """
    shown = display_path(path)
    try:
        raw, size = read_bounded(path, MAX_TEMPLATE)
    except OSError as e:
        raise ChatTemplateError(f"cannot read the chat template {shown}: "
                                f"{e.strerror or e}") from None
    if raw is None:
        raise ChatTemplateError(f"{shown} is {size} bytes, too large for a chat template")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ChatTemplateError(f"{shown} is not UTF-8 text") from None
    if not text.strip():
        raise ChatTemplateError(f"{shown} is empty")
    if not is_literal(text):  # as an inline setting without Jinja is refused
        raise ChatTemplateError(f"{shown} holds no Jinja (`{{{{ ... }}}}` or `{{% ... %}}`): "
                                "every conversation would render as this same text",
                                hint="a chat template reads `messages`, e.g. `{% for m in "
                                "messages %}{{ m['content'] }}{% endfor %}`")
    try:
        check_jinja(text)
    except ChatTemplateError as e:
        raise ChatTemplateError(f"{shown}: {e.message}", e.hint) from None
    return text


def input_template(model_dir: Path) -> str | None:
    """The default chat template transformers 5 loads from a checkpoint directory, or None.

    ``chat_template.jinja`` takes priority over ``tokenizer_config.json``'s key (as in
    `PreTrainedTokenizerBase._from_pretrained`); a list of named templates gives its
    ``default`` one. A file that cannot be read is skipped with a warning, as mergekit skips a
    model whose tokenizer does not load.
    """
    jinja = model_dir / CHAT_TEMPLATE
    try:
        if jinja.is_file():
            raw, _ = read_bounded(jinja, MAX_TEMPLATE)
            return raw.decode("utf-8") if raw is not None else None
        cfg = model_dir / TOKENIZER_CONFIG
        if not cfg.is_file():
            return None
        raw, _ = read_bounded(cfg, MAX_TOKENIZER_CONFIG)
        found = json.loads(raw).get("chat_template") if raw is not None else None
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as e:
        log.warning("%s: cannot read its chat template (%s); `auto` skips it",
                    display_path(model_dir), e)
        return None
    if isinstance(found, list):
        found = next((t.get("template") for t in found
                      if isinstance(t, dict) and t.get("name") == "default"), None)
    elif isinstance(found, dict):
        found = found.get("default")
    return found if isinstance(found, str) else None


def most_common_template(inputs: Sequence[tuple[str, Path]]) -> ChatTemplate | None:
    """mergekit's ``auto``: the most common of the inputs' stripped, non-empty templates; a tie
    goes to the first input (in the order given). None when no input has one."""
    found = [(name, t.strip()) for name, path in inputs
             if (t := input_template(path)) is not None and t.strip()]
    if not found:
        return None
    text, count = Counter(t for _, t in found).most_common(1)[0]
    holders = [name for name, t in found if t == text]
    return ChatTemplate(text, f"auto: the template of {', '.join(holders)} ({count} of "
                        f"{len(inputs)} input(s))")
