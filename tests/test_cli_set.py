"""``--set NAME=VALUE`` in `validate`, `plan`, `run` and `lock`, and ``variables=`` in the API.

Oracle: the same recipe with the value written inline. The plan hash of ``--set alpha=0.3``
equals the inline recipe's (and differs from ``--set alpha=0.4``'s), the shards are the same
bytes (sha256 computed here), and the lock pins the inputs the values select.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

import recipekit
from recipekit.errors import LockError, UsageError

from tests.helpers.recipes import write_recipe

RECIPE = """\
recipekit: 1
variables:
  alpha: 0.5
  second: ./b
models:
  a: ./a
  b: ${second}
steps:
  - name: blended
    op: interpolate
    from: [a, b]
    alpha: ${alpha}
output:
  path: ./out
"""


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def recipe(tmp_path, tiny_llama, tiny_llama_b) -> Path:
    for name, src in (("a", tiny_llama), ("b", tiny_llama_b), ("c", tiny_llama_b)):
        shutil.copytree(src, tmp_path / name)
    return write_recipe(tmp_path, RECIPE)


def inline(recipe: Path, alpha: str) -> Path:
    text = recipe.read_text().replace("${alpha}", alpha).replace("${second}", "./b")
    text = text.replace("variables:\n  alpha: 0.5\n  second: ./b\n", "")
    return write_recipe(recipe.parent, text, "inline.yaml")


def plan_hash(cli, *args) -> str:
    result = cli("plan", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["plan_hash"]


def test_plan_hash_follows_the_value(recipe, cli):
    set3 = plan_hash(cli, recipe, "--set", "alpha=0.3")
    assert set3 == plan_hash(cli, inline(recipe, "0.3"))
    assert set3 != plan_hash(cli, recipe, "--set", "alpha=0.4")
    assert plan_hash(cli, recipe) == plan_hash(cli, inline(recipe, "0.5"))
    assert set3 == recipekit.plan(recipe, variables={"alpha": 0.3}).plan_hash


def test_run_equals_inline(recipe, tmp_path, cli):
    ran = cli("run", recipe, "--set", "alpha=0.3", "-o", tmp_path / "set", "-q")
    assert ran.exit_code == 0, ran.output
    assert cli("run", inline(recipe, "0.3"), "-o", tmp_path / "inline", "-q").exit_code == 0
    assert sha(tmp_path / "set" / "model.safetensors") == sha(
        tmp_path / "inline" / "model.safetensors")
    manifest = json.loads((tmp_path / "set" / "recipekit.json").read_text())
    assert manifest["variables"] == {"alpha": 0.3, "second": "./b"}
    assert manifest["recipe"]["steps"][0]["alpha"] == 0.3 and "variables" not in manifest["recipe"]
    again = cli("run", recipe, "--set", "alpha=0.3", "-o", tmp_path / "set")
    assert again.exit_code == 0 and "already complete" in again.stdout
    other = cli("run", recipe, "--set", "alpha=0.4", "-o", tmp_path / "set")
    assert other.exit_code == 2 and "--force" in other.stderr  # another plan: refused


def test_validate_errors(recipe, cli):
    result = cli("validate", "--no-inputs", recipe, "--set", "alpha=high")
    assert result.exit_code == 2
    assert result.stderr == (
        f"{recipe}:12:12: steps[0].alpha: expected a number, got 'high' (from variable "
        "'alpha' set by --set)\n        alpha: ${alpha}\n               ^\n")
    result = cli("validate", recipe, "--set", "alpah=0.2", "--json")
    problem = json.loads(result.stdout)["recipes"][0]["error"]["problems"][0]
    assert (problem["line"], problem["key_path"]) == (2, "variables")
    assert problem["hint"].startswith("did you mean 'alpha'?")
    assert cli("validate", recipe, "--set", "alpha").exit_code == 2


def test_lock_pins_the_selected_input(recipe, cli):
    locked = cli("lock", recipe, "--set", "second=./c")
    assert locked.exit_code == 0, locked.output
    lock = json.loads(recipe.with_name("recipe.lock.json").read_text())
    assert lock["inputs"]["models.b"]["path"] == "./c"
    ran = cli("run", recipe, "--set", "second=./c", "-q", "--frozen")
    assert ran.exit_code == 0, ran.output
    other = cli("run", recipe, "-q", "-o", recipe.parent / "o2")  # the default: ./b
    assert other.exit_code == 2
    assert "models.b is now path './b' but the lock has path './c'" in other.stderr
    with pytest.raises(LockError):
        recipekit.run(recipe, output=recipe.parent / "o3", progress=None)


def test_api_plan_result_takes_no_variables(recipe):
    p = recipekit.plan(recipe, variables={"alpha": 0.3})
    with pytest.raises(UsageError, match="`output` and `variables` apply when compiling"):
        recipekit.run(p, variables={"alpha": 0.2})
    assert recipekit.validate(recipe, inputs=False, variables={"alpha": 1}).steps == 1
