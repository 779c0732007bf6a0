"""Run the recipekit CLI with its output I/O instrumented: trace it, check it, die at an event.

    python tests/helpers/crashpoints.py [--kill N | --kill-on LABEL | --stop N] [--trace FILE] \\
        [--check REF] -- run recipe.yaml -o OUT -q

The product has no test hooks: this wrapper replaces the I/O primitives the writer uses
(``os.open``, ``os.write``, ``os.fsync``/``os.fdatasync``, ``os.replace``, ``os.unlink``,
``os.mkdir``, ``os.rmdir``, ``shutil.copyfile`` and ``open`` inside recipekit.io) before calling
the CLI. Each call that touches a path under OUT (the ``-o`` argument) is an *event*, labelled
``"<kind> <path relative to OUT>"`` (``"."`` is OUT itself), numbered from 1 in call order.
A shard's writes run on the writer's worker thread, in order, between its ``open`` and its
``fsync``/``replace`` (which wait for them), and the background flush only starts after 256 MiB;
every other event runs on the main thread, so a plan's event sequence is deterministic.

* ``--kill N``: just before event N runs, print ``crashpoints: kill at event N: <label>`` to
  stderr and SIGKILL this process (nothing is cleaned up, as in a power cut of the process).
* ``--stop N``: the same, but SIGSTOP; the process goes on when sent SIGCONT.
* ``--kill-on LABEL``: like ``--kill``, at the first event labelled LABEL.
* ``--out DIR``: the output directory, for a command that takes it as an argument rather than
  ``-o`` (``convert SRC DST``).
* ``--trace FILE``: at exit, and just before a ``--kill``, write ``{"events": [...],
  "violations": [...]}`` to FILE (a killed run's list ends with the event it died before).
* ``--check REF``: before every event and at exit, compare OUT with REF (an uninterrupted run of
  the same plan) using `check_output`; each problem is printed at once to stderr as
  ``crashpoints: VIOLATION ...`` (so it survives a later SIGKILL) and recorded in the trace.
  REF is that run's output directory, or a JSON file `write_digests` made of it (so a large
  reference is hashed once, not by every wrapped process).

Files are compared by size and sha256, read in chunks: no copy of a (large) output is kept in
memory.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

STATE = ".recipekit-state.json"
MANIFEST = "recipekit.json"
PARTIAL_SUFFIX = ".recipekit-partial"


# -- the oracle: what an output directory may look like at any instant ---------------------------
def listing(root: Path) -> list[str]:
    """Every file under ``root`` (recursively), relative, sorted; [] if root does not exist."""
    out = []
    for dirpath, _dirs, files in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        out += [f if rel == "." else f"{rel}/{f}".replace(os.sep, "/") for f in files]
    return sorted(out)


def is_hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


def is_temp(rel: str) -> bool:
    """A recipekit temporary name: ``.<final name>.recipekit-partial``."""
    name = rel.rsplit("/", 1)[-1]
    return name.startswith(".") and name.endswith(PARTIAL_SUFFIX)


def _load_json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return None


_digests: dict[tuple[Any, ...], tuple[int, str]] = {}


def digest(path: str | Path) -> tuple[int, str]:
    """A file's size and sha256 (read in 1 MiB chunks), cached while its inode, size and mtime
    stay the same."""
    st = os.stat(path)
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _digests:
        sha, size = hashlib.sha256(), 0
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(1 << 20):
                sha.update(chunk)
                size += len(chunk)
        _digests[key] = (size, sha.hexdigest())
    return _digests[key]


def digests(ref: Path) -> dict[str, Any]:
    """What `check_output` needs of a reference output directory: each file's [size, sha256],
    its manifest's ``shards`` and what the state file records as ``finished`` (the same
    entries: a finished output keeps no state file, its manifest records them)."""
    files = {rel: list(digest(ref / rel)) for rel in listing(ref)}
    shards = json.loads((ref / MANIFEST).read_bytes())["shards"]
    return {"files": files, "manifest_shards": shards, "finished": shards}


def write_digests(ref: Path, path: Path) -> dict[str, Any]:
    """Write `digests` of ``ref`` to ``path`` (a file ``--check`` accepts as REF); return them."""
    data = digests(ref)
    path.write_text(json.dumps(data, indent=1))
    return data


class _Ref:
    """What the reference run wrote (hashed once): a directory, or a `write_digests` file."""

    def __init__(self, ref: Path) -> None:
        data = json.loads(ref.read_text()) if ref.is_file() else digests(ref)
        self.files = {rel: tuple(v) for rel, v in data["files"].items()}
        self.final = [rel for rel in self.files if not is_hidden(rel)]
        self.manifest_shards = data["manifest_shards"]
        self.finished = data["finished"]


_refs: dict[str, _Ref] = {}


def check_output(out: Path, ref: Path) -> list[str]:
    """Problems with ``out`` seen as a snapshot of a run of the plan that wrote ``ref``.

    * a file under a final (non-hidden) name is one ``ref`` has, with ``ref``'s bytes (for
      ``recipekit.json``: valid JSON with ``ref``'s ``shards`` entry; it may differ in paths) -
      never partial;
    * the only hidden files are the state file and ``.*.recipekit-partial`` temporaries;
    * the state file is valid JSON, and every shard it records as finished is there under its
      final name with the size and sha256 it records (and ``ref`` has);
    * when the manifest exists (it is written last) or the state says complete, every final file
      of ``ref`` is there.
    """
    if not out.is_dir():
        return []
    r = _refs.get(str(ref)) or _refs.setdefault(str(ref), _Ref(ref))
    problems = []
    have = listing(out)
    for rel in have:
        if is_hidden(rel):
            if rel != STATE and not is_temp(rel):
                problems.append(f"unexpected hidden file {rel}")
        elif rel not in r.files:
            problems.append(f"unexpected file {rel}")
        elif rel == MANIFEST:
            manifest = _load_json(Path(f"{out}/{rel}").read_bytes())
            if not isinstance(manifest, dict) or manifest.get("shards") != r.manifest_shards:
                problems.append(f"{rel} is partial or differs from the uninterrupted run")
        elif digest(f"{out}/{rel}") != r.files[rel]:
            problems.append(f"{rel} is partial or differs from the uninterrupted run")
    missing = [rel for rel in r.final if rel not in have]
    if STATE in have:
        state = _load_json(Path(f"{out}/{STATE}").read_bytes())
        if not isinstance(state, dict):
            problems.append(f"{STATE} is not valid JSON")
        else:
            for name, info in state.get("finished", {}).items():
                if name not in have:
                    problems.append(f"state records {name} as finished but it is not there")
                    continue
                size, sha = digest(f"{out}/{name}")
                if info != {"size": size, "sha256": sha}:
                    problems.append(f"state records {name} as {info}, the file differs")
                elif info != r.finished.get(name):
                    problems.append(f"state records {name} as {info}, the reference differs")
            if state.get("complete") and missing:
                problems.append(f"state says complete but {missing} are missing")
    if MANIFEST in have and missing:
        problems.append(f"{MANIFEST} exists but {missing} are missing (it must come last)")
    return problems


# -- instrumentation ------------------------------------------------------------------------------
class Instrument:
    def __init__(self, out: str, action: str | None, at: int | str, ref: str | None,
                 trace: str | None = None) -> None:
        self.out = os.path.realpath(out)
        self.action, self.at = action, at
        self.ref = Path(ref) if ref else None
        self.trace = trace
        self.n = 0
        self.events: list[str] = []
        self.violations: list[str] = []
        self._busy = False

    def rel(self, path: Any) -> str | None:
        if isinstance(path, int):
            try:
                path = os.readlink(f"/proc/self/fd/{path}")
            except OSError:
                return None
        p = os.path.realpath(os.fsdecode(os.fspath(path)))
        if p == self.out:
            return "."
        if p.startswith(self.out + os.sep):
            return p[len(self.out) + 1:]
        return None

    def check(self, when: str) -> None:
        if self.ref is None:
            return
        for problem in check_output(Path(self.out), self.ref):
            line = f"VIOLATION {when}: {problem}"
            self.violations.append(line)
            sys.stderr.write(f"crashpoints: {line}\n")
            sys.stderr.flush()

    def event(self, kind: str, path: Any) -> None:
        if self._busy:
            return
        rel = self.rel(path)
        if rel is None:
            return
        self._busy = True
        try:
            self.n += 1
            label = f"{kind} {rel}"
            self.check(f"before event {self.n} ({label})")
            self.events.append(label)
            if self.action and self.at in (self.n, label):
                self.at = -1  # only once
                sys.stderr.write(f"crashpoints: {self.action} at event {self.n}: {label}\n")
                sys.stderr.flush()
                if self.action == "kill":
                    self.write_trace()  # nothing runs after the SIGKILL
                os.kill(os.getpid(), signal.SIGKILL if self.action == "kill" else signal.SIGSTOP)
        finally:
            self._busy = False

    def install(self) -> None:
        import recipekit.io.output
        import recipekit.io.writer

        def hook(kind: str, real: Any, arg: int = 0) -> Any:
            def wrapper(*a: Any, **k: Any) -> Any:
                target = a[arg]
                if not isinstance(target, (int, str, bytes, os.PathLike)):
                    target = target.fileno()  # os.fsync(file object)
                self.event(kind, target)
                return real(*a, **k)
            return wrapper

        for name, kind, arg in [("open", "open", 0), ("write", "write", 0), ("fsync", "fsync", 0),
                                ("fdatasync", "fsync", 0), ("replace", "replace", 1),
                                ("unlink", "unlink", 0), ("remove", "unlink", 0),
                                ("mkdir", "mkdir", 0), ("rmdir", "rmdir", 0)]:
            if hasattr(os, name):
                setattr(os, name, hook(kind, getattr(os, name), arg))
        shutil.copyfile = hook("copy", shutil.copyfile, 1)

        def file_open(file: Any, mode: str = "r", *a: Any, **k: Any) -> Any:
            if any(c in mode for c in "wax+"):
                self.event("open", file)
            return builtins.open(file, mode, *a, **k)

        for module in (recipekit.io.writer, recipekit.io.output):
            module.open = file_open  # shadows the builtin inside that module only

    def write_trace(self) -> None:
        if self.trace:
            Path(self.trace).write_text(json.dumps({"events": self.events,
                                                    "violations": self.violations}, indent=1))

    def finish(self) -> None:
        self._busy = True
        self.check("at exit")
        self.write_trace()


def main(argv: list[str]) -> None:
    sep = argv.index("--")
    opts, args = argv[:sep], argv[sep + 1:]
    get = {opts[i]: opts[i + 1] for i in range(0, len(opts), 2)}
    action = "stop" if "--stop" in get else "kill" if {"--kill", "--kill-on"} & set(get) else None
    at: int | str = get.get("--kill-on") or int(get.get("--kill", get.get("--stop", 0)))
    if "--out" in get:  # a command whose output is not an -o option (convert SRC DST)
        out = get["--out"]
    else:
        flag = next(a for a in ("-o", "--output") if a in args)
        out = args[args.index(flag) + 1]
    ins = Instrument(out, action, at, get.get("--check"), get.get("--trace"))
    ins.install()
    from recipekit.cli import app

    try:
        app(args, prog_name="recipekit")
    finally:
        ins.finish()


if __name__ == "__main__":
    main(sys.argv[1:])
