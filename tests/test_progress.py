"""Progress where there is no terminal: `recipekit run` piped into a log or a program.

Oracles: the process itself run with pipes (stderr is not a TTY, as in CI or under ``nohup``),
its output parsed line by line against the output files' sizes and hashes; the throttle against
a fake clock.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import recipekit.progress as progress
from recipekit.progress import ProgressUpdate, ShardResult, every, progress_line

from tests.helpers.recipes import ROOT, solar_recipe, write_recipe


def run_piped(recipe: Path, *args: str, interval: str | None = "0"
              ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop(progress.INTERVAL_ENV, None)
    if interval is not None:
        env[progress.INTERVAL_ENV] = interval
    proc = subprocess.run([sys.executable, "-m", "recipekit.cli", "run", str(recipe),
                           "--no-fsync", *args], capture_output=True, text=True, env=env,
                          cwd=recipe.parent, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture
def recipe(tmp_path: Path, model_copy: Path) -> Path:
    return write_recipe(tmp_path, solar_recipe(output="  path: ./out\n  shard_size: 200KB"))


def total_bytes(out: Path) -> int:
    return sum(p.stat().st_size for p in out.glob("*.safetensors"))


class TestLines:
    """Off a TTY: a line per interval and one at the end; `-q` silences them."""

    def test_a_line_per_update_at_interval_zero(self, recipe):
        proc = run_piped(recipe)
        lines = proc.stderr.splitlines()
        assert len(lines) > 10 and all(line.startswith("progress: ") for line in lines)
        total = progress.format_size(total_bytes(recipe.parent / "out"))
        assert lines[-1].startswith(f"progress: {total} / {total} (100%), ")
        assert lines[-1].endswith(", done")
        assert any(": model.layers.3.mlp.up_proj.weight" in line for line in lines)
        assert "ETA " in lines[len(lines) // 2]
        assert proc.stdout.startswith("wrote out: 12 layers, 3 shard(s)")

    def test_default_interval_prints_the_final_line(self, recipe):
        lines = run_piped(recipe, interval=None).stderr.splitlines()
        assert len(lines) == 1 and lines[0].endswith(", done")  # the run takes < 10 s

    def test_quiet(self, recipe):
        proc = run_piped(recipe, "-q")
        assert proc.stderr == ""


def test_json_events(recipe):
    """`--json`: JSON Lines on stdout: start, progress, one shard event per shard, done."""
    proc = run_piped(recipe, "--json")
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    out = recipe.parent / "out"
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and proc.stderr == ""
    start, done = events[0], events[-1]
    assert start["total"] == total_bytes(out) == done["bytes_total"] == done["bytes_written"]
    assert (start["shards"], start["tensors"]) == (3, 111)
    shards = [e for e in events if e["event"] == "shard"]
    assert [(s["name"], s["sha256"]) for s in shards] == [
        (p.name, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(out.glob("model-*.safetensors"))]
    assert [{k: v for k, v in s.items() if k != "event"} for s in shards] == done["shards"]
    seen = [e["done"] for e in events if e["event"] == "progress"]
    assert seen == sorted(seen) and seen[-1] == start["total"]
    assert done["output"] == str(out) and done["already_complete"] is False


def test_json_error_event(tmp_path):
    r = write_recipe(tmp_path, solar_recipe())  # ./model does not exist
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "recipekit.cli", "run", str(r), "--json"],
                          capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 2
    (event,) = [json.loads(line) for line in proc.stdout.splitlines()]
    assert event["event"] == "error" and event["exit_code"] == 2
    assert event["type"] == "SourceNotFoundError"
    assert event["problems"][0]["line"] == 3 and event["problems"][0]["key_path"] == "models.tiny"
    assert event["message"] == proc.stderr.rstrip("\n")


class TestThrottle:
    """`every` against a fake clock: at most one call per interval, always the last."""

    def update(self, done: int, total: int = 100, shard_done: ShardResult | None = None):
        return ProgressUpdate(done, total, 1.0, 10.0, "s", "t", shard_done)

    def test_interval(self, monkeypatch):
        clock = [0.0]
        monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
        seen: list[int] = []
        call = every(10, lambda u: seen.append(u.done))
        for t, done in [(1, 10), (9, 20), (10, 30), (15, 40), (21, 50), (22, 100), (23, 100)]:
            clock[0] = t
            call(self.update(done))
        assert seen == [30, 50, 100]

    def test_shard_events_are_not_lines(self, monkeypatch):
        seen: list[int] = []
        call = every(0, lambda u: seen.append(u.done))
        call(self.update(50, shard_done=ShardResult("a", 50, "0" * 64, False)))
        assert seen == []

    @pytest.mark.parametrize(("value", "expected"), [("2.5", 2.5), ("0", 0.0), ("x", 10.0),
                                                     ("-1", 10.0), ("nan", 10.0)])
    def test_interval_from_the_environment(self, monkeypatch, value, expected):
        monkeypatch.setenv(progress.INTERVAL_ENV, value)
        assert progress.progress_interval() == expected


def test_progress_line():
    u = ProgressUpdate(3 << 30, 4 << 30, 10.0, 100 << 20, "model-00001-of-00002.safetensors",
                       "model.layers.3.mlp.up_proj.weight")
    assert progress_line(u) == ("progress: 3.00 GiB / 4.00 GiB (75%), 100.00 MiB/s, ETA 10 s, "
                                "model-00001-of-00002.safetensors: "
                                "model.layers.3.mlp.up_proj.weight")
    slow = ProgressUpdate(1 << 34, 1 << 40, 1.0, 1 << 20, "s", "t\x1b[2J")
    assert progress_line(slow).endswith("ETA 286 h 43 min, s: t\\x1b[2J")
    # before 1% is written the rate is mostly start-up: no ETA (a Ray run said 10053 h)
    early = ProgressUpdate(136, 370 << 20, 12.0, 11.0, "s", "t")
    assert early.eta is None and "ETA unknown" in progress_line(early)
