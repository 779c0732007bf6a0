"""Kill soak: SIGKILL `recipekit run` at dozens of I/O events of a many-shard output, resume it,
and check that the output is byte for byte the one an uninterrupted run writes.

    python bench/kill_soak.py [--points N] [--seed S] [--fixture small|tinyllama] [--jobs J]
                              [--double F] [--no-fsync]

This is tests/run/test_execute_crash.py's idea at scale (DESIGN.md section 3, Durability and
resume), run on a synthetic checkpoint from ``fixtures.py`` with a SOLAR-style upscale cut
into many shards:

1. build (or reuse) the fixture; run one uninterrupted reference with the plain CLI and hash it
   (`crashpoints.write_digests`: the wrapped runs compare with the hashes, no bytes are kept);
2. trace a second uninterrupted run with tests/helpers/crashpoints.py (imported, not copied): its
   event list numbers every I/O call the writer makes on the output directory;
3. choose the kill points: every phase boundary (first event, first state save, the start of
   each shard, index, config, donor files, README, manifest, the final state save; and each of
   a shard's four commit windows once: written not fsynced, fsynced not renamed, renamed not
   yet recorded, state temp not renamed), then random events (seeded) up to ``--points``;
4. for each point, in its own directory: run with ``--kill N`` (SIGKILL just before event N);
   for about half the points (``--double``), rerun and kill it again at a random event after
   N's place in the work (located in the rerun's own numbering, which tests/helpers/
   rerun_model.py predicts: the shards the state file records as finished skipped, a leftover
   temp file removed where its name is next opened); rerun to the end; then check:
   * every wrapped run: the wrapper's continuous check (``--check``: before every event, no
     final name holds a partial or wrong file, the state file is valid and truthful), its whole
     event list is the predicted one, and the kill landed on the predicted event label;
   * after each kill: the finished shards, complete flag and temp files are the predicted ones;
   * the final run reports the predicted number of resumed shards (those the state file held),
     or "already complete" where the kill came after the final state save;
   * the output has the reference's file list; shards, index, config and donor files have its
     sha256; the manifest its ``shards``; the state file is complete with the same files and
     finished shards;
   * one more plain run says "already complete".

A summary table goes to stdout, per-point records to ``bench/results/kill-soak-<stamp>.json``
(gitignored). Exit 1 on any violation, mismatch or failed check (2: no reference could be
made).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
TESTS = ROOT / "tests"
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))  # the `tests` package, for its helpers

import fixtures  # noqa: E402 - bench/ is a folder of scripts, not a package

from tests.helpers.crashpoints import (  # noqa: E402
    MANIFEST,
    STATE,
    check_output,
    digest,
    is_temp,
    listing,
    write_digests,
)
from tests.helpers.rerun_model import Left, RunModel, Step, observe, tmp_of  # noqa: E402

WRAPPER = TESTS / "helpers" / "crashpoints.py"
RESULTS = BENCH / "results"
INDEX = "model.safetensors.index.json"
TIMEOUT = 600

#: A mid-size Llama (0.46 GiB, 3 input shards): 16 layers at width 1024.
SOAK_SMALL = fixtures.LlamaShape("soak-small", num_layers=16, hidden=1024, heads=16, kv_heads=4,
                                 intermediate=2816, vocab=32000, rms_norm_eps=1e-5)


@dataclass(frozen=True)
class Fixture:
    description: str
    build: Callable[[], Path]  # builds (or reuses) the input checkpoint
    layers: list[tuple[int, int]]  # the SOLAR ranges
    shard_size: str


FIXTURES: dict[str, Fixture] = {
    "small": Fixture(
        "soak-small (16 layers x 1024, 0.46 GiB) -> SOLAR 24 layers, 0.63 GiB in 64MB shards",
        lambda: fixtures.make_llama_checkpoint(SOAK_SMALL, 0, max_shard_size=200_000_000),
        [(0, 12), (4, 16)], "64MB"),
    "tinyllama": Fixture(
        "tinyllama (22 layers x 2048, 2.05 GiB) -> SOLAR 32 layers, 2.87 GiB in 400MB shards",
        lambda: fixtures.make_tinyllama(0), [(0, 16), (6, 22)], "400MB"),
}


# -- running recipekit ----------------------------------------------------------------------------
def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    env.pop("COLUMNS", None)
    return env


def recipekit(recipe: Path, out: Path, *flags: str, wrapper: tuple[str, ...] | None = None,
              ) -> subprocess.CompletedProcess:
    """`recipekit run RECIPE -o OUT -q FLAGS` in a fresh process (under the crashpoints wrapper
    with options ``wrapper`` unless that is None)."""
    args = ["run", str(recipe), "-o", str(out), "-q", *flags]
    cmd = ([sys.executable, str(WRAPPER), *wrapper, "--", *args] if wrapper is not None
           else [sys.executable, "-m", "recipekit.cli", *args])
    return subprocess.run(cmd, cwd=out.parent, env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT)


# -- the reference trace --------------------------------------------------------------------------
class Trace(RunModel):
    """The traced uninterrupted run: its events, and (`RunModel`) what a killed run leaves and
    which events its rerun makes."""

    def first(self, label: str) -> int:
        """1-based number of the first event labelled ``label``."""
        return self.events.index(label) + 1

    def boundaries(self) -> dict[int, str]:
        """Event number -> name of every phase boundary: the first event of each phase (setup,
        first state save, each shard, index, config, donor files, README, manifest, final state
        save), and each of a shard's four commit windows once, on shards spread over the run."""
        last_state = len(self.events) - self.events[::-1].index(f"replace {STATE}")
        points = {1: "start", self.first(f"open {tmp_of(STATE)}"): "first state save"}
        for k, s in enumerate(self.shards, 1):
            points[self.first(f"open {tmp_of(s)}")] = f"shard {k} start"
        n = len(self.shards)
        windows = [  # (shard index, event, name): written-not-fsynced ... recorded-not-renamed
            (0, lambda s: self.first(f"fsync {tmp_of(s)}"), "written, not fsynced"),
            (n // 3, lambda s: self.first(f"replace {s}"), "fsynced, not renamed"),
            ((2 * n) // 3, lambda s: self.first(f"replace {s}") + 1,
             "renamed, state not updated"),
            (n - 1, lambda s: self.state_save(s) + 1, "state temp written, not renamed"),
        ]
        for k, event, name in windows:
            with contextlib.suppress(ValueError):  # no fsync events with --no-fsync
                points[event(self.shards[k])] = f"shard {k + 1} {name}"
        # donor files are written like every file (a temp opened, then renamed): the first
        # temp opened after config.json's that is not the card's, the manifest's or the state's
        # (the folder's own opens, ``open .`` for its fsyncs, are not temps)
        after = self.events[self.first(f"open {tmp_of('config.json')}"):]
        own = {tmp_of(x) for x in ("README.md", MANIFEST, STATE)}
        donor = next((e for e in after if e.startswith("open ") and is_temp(e[5:])
                      and e[5:] not in own), "")
        for label, name in [(f"open {tmp_of(INDEX)}", "index"),
                            (f"open {tmp_of('config.json')}", "config"),
                            (donor, "donor files"), (f"open {tmp_of('README.md')}", "README"),
                            (f"open {tmp_of(MANIFEST)}", "manifest")]:
            if label in self.events:
                points[self.first(label)] = f"{name} start"
        points[last_state] = "final state save (manifest there, state not complete)"
        return points

    def where(self, i: int) -> str:
        """What the run is doing at 0-based event ``i`` (for the report)."""
        label = self.events[i]
        for k, s in enumerate(self.shards, 1):
            if i in self.segment(s):
                return f"shard {k}: {label}"
        return label


def choose_points(trace: Trace, total: int, rng: random.Random) -> dict[int, str]:
    points = dict(sorted(trace.boundaries().items()))
    others = [n for n in range(1, len(trace.events) + 1) if n not in points]
    extra = rng.sample(others, min(len(others), max(0, total - len(points))))
    points.update({n: "random" for n in extra})
    return dict(sorted(points.items()))


# -- one kill point -------------------------------------------------------------------------------
KILL_LINE = re.compile(r"crashpoints: kill at event (\d+): (.*)")


@dataclass
class PointResult:
    event: int
    kind: str  # "random" or the phase boundary's name
    label: str
    where: str
    runs: list[dict[str, object]] = field(default_factory=list)
    kills: int = 0
    reruns: int = 0
    resumed: int = 0  # shards the reruns found finished (summed over this point's reruns)
    violations: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not (self.violations or self.mismatches or self.failures)


@dataclass
class Soak:
    recipe: Path
    ref: Path  # the uninterrupted output directory
    ref_digests: Path  # its write_digests file (what --check compares with)
    ref_files: dict[str, list]  # rel -> [size, sha256]
    trace: Trace
    flags: tuple[str, ...]  # for every wrapped run (e.g. --no-fsync)


def _differs(got: list[str], want: list[str]) -> str | None:
    """Where the event list ``got`` first departs from the predicted ``want`` (None: same)."""
    if got == want:
        return None
    k = next((k for k, (g, w) in enumerate(zip(got, want, strict=False)) if g != w),
             min(len(got), len(want)))
    was, then = (repr(x[k]) if k < len(x) else "the end" for x in (got, want))
    return f"event {k + 1} was {was}, predicted {then} ({len(got)} vs {len(want)} events)"


def run_point(soak: Soak, scratch: Path, n: int, kind: str, second: float | None) -> PointResult:
    """Kill at event ``n``; if ``second`` (in [0, 1)) is given, kill the rerun again at a later
    event chosen by it; then finish and check.

    Every wrapped run's whole event list (written by the wrapper, at exit or just before its
    kill) must be the one `RunModel.run` predicts from what the previous run left, and what each
    kill leaves (finished shards, complete flag, temp files) the one `RunModel.left_by`
    predicts: the oracle is the traced uninterrupted run."""
    t0 = time.perf_counter()
    tr = soak.trace
    res = PointResult(n, kind, tr.events[n - 1], tr.where(n - 1))
    out = scratch / f"point-{n:05d}" / "out"
    out.parent.mkdir(parents=True)

    def wrapped(steps: list[Step], kill: int | None,
                before: Left) -> tuple[subprocess.CompletedProcess, Left]:
        """Run ``steps`` (killed before event ``kill``), check it; the process and what it
        left."""
        trace = out.parent / f"trace-{len(res.runs)}.json"
        opts = ("--check", str(soak.ref_digests), "--trace", str(trace),
                *(("--kill", str(kill)) if kill else ()))
        expect = steps[kill - 1].label if kill else None
        done = recipekit(soak.recipe, out, *soak.flags, wrapper=opts)
        run: dict[str, object] = {
            "kill_at": kill, "expected_label": expect, "returncode": done.returncode,
            "stdout": done.stdout.strip(), "stderr_tail": done.stderr[-1500:]}
        if kill:
            run["reference_event"] = steps[kill - 1].ref + 1
        res.runs.append(run)
        res.violations += [ln for ln in done.stderr.splitlines() if "VIOLATION" in ln]
        try:
            events = json.loads(trace.read_text())["events"]
        except (OSError, ValueError, KeyError):
            events = None
        want = [s.label for s in steps[:kill]]
        if events is None:
            res.failures.append(f"run {len(res.runs)} wrote no trace")
        elif (why := _differs(events, want)) is not None:
            res.failures.append(f"run {len(res.runs)}: the event sequence changed: {why}")
        if not kill:
            return done, before
        got = KILL_LINE.search(done.stderr)
        if done.returncode != -9 or not got:
            res.failures.append(f"run to be killed at event {kill} exited {done.returncode}")
        else:
            res.kills += 1
            if (int(got[1]), got[2]) != (kill, expect):
                res.failures.append(f"killed at event {got[1]} ({got[2]}), expected "
                                    f"{kill} ({expect}): the event sequence changed")
        problems = check_output(out, soak.ref_digests)
        res.violations += [f"after the kill at event {kill}: {p}" for p in problems]
        left, seen = tr.left_by(steps, kill - 1, before), observe(out)
        if seen != left:
            res.failures.append(f"the kill at event {kill} left {seen}, predicted {left}")
        return done, left

    _, left = wrapped(tr.run(), n, Left())
    if second is not None:
        rerun = tr.run(left)
        later = [j for j, s in enumerate(rerun, 1) if s.ref >= n]  # after event n's place
        if later:
            m = later[int(second * len(later))]
            res.reruns += 1
            res.resumed += 0 if left.complete else len(left.finished)
            _, left = wrapped(rerun, m, left)
    res.resumed += 0 if left.complete else len(left.finished)
    res.reruns += 1
    final, _ = wrapped(tr.run(left), None, left)
    if final.returncode != 0:
        res.failures.append(f"the final rerun exited {final.returncode}: {final.stderr[-800:]}")
    else:
        resumed = len(left.finished)
        want = ("already complete" if left.complete else f"{len(tr.shards)} shard(s)"
                + (f", {resumed} resumed," if resumed else ","))
        if want not in final.stdout:
            res.failures.append(f"the final rerun said {final.stdout.strip()!r}, expected "
                                f"{want!r} (the "
                                f"state file recorded {resumed} finished"
                                f"{', complete' if left.complete else ''})")
    res.mismatches += compare(out, soak)
    again = recipekit(soak.recipe, out, *soak.flags)
    res.runs.append({"plain": True, "returncode": again.returncode,
                     "stdout": again.stdout.strip()})
    if again.returncode != 0 or "already complete" not in again.stdout:
        res.failures.append(f"a further run did not say 'already complete': "
                            f"{again.returncode} {again.stdout!r} {again.stderr[-500:]!r}")
    shutil.rmtree(out.parent, ignore_errors=True)
    res.seconds = time.perf_counter() - t0
    return res


def compare(out: Path, soak: Soak) -> list[str]:
    """How ``out`` differs from the reference (hashes; the manifest: its shards; the state:
    complete, same files and finished shards)."""
    problems = []
    have, want = listing(out), listing(soak.ref)
    if have != want:
        problems.append(f"file list differs: extra {sorted(set(have) - set(want))}, "
                        f"missing {sorted(set(want) - set(have))}")
    problems += [f"temp file left: {rel}" for rel in have if is_temp(rel)]
    for rel in set(have) & set(want):
        if rel in (MANIFEST, STATE):
            got, ref = (json.loads((d / rel).read_text()) for d in (out, soak.ref))
            keys = (("shards",) if rel == MANIFEST
                    else ("plan_hash", "files", "finished", "complete"))
            for k in keys:
                if got.get(k) != ref.get(k):
                    problems.append(f"{rel}: {k!r} differs from the reference")
        elif list(digest(out / rel)) != soak.ref_files[rel]:
            problems.append(f"{rel} differs from the reference")
    return problems


# -- the soak -------------------------------------------------------------------------------------
def write_recipe(path: Path, model: Path, fx: Fixture) -> Path:
    layers = ", ".join(f'"range({a},{b})"' for a, b in fx.layers)
    path.write_text(f"recipekit: 1\nname: kill-soak\nmodels:\n  src: {model}\nsteps:\n"
                    f"  - name: up\n    op: layers\n    from: src\n    layers: [{layers}]\n"
                    f"output:\n  shard_size: {fx.shard_size}\n")
    return path


def render(summary: dict[str, object]) -> str:
    rows = [("fixture", summary["fixture"]), ("output", summary["output"]),
            ("events in a full run", summary["events"]),
            ("kill points tried", f"{summary['points']} ({summary['boundaries']} phase "
                                  f"boundaries + {summary['random']} random, seed "
                                  f"{summary['seed']})"),
            ("kills delivered", f"{summary['kills']} ({summary['double_killed']} points "
                                "killed twice)"),
            ("reruns", summary["reruns"]),
            ("resumed shards", summary["resumed_shards"]),
            ("continuous-check violations", summary["violations"]),
            ("mismatches (must be 0)", summary["mismatches"]),
            ("other failed checks", summary["failures"]),
            ("total time", f"{summary['total_s']:.0f} s ({summary['setup_s']:.0f} s setup, "
                           f"{summary['jobs']} job(s))")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(["| check | result |", "|---|---|"]
                     + [f"| {k:<{width}} | {v} |" for k, v in rows]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=40,
                        help="kill points in all: every phase boundary, then random events "
                        "(default 40)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--fixture", choices=list(FIXTURES), default="small",
                        help="small (default, 11 output shards) or tinyllama (8 shards of 400MB, "
                        "about 4x slower)")
    parser.add_argument("--double", type=float, default=0.5,
                        help="fraction of points whose rerun is killed again (default 0.5)")
    parser.add_argument("--jobs", type=int, default=2,
                        help="kill points run side by side, each in its own directory "
                        "(default 2)")
    parser.add_argument("--no-fsync", action="store_true",
                        help="pass --no-fsync to every run (faster; the trace has no fsync "
                        "events then)")
    args = parser.parse_args(argv)
    if args.points < 1 or args.jobs < 1 or not 0 <= args.double <= 1:
        parser.error("--points and --jobs must be >= 1, --double in [0, 1]")
    t0 = time.perf_counter()
    fx = FIXTURES[args.fixture]
    try:
        model = fx.build()
    except fixtures.InsufficientDisk as e:
        print(f"kill soak: fixture skipped: {e}", file=sys.stderr)
        return 2
    flags = ("--no-fsync",) if args.no_fsync else ()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="soak-", dir=fixtures.FIXTURES_DIR) as tmp:
        scratch = Path(tmp)
        recipe = write_recipe(scratch / "recipe.yaml", model, fx)
        ref = scratch / "ref"
        done = recipekit(recipe, ref, *flags)
        if done.returncode != 0:
            print(f"kill soak: the reference run failed:\n{done.stderr}", file=sys.stderr)
            return 2
        ref_digests = scratch / "ref-digests.json"
        ref_files = write_digests(ref, ref_digests)["files"]
        traced_out = scratch / "traced"
        traced = recipekit(recipe, traced_out, *flags, wrapper=(
            "--trace", str(scratch / "trace.json"), "--check", str(ref_digests)))
        if traced.returncode != 0:
            print(f"kill soak: the traced run failed:\n{traced.stderr}", file=sys.stderr)
            return 2
        trace_data = json.loads((scratch / "trace.json").read_text())
        bad = trace_data["violations"] + compare(traced_out, Soak(
            recipe, ref, ref_digests, ref_files, Trace([], []), flags))
        if bad:  # an uninterrupted run is already wrong: no point in killing it
            print(f"kill soak: the uninterrupted traced run broke {len(bad)} check(s), e.g.\n"
                  + "\n".join(bad[:10]), file=sys.stderr)
            return 1
        shutil.rmtree(traced_out)
        shards = sorted(rel for rel in ref_files if rel.endswith(".safetensors"))
        trace = Trace(trace_data["events"], shards)
        soak = Soak(recipe, ref, ref_digests, ref_files, trace, flags)
        points = choose_points(trace, args.points, rng)
        seconds = {n: (rng.random() if rng.random() < args.double else None) for n in points}
        setup_s = time.perf_counter() - t0
        print(f"kill soak: {fx.description}: {len(shards)} shards, {len(trace.events)} events; "
              f"{len(points)} kill points, {args.jobs} job(s); setup {setup_s:.0f} s",
              file=sys.stderr)
        results: list[PointResult] = []
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = [pool.submit(run_point, soak, scratch, n, kind, seconds[n])
                       for n, kind in points.items()]
            for k, f in enumerate(futures, 1):
                r = f.result()
                results.append(r)
                status = "ok" if r.ok else "FAILED: " + "; ".join(
                    (r.violations + r.mismatches + r.failures)[:3])
                what = r.where if r.kind == "random" else r.kind
                print(f"[{k:>3}/{len(points)}] event {r.event:>5} {what[:60]:<60} "
                      f"kills {r.kills} resumed {r.resumed:>2} {r.seconds:5.1f} s  {status}",
                      file=sys.stderr)
    total_s = time.perf_counter() - t0
    n_bound = sum(r.kind != "random" for r in results)
    summary: dict[str, object] = {
        "fixture": f"{args.fixture}: {fx.description}",
        "output": f"{len(shards)} shards, {sum(v[0] for v in ref_files.values()) / 2**30:.2f} "
                  f"GiB{', --no-fsync' if args.no_fsync else ', fsync on'}",
        "events": len(trace.events), "points": len(results), "boundaries": n_bound,
        "random": len(results) - n_bound, "seed": args.seed,
        "kills": sum(r.kills for r in results),
        "double_killed": sum(r.kills == 2 for r in results),
        "reruns": sum(r.reruns for r in results),
        "resumed_shards": sum(r.resumed for r in results),
        "violations": sum(len(r.violations) for r in results),
        "mismatches": sum(len(r.mismatches) for r in results),
        "failures": sum(len(r.failures) for r in results),
        "total_s": total_s, "setup_s": setup_s, "jobs": args.jobs,
    }
    table = render(summary)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = RESULTS / f"kill-soak-{stamp}.json"
    path.write_text(json.dumps({"summary": summary, "argv": sys.argv[1:],
                                "trace_events": trace.events,
                                "points": [asdict(r) for r in results]}, indent=1) + "\n")
    print(f"saved {path}", file=sys.stderr)
    bad = summary["violations"] or summary["mismatches"] or summary["failures"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
