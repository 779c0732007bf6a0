"""Issue 17 item 13: nothing from an input reaches the terminal raw.

Oracle: the exact escaped text. Control and format characters (ESC of an OSC title sequence,
newline, NUL, U+202E) print as Python escapes (``\\x1b``, ``\\n``, ``\\x00``, ``\\u202e``),
and an echoed input longer than `ECHO_LIMIT` (160) characters prints as its first 160 and
``...``: one escaping helper (`echo_text`), one shortening rule.
"""

from __future__ import annotations

from pathlib import Path

from recipekit.errors import ECHO_LIMIT, Location, RecipeError, echo_text, terminal_text

from tests.helpers.recipes import solar_recipe, write_recipe

LAYERS_ERR = "steps[0].layers[0]: range(0,99) reaches layer 98, but model 'tiny' has 8 layers"


def test_echo_text_escapes_and_shortens():
    assert echo_text("a\x1b]0;t\x07\nb\x00\u202ec") == "a\\x1b]0;t\\x07\\nb\\x00\\u202ec"
    assert echo_text("x" * 5000) == "x" * ECHO_LIMIT + "..."
    assert echo_text("ok/path.yaml") == "ok/path.yaml"


def test_terminal_text_keeps_line_breaks_and_cuts_long_numbers():
    assert terminal_text("a\x1bb\nc\u202e") == "a\\x1bb\nc\\u202e"
    assert terminal_text("n=" + "9" * 400 + " end") == "n=" + "9" * (ECHO_LIMIT - 2) + "... end"


def test_location_and_caret_line_are_escaped_and_windowed():
    err = RecipeError("bad", location=Location("a\u202eb.yaml", 1, 300, "k: " + "v" * 400))
    head, text, caret = err.render().split("\n")
    assert head == "a\\u202eb.yaml:1:300: bad"
    # 160 characters around column 300 (from column 220), marked as cut on both sides
    assert text == "    ..." + "v" * ECHO_LIMIT + "..."
    assert caret == " " * 4 + " " * (3 + ECHO_LIMIT // 2) + "^"


def test_plan_escapes_an_osc_title_in_the_recipe_name(cli, tmp_path, model_copy):
    recipe = write_recipe(tmp_path, 'name: "t\\e]0;pwned\\a"\n' + solar_recipe())
    result = cli("plan", recipe)
    assert result.exit_code == 0 and "\x1b" not in result.stdout and "\x07" not in result.stdout
    assert result.stdout.splitlines()[0] == f"recipe:        {recipe} (t\\x1b]0;pwned\\x07)"


def test_run_escapes_a_newline_in_the_output_path(cli, tmp_path, model_copy, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path, solar_recipe(output='  path: "./o\\nforged"'))
    result = cli("run", recipe, "-q")
    assert result.exit_code == 0 and (tmp_path / "o\nforged").is_dir()
    assert len(result.stdout.splitlines()) == 1
    assert result.stdout.startswith("wrote o\\nforged: 12 layers, 1 shard(s), ")


def test_location_prefix_escapes_u202e_in_the_file_name(cli, tmp_path, model_copy):
    recipe = write_recipe(tmp_path, solar_recipe(layers='["range(0,99)"]'), name="a\u202eb.yaml")
    result = cli("validate", recipe)
    assert result.exit_code == 2 and "\u202e" not in result.stderr
    assert result.stderr.startswith(f"{tmp_path}/a\\u202eb.yaml:8:14: {LAYERS_ERR}")


def test_nul_and_osc_in_a_hub_revision_are_escaped(cli, tmp_path, hub_cache, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path, solar_recipe(
        model='{hub: org/tiny, revision: "ma\\0in\\e]0;x\\a"}'))
    result = cli("validate", recipe)
    assert result.exit_code == 2
    assert "\x00" not in result.stderr and "\x1b" not in result.stderr
    assert result.stderr.startswith(
        f"{recipe}:3:9: models.tiny: hub repo 'org/tiny' at revision 'ma\\x00in\\x1b]0;x\\x07' "
        "is not in the local cache")
    # a hub spec on the command line
    result = cli("inspect", "org/tiny@ma\x00in\x1b]0;x\x07", "-q")
    assert result.exit_code == 2
    assert result.stderr.startswith("'org/tiny@ma\\x00in\\x1b]0;x\\x07' does not exist; ")


def test_a_5000_character_path_is_shortened(cli, tmp_path, model_copy, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path, solar_recipe())
    result = cli("plan", recipe, "-o", "o/" * 2500)
    assert result.exit_code == 0
    assert result.stdout.splitlines()[1] == (
        "output:        " + "o/" * (ECHO_LIMIT // 2) + "...  (model 'up', config from 'tiny')")


def test_a_400_digit_number_is_shortened(cli, tmp_path, model_copy):
    recipe = write_recipe(tmp_path, solar_recipe(layers='["range(0,' + "9" * 400 + ')"]'))
    result = cli("validate", recipe)
    assert result.exit_code == 2 and "9" * (ECHO_LIMIT + 1) not in result.stderr
    assert result.stderr.splitlines()[0] == (
        f"{recipe}:8:14: steps[0].layers[0]: range(0,{'9' * (ECHO_LIMIT - 8)}... reaches "
        f"layer {'9' * ECHO_LIMIT}... but model 'tiny' has 8 layers (0-7); use indices below 8")


def test_no_message_repeats_a_urls_credentials(cli, tmp_path, model_copy):
    """A refused URL's credentials were redacted in some messages only: the line a message
    quotes, a chat template `file:` URL (read as a local path "s3:/bkt/..."), a `tokenizer:`
    naming no model, and a sweep's combination names printed them (found by a black-box
    check). Every message, its quoted line, and a JSON error hide them now."""
    secret = "s3://AKIAX:TopSecret9@bkt"
    recipe = write_recipe(tmp_path, f"""
recipekit: 1
models: {{a: {model_copy}, b: {model_copy}}}
steps: [{{name: mix, op: merge, method: linear, from: [{{model: a, weight: 1}},
          {{model: b, weight: 1}}], tokenizer: "{secret}/models/b"}}]
output: {{path: ./out, chat_template: {{file: "{secret}/t.jinja"}}}}
""")
    for args in (("validate", recipe), ("validate", recipe, "--json")):
        result = cli(*args)
        assert result.exit_code == 2, result.output
        assert "TopSecret9" not in result.output and "AKIAX" not in result.output
        assert "s3://***@bkt/t.jinja is a URL; a chat template file is read from a local" \
            in result.output
    variables = write_recipe(tmp_path, f"""
recipekit: 1
variables: {{src: {model_copy}}}
models: {{a: "${{src}}"}}
steps: [{{name: up, op: layers, from: a, layers: ["range(0,2)"]}}]
output: {{path: ./swept}}
""", name="sweep.yaml")
    assert cli("validate", variables).exit_code == 0
    result = cli("sweep", variables, "--set", f"src={model_copy},{secret}/m", "--dry-run")
    assert result.exit_code == 2 and "holds credentials" in result.output, result.output
    assert "TopSecret9" not in result.output
    assert "[in src=s3%3A%2F%2F%2A%2A%2A%40bkt" in result.output  # the combination's name
    # an AWS secret key may hold "/": "s3://KEY:ab/cd@bkt" was read as the bucket "KEY:ab"
    slashed = cli("run", variables, "--output", "s3://AKIAX:Top/Secret+9@bkt/out")
    assert slashed.exit_code == 2 and "holds credentials" in slashed.output, slashed.output
    assert "Secret" not in slashed.output and "AKIAX" not in slashed.output
    # a password holding "@" (URL parsers split the host at the last "@"), and file:// URLs,
    # which became a local folder named "u:Secret@localhost"
    for url in ("s3://AKIAX:p@ssSecretX@bkt/out", "file://u:SecretY@localhost/tmp/x"):
        refused = cli("run", variables, "--output", url)
        assert refused.exit_code == 2 and "holds credentials" in refused.output, refused.output
        assert "Secret" not in refused.output and "ssSecret" not in refused.output
    assert not list(tmp_path.glob("u:*")) and not list(Path.cwd().glob("u:*"))


def test_a_token_in_a_urls_query_is_refused_and_hidden(cli, tmp_path, model_copy):
    """A secret in a URL's query (``?token=``, a presigned ``X-Amz-Signature=``, an Azure SAS
    ``sig=``) was neither refused nor hidden: the model card and recipekit.json quote the
    recipe, so publishing the output published it. It is refused like ``user:secret@``, and
    every message writes it ``***``; a query without a secret (``?versionId=3``) is not."""
    recipe = write_recipe(tmp_path, f"""
recipekit: 1
models: {{a: {model_copy}, b: "https://host/m?rev=2&token=TopSecret9"}}
steps: [{{name: mix, op: merge, method: linear, parameters: {{weight: 1}}, from: [a, b]}}]
""")
    for args in (("validate", recipe), ("validate", recipe, "--json")):
        result = cli(*args)
        assert result.exit_code == 2, result.output
        assert "TopSecret9" not in result.output
        assert "models.b: the URL holds credentials (user:secret@, or a token in its query)" \
            in result.output
    assert '"https://host/m?rev=2&token=***"}' in cli("validate", recipe).output
    for url in ("s3://bkt/out?X-Amz-Signature=SecretZ", "az://c/out?sv=1&sig=SecretZ"):
        refused = cli("run", recipe, "--output", url)
        assert refused.exit_code == 2 and "holds credentials" in refused.output, refused.output
        assert "SecretZ" not in refused.output
    from recipekit.errors import hide_credentials, holds_credentials

    assert not holds_credentials("s3://bkt/m?versionId=3")
    assert not holds_credentials("models/a?token=1")  # a local path, not a URL
    # the hole-finder's round: other names, encodings, fragments; and path segments that
    # only look like a query (`exp;monkey=1`), which were refused
    for url, shown in [
        ("https://h/m?auth=Sx", "https://h/m?auth=***"),
        ("https://h/m?Authorization=Bearer%20Sx", "https://h/m?Authorization=***"),
        ("https://h/m#access_token=Sx", "https://h/m#access_token=***"),
        ("https://h/m?token%3DSx", "https://h/m?token%3D***"),
        ("https://h/m?params%5Btoken%5D=Sx", "https://h/m?params%5Btoken%5D=***"),
        ("https://h/m?pwd=Sx&rev=2", "https://h/m?pwd=***&rev=2"),
    ]:
        assert holds_credentials(url) and hide_credentials(f"at {url} x") == f"at {shown} x", url
    for url in ("s3://bkt/exp;monkey=1/out", "s3://bkt/o?keyword=x", "hf://a/b?revision=main"):
        assert not holds_credentials(url) and hide_credentials(url) == url, url
