"""io/output.py: the output directory a run owns (lock, state file, cleanup after a failure).

Oracle: the directory listing before and after a failed run; what a rerun then does.
"""

from __future__ import annotations

import shutil

import pytest

from recipekit.io.output import OutputDir

from tests.helpers.interrupt import interrupt_at_shard, interrupt_before_manifest
from tests.helpers.recipes import solar_recipe, write_recipe


def _listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _no_free_disk(monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1, 1, 10))


class TestFailedRunLeavesNoEmptyDirectory:
    """A run that stops before writing anything (not enough free disk) removes the folders it
    created, and only those, only while empty."""

    @pytest.mark.parametrize("output", ["out", "deep/er/out"])
    def test_created_folders_are_removed(self, cli, tmp_path, tiny_llama, monkeypatch, output):
        r = write_recipe(tmp_path, solar_recipe(tiny_llama, output=f"  path: ./{output}"))
        before = _listing(tmp_path)
        _no_free_disk(monkeypatch)
        result = cli("run", r, "-q")
        assert result.exit_code == 1
        assert result.stderr.startswith(f"{tmp_path / output}: not enough free disk: the "
                                        "output needs ")
        assert _listing(tmp_path) == before

    def test_an_existing_directory_is_kept(self, cli, tmp_path, tiny_llama, monkeypatch):
        (tmp_path / "out").mkdir()  # the user's empty folder: not ours to remove
        r = write_recipe(tmp_path, solar_recipe(tiny_llama, output="  path: ./out/model"))
        _no_free_disk(monkeypatch)
        assert cli("run", r, "-q").exit_code == 1
        assert _listing(tmp_path) == ["out", "recipe.yaml"]

    def test_a_folder_that_is_no_longer_empty_stays(self, tmp_path):
        out = tmp_path / "a" / "out"
        with pytest.raises(RuntimeError), OutputDir(out, plan_hash="h", files=[]):
            (tmp_path / "a" / "theirs").write_text("x")  # written meanwhile, beside the output
            raise RuntimeError
        assert _listing(tmp_path) == ["a", "a/theirs"]

    def test_success_keeps_the_directory(self, tmp_path):
        with OutputDir(tmp_path / "out", plan_hash="h", files=[]):
            pass
        assert (tmp_path / "out").is_dir()

    def test_a_rerun_after_freeing_space_writes_the_output(self, cli, tmp_path, tiny_llama,
                                                           monkeypatch):
        r = write_recipe(tmp_path, solar_recipe(tiny_llama, output="  path: ./out"))
        with monkeypatch.context() as m:
            _no_free_disk(m)
            assert cli("run", r, "-q").exit_code == 1
        assert cli("run", r, "-q").exit_code == 0
        assert (tmp_path / "out" / "model.safetensors").is_file()


class TestResumeKeepsFilesPutThere:
    """A file put in an interrupted run's output, at the name of a file the run had not written
    yet, was overwritten by the rerun (README said such files could not be told from the run's
    own). A run's files are a function of its plan: the rerun replaces a file there only when
    it holds the very bytes the run writes (the run's own, renamed before a kill could record
    it), and otherwise refuses (exit 2), keeping the file and the finished shards. Oracle: the
    file's bytes, and the output of an uninterrupted run."""

    SHARD = "model-{:05d}-of-00005.safetensors"

    @pytest.fixture
    def interrupted(self, tmp_path, model_copy, monkeypatch):
        import recipekit

        recipe = write_recipe(tmp_path, solar_recipe(output="  path: ./out\n  shard_size: 100KB"))
        clean = recipekit.run(recipe, output=str(tmp_path / "clean"), progress=None, fsync=False)
        restore, _ = interrupt_at_shard(monkeypatch, 3)
        with pytest.raises(KeyboardInterrupt):
            recipekit.run(recipe, progress=None, fsync=False)
        restore()
        return recipe, tmp_path / "out", clean.output

    @pytest.mark.parametrize("name", ["config.json", "README.md", SHARD.format(4)])
    def test_a_file_put_there_is_kept(self, cli, interrupted, name):
        recipe, out, clean = interrupted
        (out / name).write_bytes(b"mine\n")
        result = cli("run", recipe, "-q")
        assert result.exit_code == 2, result.output
        assert f"{name} is not a file this run wrote" in result.stderr
        assert "move it away and run again" in result.stderr
        assert (out / name).read_bytes() == b"mine\n"
        assert (out / self.SHARD.format(1)).read_bytes() == (clean / self.SHARD.format(1)
                                                               ).read_bytes()
        (out / name).unlink()
        assert cli("run", recipe, "-q").exit_code == 0
        assert _listing(out) == _listing(clean)
        for f in clean.iterdir():
            if f.name != "recipekit.json":  # it names its own output path
                assert (out / f.name).read_bytes() == f.read_bytes(), f.name

    def test_the_runs_own_bytes_are_taken(self, cli, interrupted):
        """A shard or small file the killed run renamed into place before recording it holds
        the run's bytes: the rerun goes on."""
        recipe, out, clean = interrupted
        for name in ("config.json", self.SHARD.format(3)):
            shutil.copyfile(clean / name, out / name)
        result = cli("run", recipe, "-q")
        assert result.exit_code == 0, result.output
        assert (out / self.SHARD.format(3)).read_bytes() == (clean / self.SHARD.format(3)
                                                               ).read_bytes()

    def test_force_keeps_a_file_put_there(self, cli, interrupted):
        """`--force` after that refusal deleted the file (the state file lists every name the
        run would write, written or not; found by a black-box check of the resume fix): the
        state now records each small file as it is written, and `--force` over an interrupted
        run refuses, deleting nothing, when a listed name holds a file it did not record."""
        recipe, out, _ = interrupted
        (out / "README.md").write_bytes(b"mine\n")
        before = _listing(out)
        other = recipe.read_text().replace('"range(2,8)"', '"range(4,8)"')
        recipe.write_text(other)
        result = cli("run", recipe, "-q", "--force")
        assert result.exit_code == 2, result.output
        assert "README.md (put there or changed after the interrupted run)" in result.stderr
        assert _listing(out) == before and (out / "README.md").read_bytes() == b"mine\n"

    def test_a_comment_edited_after_the_kill_keeps_the_runs_own_card(self, cli, tmp_path,
                                                                    model_copy, monkeypatch):
        """Killed before its manifest, then a comment of the recipe edited: the same plan,
        whose model card (it quotes the recipe) now differs from the one the run wrote and
        recorded. The rerun refused that card as "not a file this run wrote" (found by a
        hole-finder); a file that holds what the run recorded writing is its own."""
        import recipekit

        recipe = write_recipe(tmp_path, "# comment v1\n" + solar_recipe())
        interrupt_before_manifest(monkeypatch, OutputDir)
        with pytest.raises(KeyboardInterrupt):
            recipekit.run(recipe, progress=None, fsync=False)
        monkeypatch.undo()
        out = tmp_path / "out"
        assert "# comment v1" in (out / "README.md").read_text()
        recipe.write_text(recipe.read_text().replace("v1", "v2"))
        result = cli("run", recipe, "-q")
        assert result.exit_code == 0, result.output
        assert "# comment v2" in (out / "README.md").read_text()
        assert cli("verify", out).exit_code == 0

    def test_force_replaces_what_the_interrupted_run_wrote(self, cli, tmp_path, model_copy,
                                                           monkeypatch):
        """Killed after its config.json and donor files were written (recorded), before its
        model card: `--force` with another plan deletes them as its own and writes the new
        output."""
        import recipekit
        import recipekit.run.finish as fin

        recipe = write_recipe(tmp_path, solar_recipe(output="  path: ./out\n  shard_size: 100KB"))

        def killed(plan):
            raise KeyboardInterrupt

        monkeypatch.setattr(fin, "build_model_card", killed)
        with pytest.raises(KeyboardInterrupt):
            recipekit.run(recipe, progress=None, fsync=False)
        monkeypatch.undo()
        out = tmp_path / "out"
        assert (out / "config.json").exists() and not (out / "README.md").exists()
        recipe.write_text(recipe.read_text().replace('"range(2,8)"', '"range(4,8)"'))
        result = cli("run", recipe, "-q", "--force")
        assert result.exit_code == 0, result.output
        assert cli("verify", out).exit_code == 0

