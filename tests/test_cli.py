"""CLI conventions: ``--version``, ``-h``, shell completion, ``--json`` on every reporting
command, and a mergekit config given where a recipe belongs.

Oracles: click's own parsing (every command's ``-h`` output equals its ``--help``), bash itself
(the installed completion script, sourced, completes a command name), `json.loads` of stdout and
the values the API returns for the same recipe.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import recipekit
from recipekit.cli import app

from tests.helpers.recipes import ROOT, solar_recipe, write_recipe

COMMANDS = ["validate", "plan", "run", "lock", "convert", "inspect", "import-mergekit", "diff",
            "verify", "schema", "version", "sweep"]


def test_every_command_is_listed():
    import typer.main

    assert sorted(typer.main.get_command(app).commands) == sorted(COMMANDS)


def test_version(cli):
    result = cli("--version")
    assert result.exit_code == 0 and result.stdout == f"{recipekit.__version__}\n"


@pytest.mark.parametrize("command", [[], *[[c] for c in COMMANDS]])
def test_h_is_help(cli, command):
    short, long = cli(*command, "-h"), cli(*command, "--help")
    assert short.exit_code == long.exit_code == 0
    assert short.stdout == long.stdout and "Usage: root" in short.stdout  # CliRunner's name


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_completion_installs_and_completes(tmp_path):
    """`--install-completion bash` writes a script and sources it from ~/.bashrc; that script,
    sourced by bash, completes `recipekit ru` to `run` through the CLI."""
    # typer otherwise detects the shell from the parent process (none under a detached
    # runner: "Shell None is not supported") and ignores the name given
    env = {**os.environ, "HOME": str(tmp_path), "SHELL": "/bin/bash",
           "PYTHONPATH": str(ROOT), "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    proc = subprocess.run([sys.executable, "-m", "recipekit.cli", "--install-completion",
                           "bash"], env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    script = tmp_path / ".bash_completions" / "recipekit.sh"
    assert f"source '{script}'" in (tmp_path / ".bashrc").read_text()
    wrapper = tmp_path / "recipekit"  # what the completion function runs: this CLI
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m recipekit.cli "$@"\n')
    wrapper.chmod(0o755)

    def complete(words: str) -> list[str]:
        n = len(words.split())
        script_text = (f"source '{script}'; COMP_WORDS=(recipekit {words}); COMP_CWORD={n}; "
                       f"_recipekit_completion '{wrapper}'; " 'printf "%s\\n" "${COMPREPLY[@]}"')
        return subprocess.run(["bash", "-c", script_text], env=env, capture_output=True,
                              text=True, check=True).stdout.split()

    assert complete("ru") == ["run"]
    assert complete("run --fro") == ["--frozen"]


class TestJson:
    """`--json`: stdout is one JSON document with the API's numbers (run: tests/test_progress)."""

    @pytest.fixture
    def recipe(self, tmp_path: Path, model_copy: Path) -> Path:
        return write_recipe(tmp_path, solar_recipe())

    def test_validate(self, cli, recipe, tmp_path):
        bad = write_recipe(tmp_path, solar_recipe().replace("op: layers", "op: layerz"),
                           "bad.yaml")
        result = cli("validate", recipe, bad, "--json")
        assert result.exit_code == 2
        doc = json.loads(result.stdout)
        good, wrong = doc["recipes"]
        assert good == {"recipe": str(recipe), "ok": True, "steps": 1, "output_model": "up",
                        "inputs_checked": True, "layers": 12, "tensors": 111,
                        "adapter": False}
        assert wrong["ok"] is False and wrong["error"]["exit_code"] == 2
        problem = wrong["error"]["problems"][0]
        assert (problem["file"], problem["line"], problem["column"], problem["key_path"]) == (
            str(bad), 6, 9, "steps[0].op")

    def test_plan(self, cli, recipe):
        a, b = cli("plan", recipe, "--json"), cli("plan", recipe, "--format", "json")
        assert a.exit_code == 0 and a.stdout == b.stdout
        est = json.loads(a.stdout)["estimates"]
        p = recipekit.plan(recipe)
        assert (est["bytes_written"], est["peak_memory"], est["disk"]) == (
            p.bytes_written, p.peak_memory, p.disk)
        assert cli("plan", recipe, "--json", "--format", "dot").exit_code == 2

    def test_verify(self, cli, recipe):
        out = recipe.parent / "out"
        assert cli("run", recipe, "-q", "--no-fsync").exit_code == 0
        doc = json.loads(cli("verify", out, "--json").stdout)
        assert doc["verified"] is True and doc["problems"] == [] and doc["passed"]
        with (out / "model.safetensors").open("r+b") as f:
            f.seek(-1, 2)
            last = f.read(1)
            f.seek(-1, 2)
            f.write(bytes([last[0] ^ 1]))
        result = cli("verify", out, "--json")
        doc = json.loads(result.stdout)
        assert result.exit_code == 1 and doc["verified"] is False
        assert doc["problems"][0]["type"] == "VerifyError"

    def test_inspect_and_diff(self, cli, recipe, model_copy):
        doc = json.loads(cli("inspect", model_copy, "--json", "-q").stdout)
        assert doc["layers"]
        assert json.loads(cli("diff", model_copy, model_copy, "--json", "-q").stdout)

    def test_error_is_json_too(self, cli, tmp_path):
        r = write_recipe(tmp_path, solar_recipe())  # ./model is missing
        result = cli("plan", r, "--json")
        assert result.exit_code == 2
        assert json.loads(result.stdout)["error"]["type"] == "SourceNotFoundError"


MERGEKIT = """\
merge_method: slerp
base_model: a
slices:
  - sources:
      - {model: a, layer_range: [0, 8]}
      - {model: b, layer_range: [0, 8]}
parameters:
  t: 0.5
dtype: bfloat16
"""


@pytest.mark.parametrize("command", ["run", "validate", "plan"])
def test_mergekit_config_is_one_line(cli, tmp_path, command):
    cfg = write_recipe(tmp_path, MERGEKIT, "merge.yml")
    result = cli(command, cfg)
    assert result.exit_code == 2
    assert result.stderr == (
        f"{cfg}: this is a mergekit config, not a recipe; convert it with `recipekit "
        f"import-mergekit {cfg} -o recipe.yaml`, then use the recipe\n")


def test_a_recipe_named_models_list_is_still_a_schema_error(cli, tmp_path):
    """With `recipekit:` the document is a recipe, whatever else it holds."""
    r = write_recipe(tmp_path, "recipekit: 1\nmodels: [a]\nsteps: []\n")
    result = cli("validate", r, "--no-inputs")
    assert result.exit_code == 2 and "mergekit" not in result.stderr


class TestFileUrls:
    """``file://`` URLs name local paths wherever the command line takes a path (README:
    fsspec protocols work wherever a path goes): the recipe, ``--output`` and ``verify``'s
    argument. Typed as a path, ``file:///x`` became the folder ``file:/x`` here."""

    def test_run_and_verify(self, cli, tmp_path, tiny_llama, monkeypatch):
        monkeypatch.chdir(tmp_path)
        recipe = write_recipe(tmp_path, solar_recipe(tiny_llama))
        out = tmp_path / "written"
        done = cli("run", "--quiet", "--output", f"file://{out}", f"file://{recipe}")
        assert done.exit_code == 0, done.output
        assert (out / "recipekit.json").is_file() and not (tmp_path / "file:").exists()
        checked = cli("verify", f"file://{out}")
        assert checked.exit_code == 0 and checked.stdout.endswith("written: verified\n")

    def test_a_url_is_no_local_path(self, cli, tmp_path, monkeypatch):
        """A URL where only a local path goes is refused, not made a folder ``s3:``."""
        monkeypatch.chdir(tmp_path)
        done = cli("sweep", "--set", "x=1", "-o", "s3://bkt/sweep", "r.yaml")
        assert done.exit_code == 2
        shown = " ".join(done.output.replace("│", " ").split())  # out of click's box
        assert "s3://bkt/sweep is a URL; this takes a local path" in shown
        assert not (tmp_path / "s3:").exists()
