"""Editor and git integration: `recipekit schema`, the README modeline, the pre-commit hook, and
the generated model card's Hub front matter.

Oracles: the schema file recipe.py loads, pre-commit's own rules for a hook (the `files` regex
selects, `entry` + the selected file names runs), and the Hub's card metadata keys.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap

import yaml

from tests.helpers.hub import SHA, add_to_cache
from tests.helpers.recipes import ROOT, solar_recipe, write_recipe

GOOD = solar_recipe("./model", output=None)
BAD = GOOD.replace("op: layers", "op: layerz")


def test_schema_prints_the_schema_recipe_py_loads(cli):
    from recipekit.recipe import load_schema

    result = cli("schema")
    assert result.exit_code == 0
    printed = json.loads(result.stdout)
    assert printed == load_schema() == json.loads((ROOT / "schemas" / "recipe.schema.json")
                                                  .read_text())


def test_readme_shows_the_modeline():
    text = (ROOT / "README.md").read_text()
    assert "# yaml-language-server: $schema=" in text
    assert "recipekit schema > recipe.schema.json" in text


def run_hook(tmp_path, files: list[str]) -> subprocess.CompletedProcess:
    """Run the hook as pre-commit does: its `files` regex picks the staged files (less those
    `exclude` matches), `entry` runs with their names appended (`python` being the hook
    environment's, here this one, with this checkout on the path)."""
    hooks = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())
    (hook,) = [h for h in hooks if h["id"] == "recipekit-validate"]
    assert hook["language"] == "python" and hook.get("pass_filenames", True)
    chosen = [f for f in files if re.search(hook["files"], f)
              and not re.search(hook.get("exclude", "^$"), f)]
    argv = shlex.split(hook["entry"])
    assert argv[0] == "python"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *argv[1:], *chosen],
                          cwd=tmp_path, capture_output=True, text=True, env=env, check=False)


def test_pre_commit_hook_on_a_good_and_a_bad_recipe(tmp_path):
    (tmp_path / "recipes").mkdir()
    write_recipe(tmp_path / "recipes", GOOD, "good.yaml")  # its model does not exist: not read
    write_recipe(tmp_path / "recipes", BAD, "bad.yaml")
    (tmp_path / "recipes" / "notes.txt").write_text("not a recipe")
    ok = run_hook(tmp_path, ["recipes/good.yaml", "recipes/notes.txt", "README.md"])
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == "recipes/good.yaml: ok (1 step(s); inputs not checked)\n"
    bad = run_hook(tmp_path, ["recipes/good.yaml", "recipes/bad.yaml"])
    assert bad.returncode == 2
    assert "recipes/good.yaml: ok" in bad.stdout
    assert bad.stderr.startswith("recipes/bad.yaml:6:9: steps[0].op: unknown op 'layerz'; "
                                 "did you mean 'layers'?")
    assert "Traceback" not in bad.stderr


def test_model_card_front_matter(cli, tmp_path, tiny_llama, monkeypatch):
    cache = tmp_path / "cache"
    add_to_cache(cache, "org/tiny", {p.name: p for p in tiny_llama.iterdir()})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = write_recipe(tmp_path, textwrap.dedent(f"""\
        recipekit: 1
        name: blend
        models:
          hubby: {{hub: org/tiny}}
          local: {tiny_llama}
        steps:
          - name: mix
            op: interpolate
            from: [hubby, local]
            alpha: 0.5
        output:
          path: ./out
        """))
    assert cli("run", recipe, "-q").exit_code == 0
    card = (tmp_path / "out" / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta == {"library_name": "transformers", "base_model": ["org/tiny"],
                    "tags": ["recipekit", "merge"], "pipeline_tag": "text-generation"}
    from recipekit import __version__

    assert f"recipekit {__version__}" in body
    assert f"- `hubby`: org/tiny@main (commit `{SHA}`)" in body
    assert f"- `local`: {tiny_llama}" in body
    assert "op: interpolate" in body and "```yaml" in body
