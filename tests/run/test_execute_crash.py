"""Crash safety of `recipekit run` (DESIGN.md §3, Durability and resume): SIGKILL at many points,
rerun, and the output is the one an uninterrupted run writes; no final name ever holds a partial
file; a second concurrent run fails clearly; a different plan needs --force.

Every run here is a subprocess through tests/helpers/crashpoints.py, which instruments the I/O
primitives recipekit's writer uses (os.write/os.open/os.fsync/os.replace/..., shutil.copyfile)
and numbers each call that touches the output directory as an *event*. A traced uninterrupted run
gives the event sequence; each kill point is located in it by label, and the killed run SIGKILLs
itself just before that event. The wrapper also checks the output directory against the
reference before every event (`crashpoints.check_output`), so "never partial" is checked at every
instant of every run here, not only where a run was killed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.crashpoints import MANIFEST, STATE, check_output, is_temp, listing
from tests.helpers.recipes import ROOT, solar_recipe, write_recipe
from tests.helpers.rerun_model import Left, RunModel, observe

WRAPPER = ROOT / "tests" / "helpers" / "crashpoints.py"
INDEX = "model.safetensors.index.json"
SHARD = "model-{:05d}-of-00005.safetensors"
DONOR_EXTRA = {"tokenizer.json": '{"model": {"type": "BPE"}}\n',
               "tokenizer_config.json": '{"model_max_length": 64}\n',
               "sub/extra.json": '{"dim": 32}\n'}
LAYERS_B = '["range(0,3)", "range(5,8)"]'  # 6 layers: 3 shards where the SOLAR recipe has 5


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    env.pop("COLUMNS", None)
    return env


def recipekit(*args: object, cwd: Path, opts: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`recipekit <args>` in a fresh process under the crashpoints wrapper."""
    cmd = [sys.executable, str(WRAPPER), *opts, "--", *(str(a) for a in args)]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=120)


def tmp_of(rel: str) -> str:
    head, _, name = rel.rpartition("/")
    return f"{head}/.{name}.recipekit-partial" if head else f".{name}.recipekit-partial"


def predicted_listing(events: list[str]) -> list[str]:
    """The files the output directory holds after ``events`` (what each event does to names)."""
    files: set[str] = set()
    for e in events:
        kind, rel = e.split(" ", 1)
        if kind == "open" and is_temp(rel):
            files.add(rel)
        elif kind == "replace":
            files.discard(tmp_of(rel))
            files.add(rel)
        elif kind == "unlink":
            files.discard(rel)
    return sorted(files)


def recorded_shards(events: list[str], shards: list[str]) -> int:
    """How many shards a state-file rename recorded after the shard's own rename, in ``events``."""
    count = 0
    for s in shards:
        if f"replace {s}" in events:
            i = events.index(f"replace {s}")
            count += f"replace {STATE}" in events[i:]
    return count


@dataclass
class Env:
    base: Path
    recipe: Path
    recipe_b: Path
    ref: Path  # an uninterrupted run of `recipe`
    ref_b: Path  # an uninterrupted run of `recipe_b`
    events: list[str]  # the traced uninterrupted run of `recipe`
    shards: list[str]

    def event(self, label: str, k: int = 1) -> int:
        """1-based number of the k-th event labelled ``label`` (k=-1: the last)."""
        hits = [i for i, e in enumerate(self.events, 1) if e == label]
        assert hits, f"no event {label!r} in the reference trace"
        return hits[k - 1] if k > 0 else hits[k]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Env:
    base = tmp_path_factory.mktemp("crash")
    shutil.copytree(tiny_llama, base / "model")
    for rel, text in DONOR_EXTRA.items():  # several donor files, one in a subfolder
        (base / "model" / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / "model" / rel).write_text(text)
    output = "  path: ./out\n  shard_size: 100KB"
    recipe = write_recipe(base, solar_recipe("./model", output=output))
    recipe_b = write_recipe(base, solar_recipe("./model", layers=LAYERS_B, output=output),
                            "recipe_b.yaml")
    ref, ref_b = base / "ref", base / "ref_b"
    for r, o in ((recipe, ref), (recipe_b, ref_b)):  # the references: plain CLI, no wrapper
        done = subprocess.run([sys.executable, "-m", "recipekit.cli", "run", str(r), "-q",
                               "-o", str(o)], cwd=base, env=_env(), capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    shards = sorted(p.name for p in ref.glob("model-*.safetensors"))
    assert len(shards) == 5 and len(list(ref_b.glob("model-*.safetensors"))) == 3
    assert {"sub/extra.json", "tokenizer.json", "generation_config.json"} <= set(listing(ref))

    traced = recipekit("run", recipe, "-q", "-o", base / "traced", cwd=base,
                       opts=("--trace", str(base / "trace.json"), "--check", str(ref)))
    assert traced.returncode == 0, traced.stderr
    trace = json.loads((base / "trace.json").read_text())
    assert trace["violations"] == []
    assert_same_as_ref(base / "traced", ref)  # the wrapper changes no byte
    return Env(base, recipe, recipe_b, ref, ref_b, trace["events"], shards)


def assert_same_as_ref(out: Path, ref: Path) -> None:
    """``out`` is what the uninterrupted run ``ref`` wrote: same files, same bytes (the manifest:
    same shard hashes; the state file: complete, same shards and file list)."""
    assert listing(out) == listing(ref)
    assert not [r for r in listing(out) if is_temp(r)]
    for rel in listing(ref):
        if rel == MANIFEST:
            got, want = (json.loads((d / rel).read_text()) for d in (out, ref))
            assert got["shards"] == want["shards"]
        elif rel == STATE:
            got, want = (json.loads((d / rel).read_text()) for d in (out, ref))
            assert got["complete"] is True
            assert got["plan_hash"] == json.loads((out / MANIFEST).read_text())["plan_hash"]
            assert {k: got[k] for k in ("files", "finished")} == {
                k: want[k] for k in ("files", "finished")}
        else:
            assert (out / rel).read_bytes() == (ref / rel).read_bytes(), rel


def no_violations(result: subprocess.CompletedProcess) -> None:
    assert "VIOLATION" not in result.stderr, result.stderr


# -- the kill points ------------------------------------------------------------------------------
#: name -> where the run dies: just before the event this returns (a number in the reference trace)
KILL_POINTS: dict[str, Callable[[Env], int]] = {
    "before-the-output-dir-exists": lambda e: 1,
    # regression: the rerun refused the state file's own temp as a file recipekit did not write
    "state-file-temp-written-not-renamed": lambda e: e.event(f"replace {STATE}"),
    "state-written-before-any-shard": lambda e: e.event(f"open {tmp_of(e.shards[0])}"),
    "mid-first-shard": lambda e: e.event(f"write {tmp_of(e.shards[0])}", 10),
    "first-shard-written-before-fsync": lambda e: e.event(f"fsync {tmp_of(e.shards[0])}"),
    "first-shard-renamed-before-state-records-it": lambda e: e.event(f"replace {e.shards[0]}") + 1,
    "first-shard-state-temp-not-renamed": lambda e: e.event(f"replace {STATE}", 2),
    "between-shards": lambda e: e.event(f"open {tmp_of(e.shards[2])}"),
    "mid-last-shard": lambda e: e.event(f"write {tmp_of(e.shards[-1])}", 5),
    "last-shard-renamed-before-state-records-it": lambda e: e.event(f"replace {e.shards[-1]}") + 1,
    "all-shards-before-index": lambda e: e.event(f"open {tmp_of(INDEX)}"),
    "index-temp-written-not-renamed": lambda e: e.event(f"replace {INDEX}"),
    "index-before-config": lambda e: e.event(f"open {tmp_of('config.json')}"),
    "config-before-donor-files": lambda e: e.event(f"open {tmp_of('generation_config.json')}"),
    "donor-file-copied-not-renamed": lambda e: e.event("replace tokenizer.json"),
    "between-donor-files": lambda e: e.event(f"open {tmp_of('tokenizer_config.json')}"),
    "donor-subfolder-made-still-empty": lambda e: e.event(f"open {tmp_of('sub/extra.json')}"),
    "readme-before-manifest": lambda e: e.event(f"open {tmp_of(MANIFEST)}"),
    "manifest-temp-written-not-renamed": lambda e: e.event(f"replace {MANIFEST}"),
    # a finished output keeps no state file: the kill lands after the manifest, before its removal
    "manifest-before-state-file-removed": lambda e: e.event(f"unlink {STATE}"),
}


@dataclass
class Outcome:
    n: int  # the event the run died before
    out: Path
    killed: subprocess.CompletedProcess
    after_kill: list[str]  # the output directory's listing right after the kill
    problems_after_kill: list[str]  # check_output right after the kill
    rerun: subprocess.CompletedProcess


def kill_and_rerun(env: Env, point: str) -> Outcome:
    out = env.base / "points" / point / "out"
    out.parent.mkdir(parents=True)  # as for the reference: only `out` itself is made by the run
    n = KILL_POINTS[point](env)
    killed = recipekit("run", env.recipe, "-q", "-o", out, cwd=env.base,
                       opts=("--kill", str(n), "--check", str(env.ref)))
    after, problems = listing(out), check_output(out, env.ref)
    rerun = recipekit("run", env.recipe, "-q", "-o", out, cwd=env.base,
                      opts=("--check", str(env.ref)))
    return Outcome(n, out, killed, after, problems, rerun)


@pytest.fixture(scope="module")
def outcomes(env: Env) -> dict[str, Outcome]:
    """Every kill point's kill + rerun, run side by side (each in its own directory) to keep the
    file fast; the tests below judge them one by one."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        futures = {p: pool.submit(kill_and_rerun, env, p) for p in KILL_POINTS}
        return {p: f.result() for p, f in futures.items()}


class TestKillAndRerun:
    """SIGKILL at each kill point, then rerun to the end.

    Oracle: the bytes of an uninterrupted run (the manifest: its shard hashes), and the file
    listing the reference trace predicts at the kill point.
    """

    @pytest.mark.parametrize("point", list(KILL_POINTS))
    def test_killed_run_resumes_to_identical_output(self, env, outcomes, cli, point):
        o = outcomes[point]
        n, killed, rerun = o.n, o.killed, o.rerun
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert f"kill at event {n}: {env.events[n - 1]}\n" in killed.stderr
        no_violations(killed)  # before every event of the killed run: nothing final is partial
        assert o.problems_after_kill == []
        assert o.after_kill == predicted_listing(env.events[:n - 1])
        assert (MANIFEST in o.after_kill) == (point == "manifest-before-state-file-removed")

        assert rerun.returncode == 0, rerun.stderr
        no_violations(rerun)
        resumed = recorded_shards(env.events[:n - 1], env.shards)
        assert "5 shard(s)" in rerun.stdout
        assert (f", {resumed} resumed" in rerun.stdout) if resumed else (
            "resumed" not in rerun.stdout), rerun.stdout
        assert_same_as_ref(o.out, env.ref)

        again = cli("run", env.recipe, "-q", "-o", o.out)
        assert again.exit_code == 0 and "already complete" in again.stdout, again.output

    def test_kill_points_cover_every_phase(self, env):
        """≥ 12 distinct points, in order, in every phase of a run."""
        numbers = [f(env) for f in KILL_POINTS.values()]
        assert len(set(numbers)) == len(numbers) >= 12
        assert numbers == sorted(numbers)
        kinds = {env.events[n - 1].split(" ")[0] for n in numbers}
        assert {"mkdir", "open", "write", "fsync", "replace"} <= kinds

    def test_killed_again_while_resuming(self, env, tmp_path):
        out = tmp_path / "out"
        kills = [f"write {tmp_of(env.shards[1])}", f"replace {env.shards[3]}",
                 f"open {tmp_of('tokenizer.json')}", f"replace {STATE}"]
        for label in kills:
            killed = recipekit("run", env.recipe, "-q", "-o", out, cwd=env.base,
                               opts=("--kill-on", label, "--check", str(env.ref)))
            assert killed.returncode == -signal.SIGKILL, killed.stderr
            assert f": {label}\n" in killed.stderr
            no_violations(killed)
        rerun = recipekit("run", env.recipe, "-q", "-o", out, cwd=env.base,
                          opts=("--check", str(env.ref)))
        assert rerun.returncode == 0, rerun.stderr
        no_violations(rerun)
        assert ", 5 resumed" in rerun.stdout  # the last kill hit the final state save
        assert_same_as_ref(out, env.ref)


class TestRerunModel:
    """tests/helpers/rerun_model.py, the kill soak's model of a killed run and its rerun.

    Oracle: the real program's traced events. A killed run's whole event list (the wrapper
    writes it just before the kill) and its rerun's must be the ones `RunModel.run` predicts,
    and what the kill left (state file's finished shards and complete flag, temp files) the
    one `RunModel.left_by` predicts. These are the sequences the safe-write helper makes: the
    folder fsync after every rename, a leftover temp removed when its name is next opened, a
    finished shard's events skipped through its state save's folder fsync.
    """

    def _run(self, env: Env, out: Path, model: RunModel, before: Left,
             kill: int | None) -> Left:
        steps = model.run(before)
        trace = out.parent / "trace.json"
        opts = ("--check", str(env.ref), "--trace", str(trace))
        done = recipekit("run", env.recipe, "-q", "-o", out, cwd=env.base,
                         opts=(*opts, "--kill", str(kill)) if kill else opts)
        no_violations(done)
        assert json.loads(trace.read_text())["events"] == [s.label for s in steps[:kill]]
        if kill is None:
            assert done.returncode == 0, done.stderr
            assert_same_as_ref(out, env.ref)
            return before
        assert done.returncode == -signal.SIGKILL, done.stderr
        left = model.left_by(steps, kill - 1, before)
        assert observe(out) == left
        return left

    @pytest.mark.parametrize(("kills", "finished", "complete", "temp"), [
        # a shard's temp left mid-write: the rerun's open fails, unlinks it, opens again
        ([(f"write {tmp_of(SHARD.format(1))}", 3)], 0, False, tmp_of(SHARD.format(1))),
        # the state temp left, shard 2 renamed but not recorded: rewritten, after a cleanup
        ([(f"replace {STATE}", 3)], 1, False, tmp_of(STATE)),
        # 3 shards recorded: their events, through each state save's folder fsync, skipped
        ([(f"open {tmp_of(SHARD.format(4))}", 1)], 3, False, None),
        # the final state save done: "already complete", only the opening events
        ([("fsync .", -1)], 5, True, None),
        # killed again in the rerun, on the leftover's cleanup, then after two more shards
        ([(f"write {tmp_of(SHARD.format(2))}", 2), (f"unlink {tmp_of(SHARD.format(2))}", 1),
          (f"open {tmp_of(SHARD.format(5))}", 1)], 4, False, None),
    ], ids=["shard-temp-left", "state-temp-left", "shards-finished", "complete", "twice"])
    def test_model_predicts_every_event(self, env, tmp_path, kills, finished, complete, temp):
        model = RunModel(env.events, env.shards)
        assert [s.label for s in model.run()] == env.events
        out = tmp_path / "out"
        left = Left()
        for label, k in kills:  # the k-th event so labelled in this run's predicted sequence
            hits = [j for j, s in enumerate(model.run(left), 1) if s.label == label]
            left = self._run(env, out, model, left, hits[k - 1] if k > 0 else hits[k])
        assert left == Left(frozenset(env.shards[:finished]), complete,
                            frozenset([temp] if temp else []))
        if complete:
            assert [s.label for s in model.run(left)] == ["mkdir .", "open ."]  # and the lock
        self._run(env, out, model, left, None)


class TestDifferentPlanAfterKill:
    """A killed run, then another recipe into the same directory.

    Oracle: the bytes of an uninterrupted run of the second recipe.
    """

    def test_needs_force_and_force_leaves_no_stale_file(self, env, tmp_path, cli):
        out = tmp_path / "out"
        killed = recipekit("run", env.recipe, "-q", "-o", out, cwd=env.base,
                           opts=("--kill", str(env.event(f"write {tmp_of(env.shards[3])}", 3))))
        assert killed.returncode == -signal.SIGKILL
        before = {rel: (out / rel).read_bytes() for rel in listing(out)}
        assert {env.shards[2], tmp_of(env.shards[3])} <= set(before)

        refused = recipekit("run", env.recipe_b, "-q", "-o", out, cwd=env.base)
        assert refused.returncode == 2, refused.stderr
        assert "holds the output of a different plan" in refused.stderr
        assert "--force" in refused.stderr
        assert {rel: (out / rel).read_bytes() for rel in listing(out)} == before

        forced = recipekit("run", env.recipe_b, "-q", "-o", out, "--force", cwd=env.base)
        assert forced.returncode == 0, forced.stderr
        assert_same_as_ref(out, env.ref_b)  # not one of the first plan's 5 shard names is left
        again = cli("run", env.recipe_b, "-q", "-o", out)
        assert again.exit_code == 0 and "already complete" in again.stdout, again.output

    @pytest.mark.parametrize("name", ["config.json", "sub/extra.json", "README.md"])
    def test_force_after_a_kill_that_followed_a_small_files_rename(self, env, tmp_path, name):
        """Killed just after a small file was renamed into place: `--force` took that file for
        one put there by someone else and refused (the state file recorded it only after the
        rename; found by a black-box check). It is recorded before the rename now."""
        out = tmp_path / "out"
        killed = recipekit("run", env.recipe, "-q", "-o", out, cwd=env.base,
                           opts=("--kill", str(env.event(f"replace {name}") + 1)))
        assert killed.returncode == -signal.SIGKILL
        assert (out / name).exists()
        forced = recipekit("run", env.recipe_b, "-q", "-o", out, "--force", cwd=env.base)
        assert forced.returncode == 0, forced.stderr
        assert_same_as_ref(out, env.ref_b)

    def _killed_while_forcing(self, env: Env, out: Path) -> None:
        """A complete output of `recipe` (a copy of the reference run, state file included), then
        `recipe_b --force` killed mid-deletion."""
        shutil.copytree(env.ref, out)
        killed = recipekit("run", env.recipe_b, "-q", "-o", out, "--force", cwd=env.base,
                           opts=("--kill-on", f"unlink {env.shards[1]}"))
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert env.shards[0] not in listing(out) and env.shards[1] in listing(out)

    def test_force_killed_while_deleting_then_forced_again(self, env, tmp_path):
        out = tmp_path / "out"
        self._killed_while_forcing(env, out)
        forced = recipekit("run", env.recipe_b, "-q", "-o", out, "--force", cwd=env.base)
        assert forced.returncode == 0, forced.stderr
        assert_same_as_ref(out, env.ref_b)

    def test_force_killed_while_deleting_then_first_recipe_again(self, env, tmp_path):
        """The state must stop saying complete before --force deletes anything (regression:
        shards were deleted first, and the first recipe's rerun said "already complete")."""
        out = tmp_path / "out"
        self._killed_while_forcing(env, out)
        rerun = recipekit("run", env.recipe, "-q", "-o", out, cwd=env.base)
        assert rerun.returncode == 0, rerun.stderr
        assert "already complete" not in rerun.stdout  # shard 1 is gone
        assert_same_as_ref(out, env.ref)


def _wait_stopped(proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        with open(f"/proc/{proc.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.01)
    raise AssertionError("run A never reached its stop point")


class TestConcurrentRun:
    """Run A paused mid-shard (SIGSTOP at an event); run B into the same output.

    Oracle: the flock's documented behaviour (B fails clearly and touches nothing; the lock dies
    with A) and the bytes of an uninterrupted run.
    """

    @pytest.mark.parametrize("then", ["A-continues", "A-is-killed"])
    def test_second_run_fails_clearly_until_the_first_ends(self, env, tmp_path, cli, then):
        out = tmp_path / "out"
        n = env.event(f"write {tmp_of(env.shards[1])}", 10)
        cmd = [sys.executable, str(WRAPPER), "--stop", str(n), "--check", str(env.ref), "--",
               "run", str(env.recipe), "-q", "-o", str(out)]
        a = subprocess.Popen(cmd, cwd=env.base, env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        try:
            _wait_stopped(a)
            before = {rel: (out / rel).read_bytes() for rel in listing(out)}
            assert tmp_of(env.shards[1]) in before  # A is mid-shard
            b = recipekit("run", env.recipe, "-q", "-o", out, cwd=env.base)
            assert b.returncode == 1, b.stderr
            assert "another recipekit run is writing to" in b.stderr
            assert {rel: (out / rel).read_bytes() for rel in listing(out)} == before
            a.send_signal(signal.SIGCONT if then == "A-continues" else signal.SIGKILL)
            a_out, a_err = a.communicate(timeout=120)
        finally:
            if a.poll() is None:
                a.kill()
                a.communicate()
        assert "VIOLATION" not in a_err, a_err
        if then == "A-continues":
            assert a.returncode == 0, a_err
        else:
            assert a.returncode == -signal.SIGKILL
            b = recipekit("run", env.recipe, "-q", "-o", out, cwd=env.base,
                          opts=("--check", str(env.ref)))
            assert b.returncode == 0, b.stderr
            assert ", 1 resumed" in b.stdout
            no_violations(b)
        assert_same_as_ref(out, env.ref)
        again = cli("run", env.recipe, "-q", "-o", out)  # the lock is free again
        assert again.exit_code == 0 and "already complete" in again.stdout, again.output
