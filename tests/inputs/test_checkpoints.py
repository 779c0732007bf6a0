"""inputs/checkpoints.py: what `inspect` and `diff` open (a directory, a file, a hub repo).

Oracle: the messages users see for inputs they cannot read (the kernel's answer for a mode-000
directory, simulated where chmod does not bite, as for root).
"""

from __future__ import annotations

import shutil

import pytest

from tests.helpers.permissions import unreadable_dir


@pytest.mark.parametrize("command", [["inspect", "{m}"], ["diff", "{m}", "{other}"],
                                     ["diff", "{other}", "{m}"]])
def test_unreadable_directory_is_named(cli, tmp_path, tiny_llama, monkeypatch, command):
    """Exit 2 naming the directory, as for an unreadable shard; no internal PermissionError
    on m/adapter_config.json or m/pytorch_model.bin."""
    m = tmp_path / "m"
    shutil.copytree(tiny_llama, m)
    args = [a.format(m=m, other=tiny_llama) for a in command]
    with unreadable_dir(m, monkeypatch):
        result = cli(*args)
    assert result.exit_code == 2, result.output
    assert result.stderr == (f"{m}: cannot read: Permission denied; give the user running "
                             "recipekit read and search permission on it (chmod u+rx)\n")
