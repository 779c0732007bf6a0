"""Sweeps (`recipekit/run/sweep.py`, `sweep_ray.py`, `recipekit sweep`, `recipekit.sweep`).

Oracle: separate runs. Each combination's shards must hash (sha256, computed here with hashlib)
like ``recipekit run --set ...`` of the same values into another directory; the index must
list every combination with its status; a failure must not stop the others; a rerun must
resume. The Ray sweep must write the same bytes as the local one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import recipekit
from recipekit.errors import RecipeErrors, UsageError
from recipekit.run.sweep import combination_name, iter_combinations, parse_sweep_settings

from tests.helpers.recipes import ROOT, write_recipe
from tests.helpers.sweeps import SWEEP_RECIPE as RECIPE
from tests.helpers.sweeps import shard_hashes


@pytest.fixture
def recipe(tmp_path, tiny_llama, tiny_llama_b) -> Path:
    return write_recipe(tmp_path, RECIPE.format(a=tiny_llama, b=tiny_llama_b))


class TestNames:
    """Combination names: the values set, in the recipe's order, one portable component."""

    def test_order_and_escaping(self):
        combos = iter_combinations({"dtype": ["float32"], "alpha": [0.1, 1e-05]},
                                   ["alpha", "dtype"])
        assert [c.name for c in combos] == ["alpha=0.1,dtype=float32",
                                            "alpha=1e-05,dtype=float32"]
        assert combination_name({"p": "a/b,c=d é"}) == "p=a%2Fb%2Cc%3Dd%20%C3%A9"
        assert combination_name({"w": [0.5, 0.5]}) == "w=%5B0.5%2C0.5%5D"
        long = combination_name({"x": "y" * 400})
        assert len(long) == 200 and "/" not in long

    @pytest.mark.parametrize("texts, values", [
        (["alpha=0.1,0.3"], {"alpha": [0.1, 0.3]}),
        (["alpha=[0.1, 0.3]", "m=ties"], {"alpha": [0.1, 0.3], "m": ["ties"]}),
        (['m=["a,b", c]'], {"m": ["a,b", "c"]}),
        (["w=[[1, 0], [0, 1]]"], {"w": [[1, 0], [0, 1]]}),
    ])
    def test_values(self, texts, values):
        assert parse_sweep_settings(texts) == values

    @pytest.mark.parametrize("texts, message", [
        ([], "a sweep needs at least one --set NAME=V1,V2,..."),
        (["a=0.1,0.10"], "--set a: 0.1 is given twice"),
        (["a=1", "a=2"], "--set a is given twice; list every value in one option"),
        (["a=[]"], "--set a: the list of values is empty"),
        (["a=1,"], "--set a: an empty value in '1,'; remove the extra comma"),
        (["a="], "--set a: no value after '='"),
    ])
    def test_mistakes(self, texts, message):
        with pytest.raises(UsageError) as e:
            parse_sweep_settings(texts)
        assert e.value.render().startswith(message)


class TestLocalSweep:
    """Every combination equals its separate run; the index says what happened."""

    def test_outputs_equal_separate_runs(self, recipe, tmp_path, cli):
        result = cli("sweep", recipe, "--set", "alpha=0.25,0.75", "--set",
                     "dtype=float32,bfloat16")
        assert result.exit_code == 0, result.output
        root = tmp_path / "out" / "grid"
        names = ["alpha=0.25,dtype=float32", "alpha=0.25,dtype=bfloat16",
                 "alpha=0.75,dtype=float32", "alpha=0.75,dtype=bfloat16"]
        index = json.loads((root / "sweep.json").read_text())
        assert index["recipekit_sweep"] == 1 and index["recipe"] == "../../recipe.yaml"
        assert index["variables"] == ["alpha", "dtype"]
        assert [(c["name"], c["output"], c["status"]) for c in index["combinations"]] == [
            (n, n, "written") for n in names]
        seen = set()
        for c in index["combinations"]:
            alone = tmp_path / "alone" / c["name"]
            run = cli("run", recipe, "-o", alone, "-q", "--set", f"alpha={c['values']['alpha']}",
                      "--set", f"dtype={c['values']['dtype']}")
            assert run.exit_code == 0, run.output
            assert shard_hashes(root / c["name"]) == shard_hashes(alone) == c["shards"]
            manifest = json.loads((root / c["name"] / "recipekit.json").read_text())
            assert manifest["variables"] == c["values"]
            assert manifest["plan_hash"] == c["plan_hash"]
            seen.add(c["plan_hash"])
        assert len(seen) == 4
        verified = cli("verify", root / names[1])
        assert verified.exit_code == 0
        assert "still matches the recorded recipe" in verified.stdout

    def test_resume(self, recipe, tmp_path):
        first = recipekit.sweep(recipe, {"alpha": [0.25]})
        assert [c.status for c in first.combinations] == ["written"]
        again = recipekit.sweep(recipe, {"alpha": [0.25, 0.75]})
        assert [(c.name, c.status) for c in again.combinations] == [
            ("alpha=0.25", "complete"), ("alpha=0.75", "written")]
        assert again.combinations[0].shards == first.combinations[0].shards

    def test_killed_sweep_resumes(self, recipe, tmp_path):
        """A sweep SIGKILLed inside its second combination (every shard written, the index
        not yet): the rerun reports the first complete, resumes the second from its shards,
        and both equal separate runs."""
        recipe.write_text(recipe.read_text().replace("path: out/grid",
                                                     "path: out/grid\n  shard_size: 100KB"))
        root = tmp_path / "out" / "grid"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
        killed = subprocess.run(
            [sys.executable, str(ROOT / "tests" / "helpers" / "crashpoints.py"), "--kill-on",
             "replace alpha=0.75/model.safetensors.index.json", "--", "sweep", str(recipe),
             "-o", str(root), "--set", "alpha=0.25,0.75"],
            env=env, capture_output=True, text=True, timeout=300)
        assert killed.returncode == -9, killed.stderr
        index = json.loads((root / "sweep.json").read_text())
        assert [c["status"] for c in index["combinations"]] == ["written", "pending"]
        again = recipekit.sweep(recipe, {"alpha": [0.25, 0.75]})
        assert [c.status for c in again.combinations] == ["complete", "resumed"]
        alone = recipekit.run(recipe, variables={"alpha": 0.75}, output=tmp_path / "alone",
                              progress=None)
        assert len(alone.shards) > 1
        assert shard_hashes(root / "alpha=0.75") == shard_hashes(tmp_path / "alone")

    def test_failing_combination(self, recipe, tmp_path, cli):
        root = tmp_path / "out" / "grid"
        root.mkdir(parents=True)
        (root / "alpha=0.5").write_text("not a directory")  # this output cannot be written
        result = cli("sweep", recipe, "--set", "alpha=0.25,0.5,0.75")
        assert result.exit_code == 1
        assert "alpha=0.5: failed:\n" in result.stderr
        index = json.loads((root / "sweep.json").read_text())
        rows = {c["name"]: c for c in index["combinations"]}
        assert [rows[n]["status"] for n in ("alpha=0.25", "alpha=0.5", "alpha=0.75")] == [
            "written", "failed", "written"]
        assert rows["alpha=0.5"]["exit_code"] == 2 and rows["alpha=0.5"]["error"]
        assert (root / "alpha=0.5").read_text() == "not a directory"  # never deleted

    def test_bad_value_fails_before_anything_runs(self, recipe, tmp_path, cli):
        result = cli("sweep", recipe, "--set", "alpha=0.25,abc")
        assert result.exit_code == 2
        assert result.stderr == (
            f"{recipe}:12:12: steps[0].alpha: expected a number, got 'abc' (from variable "
            "'alpha' set by --set) [in alpha=abc]\n        alpha: ${alpha}\n"
            "               ^\n")
        assert not (tmp_path / "out").exists()

    def test_undeclared_variable(self, recipe, cli):
        result = cli("sweep", recipe, "--set", "alhpa=0.1,0.2")
        assert result.exit_code == 2
        assert "--set alhpa: the recipe declares no variable 'alhpa'; did you mean 'alpha'?" in (
            result.stderr)
        assert "[in " not in result.stderr  # the same in every combination: said once

    def test_output_path_depending_on_a_swept_variable(self, recipe, tmp_path, cli):
        text = recipe.read_text().replace("path: out/grid", "path: out/blend-${alpha}")
        recipe.write_text(text)
        result = cli("sweep", recipe, "--set", "alpha=0.25,0.75")
        assert result.exit_code == 2
        assert "output.path depends on a swept variable" in result.stderr
        ok = cli("sweep", recipe, "--set", "alpha=0.25,0.75", "-o", tmp_path / "root")
        assert ok.exit_code == 0, ok.output
        assert (tmp_path / "root" / "alpha=0.75" / "model.safetensors").is_file()

    def test_dry_run_writes_nothing(self, recipe, tmp_path, cli):
        result = cli("sweep", recipe, "--set", "alpha=0.25,0.75", "--dry-run")
        assert result.exit_code == 0, result.output
        plans = [recipekit.plan(recipe, variables={"alpha": a}, output=tmp_path / "out" /
                                "grid" / f"alpha={a}").plan_hash for a in (0.25, 0.75)]
        assert result.stdout.splitlines()[:2] == [
            f"alpha={a}: plan {h} -> {tmp_path / 'out' / 'grid' / f'alpha={a}'}"
            for a, h in zip((0.25, 0.75), plans, strict=True)]
        assert not (tmp_path / "out").exists()

    def test_json(self, recipe, tmp_path, cli):
        result = cli("sweep", recipe, "--set", "alpha=0.25", "--json")
        assert result.exit_code == 0
        assert json.loads(result.stdout) == json.loads(
            (tmp_path / "out" / "grid" / "sweep.json").read_text())

    def test_ray_missing(self, recipe, cli, monkeypatch):
        monkeypatch.setitem(sys.modules, "ray", None)
        result = cli("sweep", recipe, "--set", "alpha=0.25", "--executor", "ray")
        assert result.exit_code == 2
        assert result.stderr == ("--executor ray needs Ray, which is not installed; "
                                 "pip install 'recipekit[ray]'\n")

    def test_address_needs_ray(self, recipe, cli):
        result = cli("sweep", recipe, "--set", "alpha=0.25", "--address", "1.2.3.4:6379")
        assert result.exit_code == 2 and "--address is used by --executor ray" in result.stderr


def _tree(folder: Path) -> dict[str, str]:
    """Every entry under ``folder``: a file's sha256, or "dir"."""
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            if p.is_file() else "dir" for p in sorted(folder.rglob("*"))}


class TestRootApartFromInputs:
    """A sweep root that is, or lies inside, an input is refused before anything is written
    (exit 2), like a run's output: the index used to be written into the model directory."""

    @pytest.fixture
    def local(self, tmp_path, tiny_llama, tiny_llama_b) -> Path:
        import shutil

        shutil.copytree(tiny_llama, tmp_path / "m")
        shutil.copytree(tiny_llama_b, tmp_path / "m2")
        return write_recipe(tmp_path, RECIPE.format(a="./m", b="./m2"))

    @pytest.mark.parametrize("root, message", [
        ("m", "sweep root {t}/m is input `models.a` ({t}/m)"),
        ("m/sub", "sweep root {t}/m/sub lies inside input `models.a` ({t}/m)"),
        ("recipe.yaml", "sweep root {t}/recipe.yaml is the recipe {t}/recipe.yaml"),
    ])
    def test_refused_before_anything_is_written(self, local, tmp_path, cli, root, message):
        before = _tree(tmp_path)
        result = cli("sweep", local, "--set", "alpha=0.25,0.75", "-o", tmp_path / root)
        assert result.exit_code == 2, result.output
        assert result.stderr == (
            message.format(t=tmp_path) + "; pass --output a directory apart from the recipe's "
            "inputs: a sweep writes there, and inputs are never touched\n")
        assert _tree(tmp_path) == before

    def test_index_that_would_be_the_recipe(self, tmp_path, tiny_llama, tiny_llama_b, cli):
        recipe = write_recipe(tmp_path, RECIPE.format(a=tiny_llama, b=tiny_llama_b),
                              name="sweep.json.yaml")
        (tmp_path / "sweep.json").symlink_to(recipe)  # the index would replace this link
        before = _tree(tmp_path)
        result = cli("sweep", recipe, "--set", "alpha=0.25", "-o", tmp_path)
        assert result.exit_code == 2
        assert result.stderr.startswith(
            f"sweep index {tmp_path}/sweep.json is the recipe {recipe}")
        assert _tree(tmp_path) == before

    def test_root_that_is_a_file(self, recipe, tmp_path, cli):
        (tmp_path / "notes.txt").write_text("mine")
        result = cli("sweep", recipe, "--set", "alpha=0.25", "-o", tmp_path / "notes.txt")
        assert result.exit_code == 2
        assert result.stderr == (f"sweep root {tmp_path}/notes.txt exists and is not a "
                                 "directory; pass --output a directory, or a path that does "
                                 "not exist\n")
        assert (tmp_path / "notes.txt").read_text() == "mine"

    def test_root_containing_the_inputs_is_fine(self, local, tmp_path):
        result = recipekit.sweep(local, {"alpha": [0.25]}, output=tmp_path)
        assert [c.status for c in result.combinations] == ["written"]
        assert (tmp_path / "sweep.json").is_file()


def test_api_errors(recipe):
    with pytest.raises(UsageError):
        recipekit.sweep(recipe, {})
    with pytest.raises(RecipeErrors, match="values= beta: the recipe declares no variable"):
        recipekit.sweep(recipe, {"beta": [1]})
    with pytest.raises(UsageError, match="unknown executor 'dask'"):
        recipekit.sweep(recipe, {"alpha": [0.1]}, executor="dask")  # type: ignore[arg-type]




class TestUrlRoots:
    """A sweep's root is a local directory (its index and each combination's folder are
    written with local file calls): a URL root is refused (exit 2) before anything is written,
    never made a folder ``s3:`` or the unused placeholder out/<stem> of a URL output.path;
    ``file://`` names its local path."""

    def test_url_output_path_needs_output(self, recipe, tmp_path):
        text = recipe.read_text()
        assert "  path: out/grid\n" in text
        url_recipe = write_recipe(tmp_path, text.replace("  path: out/grid\n",
                                                         "  path: s3://bkt/sweep\n"),
                                  name="url.yaml")
        with pytest.raises(UsageError, match="a sweep's root is a local directory, and the "
                           r"recipe's output.path is a URL; pass --output DIR"):
            recipekit.sweep(url_recipe, {"alpha": [0.25]}, dry_run=True)
        assert not (tmp_path / "out").exists()

    def test_api_root_url(self, recipe, tmp_path, monkeypatch):
        monkeypatch.chdir(tmp_path)  # where the folder `s3:` was made
        with pytest.raises(UsageError) as e:
            recipekit.sweep(recipe, {"alpha": [0.25]}, output="s3://KEY:SECRET@bkt/x",
                            dry_run=True)
        assert e.value.render().startswith("the sweep root s3://***@bkt/x is a URL")
        result = recipekit.sweep(recipe, {"alpha": [0.25]}, output=f"file://{tmp_path}/root",
                                 dry_run=True)
        assert result.root == tmp_path / "root"
