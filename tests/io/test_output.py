"""io/output.py: the output directory a run owns (lock, state file, cleanup after a failure).

Oracle: the directory listing before and after a failed run; what a rerun then does.
"""

from __future__ import annotations

import shutil

import pytest

from recipekit.io.output import OutputDir

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
