"""`output.chat_template` end to end: which template, the files that carry it, the plan hash,
the lock, the refusals, and `import-mergekit`'s conversion.

Oracles: transformers 5's `AutoTokenizer.from_pretrained(out)` (the template it loads and
`apply_chat_template`'s text); mergekit 0.1.5 on the configs of its tests/test_chat_template.py
(chatml, a literal template) and on an `auto` config, on models made like its tests/common.py
(marker `mergekit`): the same template text where mergekit's is not a file of its own, and the
same rendered conversations.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import yaml

import recipekit
from recipekit.inputs.chat_template import builtin_template
from recipekit.tools.mergekit_import import convert_file

from tests.helpers.adapter_builders import make_adapter
from tests.helpers.chat_models import make_chat_model, renderings
from tests.helpers.mergekit import needs_mergekit, run_mergekit
from tests.helpers.recipes import write_recipe

LITERAL = "{{messages[0]['content']}}"  # mergekit's test_template_literal_jinja
A = "{% for m in messages %}A: {{ m.content }}{% endfor %}"
B = "{% for m in messages %}B: {{ m.content }}\n{% endfor %}\n"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """model_base (tokenizer, no template) and model_b (no tokenizer), as mergekit's
    test_chat_template.py; t_a/t_b/t_c carry templates A, B, B (config key, .jinja, config
    key); stale: a donor with a template in its config, a named one and a processor one."""
    root = tmp_path_factory.mktemp("chat")
    make_chat_model(root / "model_base", seed=0)
    make_chat_model(root / "model_b", seed=1, tokenizer=False)
    make_chat_model(root / "t_a", seed=2, template=A, in_config=True)
    make_chat_model(root / "t_b", seed=3, template=B)
    make_chat_model(root / "t_c", seed=4, template=B, in_config=True)
    stale = make_chat_model(root / "stale", seed=5, template="OLD {{ messages }}",
                            in_config=True)
    (stale / "additional_chat_templates").mkdir()
    (stale / "additional_chat_templates" / "tool_use.jinja").write_text("TOOLS {{ tools }}")
    (stale / "chat_template.json").write_text(json.dumps({"chat_template": "PROC"}))
    return root


def linear(tmp_path: Path, models: Path, names: tuple[str, ...], template: str,
           out: str = "out") -> Path:
    """A linear 1:1 merge recipe of ``names`` (the first is the donor) with ``template`` as
    the `output.chat_template` YAML value."""
    d = tmp_path
    for n in names:
        if not (d / n).exists():
            (d / n).symlink_to(models / n)
    ins = ", ".join(f"{{model: {n}, weight: 0.5}}" for n in names)
    return write_recipe(d, f"""
        recipekit: 1
        models: {{{", ".join(f"{n}: ./{n}" for n in names)}}}
        steps:
          - {{name: merged, op: merge, method: linear, from: [{ins}]}}
        output:
          path: ./{out}
          dtype: bfloat16
          chat_template: {template}
        """)


def run_ok(cli, recipe: Path, *args: str) -> Path:
    result = cli("run", recipe, "-q", *args)
    assert result.exit_code == 0, result.output
    return recipe.parent / "out"


def loaded_template(out: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(out).chat_template


class TestWritten:
    """Oracle: transformers 5's AutoTokenizer on the output."""

    def test_builtin(self, cli, tmp_path, models):
        out = run_ok(cli, linear(tmp_path, models, ("model_base", "model_b"), "chatml"))
        text = (out / "chat_template.jinja").read_text()
        assert text == builtin_template("chatml")
        assert loaded_template(out) == text
        assert renderings(out)[0].startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
        manifest = json.loads((out / "recipekit.json").read_text())
        assert "chat_template.jinja" in manifest["files"]
        assert manifest["chat_template"] == "built-in chatml"
        assert cli("verify", out).exit_code == 0

    def test_the_donors_stale_templates_are_replaced(self, cli, tmp_path, models):
        """The donor's config key would lose to chat_template.jinja anyway, but its named
        templates would make AutoTokenizer's template a dict (and `tools=` pick tool_use)."""
        out = run_ok(cli, linear(tmp_path, models, ("stale", "model_b"), json.dumps(LITERAL)))
        assert sorted(p.name for p in out.iterdir() if "template" in p.name) == [
            "chat_template.jinja"]
        assert (out / "chat_template.jinja").read_text() == LITERAL
        config = json.loads((out / "tokenizer_config.json").read_text())
        donor = json.loads((models / "stale" / "tokenizer_config.json").read_text())
        del donor["chat_template"]
        assert config == donor  # nothing else changed
        assert loaded_template(out) == LITERAL

    def test_unset_keeps_the_donors_files(self, cli, tmp_path, models):
        recipe = linear(tmp_path, models, ("stale", "model_b"), "x")
        recipe.write_text(recipe.read_text().replace("  chat_template: x\n", ""))
        out = run_ok(cli, recipe)
        for rel in ("tokenizer_config.json", "chat_template.json",
                    "additional_chat_templates/tool_use.jinja"):
            assert (out / rel).read_bytes() == (models / "stale" / rel).read_bytes()
        assert not (out / "chat_template.jinja").exists()

    def test_auto_takes_the_plurality(self, cli, tmp_path, models):
        recipe = linear(tmp_path, models, ("t_a", "t_b", "t_c"), "auto")
        assert "chat template: auto: the template of t_b, t_c (2 of 3 input(s))\n" in \
            cli("plan", recipe).output
        out = run_ok(cli, recipe)
        assert (out / "chat_template.jinja").read_text() == B.strip()
        assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())
        assert loaded_template(out) == B.strip()

    def test_auto_without_templates_warns_and_keeps_the_donor(self, tmp_path, models, caplog):
        recipe = linear(tmp_path, models, ("model_base", "model_b"), "auto")
        with caplog.at_level(logging.WARNING):
            p = recipekit.plan(recipe).plan
        assert p.chat_template is None and p.files == {}
        assert ("output.chat_template is auto, but none of the input models (model_base, "
                "model_b) has a chat template: the output keeps the donor's tokenizer files as "
                "they are") in caplog.text

    def test_auto_looks_only_at_the_models_the_output_uses(self, tmp_path, models):
        recipe = linear(tmp_path, models, ("t_a", "model_b"), "auto")
        text = recipe.read_text().replace("t_a: ./t_a", "t_a: ./t_a, t_b: ./t_b, t_c: ./t_c")
        (tmp_path / "t_b").symlink_to(models / "t_b")
        (tmp_path / "t_c").symlink_to(models / "t_c")
        recipe.write_text(text)
        assert recipekit.plan(recipe).plan.chat_template.text == A


class TestFileTemplate:
    def recipe(self, tmp_path: Path, models: Path) -> Path:
        (tmp_path / "chat.jinja").write_text(B)
        return linear(tmp_path, models, ("model_base", "model_b"), "{file: chat.jinja}")

    def test_written_verbatim(self, cli, tmp_path, models):
        out = run_ok(cli, self.recipe(tmp_path, models))
        assert (out / "chat_template.jinja").read_text() == B

    def test_its_content_is_in_the_plan_hash(self, tmp_path, models):
        recipe = self.recipe(tmp_path, models)
        before = recipekit.plan(recipe).plan_hash
        (tmp_path / "chat.jinja").write_text(A)
        assert recipekit.plan(recipe).plan_hash != before

    def test_locked_and_refused_by_frozen_when_changed(self, cli, tmp_path, models):
        recipe = self.recipe(tmp_path, models)
        assert cli("lock", recipe).exit_code == 0
        lock = json.loads((tmp_path / "recipe.lock.json").read_text())
        assert lock["inputs"]["output.chat_template.file"]["path"] == "chat.jinja"
        assert set(lock["inputs"]["output.chat_template.file"]["files"]) == {"chat.jinja"}
        assert cli("run", recipe, "-q", "--frozen").exit_code == 0
        (tmp_path / "chat.jinja").write_text(B.replace("B:", "b:"))
        result = cli("run", recipe, "-q", "--frozen", "--force")
        assert result.exit_code == 2
        assert f"output.chat_template.file: {tmp_path / 'chat.jinja'} has sha256" \
            in result.output
        assert "recipekit lock" in result.output

    def test_a_file_inside_the_output_is_an_input(self, cli, tmp_path, models):
        """A template file under the output path would be deleted or rewritten by the run
        (`--force` regenerated README.md, the template, before this was refused)."""
        out = run_ok(cli, self.recipe(tmp_path, models))
        name = "chat_template.jinja"
        recipe = linear(tmp_path, models, ("model_base", "model_b"), f"{{file: out/{name}}}")
        card = (out / name).read_bytes()
        for args in (("validate",), ("run", "-q", "--force")):
            result = cli(*args, recipe)
            assert result.exit_code == 2, result.output
            assert (f"output path {out} contains the chat template file {out / name} "
                    "that `output` names") in result.stderr
        assert (out / name).read_bytes() == card

    def test_missing_file_is_located(self, cli, tmp_path, models):
        recipe = self.recipe(tmp_path, models)
        (tmp_path / "chat.jinja").unlink()
        result = cli("validate", recipe)
        assert result.exit_code == 2
        assert f"recipe.yaml:8:25: output.chat_template.file: cannot read the chat template " \
            f"{tmp_path / 'chat.jinja'}: No such file or directory\n" in result.output

    def test_broken_file_is_located(self, cli, tmp_path, models):
        recipe = self.recipe(tmp_path, models)
        (tmp_path / "chat.jinja").write_text("{% for m in messages %}\n{{ m }")
        result = cli("validate", recipe)
        assert result.exit_code == 2
        assert (f"recipe.yaml:8:25: output.chat_template.file: {tmp_path / 'chat.jinja'}: line "
                "2 of the chat template is not valid Jinja: unexpected '}'") in result.output


    @pytest.mark.parametrize("text, message", [
        # parsed only, an unknown filter passed; transformers compiles, and failed at use
        ("{% for m in messages %}{{ m['content'] | trimm }}{% endfor %}",
         ": line 1 of the chat template is not valid Jinja: No filter named 'trimm'"),
        # inline, text without Jinja was refused (a mistyped name); from a file it was taken
        ("You are a helpful assistant.\n", " holds no Jinja (`{{ ... }}` or `{% ... %}`): every "
         "conversation would render as this same text"),
    ])
    def test_a_file_transformers_cannot_use_is_refused(self, cli, tmp_path, models, text,
                                                      message):
        """Found by a black-box check: both exited 0."""
        recipe = self.recipe(tmp_path, models)
        (tmp_path / "chat.jinja").write_text(text)
        result = cli("validate", recipe)
        assert result.exit_code == 2, result.output
        assert (f"recipe.yaml:8:25: output.chat_template.file: {tmp_path / 'chat.jinja'}"
                f"{message}") in result.output


class TestRefused:
    def test_unknown_name_exits_2_before_reading_inputs(self, cli, tmp_path, models):
        recipe = linear(tmp_path, models, ("model_base", "model_b"), "chatlm")
        result = cli("validate", "--no-inputs", recipe)
        assert result.exit_code == 2
        assert result.output.startswith(
            f"{tmp_path / 'recipe.yaml'}:8:18: output.chat_template: 'chatlm' is not a built-in "
            "chat template; did you mean 'chatml'? The built-ins are alpaca, chatml, exaone, "
            "llama3, mistral")
        assert not (tmp_path / "out").exists()

    def test_broken_literal(self, cli, tmp_path, models):
        recipe = linear(tmp_path, models, ("model_base", "model_b"), '"{{ x }"')
        result = cli("run", recipe, "-q")
        assert result.exit_code == 2
        assert "output.chat_template: line 1 of the chat template is not valid Jinja" \
            in result.output
        assert not (tmp_path / "out").exists()

    def test_adapter_output(self, cli, tmp_path, models):
        make_adapter("llama", models / "model_base", tmp_path / "a", r=2,
                     target_modules=["q_proj"], task_type="CAUSAL_LM")
        result = cli("validate", write_recipe(tmp_path, """
            recipekit: 1
            adapters: {a: ./a}
            steps:
              - {name: mix, op: combine_adapters, adapters: [a]}
            output: {path: ./out, chat_template: chatml}
            """))
        assert result.exit_code == 2
        assert ("output.chat_template: an adapter output has no tokenizer to carry a chat "
                "template") in result.output


def mergekit_config(tmp_path: Path, models: Path, names: tuple[str, ...], template: str) -> Path:
    """A mergekit config as test_chat_template.py builds them: linear 0.5 each, base_model the
    first, dtype bfloat16."""
    for n in names:
        if not (tmp_path / n).exists():
            (tmp_path / n).symlink_to(models / n)
    lines = [f"base_model: ./{names[0]}", "merge_method: linear", "dtype: bfloat16", "models:"]
    lines += [f"  - {{model: ./{n}, parameters: {{weight: 0.5}}}}" for n in names]
    lines.append(f"chat_template: {json.dumps(template)}")
    (tmp_path / "mk.yml").write_text("\n".join(lines) + "\n")
    return tmp_path / "mk.yml"


class TestImport:
    @pytest.mark.parametrize("template", ["auto", "chatml", LITERAL, B, B + "  \n\tx"])
    def test_converted_to_output_chat_template(self, tmp_path, models, monkeypatch, template):
        config = mergekit_config(tmp_path, models, ("model_base", "model_b"), template)
        monkeypatch.chdir(tmp_path)
        text = convert_file(config, tmp_path / "recipe.yaml")
        assert yaml.safe_load(text)["output"]["chat_template"] == template
        if template == B:  # written as people write templates in YAML
            assert "  chat_template: |\n    {% for m in messages %}B: {{ m.content }}\n" in text
        assert recipekit.validate(text, base_dir=tmp_path).inputs_checked

    def test_unknown_builtin_is_refused_at_its_key(self, cli, tmp_path, models, monkeypatch):
        mergekit_config(tmp_path, models, ("model_base", "model_b"), "vicuna")
        monkeypatch.chdir(tmp_path)
        result = cli("import-mergekit", "mk.yml")
        assert result.exit_code == 2
        assert result.output.startswith("mk.yml:7:16: chat_template: cannot convert "
                                        "chat_template: 'vicuna' is not a built-in chat template")


@pytest.mark.mergekit
@needs_mergekit
@pytest.mark.parametrize(("names", "template"), [
    (("model_base", "model_b"), "chatml"),   # test_template_chatml
    (("model_base", "model_b"), LITERAL),    # test_template_literal_jinja
    (("t_a", "t_b", "t_c"), "auto"),         # templates A, B, B: B
])
def test_same_template_as_mergekit(cli, tmp_path, models, monkeypatch, names, template):
    """mergekit 0.1.5 and recipekit on the same config: the same conversations rendered, the
    same template text (except built-ins, whose files are each tool's own), and neither
    leaves the key in tokenizer_config.json."""
    config = mergekit_config(tmp_path, models, names, template)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipe.yaml").write_text(convert_file(config, tmp_path / "recipe.yaml"))
    ours = tmp_path / "ours"
    result = cli("run", tmp_path / "recipe.yaml", "-q", "-o", ours)
    assert result.exit_code == 0, result.output
    theirs = tmp_path / "theirs"
    run_mergekit(config, theirs, tmp_path)
    assert renderings(ours) == renderings(theirs)
    if template != "chatml":
        assert (ours / "chat_template.jinja").read_text() == \
            (theirs / "chat_template.jinja").read_text()
    for out in (ours, theirs):
        assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())
    shutil.rmtree(theirs)
