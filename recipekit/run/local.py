"""Run a plan on this machine: fetch the hub shards it reads, stream its shards, finish the
output directory, or the output prefix on object storage (run/target.py). Resuming, locking and
space checks are the output's (io/output.py, io/remote_output.py).
"""

from __future__ import annotations

import gc
from pathlib import Path

from recipekit.graph import Load
from recipekit.inputs.models import iter_donor_files
from recipekit.io.output import OutputDir
from recipekit.io.remote_output import RemoteOutput
from recipekit.plan import Plan
from recipekit.plan.overlap import check_plan_output
from recipekit.run.device import resolve_device
from recipekit.run.execute import Progress, RunEvents, RunResult, stream_shards
from recipekit.run.fetch import fetch_hub_shards
from recipekit.run.finish import finish_output, output_files
from recipekit.run.target import check_remote_inputs, open_output, output_location


def run_plan(plan: Plan, *, device: str = "cpu", fsync: bool = True, force: bool = False,
             progress: Progress | None = None, check_finite: bool = False,
             workers: int | None = None, events: RunEvents | None = None) -> RunResult:
    """Write the plan's output directory (resuming finished shards of the same plan).

    ``workers`` threads compute row pieces side by side on the CPU (default: `piece_workers`);
    they change no byte of the output. ``progress`` gets the bytes of each piece written (resumed
    shards count whole), ``events`` the tensor being written and each shard's sha256.

    Raises:
        OutputPathError: the output is a file, holds foreign files, or another plan's output;
            or it is, lies inside or contains an input (with or without ``force``).
        OutputError: disk full, another run holds the lock, I/O failure.
        CorruptCheckpointError: an input changed or broke while being read.
    """
    if plan.recipe.output.url is None:
        check_plan_output(plan)  # before anything is fetched, created or deleted
    plan = fetch_hub_shards(plan)
    check_remote_inputs(plan)
    # A plan that only moves bytes never needs torch: skip its import (about a second).
    computes = any(not isinstance(t.node, Load) for s in plan.shards for t in s.tensors)
    dev = resolve_device(device) if computes or device != "cpu" or check_finite else None
    # The cyclic GC's full collections walk every object alive, and torch's import leaves about
    # a million: move them out of its reach (they live as long as the process anyway). The run
    # itself makes no reference cycles (see `evaluate`).
    gc.freeze()
    out_path = output_location(plan)
    donor_files = iter_donor_files(plan.donor.path) if plan.donor is not None else []
    with open_output(plan, output_files(plan, donor_files), force=force, fsync=fsync) as out:
        if out.already_complete:
            return RunResult(out_path, True, 0, len(plan.shards), 0,
                             shards=_hashes(out, plan))
        todo = [s for s in plan.shards if not out.is_finished(s.filename)]
        out.begin(sum(s.size for s in todo) + _donor_bytes(plan, donor_files) + (1 << 20))
        found = stream_shards(plan, out, dev, fsync=fsync, progress=progress,
                              check_finite=check_finite, workers=workers, events=events)
        finish_output(plan, out, donor_files)
        hashes = _hashes(out, plan)
    return RunResult(out_path, False, len(todo), len(plan.shards) - len(todo),
                     sum(s.size for s in todo), found, hashes)


def _hashes(out: OutputDir | RemoteOutput, plan: Plan) -> dict[str, str]:
    """Each shard's sha256 as the state file records it (computed while streaming)."""
    return {s.filename: str(out.state.finished.get(s.filename, {}).get("sha256", ""))
            for s in plan.shards}


def _donor_bytes(plan: Plan, donor_files: list[Path]) -> int:
    return sum((plan.donor.path / p).stat().st_size  # type: ignore[union-attr]
               for p in donor_files)
