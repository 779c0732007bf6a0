"""A sweep on Ray: each combination is one Ray task that runs the whole recipe on a worker.

Why tasks of whole runs: combinations are independent outputs, so the unit of work is a run
(`recipekit.run.sweep.run_combination`, as the local sweep does one after another), not a
shard; this needs nothing of the per-shard Ray executor but its connection (`ray.connect`:
the same bounded wait and message for a wrong address). The driver validates every
combination first (`plan_sweep`), submits one plain `ray.remote` task per combination, and
rewrites `sweep.json` as each returns. Workers must see the recipe, its inputs and the sweep's
root at the same paths as the driver (one machine, or a shared file system).

A worker that dies is retried by Ray (``max_retries``); the retried run resumes from that
combination's finished shards like any interrupted run. Oracle: tests/run/test_ray.py runs a
sweep on its two-node local cluster and compares every shard's sha256 with the local sweep.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from recipekit.run.ray import connect
from recipekit.run.sweep import (
    INDEX_NAME,
    Combination,
    CombinationResult,
    SweepPlan,
    SweepResult,
    run_combination,
    write_index,
)

#: Retries of a combination whose worker died (a run resumes from its finished shards).
MAX_RETRIES = 2


def _run_remote(sp: SweepPlan, c: Combination, options: dict[str, Any]) -> CombinationResult:
    """The task body: one whole run of one combination on a worker, no progress display."""
    return run_combination(sp, c, progress=None, **options)


def run_sweep_ray(sp: SweepPlan, *, address: str | None = None,
                  on_result: Callable[[CombinationResult], None] | None = None,
                  **options: Any) -> SweepResult:
    """Run every combination as a Ray task, all submitted at once (Ray schedules them on the
    cluster's CPUs), and write the index as each finishes.

    Connects to ``address``, else ``RAY_ADDRESS`` (Ray's own convention), else starts a local
    Ray on this machine; a Ray already initialised in this process is used as it is. ``options``
    go to each run (`recipekit.api.run`: device, force, fsync, workers).

    Raises:
        ExtraMissingError: ray is not installed.
        ClusterError: the cluster cannot be reached (a wrong address: in about 20 s,
            `ray.connect`).
    """
    if isinstance(sp.recipe, Path):  # a worker's working directory may be another
        sp = dataclasses.replace(sp, recipe=sp.recipe.resolve())
    with connect(address) as ray:
        task = ray.remote(max_retries=MAX_RETRIES)(_run_remote)
        results = {c.name: CombinationResult(c.name, c.values, sp.output(c), "pending")
                   for c in sp.combinations}
        write_index(sp, results.values())
        pending = {task.remote(sp, c, options): c for c in sp.combinations}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                c = pending.pop(ref)
                try:
                    results[c.name] = ray.get(ref)
                except Exception as e:  # the task failed for good: a worker crash, retried
                    results[c.name] = CombinationResult(
                        c.name, c.values, sp.output(c), "failed",
                        error=f"the Ray task failed: {type(e).__name__}: {e}", exit_code=1)
                write_index(sp, results.values())
                if on_result is not None:
                    on_result(results[c.name])
        return SweepResult(sp.root, sp.root / INDEX_NAME, tuple(results.values()),
                           sp.recipe_file)
