"""The Python API: `validate`, `plan`, `run` and `lock` a recipe, as the CLI does.

Why a module of its own: the CLI used to hold the lock check, the output override and the run
summary, so a notebook user had only an internal route that took a file path, showed no progress
and skipped the lock. Here each command is one function that takes a recipe as a path, as
YAML/JSON text or as a dict, returns a frozen result, and raises the project's typed errors
(`recipekit.errors`) with the messages the CLI prints; `cli.py` is a thin layer over it.
Oracle: tests/test_api.py runs each function on all three forms and compares lock, ``frozen``,
resume and ``force`` behaviour with the CLI's.

Example:
    >>> import recipekit
    >>> p = recipekit.plan("recipes/quickstart.yaml")          # doctest: +SKIP
    >>> p.layers, p.shards[0].name                              # doctest: +SKIP
    (12, 'model.safetensors')
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from recipekit.errors import UsageError, display_path, echo_text
from recipekit.progress import (
    ProgressCallback,
    ProgressUpdate,
    ShardResult,
    bar_callback,
    is_interactive,
)
from recipekit.recipe.load import RecipeSource
from recipekit.run.sweep import CombinationResult, SweepResult

__all__ = [
    "LockResult",
    "PlanResult",
    "PlannedShard",
    "ProgressUpdate",
    "RunResult",
    "ShardResult",
    "SweepResult",
    "ValidationResult",
    "lock",
    "plan",
    "run",
    "sweep",
    "validate",
]

Progress = ProgressCallback | Literal["auto"] | None


@dataclass(frozen=True)
class ValidationResult:
    """What `validate` found: a valid recipe, and (``inputs=True``) what its output will be."""

    recipe: str  # the recipe as messages name it (a path, ``<string>`` or ``<dict>``)
    steps: int
    output_model: str
    inputs_checked: bool
    layers: int | None = None  # None: inputs not checked, or a PEFT adapter output
    tensors: int | None = None
    adapter: bool = False  # the output is a PEFT adapter directory

    def summary(self) -> str:
        """The line `recipekit validate` prints after ``<recipe>: ok``."""
        if not self.inputs_checked:
            return f"{self.steps} step(s); inputs not checked"
        what = "PEFT adapter" if self.adapter else f"{self.layers} layers"
        return (f"{self.steps} step(s); output '{echo_text(self.output_model)}': {what}, "
                f"{self.tensors} tensors")


@dataclass(frozen=True)
class PlannedShard:
    """One output shard of a plan: file name, tensor count and size in bytes."""

    name: str
    tensors: int
    bytes: int


@dataclass(frozen=True)
class PlanResult:
    """A compiled plan's estimates, before anything is written (`recipekit plan`).

    ``peak_memory`` is the working set above an idle process; ``disk`` the output's shards plus
    the donor's other files; ``whole_tensor`` names the largest op that holds a whole tensor in
    memory (None when every computed tensor streams in row pieces). Pass the result to `run` to
    run this very plan without compiling it again.
    """

    recipe: str
    output: Path | str  # a local directory, or a URL
    output_model: str
    layers: int | None
    adapter: bool
    tensors: int
    inputs_read: int
    bytes_read: int
    bytes_read_total: int  # re-reads included (a layer used twice is read twice)
    bytes_written: int
    peak_memory: int
    disk: int
    shards: tuple[PlannedShard, ...]
    whole_tensor: Mapping[str, Any] | None
    plan_hash: str
    #: The recipe file (None for text or data): its lock lies beside it.
    recipe_file: Path | None = field(default=None, repr=False)
    #: The compiled `recipekit.plan.Plan` (internal; for `recipekit.plan.render`).
    plan: Any = field(default=None, repr=False, compare=False)

    def text(self, *, verbose: bool = False) -> str:
        """The summary `recipekit plan` prints (``verbose``: every tensor and its source)."""
        from recipekit.plan.render import render_text

        return render_text(self.plan, disk_extra=self.disk - self.bytes_written,
                           verbose=verbose)

    def to_json(self) -> str:
        """`recipekit plan --json`: the DAG, the schedule and these estimates."""
        from recipekit.plan.render import render_json

        return render_json(self.plan, disk_extra=self.disk - self.bytes_written)


@dataclass(frozen=True)
class RunResult:
    """A finished output (`recipekit run`): where, its shards with their sha256, the bytes this
    call wrote, and whether it resumed an interrupted run or found the output complete."""

    output: Path | str  # a local directory, or a URL (``s3://bucket/prefix``)
    shards: tuple[ShardResult, ...]
    bytes_written: int  # by this call (0 when already complete)
    bytes_total: int  # of every shard
    shards_resumed: int
    already_complete: bool
    seconds: float
    layers: int | None
    adapter: bool
    #: ``check_finite``: tensor label -> (NaN count, Inf count), for the shards this call wrote.
    non_finite: Mapping[str, tuple[int, int]] = field(default_factory=dict)

    def summary(self) -> str:
        """The line `recipekit run` prints."""
        from recipekit.units import format_size

        where = self.output if isinstance(self.output, str) else display_path(self.output)
        if self.already_complete:
            return f"{where}: already complete (same recipe and inputs); nothing to do"
        rate = (format_size(self.bytes_written / self.seconds) + "/s"
                if self.seconds > 0 else "")
        resumed = f", {self.shards_resumed} resumed" if self.shards_resumed else ""
        what = "a PEFT adapter" if self.adapter else f"{self.layers} layers"
        return (f"wrote {where}: {what}, {len(self.shards)} shard(s){resumed}, "
                f"{format_size(self.bytes_written)} in {self.seconds:.1f} s ({rate})")


@dataclass(frozen=True)
class LockResult:
    """A lock written by `lock`: its path, the inputs and files it pins."""

    path: Path
    inputs: int
    files: int


def _load(recipe: RecipeSource, base_dir: str | os.PathLike | None,
          variables: Mapping[str, Any] | None = None):
    """The typed recipe and its file, absolute (None for text or data): a plan run after a
    `os.chdir` must still find the lock beside its recipe."""
    from recipekit.recipe import load_recipe
    from recipekit.recipe.load import is_recipe_text

    r = load_recipe(recipe, base_dir=base_dir, variables=variables)
    is_file = isinstance(recipe, os.PathLike) or (
        isinstance(recipe, str) and not is_recipe_text(recipe))
    return r, (Path(recipe).absolute() if is_file else None)  # type: ignore[arg-type]


def validate(recipe: RecipeSource, *, inputs: bool = True,
             base_dir: str | os.PathLike | None = None,
             variables: Mapping[str, Any] | None = None) -> ValidationResult:
    """Check a recipe, and (``inputs``) its inputs' configs and headers, writing nothing.

    ``recipe`` is a path, YAML/JSON text or a dict (`recipekit.recipe.load_recipe`); paths in
    text or data are relative to ``base_dir`` (default: the working directory). ``inputs=False``
    checks the document alone, as ``validate --no-inputs``. ``variables`` sets the recipe's
    declared variables by name (``--set``; README, "Variables and sweeps").

    Returns:
        What the output will be (layers, tensors) when inputs were checked.

    Raises:
        RecipeErrors: every problem of the document, located (``recipe.yaml:9:5: ...``).
        MergekitConfigError: a mergekit config (convert it with `recipekit import-mergekit`).
        UsageError: any other problem `recipekit validate` finds (missing model, bad range).

    Example:
        >>> recipekit.validate({"recipekit": 1, "models": {"m": "./m"},
        ...                     "steps": [{"name": "s", "op": "layers", "from": "m",
        ...                                "layers": [0]}]}, inputs=False)  # doctest: +SKIP
        ValidationResult(recipe='<dict>', steps=1, output_model='s', inputs_checked=False, ...)
    """
    r, _ = _load(recipe, base_dir, variables)
    shown = r.document.file
    if not inputs:
        return ValidationResult(shown, len(r.steps), r.output.model, False)
    p = _compile(r, None)
    return ValidationResult(shown, len(r.steps), r.output.model, True,
                            None if p.adapter else p.model.stack.num_layers, p.num_tensors,
                            p.adapter)


def _compile(r, output: str | os.PathLike | None):
    """Compile ``r`` with ``output`` (``--output``) in place of its ``output.path``.

    ``output`` gets the recipe's checks of a path or URL: a URL holding credentials (or naming
    no bucket) is refused before anything echoes it (exit 2; the message shows ``***@``), and
    a ``file://`` URL names its local path.
    """
    from recipekit.inputs.resolve import resolve_sources
    from recipekit.plan import compile_plan

    if output is not None:
        from recipekit.errors import holds_credentials
        from recipekit.io.urls import is_url, local_path_text, redact, url_problem

        text = os.fspath(output)
        if holds_credentials(text) and not is_url(text):  # file://user:secret@...
            raise UsageError(f"the output {redact(text)} holds credentials (user:secret@, or a "
                             "token in its query)", hint="name the local path")
        if is_url(text):
            problem = url_problem(text)
            if problem is not None:
                raise UsageError(f"the output URL {redact(text)} {problem}",
                                 hint="pass the output as s3://bucket/prefix")
            new = dataclasses.replace(r.output, url=text.rstrip("/"))
        else:
            new = dataclasses.replace(r.output, path=Path(local_path_text(text)).resolve(),
                                      url=None)
        r = dataclasses.replace(r, output=new)
    return compile_plan(r, resolve_sources(r))


def plan(recipe: RecipeSource, *, output: str | os.PathLike | None = None,
         base_dir: str | os.PathLike | None = None, warn: bool = True,
         variables: Mapping[str, Any] | None = None) -> PlanResult:
    """Compile a recipe into its plan and estimates, reading headers only (no tensor data).

    ``output`` overrides the recipe's ``output.path`` (``--output``). ``warn`` logs the donor
    files a run will not copy (links out of the model, special files); `run` logs them again,
    so a plan made only to be run passes ``warn=False``. ``variables``: as `validate`; the
    values are part of the plan hash (a value changes it, the same value written inline in
    the recipe does not).

    Raises:
        as `validate`.

    Example:
        >>> p = recipekit.plan("recipes/quickstart.yaml")   # doctest: +SKIP
        >>> p.tensors, p.bytes_written, p.peak_memory       # doctest: +SKIP
    """
    from recipekit.inputs.models import iter_donor_files
    from recipekit.plan.render import estimates, whole_tensor_estimate

    r, file = _load(recipe, base_dir, variables)
    p = _compile(r, output)
    extra = sum((p.donor.path / f).stat().st_size
                for f in iter_donor_files(p.donor.path, warn=warn)) if p.donor is not None else 0
    est = estimates(p, extra)
    return PlanResult(
        r.document.file, p.recipe.output.url or p.recipe.output.path, r.output.model,
        None if p.adapter else p.model.stack.num_layers, p.adapter, p.num_tensors,
        len(p.loads()), est["bytes_read"], est["bytes_read_total"], est["bytes_written"],
        est["peak_memory"], est["disk"],
        tuple(PlannedShard(s.filename, len(s.tensors), s.size) for s in p.shards),
        whole_tensor_estimate(p), p.plan_hash(), file, p)


def run(recipe: RecipeSource | PlanResult, *, output: str | os.PathLike | None = None,
        base_dir: str | os.PathLike | None = None, device: str = "cpu", force: bool = False,
        fsync: bool = True, check_finite: bool = False, workers: int | None = None,
        frozen: bool = False, lock_file: str | os.PathLike | None = None,
        progress: Progress = "auto", variables: Mapping[str, Any] | None = None,
        executor: Literal["local", "ray"] = "local", address: str | None = None) -> RunResult:
    """Write the recipe's output checkpoint, as `recipekit run` does.

    A rerun of the same plan resumes from its finished shards, or returns ``already_complete``;
    an output of another plan is refused unless ``force`` (which deletes only files recipekit
    wrote there). When a lock exists (``<recipe stem>.lock.json`` beside a recipe file, or
    ``lock_file``) every input is checked against it first; ``frozen`` requires the lock and
    re-hashes every local input file. ``recipe`` may be a `PlanResult` from `plan`, to run
    that plan without compiling it again.

    Args:
        device: ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto``.
        fsync: fsync finished files (``--no-fsync`` is ``fsync=False``).
        check_finite: count NaN/Inf per tensor (``RunResult.non_finite``).
        workers: CPU threads computing row pieces (default: half the cores, at most 8; on
            Ray: per task, default 1).
        executor: ``local`` (this process) or ``ray``: one Ray task per output shard, on the
            cluster at ``address`` (default: Ray's own lookup, ``RAY_ADDRESS`` first), writing
            the same bytes into an output directory every node sees (README, "Running on a
            cluster"). Needs ``pip install 'recipekit[ray]'``.
        progress: a callable receiving `ProgressUpdate`s (bytes done and total, rate, current
            shard and tensor, each finished shard); ``"auto"``: a tqdm bar in a notebook or on
            a terminal, nothing otherwise; None: nothing.
        variables: the recipe's variables by name, as `plan` (``--set``).

    Raises:
        UsageError (exit 2 in the CLI): the recipe, its inputs, the lock, the device, or an
            output that holds another plan's files.
        OutputError, TensorDataError (exit 1): reading or writing tensor data failed; finished
            shards are kept and a rerun resumes.

    Example:
        >>> result = recipekit.run("recipes/quickstart.yaml", progress=None)  # doctest: +SKIP
        >>> [(s.name, s.sha256[:8]) for s in result.shards]                    # doctest: +SKIP
    """
    from recipekit.run.device import resolve_device

    check_executor(executor, address)
    _check_workers(workers)
    if device != "cpu" and executor == "local":
        resolve_device(device)  # fail on a bad device before reading anything (Ray: on workers)
    p = recipe if isinstance(recipe, PlanResult) else plan(recipe, output=output,
                                                           base_dir=base_dir, warn=False,
                                                           variables=variables)
    if isinstance(recipe, PlanResult) and (output is not None or variables is not None):
        raise UsageError("`output` and `variables` apply when compiling; pass them to `plan` "
                         "instead")
    _check_lock(p, frozen, lock_file)
    from recipekit.run.finish import check_inputs_unchanged

    check_inputs_unchanged(p.plan, p.plan_hash)  # a PlanResult made a while ago
    start = time.perf_counter()
    with _progress(progress, p.bytes_written) as callback:
        result, shards = _run_plan(p, callback, device=device, force=force, fsync=fsync,
                                   check_finite=check_finite, workers=workers,
                                   executor=executor, address=address)
    return RunResult(result.output, shards, result.bytes_written, p.bytes_written,
                     result.shards_resumed, result.already_complete,
                     time.perf_counter() - start, p.layers, p.adapter, result.non_finite)


def check_executor(executor: str, address: str | None) -> None:
    """Refuse an unknown executor, an address without Ray, and (before any work) a missing
    Ray.

    Raises:
        UsageError: as said; ExtraMissingError: Ray is not installed (exit code 2).
    """
    if executor not in ("local", "ray"):
        raise UsageError(f"unknown executor {executor!r}", hint="use 'local' or 'ray'")
    if executor == "local" and address is not None:
        raise UsageError("an address applies to the Ray executor",
                         hint="add --executor ray (executor='ray'), or drop --address")
    if executor == "ray":
        from recipekit.run.ray import import_ray

        import_ray(address)  # bounds Ray's wait for a wrong address's answer


def _check_workers(workers: Any) -> None:
    """``workers`` as the CLI's ``--workers`` takes it (an integer ≥ 1), or None."""
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)
                                or workers < 1):
        raise UsageError(f"workers must be a whole number of threads, at least 1, not "
                         f"{workers!r}", hint="leave it None for the default (half the cores, "
                         "at most 8)")


def _run_plan(p: PlanResult, callback: ProgressCallback | None, *, executor: str,
              address: str | None, **options: Any):
    tracker = _Tracker(p.bytes_written, callback)
    if executor == "ray":
        from recipekit.run.ray import run_plan_on_ray

        result = run_plan_on_ray(p.plan, address=address, progress=tracker.tick,
                                 events=tracker, **options)  # type: ignore[arg-type]
    else:
        from recipekit.run.local import run_plan

        result = run_plan(p.plan, progress=tracker.tick, events=tracker,  # type: ignore[arg-type]
                          **options)
    sizes = {s.name: s.bytes for s in p.shards}
    resumed = tracker.resumed if not result.already_complete else set(sizes)
    shards = tuple(ShardResult(name, sizes[name], sha, name in resumed)
                   for name, sha in result.shards.items())
    if result.already_complete:
        tracker.tick(p.bytes_written)
    return result, shards


@contextmanager
def _progress(progress: Progress, total: int) -> Iterator[ProgressCallback | None]:
    if progress == "auto":
        if is_interactive():
            with bar_callback(total) as bar:
                yield bar
            return
        progress = None
    if progress is not None and not callable(progress):
        raise TypeError("progress is a callable, 'auto' or None")
    yield progress


class _Tracker:
    """Turns the executor's byte increments (`tick`) and events (the `RunEvents` methods
    `tensor` and `shard`, duck-typed so that importing the API does not import the executor)
    into cumulative `ProgressUpdate`s."""

    def __init__(self, total: int, callback: ProgressCallback | None) -> None:
        self.total, self.callback = total, callback
        self.done = self.skipped = 0
        self.current: tuple[str | None, str | None] = (None, None)  # shard, tensor
        self.resumed: set[str] = set()
        self.start = time.monotonic()

    def _update(self, shard_done: ShardResult | None = None) -> None:
        if self.callback is None:
            return
        elapsed = time.monotonic() - self.start
        rate = (self.done - self.skipped) / elapsed if elapsed > 0 else 0.0
        self.callback(ProgressUpdate(self.done, self.total, elapsed, rate, *self.current,
                                     shard_done))

    def tick(self, n: int) -> None:
        if n > 0:
            self.done = min(self.total, self.done + n)
            self._update()

    def tensor(self, shard: str, name: str) -> None:
        self.current = (shard, name)

    def shard(self, name: str, sha256: str, size: int, *, resumed: bool) -> None:
        if resumed:
            self.resumed.add(name)
            self.skipped += size
        self._update(ShardResult(name, size, sha256, resumed))


def _check_lock(p: PlanResult, frozen: bool, lock_file: str | os.PathLike | None) -> None:
    """The lock beside the recipe (or ``lock_file``), checked when it exists; required by
    ``frozen``."""
    from recipekit.tools.lock import check_lock, lock_path

    recipe_file = p.recipe_file
    path = Path(lock_file) if lock_file is not None else (
        lock_path(recipe_file) if recipe_file is not None else None)
    if path is not None and path.exists():
        check_lock(p.plan.recipe, p.plan.sources, path, full_hash=frozen)
    elif frozen:
        if path is None:
            raise UsageError("frozen: a recipe given as text or data has no lock beside it",
                             file=p.recipe, hint="pass lock_file=PATH")
        if lock_file is not None:  # `recipekit lock` writes <stem>.lock.json, not this name
            raise UsageError(f"frozen: no lock file {display_path(path)}", file=str(path),
                             hint=f"create it with `recipekit.lock(recipe, path={str(path)!r})`"
                             " and commit it")
        shown = display_path(recipe_file or path)
        raise UsageError(f"frozen: no lock file {path.name} beside the recipe", file=shown,
                         hint=f"create it with `recipekit lock {shown}` (or `recipekit.lock`) "
                         "and commit it")


def lock(recipe: RecipeSource, *, path: str | os.PathLike | None = None,
         base_dir: str | os.PathLike | None = None,
         variables: Mapping[str, Any] | None = None) -> LockResult:
    """Write the recipe's lock (`recipekit lock`): hub inputs pinned to commits, every input
    file's size and sha256. ``path`` defaults to ``<recipe stem>.lock.json`` beside a recipe
    file and is required for text or data. ``variables``: as `validate` (inputs named through
    a variable are locked as they resolve with these values).

    Raises:
        as `validate`; UsageError without ``path`` for text or data; LockError for a ``path``
        that is or lies inside an input, or names a file that is not a lock.
    """
    from recipekit.inputs.resolve import resolve_sources
    from recipekit.tools.lock import build_lock, check_lock_path, lock_path, write_lock

    r, file = _load(recipe, base_dir, variables)
    if path is None and file is None:
        raise UsageError("a recipe given as text or data has no file to put its lock beside",
                         file=r.document.file, hint="pass path=LOCK_FILE")
    target = Path(path) if path is not None else lock_path(file)  # type: ignore[arg-type]
    sources = resolve_sources(r)
    check_lock_path(target, r, sources, named=path is not None)
    doc = build_lock(r, sources)
    write_lock(target, doc)
    return LockResult(target, len(doc["inputs"]),
                      sum(len(e["files"]) for e in doc["inputs"].values()))



def sweep(recipe: RecipeSource, values: Mapping[str, Sequence[Any]], *,
          output: str | os.PathLike | None = None, base_dir: str | os.PathLike | None = None,
          executor: Literal["local", "ray"] = "local", address: str | None = None,
          dry_run: bool = False, device: str = "cpu", force: bool = False, fsync: bool = True,
          workers: int | None = None,
          on_result: Callable[[CombinationResult], None] | None = None,
          progress: Callable[[str], ProgressCallback | None] | None = None) -> SweepResult:
    """Run the recipe once for every combination of ``values`` (`recipekit sweep`): one output
    per combination under one root, named by its values (``<root>/alpha=0.1,method=ties``),
    each with its own manifest, and an index ``<root>/sweep.json``.

    Every combination's document is validated before anything runs (exit 2 in the CLI); after
    that a failing combination is recorded (``status="failed"``, its message in ``error``) and
    the others still run. A rerun resumes: finished combinations report ``complete``, an
    interrupted one resumes from its shards. ``executor="ray"`` runs the combinations as Ray
    tasks (``address``, else ``RAY_ADDRESS``); ``dry_run`` compiles each combination's plan
    (headers only) and writes nothing (``status="planned"``).

    Args:
        values: the values of each variable, by name, e.g. ``{"alpha": [0.1, 0.3]}``.
        output: the sweep's root (default: the recipe's ``output.path``, which must then not
            depend on a swept variable).
        on_result: called with each combination's result as it finishes.
        progress: local sweeps: called with each combination's name as it starts, returns the
            `run` progress callback for that run (or None).

    Raises:
        RecipeErrors: a combination's document is invalid (the note names the variable).
        UsageError: no values, a root that depends on a swept variable.
        ExtraMissingError: ``executor="ray"`` without ray installed.

    Example:
        >>> r = recipekit.sweep("recipes/alpha-grid.yaml", {"alpha": [0.25, 0.5]})  # doctest: +SKIP
        >>> [(c.name, c.status) for c in r.combinations]                            # doctest: +SKIP
        [('alpha=0.25', 'written'), ('alpha=0.5', 'written')]
    """
    from recipekit.run.sweep import plan_sweep, run_combination, run_sweep

    if executor not in ("local", "ray"):
        raise UsageError(f"unknown executor {executor!r}", hint="use 'local' or 'ray'")
    _check_workers(workers)
    if device != "cpu":
        from recipekit.run.device import resolve_device

        resolve_device(device)
    sp = plan_sweep(recipe, values, output=output, base_dir=base_dir)
    if dry_run:
        return _plan_combinations(sp)
    options = {"device": device, "force": force, "fsync": fsync, "workers": workers}
    if executor == "ray":
        from recipekit.run.sweep_ray import run_sweep_ray

        return run_sweep_ray(sp, address=address, on_result=on_result, **options)
    return run_sweep(sp, lambda sp_, c: run_combination(
        sp_, c, progress=progress(c.name) if progress is not None else None, **options),
        on_result=on_result)


def _plan_combinations(sp: Any) -> SweepResult:
    """Each combination's plan (headers only): its plan hash, or why it cannot be compiled."""
    from recipekit.errors import RecipekitError
    from recipekit.run.sweep import INDEX_NAME

    out = []
    for c in sp.combinations:
        try:
            p = plan(sp.recipe, output=sp.output(c), base_dir=sp.base_dir, warn=False,
                     variables=sp.settings(c))
        except RecipekitError as e:
            out.append(CombinationResult(c.name, c.values, sp.output(c), "failed",
                                         error=e.render(), exit_code=e.exit_code))
            continue
        out.append(CombinationResult(c.name, c.values, sp.output(c), "planned", p.plan_hash))
    return SweepResult(sp.root, sp.root / INDEX_NAME, tuple(out), sp.recipe_file)
