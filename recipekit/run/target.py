"""Where a run writes: a local output directory (io/output.py) or an output prefix on object
storage (io/remote_output.py), behind one interface that the local executor (and executors that
write shards from other processes) use; and the check that URL inputs did not change since the
plan was made.
"""

from __future__ import annotations

from pathlib import Path

from recipekit.io.output import OutputDir
from recipekit.io.remote_output import RemoteOutput
from recipekit.io.urls import is_url
from recipekit.plan import Plan
from recipekit.plan.overlap import check_url_apart


def output_location(plan: Plan) -> Path | str:
    """The output's local path, or its URL."""
    return plan.recipe.output.url or plan.recipe.output.path


def open_output(plan: Plan, files: list[str], *, force: bool, fsync: bool
                ) -> OutputDir | RemoteOutput:
    """The output of ``plan``, not yet entered (use it as a context manager)."""
    url = plan.recipe.output.url
    if url is None:
        return OutputDir(plan.recipe.output.path, plan_hash=plan.plan_hash(), files=files,
                         force=force, fsync=fsync)
    check_url_apart(url, plan.recipe)  # compile checked it; a plan may come from elsewhere
    return RemoteOutput(url, plan_hash=plan.plan_hash(), files=files, force=force, fsync=fsync)


def shard_target(location: str, unrecorded: frozenset[str] = frozenset()
                 ) -> OutputDir | RemoteOutput:
    """The output at ``location`` (a local path or a URL) as a worker process of another
    executor writes shards into it: not entered (no lock, no listing, no state; the process
    that owns the output records each shard with `mark_finished`). ``unrecorded``: the names
    the owner found taken (its output's `unrecorded`): a shard written at one replaces the
    file there only if it holds the same bytes, as in a local run."""
    if is_url(location):
        return RemoteOutput(location, plan_hash="", files=[], unrecorded=unrecorded)
    return OutputDir(Path(location), plan_hash="", files=[], unrecorded=unrecorded)


def check_remote_inputs(plan: Plan) -> None:
    """Each URL input object the plan reads still has the size and ETag it was planned from
    (one HEAD each): a changed object would mix two versions into one output.

    Raises:
        TensorDataError: an object changed or disappeared.
    """
    from recipekit.inputs.remote import check_unchanged

    read: dict[str, set[str]] = {}
    for node in plan.loads():
        ckpt = plan.sources[node.source]
        if getattr(ckpt, "remote", None) is None:
            continue
        info = ckpt.tensors[node.name]
        read.setdefault(node.source, set()).add(info.file.relative_to(ckpt.remote.path)
                                                .as_posix())
    for name, files in sorted(read.items()):
        check_unchanged(plan.sources[name].remote, sorted(files))
