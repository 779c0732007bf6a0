"""What a rerun of a killed `recipekit run` does, predicted from one traced uninterrupted run.

The kill soak (bench/kill_soak.py) and the crash tests kill a run at an event of the reference
trace (tests/helpers/crashpoints.py numbers every I/O call on the output directory), rerun it,
and check that each kill lands on the event they meant. That needs the rerun's own event
sequence, which is the reference's with three differences the safe-write helper
(recipekit/io/writer.py) and the state file make:

* a shard the state file records as finished is skipped whole: its temp's open, writes, fsync
  and rename, the folder fsyncs (``open .``, ``fsync .``) after the rename and before the state
  save, and the state save itself with its folder fsync;
* a temp file the killed run left is removed when the rerun first opens that name: the
  exclusive open fails, the leftover is unlinked, the open is retried (``open T``,
  ``unlink T``, ``open T`` where the reference has one ``open T``);
* an output whose state file says complete is "already complete": only the opening events
  (making the folder, opening it for the lock) happen.

`RunModel.run` predicts that sequence from what the killed run left (`Left`); `RunModel.left_by`
predicts what a run killed after its first k events leaves, by replaying what each event does to
the folder; `observe` reads the same facts off a real output directory, so a harness can check
the prediction after every kill. The oracle of the model itself is a traced real rerun
(tests/run/test_execute_crash.py, TestRerunModel): its whole event list must equal `run`'s.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from recipekit.io.names import MANIFEST

from tests.helpers.crashpoints import STATE, is_temp, listing

FOLDER_FSYNC = ["open .", "fsync ."]  # writer.fsync_dir: the folder opened, then fsynced


def tmp_of(rel: str) -> str:
    """The temp name recipekit writes ``rel`` under (writer.partial_path)."""
    head, _, name = rel.rpartition("/")
    return f"{head}/.{name}.recipekit-partial" if head else f".{name}.recipekit-partial"


@dataclass(frozen=True)
class Step:
    """One event of a predicted run: its label and the 0-based index of the reference event it
    is (``cleanup``: an extra event removing a leftover temp, placed at the reference event it
    comes just before)."""

    label: str
    ref: int
    cleanup: bool = False


@dataclass(frozen=True)
class Left:
    """What a killed run leaves that shapes the next run's events: the shards its state file
    records as finished, whether that file says complete, and the temp files left behind."""

    finished: frozenset[str] = frozenset()
    complete: bool = False
    temps: frozenset[str] = frozenset()


def observe(out: Path) -> Left:
    """The `Left` of a real output directory (an unreadable or missing state file: nothing
    finished)."""
    try:
        state = json.loads((out / STATE).read_text())
        finished, complete = frozenset(state["finished"]), bool(state.get("complete"))
    except FileNotFoundError:  # a finished output keeps no state: its manifest says it all
        try:
            shards = json.loads((out / MANIFEST).read_text())["shards"]
            finished, complete = frozenset(shards), True
        except (OSError, ValueError, KeyError, TypeError):
            finished, complete = frozenset(), False
    except (OSError, ValueError, KeyError, TypeError):
        finished, complete = frozenset(), False
    return Left(finished, complete, frozenset(rel for rel in listing(out) if is_temp(rel)))


class RunModel:
    """The event sequence of an uninterrupted run (``events``) writing ``shards``, and what
    follows from it for killed runs and their reruns."""

    def __init__(self, events: list[str], shards: list[str]) -> None:
        self.events = events
        self.shards = shards
        saves = [i for i, e in enumerate(events) if e == f"replace {STATE}"]
        self.final_save = saves[-1] if saves else -1  # the save that says complete
        #: a run with a manifest removes the state file once it is written (run/finish.py)
        self.drops_state = f"unlink {STATE}" in events
        opens = [i for i, e in enumerate(events) if e == f"open {tmp_of(STATE)}"]
        self.opening = opens[0] if opens else len(events)  # events before the first state save

    def state_save(self, shard: str) -> int:
        """0-based index of the state file's rename that records ``shard`` as finished."""
        renamed = self.events.index(f"replace {shard}", self.events.index(f"open {tmp_of(shard)}"))
        return self.events.index(f"replace {STATE}", renamed)

    def segment(self, shard: str) -> range:
        """0-based indexes of a shard's events: its temp's open through the state save that
        records it, with that save's folder fsync (a rerun that finds it finished skips them
        all)."""
        start = self.events.index(f"open {tmp_of(shard)}")
        end = self.state_save(shard) + 1
        if self.events[end:end + 2] == FOLDER_FSYNC:  # absent with --no-fsync
            end += 2
        return range(start, end)

    def run(self, left: Left = Left()) -> list[Step]:
        """The events of a run started on an output a killed run left as ``left`` (``Left()``:
        a new output, the reference run itself)."""
        if left.complete:
            return [Step(e, i) for i, e in enumerate(self.events[:self.opening])]
        skip = {i for s in left.finished for i in self.segment(s)}
        temps = set(left.temps)
        steps: list[Step] = []
        for i, e in enumerate(self.events):
            if i in skip:
                continue
            kind, _, rel = e.partition(" ")
            if kind == "open" and rel in temps:  # writer.open_exclusive removes a leftover
                temps.discard(rel)
                steps += [Step(e, i, True), Step(f"unlink {rel}", i, True)]
            steps.append(Step(e, i))
        return steps

    def left_by(self, steps: list[Step], ran: int, before: Left = Left()) -> Left:
        """What a run of ``steps`` (started on ``before``) leaves when killed after its first
        ``ran`` events: each event's effect on the folder, replayed."""
        finished, complete, temps = set(before.finished), before.complete, set(before.temps)
        renamed: set[str] = set()  # shards this run renamed into place
        for step in steps[:ran]:
            kind, _, rel = step.label.partition(" ")
            if kind == "open" and is_temp(rel):
                temps.add(rel)
            elif kind == "unlink" and rel == STATE:  # after the manifest: complete
                finished |= set(self.shards)
                complete = True
            elif kind == "unlink":
                temps.discard(rel)
            elif kind == "replace":
                temps.discard(tmp_of(rel))
                if rel == STATE:  # the state file records every shard renamed so far
                    finished |= renamed
                    complete = step.ref == self.final_save and not self.drops_state
                elif rel in self.shards:
                    renamed.add(rel)
        return Left(frozenset(finished), complete, frozenset(temps))
