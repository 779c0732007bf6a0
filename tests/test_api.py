"""The Python API (`recipekit.api`): the CLI's commands as functions of a path, text or dict.

Oracles: the CLI itself (the same messages, lock and `--frozen` behaviour, resume), the bytes
on disk (sha256 of each shard file, computed here with hashlib), and the three recipe forms
against each other (the same plan hash and the same output bytes).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import recipekit
from recipekit.errors import (
    LockError,
    MergekitConfigError,
    OutputPathError,
    RecipeErrors,
    SourceNotFoundError,
    TensorDataError,
    UsageError,
)

from tests.helpers.builders import rewrite_reordered
from tests.helpers.interrupt import interrupt_at_shard
from tests.helpers.recipes import ROOT, solar_recipe, write_recipe

#: Five shards of the 12-layer fp32 output (about 490 KB).
SHARDED = "  path: ./out\n  shard_size: 100KB"


def forms(recipe: Path) -> dict[str, object]:
    """The same recipe as a path, as YAML text and as a dict."""
    text = recipe.read_text()
    return {"path": recipe, "text": text, "dict": yaml.safe_load(text)}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def recipe(tmp_path: Path, model_copy: Path) -> Path:
    return write_recipe(tmp_path, solar_recipe(output=SHARDED))


class TestThreeForms:
    """A path, YAML text and a dict give the same validation, plan and output bytes."""

    def test_validate(self, recipe):
        results = {k: recipekit.validate(v, base_dir=recipe.parent)
                   for k, v in forms(recipe).items()}
        assert {r.recipe for r in results.values()} == {str(recipe), "<string>", "<dict>"}
        for r in results.values():
            assert (r.steps, r.output_model, r.layers, r.tensors, r.inputs_checked) == (
                1, "up", 12, 111, True)
        assert not recipekit.validate(recipe, inputs=False).inputs_checked

    def test_plan(self, recipe):
        plans = [recipekit.plan(v, base_dir=recipe.parent) for v in forms(recipe).values()]
        assert len({p.plan_hash for p in plans}) == 1
        p = plans[0]
        assert p.output == recipe.parent / "out"
        assert (p.layers, p.tensors, len(p.shards)) == (12, 111, 5)
        assert p.bytes_written == sum(s.bytes for s in p.shards)
        assert p.disk >= p.bytes_written and p.peak_memory > 0 and p.whole_tensor is None
        assert "peak memory:" in p.text()

    def test_run(self, recipe, tmp_path):
        results = {k: recipekit.run(v, base_dir=recipe.parent, output=tmp_path / k,
                                    progress=None, fsync=False)
                   for k, v in forms(recipe).items()}
        hashes = {k: [(s.name, s.sha256) for s in r.shards] for k, r in results.items()}
        assert hashes["path"] == hashes["text"] == hashes["dict"]
        for k, r in results.items():
            assert r.output == tmp_path / k and not r.already_complete
            assert [s.sha256 for s in r.shards] == [sha256(r.output / s.name) for s in r.shards]
            assert r.bytes_written == r.bytes_total == sum(
                (r.output / s.name).stat().st_size for s in r.shards)
            assert r.layers == 12 and r.summary().startswith(f"wrote {r.output}: 12 layers")

    def test_same_bytes_as_the_cli(self, cli, recipe, tmp_path):
        assert cli("run", recipe, "-q", "--no-fsync").exit_code == 0
        r = recipekit.run(recipe.read_text(), base_dir=recipe.parent, output=tmp_path / "api",
                          progress=None)
        assert [s.sha256 for s in r.shards] == [sha256(tmp_path / "out" / s.name)
                                                for s in r.shards]

    def test_dict_values_python_gives(self, recipe, model_copy):
        """Tuples and paths in a dict are what YAML lists and strings would be."""
        data = yaml.safe_load(recipe.read_text())
        data["models"]["tiny"] = str(model_copy)
        python = {**data, "models": {"tiny": model_copy},  # a Path
                  "steps": [{**data["steps"][0], "layers": ("range(0,6)", "range(2,8)")}]}
        assert recipekit.plan(python).plan_hash == recipekit.plan(data).plan_hash

    def test_run_a_plan_result(self, recipe):
        p = recipekit.plan(recipe)
        r = recipekit.run(p, progress=None)
        assert [s.name for s in r.shards] == [s.name for s in p.shards]


class TestErrors:
    """Typed errors with the CLI's located messages."""

    TYPO = solar_recipe().replace("layers: [", "layerz: [")

    def test_text_recipe_paths_are_said_to_be_relative_to_base_dir(self, tmp_path):
        """The hint said "relative to the recipe file", which recipe text does not have."""
        text = "recipekit: 1\nmodels: {a: ./nope}\nsteps: [{name: s, op: layers, from: a, " \
               "layers: [0]}]\n"
        with pytest.raises(SourceNotFoundError, match=r"relative to base_dir \("):
            recipekit.validate(text, base_dir=tmp_path)

    def test_frozen_with_a_missing_lock_file_names_how_to_make_it(self, recipe, tmp_path):
        """`recipekit lock` writes <stem>.lock.json, so it cannot make a lock_file= of
        another name: the hint names `recipekit.lock(recipe, path=...)`."""
        other = tmp_path / "other.lock.json"
        with pytest.raises(UsageError, match=r"recipekit\.lock\(recipe, path="):
            recipekit.run(recipe, frozen=True, lock_file=other, progress=None)

    @pytest.mark.parametrize("name", ["run", "plan"])
    def test_help_shows_the_function(self, name):
        """`recipekit.run` and `recipekit.plan` are also subpackages: `help()`, a notebook's
        `?` and `inspect.signature` showed the package's docstring and ``(*args, **kwargs)``."""
        import inspect

        entry, function = getattr(recipekit, name), getattr(recipekit.api, name)
        assert inspect.signature(entry) == inspect.signature(function)
        assert function.__doc__ in entry.__doc__
        assert entry.__doc__.startswith(f"``recipekit.{name}(...)`` is `recipekit.api.{name}`")

    @pytest.mark.parametrize("workers", [0, -3, 1.5, True])
    def test_workers_as_the_cli_takes_them(self, cli, recipe, workers):
        """`--workers 0` exits 2 in the CLI; the API ran with any value."""
        with pytest.raises(UsageError, match="workers must be a whole number") as e:
            recipekit.run(recipe, workers=workers, progress=None)
        assert e.value.exit_code == 2 and not (recipe.parent / "out").exists()
        with pytest.raises(UsageError, match="workers must be a whole number"):
            recipekit.sweep(recipe, {"x": [1]}, workers=workers)
        assert cli("run", recipe, "--workers", "0").exit_code == 2

    def test_file_message_is_the_clis(self, cli, tmp_path, model_copy):
        r = write_recipe(tmp_path, self.TYPO)
        with pytest.raises(RecipeErrors) as e:
            recipekit.validate(r)
        assert e.value.exit_code == 2
        assert str(e.value) == cli("validate", r).stderr.rstrip("\n")

    def test_text_is_located_by_line(self):
        with pytest.raises(RecipeErrors) as e:
            recipekit.plan(self.TYPO)
        assert str(e.value).splitlines()[0] == (
            "<string>:8:5: steps[0].layerz: unknown key in step 'up' (op: layers); did you "
            "mean 'layers'?")
        assert e.value.errors[0].location.line == 8
        assert e.value.errors[0].key_path == ("steps", 0, "layerz")

    def test_dict_is_located_by_key_path(self):
        with pytest.raises(RecipeErrors) as e:
            recipekit.validate(yaml.safe_load(self.TYPO), inputs=False)
        assert "<dict>: steps[0].layerz: unknown key in step 'up' (op: layers); did you mean " \
               "'layers'?" in str(e.value)

    def test_dict_value_without_json_form(self):
        with pytest.raises(RecipeErrors) as e:
            recipekit.validate({"recipekit": 1, "name": {1, 2}}, inputs=False)
        assert str(e.value) == ("<dict>: name: a set is not a recipe value; use strings, "
                                "numbers, booleans, lists and mappings")

    def test_missing_model(self, tmp_path):
        r = write_recipe(tmp_path, solar_recipe())
        with pytest.raises(SourceNotFoundError) as e:
            recipekit.run(r, progress=None)
        assert e.value.exit_code == 2 and e.value.location.line == 3

    def test_mergekit_config(self, cli, tmp_path):
        cfg = write_recipe(tmp_path, "merge_method: linear\nmodels:\n  - model: a\n"
                           "    parameters: {weight: 1}\n", "merge.yml")
        with pytest.raises(MergekitConfigError) as e:
            recipekit.run(cfg)
        assert str(e.value) == cli("run", cfg).stderr.rstrip("\n")

    def test_not_a_recipe_kind(self):
        with pytest.raises(TypeError, match="a recipe is a path, YAML/JSON text or a mapping"):
            recipekit.validate(42)  # type: ignore[arg-type]


class TestInputChangedAfterPlan:
    """`run(plan)` refuses an input file that is not the version `plan` read its header from:
    the plan's byte offsets are that version's. Oracle: `rewrite_reordered` keeps every tensor
    and value and the file's size but moves every offset (reading the old offsets gave other
    tensors' bytes, exit 0), and the output directory left behind."""

    @pytest.mark.parametrize("in_place", [False, True], ids=["renamed", "in-place"])
    def test_a_rewritten_input_is_refused(self, recipe, tmp_path, in_place):
        reference = recipekit.run(recipekit.plan(recipe, output=tmp_path / "ref"), progress=None)
        plan = recipekit.plan(recipe)
        weights = tmp_path / "model" / "model.safetensors"
        before = weights.stat().st_mtime_ns
        rewrite_reordered(weights, in_place=in_place)
        if weights.stat().st_mtime_ns == before:
            # a write's mtime is the clock's coarse tick: move it as a write a tick later would
            os.utime(weights, ns=(before, before + 1))
        with pytest.raises(TensorDataError) as e:
            recipekit.run(plan, progress=None)
        why = "its modification time moved" if in_place else "it was replaced by another file"
        assert e.value.exit_code == 1
        assert e.value.message == (
            f"the file changed since the plan read its header ({why}): the plan's byte offsets "
            "may not hold for it, so nothing was read from it")
        assert e.value.file.endswith("model/model.safetensors")
        assert "finished shards are kept; run again" in e.value.hint
        out = tmp_path / "out"
        assert not (out / "recipekit.json").exists()
        assert not list(out.glob("*.safetensors")) and not list(out.glob(".*partial"))
        # the advice works: planned again, the rewritten file gives the original's output
        again = recipekit.run(recipekit.plan(recipe, output=tmp_path / "again"), progress=None)
        assert again.shards == reference.shards


    def test_a_changed_config_is_refused(self, recipe, tmp_path):
        """config.json is read when planning (the output's config is made from it) and is
        part of the plan hash: changed afterwards, the output would hold the old values while
        its manifest named the new file, and `verify` and reruns accepted it."""
        plan = recipekit.plan(recipe)
        config = tmp_path / "model" / "config.json"
        data = json.loads(config.read_text())
        data["rope_theta"] = 500000.0
        config.write_text(json.dumps(data))
        with pytest.raises(TensorDataError) as e:
            recipekit.run(plan, progress=None)
        assert e.value.exit_code == 1
        assert e.value.message.startswith("an input's files changed since the plan was made")
        assert not (tmp_path / "out").exists()
        recipekit.run(recipekit.plan(recipe), progress=None)  # planned again: the new config
        assert json.loads((tmp_path / "out" / "config.json").read_text())["rope_theta"] == 5e5


class TestProgress:
    """A progress callback sees the bytes grow to the total and every shard finish."""

    def test_bytes_increase_to_the_total(self, recipe):
        updates = []
        r = recipekit.run(recipe, progress=updates.append, fsync=False)
        done = [u.done for u in updates]
        assert done == sorted(done) and done[-1] == updates[-1].total == r.bytes_total
        assert r.bytes_total == sum((r.output / s.name).stat().st_size for s in r.shards)
        finished = [u.shard_done for u in updates if u.shard_done is not None]
        assert finished == list(r.shards)
        assert {u.tensor for u in updates} >= {"model.embed_tokens.weight", "lm_head.weight"}

    def test_already_complete_reports_the_total(self, recipe):
        recipekit.run(recipe, progress=None, fsync=False)
        updates = []
        r = recipekit.run(recipe, progress=updates.append)
        assert r.already_complete and [u.done for u in updates] == [r.bytes_total]

    @pytest.mark.parametrize("error", [AttributeError, KeyboardInterrupt])
    def test_a_callback_failing_at_once_leaves_nothing_open(self, recipe, error):
        """A callback that raised on its first call (a typo in a notebook's callback, Ctrl-C)
        left the shard's writer thread blocked forever and its partial file open: its first
        call came before the shard's clean-up took over (found by a black-box check)."""
        import threading

        def callback(update):
            raise error("typo")

        with pytest.raises(error):
            recipekit.run(recipe, progress=callback)
        assert not [t for t in threading.enumerate() if t.name == "recipekit-write"]
        out = recipe.parent / "out"
        assert not [f for f in out.iterdir() if f.name.endswith(".recipekit-partial")]
        opened = {os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")}
        assert not [f for f in opened if f.startswith(str(out.resolve()))]
        assert len(recipekit.run(recipe, progress=None, fsync=False).shards) == 5

    def test_auto_is_silent_off_a_terminal(self, recipe, capsys):
        recipekit.run(recipe, fsync=False)
        assert capsys.readouterr() == ("", "")


class TestLikeTheCli:
    """Lock, frozen, resume and force behave as `recipekit run` does (tests/tools/test_lock.py
    has the CLI's side)."""

    def test_lock_and_frozen(self, cli, recipe, model_copy):
        lock = recipekit.lock(recipe)
        assert lock.path == recipe.with_name("recipe.lock.json") and lock.inputs == 1
        recipekit.run(recipe, frozen=True, progress=None, fsync=False)
        weights = model_copy / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 1  # same size, other bytes
        weights.write_bytes(bytes(data))
        with pytest.raises(LockError) as e:
            recipekit.run(recipe, frozen=True, progress=None, force=True)
        assert e.value.exit_code == 2
        cli_err = cli("run", recipe, "--frozen", "-q", "--force")
        assert cli_err.exit_code == 2
        assert str(e.value) == cli_err.stderr.rstrip("\n")

    def test_lock_found_after_a_chdir(self, recipe, model_copy, tmp_path, monkeypatch):
        """A plan of a recipe named by a relative path, run after `os.chdir`, looked for the
        lock relative to the new directory, found none and ran on changed inputs (found by a
        black-box check)."""
        monkeypatch.chdir(recipe.parent)
        recipekit.lock(recipe.name)
        weights = model_copy / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 1
        weights.write_bytes(bytes(data))
        p = recipekit.plan(recipe.name)
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        monkeypatch.chdir(elsewhere)
        with pytest.raises(LockError):
            recipekit.run(p, progress=None)
        assert not (recipe.parent / "out").exists()

    def test_frozen_without_a_lock(self, cli, recipe):
        with pytest.raises(UsageError) as e:
            recipekit.run(recipe, frozen=True, progress=None)
        assert str(e.value) == cli("run", recipe, "--frozen", "-q").stderr.rstrip("\n")
        with pytest.raises(UsageError, match="pass lock_file=PATH"):
            recipekit.run(recipe.read_text(), base_dir=recipe.parent, frozen=True)

    def test_lock_file_for_text(self, recipe, tmp_path):
        lock = recipekit.lock(recipe.read_text(), base_dir=recipe.parent,
                              path=tmp_path / "t.lock.json")
        r = recipekit.run(recipe.read_text(), base_dir=recipe.parent, frozen=True,
                          lock_file=lock.path, progress=None, fsync=False)
        assert len(r.shards) == 5

    def test_resume_and_already_complete(self, recipe, monkeypatch):
        restore, _ = interrupt_at_shard(monkeypatch, 2)
        with pytest.raises(KeyboardInterrupt):
            recipekit.run(recipe, progress=None)
        restore()
        r = recipekit.run(recipe, progress=None)
        assert r.shards_resumed == 1 and [s.resumed for s in r.shards] == [True] + [False] * 4
        assert r.bytes_written == r.bytes_total - r.shards[0].bytes
        again = recipekit.run(recipe, progress=None)
        assert again.already_complete and again.bytes_written == 0
        assert again.shards == tuple(s.__class__(s.name, s.bytes, s.sha256, True)
                                     for s in r.shards)

    def test_force(self, recipe):
        recipekit.run(recipe, progress=None, fsync=False)
        other = recipe.read_text().replace('"range(2,8)"', '"range(4,8)"')
        with pytest.raises(OutputPathError, match="--force"):
            recipekit.run(other, base_dir=recipe.parent, progress=None)
        r = recipekit.run(other, base_dir=recipe.parent, progress=None, force=True)
        assert r.layers == 10


def test_import_recipekit_is_light():
    """`import recipekit` imports neither torch nor the API; the API names resolve lazily and
    `recipekit.run`/`recipekit.plan` stay callable once their subpackages are imported."""
    code = ("import sys, recipekit; assert 'torch' not in sys.modules; "
            "assert 'recipekit.api' not in sys.modules; "
            "import recipekit.run.local, recipekit.plan.render; "
            "assert callable(recipekit.run) and callable(recipekit.plan); "
            "assert recipekit.validate.__module__ == 'recipekit.api'; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
