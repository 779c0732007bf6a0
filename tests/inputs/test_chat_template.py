"""inputs/chat_template.py: the built-in templates, the setting's checks, the inputs' templates
and `auto`'s choice.

Oracles: each format's published prompt layout (ChatML; Meta's Llama 3 format; Stanford
Alpaca's; Mistral instruct v1, which mergekit 0.1.5's mistral and chatml files render
identically; EXAONE 3), rendered by transformers' own chat-template compiler; transformers 5's
`AutoTokenizer` for which template a checkpoint directory carries; mergekit 0.1.5's `auto`
rule (`Counter.most_common` over stripped templates, reference/tokenizers.md §4.3).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recipekit.errors import ChatTemplateError
from recipekit.inputs.chat_template import (
    builtin_names,
    builtin_template,
    check_jinja,
    input_template,
    most_common_template,
    read_template_file,
    setting_problem,
)

from tests.helpers.chat_models import CONVERSATIONS

SYSTEM_CHAT = CONVERSATIONS[0]  # system, user, assistant, user

#: The published layout of each format for SYSTEM_CHAT with a generation prompt.
PUBLISHED = {
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
              "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
              "<|im_start|>assistant\n",
    "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "alpaca": "Be brief.\n\n### Instruction:\nHi there\n\n### Response:\nHello!\n\n"
              "### Instruction:\nBye\n\n### Response:\n",
    "mistral": "<s> [INST] Be brief.\n\nHi there [/INST] Hello!</s> [INST] Bye [/INST]",
    "exaone": "[|system|]Be brief.[|endofturn|]\n[|user|]Hi there\n"
              "[|assistant|]Hello![|endofturn|]\n[|user|]Bye\n[|assistant|]",
}


def render(text: str, messages: list[dict], generation: bool = True) -> str:
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template(text).render(messages=messages, bos_token="<s>",
                                                eos_token="</s>", add_generation_prompt=generation)


class TestBuiltins:
    """Oracle: the published layouts above, rendered by transformers' compiler."""

    def test_mergekits_five_are_built_in(self):
        assert builtin_names() == ["alpaca", "chatml", "exaone", "llama3", "mistral"]

    @pytest.mark.parametrize("name", sorted(PUBLISHED))
    def test_each_renders_its_published_layout(self, name):
        assert render(builtin_template(name), SYSTEM_CHAT) == PUBLISHED[name]

    def test_without_a_system_message(self):
        chat = SYSTEM_CHAT[1:]
        assert render(builtin_template("exaone"), chat).startswith(
            "[|system|][|endofturn|]\n[|user|]Hi there\n")
        assert render(builtin_template("alpaca"), chat).startswith("### Instruction:\nHi there")
        assert render(builtin_template("mistral"), chat) == \
            "<s> [INST] Hi there [/INST] Hello!</s> [INST] Bye [/INST]"

    def test_unknown_name_has_no_text(self):
        assert builtin_template("vicuna") is None


class TestSetting:
    @pytest.mark.parametrize("value", ["auto", "chatml", "{{ messages[0]['content'] }}",
                                       "{% for m in messages %}{{ m.content }}{% endfor %}",
                                       "{% generation %}{{ x }}{% endgeneration %}"])
    def test_accepted(self, value):
        assert setting_problem(value) is None

    def test_unknown_name_lists_the_builtins_and_suggests(self):
        assert setting_problem("chatlm") == (
            "'chatlm' is not a built-in chat template",
            "did you mean 'chatml'? The built-ins are alpaca, chatml, exaone, llama3, mistral; "
            "or write `auto` (the inputs' most common template), Jinja text (it holds `{{` or "
            "`{%`), or `{file: path}`")

    def test_broken_jinja_names_its_line(self):
        message, _ = setting_problem("{% for m in messages %}\n{{ m.content }")
        assert message == "line 2 of the chat template is not valid Jinja: unexpected '}'"

    def test_check_jinja_raises(self):
        with pytest.raises(ChatTemplateError, match="line 1 .* not valid Jinja"):
            check_jinja("{% if x %}")


class TestTemplateFile:
    def test_read(self, tmp_path):
        (tmp_path / "t.jinja").write_text("{{ messages[0].content }}\n")
        assert read_template_file(tmp_path / "t.jinja") == "{{ messages[0].content }}\n"

    @pytest.mark.parametrize(("data", "why"), [(b"\xff{{", "is not UTF-8 text"),
                                               (b"  \n", "is empty"),
                                               (b"{{ x", "not valid Jinja")])
    def test_unusable(self, tmp_path, data, why):
        (tmp_path / "t.jinja").write_bytes(data)
        with pytest.raises(ChatTemplateError, match=why):
            read_template_file(tmp_path / "t.jinja")

    def test_missing(self, tmp_path):
        with pytest.raises(ChatTemplateError, match="cannot read the chat template .*t.jinja: "
                                                    "No such file"):
            read_template_file(tmp_path / "t.jinja")


def write(d: Path, **files: object) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, value in files.items():
        name = name.replace("__", ".")
        (d / name).write_text(value if isinstance(value, str) else json.dumps(value))
    return d


class TestInputTemplate:
    """Oracle: what transformers 5's AutoTokenizer loads as the default template (checked on a
    saved tokenizer in tests/plan/test_chat_template.py); here the file rules."""

    def test_the_jinja_file_wins_over_the_config_key(self, tmp_path):
        d = write(tmp_path, chat_template__jinja="J", tokenizer_config__json={
            "chat_template": "C"})
        assert input_template(d) == "J"

    def test_the_config_key(self, tmp_path):
        assert input_template(write(tmp_path, tokenizer_config__json={"chat_template": "C"})) \
            == "C"

    def test_a_list_of_named_templates_gives_default(self, tmp_path):
        d = write(tmp_path, tokenizer_config__json={"chat_template": [
            {"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]})
        assert input_template(d) == "D"

    def test_none(self, tmp_path):
        assert input_template(write(tmp_path, tokenizer_config__json={})) is None
        assert input_template(tmp_path / "nothing") is None

    def test_unreadable_config_is_skipped_with_a_warning(self, tmp_path, caplog):
        (tmp_path / "tokenizer_config.json").write_text("{not json")
        assert input_template(tmp_path) is None
        assert "cannot read its chat template" in caplog.text


class TestMostCommon:
    """Oracle: mergekit 0.1.5's rule, `Counter(stripped templates).most_common(1)`."""

    def test_plurality_wins(self, tmp_path):
        dirs = [("a", write(tmp_path / "a", chat_template__jinja="A\n")),
                ("b", write(tmp_path / "b", chat_template__jinja="B\n")),
                ("c", write(tmp_path / "c", tokenizer_config__json={"chat_template": " B"})),
                ("d", write(tmp_path / "d", tokenizer_config__json={}))]
        chosen = most_common_template(dirs)
        assert chosen.text == "B"  # stripped, as mergekit writes it
        assert chosen.source == "auto: the template of b, c (2 of 4 input(s))"

    def test_a_tie_goes_to_the_first_listed(self, tmp_path):
        dirs = [("b", write(tmp_path / "b", chat_template__jinja="B")),
                ("a", write(tmp_path / "a", chat_template__jinja="A"))]
        assert most_common_template(dirs).text == "B"
        assert most_common_template(dirs[::-1]).text == "A"

    def test_none_found(self, tmp_path):
        assert most_common_template([("a", write(tmp_path / "a", chat_template__jinja="  "))]) \
            is None
