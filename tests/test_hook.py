"""The pre-commit hook (`.pre-commit-hooks.yaml`, `recipekit/hook.py`) in the environment
pre-commit gives it.

pre-commit installs a `language: python` hook with ``pip install . <additional_dependencies>``
into a fresh virtualenv and runs ``entry`` with the staged file names its ``files`` pattern
selects (less ``exclude``). Oracles: the installed packages' own metadata for the dependency
closure (`importlib.metadata`, markers evaluated by `packaging` as pip does), a subprocess in
which every module outside the standard library, recipekit and that closure fails to import
(torch above all), and the output of `recipekit validate --no-inputs` for the same files.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.helpers.recipes import ROOT

HOOKS = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())
(HOOK,) = [h for h in HOOKS if h["id"] == "recipekit-validate"]
RECIPES = sorted(p for p in (ROOT / "recipes").glob("*") if p.suffix in (".yaml", ".json"))
BAD = "recipekit: 1\nmodels: {a: ./a, b: ./b}\nsteps:\n  - {name: m, op: merge, method: slerp, " \
      "from: [a, b]}\n"


def _selected(name: str) -> bool:
    """Whether pre-commit hands ``name`` (a path relative to the repository) to the hook."""
    return bool(re.search(HOOK["files"], name)) and not re.search(HOOK.get("exclude", "^$"),
                                                                   name)


def _declared() -> list[Requirement]:
    deps = HOOK["additional_dependencies"]
    return [Requirement(d) for d in deps if not d.startswith("-")]


def test_files_pattern_selects_recipes_and_not_lockfiles():
    chosen = ["recipes/merge.yaml", "recipes/merge.yml", "recipes/merge.json", "recipe/a.yaml",
              "sub/recipes/a.yaml", "models/upscale.recipe.yaml", "x.recipe.json"]
    left = ["recipes/merge.lock.json", "sub/recipes/a.lock.json", "x.recipe.lock.json",
            "recipes/models/tiny-llama/config.json", "README.md", "config.yaml"]
    assert [f for f in chosen + left if _selected(f)] == chosen


def test_environment_keeps_torch_out():
    """`--no-deps` stops pip from following recipekit's own dependencies (torch, typer, ...)."""
    deps = HOOK["additional_dependencies"]
    assert HOOK["language"] == "python" and deps[0] == "--no-deps"
    names = {canonicalize_name(r.name) for r in _declared()}
    assert names == {"pyyaml", "jsonschema", "attrs", "referencing",
                     "jsonschema-specifications", "rpds-py", "typing-extensions"}
    core = {canonicalize_name(Requirement(r).name)
            for r in md.requires("recipekit") or [] if "extra ==" not in r}
    assert "torch" in core  # torch stays a core dependency of the package itself
    assert shlex.split(HOOK["entry"]) == ["python", "-m", "recipekit.hook"]


def test_declared_dependencies_are_a_closed_set():
    """Every dependency of a declared package (markers evaluated for this Python, no extras) is
    declared too, so `pip install --no-deps` leaves nothing out; and each declared version
    range admits the installed version the suite runs with."""
    declared = {canonicalize_name(r.name): r for r in _declared()}
    missing = []
    for name, req in declared.items():
        assert req.specifier.contains(md.version(name), prereleases=True), (name, req)
        for dep in md.requires(name) or []:
            r = Requirement(dep)
            if r.marker is not None and not r.marker.evaluate({"extra": ""}):
                continue
            if canonicalize_name(r.name) not in declared:
                missing.append(f"{name} needs {dep}")
    assert not missing, missing


#: Runs ``recipekit.hook`` where only the standard library, recipekit and the declared packages
#: import; torch is blocked by name as well (it would be found in this environment).
SHIM = """
import importlib.abc, runpy, sys
allowed = set(sys.stdlib_module_names) | {"recipekit", "__main__"} | set(sys.argv[1].split(","))
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top not in allowed:
            raise ModuleNotFoundError(f"blocked in the hook's environment: {name}", name=name)
        return None
sys.meta_path.insert(0, Block())
sys.modules["torch"] = None
sys.argv = ["recipekit.hook", *sys.argv[2:]]
runpy.run_module("recipekit.hook", run_name="__main__")
"""


def _top_level_modules() -> list[str]:
    names = {canonicalize_name(r.name) for r in _declared()}
    return sorted(mod for mod, dists in md.packages_distributions().items()
                  if any(canonicalize_name(d) in names for d in dists))


def _run_hook_isolated(cwd: Path, files: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", SHIM, ",".join(_top_level_modules()), *files],
                          cwd=cwd, capture_output=True, text=True, env=env, check=False)


def test_hook_runs_with_only_its_environment(tmp_path, cli):
    """Every recipe in recipes/ passes, a document-only mistake fails with its located message
    (the same as `recipekit validate --no-inputs`), and nothing outside the hook's environment
    is imported: the shim would make such an import fail."""
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "bad.yaml").write_text(BAD)
    files = [str(p) for p in RECIPES]
    ok = _run_hook_isolated(tmp_path, files)
    assert ok.returncode == 0, ok.stderr
    assert ok.stderr == ""
    assert ok.stdout == cli("validate", "--no-inputs", *files).stdout
    assert ok.stdout.count(": ok (") == len(RECIPES) == 11
    quickstart = str(ROOT / "recipes" / "quickstart.yaml")
    bad = _run_hook_isolated(tmp_path, ["recipes/bad.yaml", quickstart])
    assert bad.returncode == 2
    assert bad.stderr.splitlines()[0] == (
        "recipes/bad.yaml:4:5: steps[0]: method slerp needs `parameters: {t: ...}`")
    assert "Traceback" not in bad.stderr and "blocked" not in bad.stderr
    assert bad.stdout == f"{quickstart}: ok (1 step(s); inputs not checked)\n"


def test_hook_refuses_a_lockfile_given_by_hand(tmp_path):
    """The pattern excludes lock files; named explicitly, one is refused in one sentence."""
    lock = tmp_path / "merge.lock.json"
    lock.write_text(json.dumps({"recipekit_lock": 1, "recipe": "merge.yaml", "inputs": {}}))
    out = _run_hook_isolated(tmp_path, [lock.name])
    assert out.returncode == 2
    assert out.stderr.splitlines()[0] == (
        "merge.lock.json:1:1: this is a lockfile written by `recipekit lock`, not a recipe; "
        "validate the recipe it pins ('merge.yaml') instead; lockfiles are checked by "
        "`recipekit run`")


def test_validate_no_inputs_without_torch(tmp_path):
    """`recipekit validate --no-inputs` itself (the CLI, not the hook module) needs no torch."""
    (tmp_path / "bad.yaml").write_text(BAD)
    code = ("import sys; sys.modules['torch'] = None; from recipekit.cli import main; "
            "sys.argv = ['recipekit', 'validate', '--no-inputs', *sys.argv[1:]]; main()")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-c", code, *map(str, RECIPES), "bad.yaml"],
                         cwd=tmp_path, capture_output=True, text=True, env=env, check=False)
    assert run.returncode == 2, run.stderr
    assert run.stdout.count(": ok (") == len(RECIPES)
    assert run.stderr.startswith("bad.yaml:4:5: steps[0]: method slerp needs `parameters: "
                                 "{t: ...}`")
    assert "Traceback" not in run.stderr


def test_hook_usage(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    none = subprocess.run([sys.executable, "-m", "recipekit.hook"], cwd=tmp_path,
                          capture_output=True, text=True, env=env, check=False)
    assert none.returncode == 2 and none.stderr.startswith("usage: python -m recipekit.hook")
