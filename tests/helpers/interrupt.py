"""Ctrl-C at a chosen shard of a run in this process: what a user's interrupt leaves behind.

Why a helper: resume, progress and output-directory tests each need a run stopped after its
first shards (the kill tests' subprocesses are heavier than these need).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def interrupt_at_shard(monkeypatch: Any, n: int) -> tuple[Callable[[], None], list[str]]:
    """Make the ``n``-th shard a run starts raise KeyboardInterrupt (the ones before it are
    written); returns the function that puts the real writer back, and the list of the shard
    names started (filled as the run goes)."""
    import recipekit.run.execute as ex

    real, calls = ex.write_shard, []

    def failing(plan: Any, shard: Any, *a: Any, **k: Any) -> str:
        calls.append(shard.filename)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(plan, shard, *a, **k)

    monkeypatch.setattr(ex, "write_shard", failing)
    return (lambda: monkeypatch.setattr(ex, "write_shard", real)), calls


def interrupt_before_manifest(monkeypatch: Any, output_cls: type) -> None:
    """Make ``output_cls`` (`OutputDir`, `RemoteOutput`) raise KeyboardInterrupt where it
    would write the manifest, the file written last: every other file is in place. Undone by
    ``monkeypatch.undo()``."""
    from recipekit.io.names import MANIFEST

    write = output_cls.write_file

    def killed(out: Any, rel: str, data: bytes) -> None:
        if rel == MANIFEST:
            raise KeyboardInterrupt
        write(out, rel, data)

    monkeypatch.setattr(output_cls, "write_file", killed)
