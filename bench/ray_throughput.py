"""The Ray executor: throughput with 1, 2 and 4 workers on this machine, and partitioning the
405B-shaped plan into tasks (DESIGN.md §7, last row; README "Running on a cluster").

    python bench/ray_throughput.py [--workers 1,2,4] [--cases solar,linear] [--runs 2]
                                   [--shard-size 256MB] [--partition-only]

Throughput: for each case the local executor (the baseline and the oracle) and, for each
worker count N, a one-node Ray cluster started here with ``--num-cpus=N`` (so N shard tasks run
at once) take turns, ``--runs`` rounds, running the same recipe through the real command,
``recipekit run RECIPE --executor ray --address ...``. Wall time is the whole driver process's,
start-up and ``ray.init`` included, with a warm page cache (inputs read once before each run)
and fsync on, as in bench/run.py. Every Ray output's shard sha256s must equal the local run's
(the bytes check). Peak memory is not reported: Ray's workers are children of the raylet, not
of the driver, so `measure.py`'s process tree would miss them.

Partitioning: the 405B-shaped sparse checkpoint (fixtures.LLAMA_405B, headers only) is planned
for a SOLAR upscale and a TIES merge; the time to compile the plan, and then to build every
shard's task payload (`recipekit.run.ray.shard_payload`, what the driver submits), are
reported with the payload sizes; so is the alternative the executor does not take — every task
recompiling the plan from the recipe — as its total cost (one compile per task).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fixtures  # noqa: E402 - bench/ is a folder of scripts, not a package
from measure import run_measured  # noqa: E402

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
HOST = "127.0.0.2"
READ_CHUNK = 16 << 20


def recipekit_command() -> list[str]:
    return [sys.executable, "-m", "recipekit"]


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))


# -- partitioning the 405B plan ------------------------------------------------------------------

def partition(work: Path) -> list[dict[str, object]]:
    """Compile the 405B-shaped SOLAR and TIES plans and build every shard's task payload."""
    sys.path.insert(0, str(ROOT))
    from recipekit.inputs.resolve import resolve_sources
    from recipekit.plan import compile_plan
    from recipekit.recipe import load_recipe
    from recipekit.run.ray import shard_memory, shard_payload

    src = fixtures.make_sparse_checkpoint(fixtures.LLAMA_405B)
    recipes = {
        "solar": f"recipekit: 1\nmodels:\n  big: {src}\nsteps:\n  - name: up\n    op: layers\n"
                 '    from: big\n    layers: ["range(0,94)", "range(32,126)"]\n'
                 f"output:\n  path: {work / 'out-405b'}\n",
        "ties": f"recipekit: 1\nmodels:\n  a: {src}\n  b: {src}\nsteps:\n  - name: m\n"
                "    op: merge\n    method: ties\n    base: a\n"
                "    from: [{model: b, weight: 0.5, density: 0.5}]\n"
                f"output:\n  path: {work / 'out-405b'}\n",
    }
    rows = []
    for name, text in recipes.items():
        path = work / f"405b-{name}.yaml"
        path.write_text(text)
        t0 = time.perf_counter()
        recipe = load_recipe(path)
        plan = compile_plan(recipe, resolve_sources(recipe))
        plan.plan_hash()
        compile_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        # what Ray sends per task: the argument serialized (Ray's cloudpickle ~ pickle)
        payloads = [pickle.dumps(shard_payload(plan, s), protocol=pickle.HIGHEST_PROTOCOL)
                    for s in plan.shards]
        memory = [shard_memory(s) for s in plan.shards]
        partition_s = time.perf_counter() - t1
        t2 = time.perf_counter()
        for p in payloads:
            pickle.loads(p)
        unpickle_s = (time.perf_counter() - t2) / len(payloads)
        sizes = [len(p) for p in payloads]
        rows.append({"recipe": name, "shards": len(plan.shards), "tensors": plan.num_tensors,
                     "bytes_written": plan.bytes_written, "compile_s": compile_s,
                     "partition_s": partition_s, "payload_max": max(sizes),
                     "payload_total": sum(sizes), "unpickle_s_per_task": unpickle_s,
                     "task_memory_max": max(memory),
                     "recompile_per_task_total_s": compile_s * len(plan.shards)})
    return rows


# -- a one-node cluster ----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class LocalCluster:
    """``ray start --head --num-cpus=N`` as a process group of its own, stopped by PID
    (/work/shared/reference/cluster.md §1.1)."""

    def __init__(self, cpus: int, tmp: Path) -> None:
        self.tmp = tmp
        token = secrets.token_hex(32)
        self.env = dict(env(), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
                        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0", RAY_USAGE_STATS_ENABLED="0")
        (tmp / "home").mkdir(parents=True, exist_ok=True)
        port = free_port()
        self.address = f"{HOST}:{port}"
        ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
        self.log = open(tmp / f"cluster-{cpus}.log", "wb")  # noqa: SIM115 - closed in stop
        self.proc = subprocess.Popen(
            [ray_bin, "start", "--head", "--block", f"--port={port}", f"--num-cpus={cpus}",
             f"--node-ip-address={HOST}", f"--temp-dir={tmp / 'rt'}", "--include-dashboard=false",
             "--disable-usage-stats", "--object-store-memory=100000000",
             f"--ray-client-server-port={free_port()}"],
            env=dict(self.env, HOME=str(tmp / "home")), start_new_session=True,
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            with socket.socket() as s:
                if s.connect_ex((HOST, port)) == 0:
                    break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the Ray head did not start:\n"
                                   + (tmp / f"cluster-{cpus}.log").read_text()[-3000:])
            time.sleep(0.2)
        time.sleep(2)  # the raylet registers after the GCS opens its port

    def stop(self) -> None:
        import signal

        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        self.log.close()


# -- throughput ------------------------------------------------------------------------------------

def warm(paths: list[Path]) -> None:
    """Read every input file once, so every run starts with a warm page cache."""
    buf = bytearray(READ_CHUNK)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def shard_hashes(out: Path) -> dict[str, str]:
    manifest = json.loads((out / "recipekit.json").read_text())
    return {k: v["sha256"] for k, v in manifest["shards"].items()}


def file_hashes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.glob("*.safetensors"))}


def make_cases(work: Path, shard_size: str) -> dict[str, tuple[Path, list[Path]]]:
    a = fixtures.make_tinyllama(0)
    b = fixtures.make_tinyllama(1)
    inputs = {s: sorted(p.glob("*.safetensors")) for s, p in (("a", a), ("b", b))}
    solar = work / "solar.yaml"
    solar.write_text(f"recipekit: 1\nmodels:\n  tiny: {a}\nsteps:\n  - name: up\n"
                     '    op: layers\n    from: tiny\n    layers: ["range(0,16)", "range(6,22)"]\n'
                     f"output:\n  shard_size: {shard_size}\n")
    linear = work / "linear.yaml"
    linear.write_text(f"recipekit: 1\nmodels:\n  a: {a}\n  b: {b}\nsteps:\n  - name: m\n"
                      "    op: merge\n    method: linear\n"
                      "    from: [{model: a, weight: 0.5}, {model: b, weight: 0.5}]\n"
                      f"output:\n  shard_size: {shard_size}\n")
    return {"solar": (solar, inputs["a"]), "linear": (linear, inputs["a"] + inputs["b"])}


def timed_run(argv: list[str], out: Path, inputs: list[Path], run_env: dict[str, str],
              log: Path) -> float:
    if out.exists():
        shutil.rmtree(out)
    os.sync()
    warm(inputs)
    m = run_measured([*argv, "-o", str(out), "-q"], env=run_env, log=log)
    if m.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({m.returncode}); see {log}")
    return m.wall_s


def throughput(work: Path, cases: list[str], workers: list[int], runs: int,
               shard_size: str) -> list[dict[str, object]]:
    """Per case, ``runs`` rounds of: the local run, then Ray with each worker count (variants
    alternate, as bench/run.py's do); each Ray output is checked against the local one's
    shard hashes. The clusters stay up (idle) for the whole benchmark."""
    defs = make_cases(work, shard_size)
    rows: list[dict[str, object]] = []
    clusters: dict[int, LocalCluster] = {}
    try:
        for n in workers:  # a short temp dir: Ray's socket paths must fit 107 bytes
            clusters[n] = LocalCluster(n, Path(tempfile.mkdtemp(prefix="rkray")))
        for case in cases:
            recipe, inputs = defs[case]
            out = work / f"out-{case}"
            variants: list[tuple[int | None, list[str], dict[str, str]]] = [
                (None, [*recipekit_command(), "run", str(recipe)], env())]
            variants += [(n, [*recipekit_command(), "run", str(recipe), "--executor", "ray",
                              "--address", clusters[n].address], clusters[n].env)
                         for n in workers]
            walls: dict[int | None, list[float]] = {n: [] for n, _, _ in variants}
            same: dict[int | None, bool] = {n: True for n, _, _ in variants}
            expected: dict[str, str] = {}
            for _ in range(runs):
                for n, argv, run_env in variants:
                    walls[n].append(timed_run(argv, out, inputs, run_env,
                                              work / f"{case}-{n or 'local'}.log"))
                    got = shard_hashes(out)
                    expected = expected or got  # the first, local run is the oracle
                    same[n] = same[n] and got == expected and file_hashes(out) == expected
                    print(f"{case} {'local' if n is None else f'ray x{n}'}: "
                          f"{walls[n][-1]:.1f} s, same bytes: {same[n]}", file=sys.stderr)
            written = sum((out / k).stat().st_size for k in expected)
            for n, _, _ in variants:
                rows.append({"case": case, "executor": "local" if n is None else "ray",
                             "workers": n, "wall_s": statistics.median(walls[n]),
                             "walls": walls[n], "bytes_written": written,
                             "shards": len(expected), "same_bytes": same[n]})
            shutil.rmtree(out, ignore_errors=True)
    finally:
        for c in clusters.values():
            c.stop()
            shutil.rmtree(c.tmp, ignore_errors=True)
    return rows


def render(part: list[dict[str, object]], tput: list[dict[str, object]]) -> str:
    gib = 1024 ** 3
    lines = []
    if part:
        lines += ["| 405B-shaped plan | shards | tensors | compile | partition into tasks | "
                  "largest payload | all payloads | unpickle / task | recompile per task, "
                  "all tasks |", "|---|---|---|---|---|---|---|---|---|"]
        for r in part:
            lines.append(
                f"| {r['recipe']} ({int(r['bytes_written']) / gib:.0f} GiB out) | {r['shards']} | "
                f"{r['tensors']} | {r['compile_s']:.2f} s | {r['partition_s']:.2f} s | "
                f"{int(r['payload_max']) / 1024:.0f} KiB | "
                f"{int(r['payload_total']) / 1024 ** 2:.1f} MiB | "
                f"{float(r['unpickle_s_per_task']) * 1e3:.1f} ms | "
                f"{r['recompile_per_task_total_s']:.0f} s |")
        lines.append("")
    if tput:
        lines += ["| case | executor | wall (median) | throughput (written) | vs local | "
                  "same bytes |", "|---|---|---|---|---|---|"]
        local = {r["case"]: r["wall_s"] for r in tput if r["executor"] == "local"}
        for r in tput:
            who = "local" if r["executor"] == "local" else f"ray, {r['workers']} worker(s)"
            wall = float(r["wall_s"])  # type: ignore[arg-type]
            rate = int(r["bytes_written"]) / wall / 1024 ** 2  # type: ignore[call-overload]
            lines.append(f"| {r['case']} ({r['shards']} shards) | {who} | {wall:.1f} s | "
                         f"{rate:.0f} MiB/s | {float(local[r['case']]) / wall:.2f}× | "  # type: ignore[arg-type]
                         f"{'yes' if r['same_bytes'] else 'NO'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--cases", default="solar,linear")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--shard-size", default="256MB")
    ap.add_argument("--partition-only", action="store_true")
    args = ap.parse_args(argv)
    work = fixtures.FIXTURES_DIR / f"run-ray-{os.getpid()}"
    work.mkdir(parents=True)
    try:
        part = partition(work)
        print(render(part, []), file=sys.stderr)
        tput = [] if args.partition_only else throughput(
            work, args.cases.split(","), [int(w) for w in args.workers.split(",")], args.runs,
            args.shard_size)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = render(part, tput)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    (RESULTS / f"ray-{stamp}.json").write_text(json.dumps(
        {"partition": part, "throughput": tput, "cpus": os.cpu_count()}, indent=2))
    (RESULTS / f"ray-{stamp}.md").write_text(table + "\n")
    return 0 if all(r["same_bytes"] for r in tput) else 1


if __name__ == "__main__":
    sys.exit(main())
