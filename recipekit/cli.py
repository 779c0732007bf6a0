"""The `recipekit` command: a thin layer over the Python API (`recipekit.api`).

Only this module prints. Every `RecipekitError` is rendered like a compiler message and mapped
to its exit code (2: the recipe or its inputs, 1: reading/writing tensor data); anything else is
an internal error, shown with a traceback only under ``--debug``. With ``--json`` stdout carries
only JSON (``run``: JSON Lines events), errors included; messages still go to stderr. torch is
imported only when a command computes tensors, so `validate`, `plan` and ``--help`` answer at
once.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from recipekit import __version__
from recipekit.errors import RecipeErrors, RecipekitError, echo_text, terminal_text

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Compile merge/grow/shrink/adapt recipes into a tensor plan and stream it to disk.",
)

T = TypeVar("T")


def _url_or_path(text: str) -> str:
    """A command-line argument that may be a URL (``verify``, ``inspect``, ``diff``), checked
    as the recipe's URLs are: one holding credentials (``s3://user:secret@bucket/...``) is
    refused with the secret shown as ``***`` (click exits 2 before the command runs, so no
    message, ``--json`` event or backend error repeats it); ``file:///x`` is the path ``/x``.
    Other text is returned as typed."""
    from recipekit.errors import holds_credentials
    from recipekit.io.urls import is_url, local_path_text, redact, url_problem

    if holds_credentials(text) and not is_url(text):  # file://user:secret@...
        raise typer.BadParameter(f"{redact(text)} holds credentials (user:secret@, or a token "
                                 "in its query); name the local path")
    if is_url(text):
        problem = url_problem(text)
        if problem is not None:
            raise typer.BadParameter(f"the URL {redact(text)} {problem}")
        return text
    return local_path_text(text)


def _local_path(text: str) -> Path:
    """A command-line argument that names a local file or folder (a recipe, a sweep root, a
    chart): ``file:///x`` is ``/x``; any other URL is refused (it would become a folder named
    ``s3:`` here), without repeating a secret it holds."""
    from recipekit.io.urls import is_url, redact

    checked = _url_or_path(text)
    if is_url(checked):
        raise typer.BadParameter(f"{redact(checked)} is a URL; this takes a local path")
    return Path(checked)


RecipeArg = Annotated[Path, typer.Argument(help="The recipe file (YAML or JSON).",
                                           show_default=False, parser=_local_path)]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")]
OutputOpt = Annotated[str | None, typer.Option(
    "--output", "-o", help="Output directory or URL, e.g. s3://bucket/prefix (overrides the "
    "recipe's output.path).", show_default=False)]
JsonOpt = Annotated[bool, typer.Option(
    "--json", help="Print machine-readable JSON on stdout (schema: README, \"JSON output\").")]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", metavar="NAME=VALUE", help="Set a variable the recipe declares (repeatable); the "
    "value is read as YAML: 0.3, ties, '0.3' (a string), [1, 2].", show_default=False)]


def _settings(texts: list[str] | None):
    """``--set`` options as the API's ``variables`` (None when there are none)."""
    if not texts:
        return None
    from recipekit.recipe.variables import parse_settings

    return parse_settings(texts)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True,
        help="Print the recipekit version and exit.")] = False,
) -> None:
    """Compile merge/grow/shrink/adapt recipes into a tensor plan and stream it to disk."""


def _blas_on_caller_threads() -> None:
    """Keep BLAS on the calling thread for the statistics commands (`inspect`, `diff`,
    `verify --stats`).

    Why: their Σx² is a BLAS ``dot`` on each of `tools.stream_stats`' worker threads, and
    OpenBLAS spreads a dot of more than 10,000 values over threads of its own, which
    oversubscribes the cores (a bf16 piece cost 1.3 instead of 0.9 ns a value on one worker,
    2.0 instead of 0.5 on two). OpenBLAS reads its thread count once, when numpy loads it, so
    this runs before the command imports numpy; a user's own setting is kept. Here and not in
    the library: a Python caller's BLAS stays as it set it up (the same numbers, more slowly).
    """
    if "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _say(text: str, *, err: bool = False) -> None:
    """Print human text: `terminal_text` escapes whatever control or format character an input
    slipped into it (an OSC title in a name, U+202E, NUL), keeping only the line breaks."""
    typer.echo(terminal_text(text), err=err)


class _EchoHandler(logging.Handler):
    """Prints recipekit's log records to the current stderr as ``warning: ...``."""

    def emit(self, record: logging.LogRecord) -> None:
        _say(f"{record.levelname.lower()}: {record.getMessage()}", err=True)


def _configure_logging(debug: bool) -> None:
    """One handler on the `recipekit` logger; the root logger is left alone."""
    logger = logging.getLogger("recipekit")
    logger.setLevel(logging.DEBUG if debug else logging.WARNING)
    if not any(isinstance(h, _EchoHandler) for h in logger.handlers):
        logger.addHandler(_EchoHandler())


class Executor(str, enum.Enum):
    local = "local"
    ray = "ray"


class PlanFormat(str, enum.Enum):
    text = "text"
    json = "json"
    dot = "dot"
    svg = "svg"


ChartOpt = Annotated[Path | None, typer.Option(
    "--chart", help="Also draw a per-layer chart to this file (.png, .svg or .pdf; needs "
    "matplotlib: pip install 'recipekit[charts]').",
    show_default=False, parser=_local_path, metavar="<path>")]


def _check_chart(chart: Path | None) -> None:
    """Refuse `--chart` before any work when it cannot be drawn (path, matplotlib)."""
    if chart is not None:
        from recipekit.tools.charts import check_chart_path, require_matplotlib

        check_chart_path(chart)
        require_matplotlib()


def _json(data: Any, *, indent: int | None = None, ensure_ascii: bool = False) -> None:
    """One JSON document (or JSON Lines event) on stdout, flushed at once, and whole: a Ctrl-C
    while it is written left half a document followed by the error document, which no reader
    parses (found by a black-box check), so SIGINT waits until it is out (and is dropped: the
    command has done its work)."""
    _whole(json.dumps(data, allow_nan=False, ensure_ascii=ensure_ascii, indent=indent))


def _whole(text: str) -> None:
    """``text`` on stdout with SIGINT ignored while it is written (`_json`)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        typer.echo(text)
        return
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        typer.echo(text)
    finally:
        signal.signal(signal.SIGINT, before)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (`timeout`, `docker stop`, Kubernetes, Slurm, a closed terminal),
    raised in the main thread so that a run stops as on Ctrl-C: temp files removed, finished
    shards kept, the `Interrupted` error last under ``--json``; exit 128 + the signal number.
    Before, the process died of the signal, leaving its temp file and no message."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _terminate_like_interrupt() -> None:
    """Raise `Terminated` on SIGTERM and SIGHUP in this (the CLI's) process."""
    import signal

    def raise_terminated(signum: int, frame: Any) -> None:
        raise Terminated(signum)

    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) is signal.SIG_DFL:
            signal.signal(sig, raise_terminated)


def error_json(e: RecipekitError) -> dict[str, Any]:
    """An error as ``--json`` prints it: its type, exit code and rendered message, and for each
    problem the file, line, column, key path, message and hint."""
    def one(x: RecipekitError) -> dict[str, Any]:
        from recipekit.errors import format_key_path

        loc = x.location
        return {"file": loc.file if loc else x.file, "line": loc.line if loc else None,
                "column": loc.column if loc else None,
                "key_path": format_key_path(x.key_path) if x.key_path else None,
                "message": x.message, "hint": x.hint}

    problems = e.errors if isinstance(e, RecipeErrors) else [e]
    return {"type": type(e).__name__, "exit_code": e.exit_code, "message": e.render(),
            "problems": [one(x) for x in problems]}


#: The exit code of a command stopped by Ctrl-C (SIGINT), as shells report it: 128 + 2.
INTERRUPTED = 130


def _guard(debug: bool, body: Callable[[], T],
           on_error: Callable[[dict[str, Any]], None] | None = None, *,
           resumes: bool = False) -> T:
    """Run a command body, rendering errors as one paragraph with the right exit code
    (``on_error``: also handed the error's JSON form, for ``--json``; ``resumes``: a command
    that writes an output a rerun resumes, which an interruption's message says). ``--debug``
    adds the traceback and changes nothing else (it used to turn exit 2 into 1 and drop the
    JSON error)."""
    _configure_logging(debug)
    try:
        return body()
    except RecipekitError as e:
        if debug:
            traceback.print_exc()
        _say(e.render(), err=True)
        if on_error is not None:
            on_error(error_json(e))
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt as e:
        how, code = ((f"terminated ({_signal_name(e.signum)})", 128 + e.signum)
                     if isinstance(e, Terminated) else ("interrupted", INTERRUPTED))
        message = how + ("; finished shards are kept and a rerun resumes" if resumes else "")
        _say(message, err=True)
        if on_error is not None:  # a --json reader gets its last event / document too
            on_error({"type": "Interrupted", "exit_code": code, "message": message,
                      "problems": []})
        raise typer.Exit(code) from None
    except typer.Exit:
        raise
    except BrokenPipeError:
        # the reader of stdout went away (`run --json | head -1`): stop quietly, as `head`'s
        # writers do; what a run had finished is kept
        from recipekit.io.writer import stdout_to_devnull

        stdout_to_devnull()  # Python's flush at exit would report the broken pipe again
        raise typer.Exit(1) from None
    except Exception as e:
        if debug:
            traceback.print_exc()
        message = (f"internal error: {type(e).__name__}: {e}\n"
                   "rerun with --debug for the traceback, and please report it")
        _say(message, err=True)
        if on_error is not None:
            on_error({"type": "InternalError", "exit_code": 1, "message": message,
                      "problems": []})
        raise typer.Exit(1) from None


def _signal_name(signum: int) -> str:
    import signal

    return signal.Signals(signum).name  # SIGTERM or SIGHUP (`_terminate_like_interrupt`)


def _error_doc(e: dict[str, Any]) -> None:
    _json({"error": e})


@app.command()
def validate(
    recipes: Annotated[list[Path], typer.Argument(help="Recipe files (YAML or JSON).",
                                                  show_default=False, parser=_local_path)],
    no_inputs: Annotated[bool, typer.Option(
        "--no-inputs", help="Check the recipe documents only (schema, names, layer ranges, "
        "each op's and merge method's rules), without opening the models they name: for "
        "pre-commit and CI.")] = False,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Check recipes and their inputs (headers only) without writing anything."""
    from recipekit import api

    results: list[dict[str, Any]] = []

    def check(recipe: Path) -> None:
        def failed(e: dict[str, Any]) -> None:
            results.append({"recipe": str(recipe), "ok": False, "error": e})

        def body() -> None:
            r = api.validate(recipe, inputs=not no_inputs, variables=_settings(set_))
            results.append({"recipe": str(recipe), "ok": True, **_fields(r)})
            if not as_json:
                _say(f"{echo_text(recipe)}: ok ({r.summary()})")

        _guard(debug, body, failed if as_json else None)

    code = 0
    for recipe in recipes:  # every file is checked; the worst exit code wins
        try:
            check(recipe)
        except typer.Exit as e:
            code = max(code, e.exit_code)
    if as_json:
        _json({"recipes": results})
    if code:
        raise typer.Exit(code)


def _fields(result: Any) -> dict[str, Any]:
    """A result dataclass of the API as JSON values (paths as strings)."""
    import dataclasses

    out = {}
    for f in dataclasses.fields(result):
        if f.repr:  # internal objects (the compiled plan) are left out
            value = getattr(result, f.name)
            out[f.name] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    import dataclasses

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _fields(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


@app.command()
def plan(
    recipe: RecipeArg,
    output: OutputOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v",
                                          help="List every tensor and its source.")] = False,
    fmt: Annotated[PlanFormat, typer.Option(
        "--format", "-f", help="text (a summary), json (the DAG and the schedule), dot (a "
        "Graphviz graph of inputs, steps and output) or svg (that graph drawn; needs "
        "Graphviz's `dot`).")] = PlanFormat.text,
    tensors: Annotated[bool, typer.Option(
        "--tensors", help="With dot or svg: one node per tensor and op instead of per "
        "step.")] = False,
    chart: ChartOpt = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Same as --format json: the DAG, the schedule and the estimates.")
    ] = False,
    set_: SetOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Show what a run would read and write: tensors, bytes, shards, memory and disk."""

    def body() -> None:
        from recipekit import api
        from recipekit.errors import UsageError

        if as_json and fmt not in (PlanFormat.text, PlanFormat.json):
            raise UsageError(f"--json and --format {fmt.value} ask for two formats",
                             hint="give one of them")
        _check_chart(chart)
        p = api.plan(recipe, output=output, variables=_settings(set_))
        if as_json or fmt is PlanFormat.json:
            typer.echo(p.to_json())
        elif fmt in (PlanFormat.dot, PlanFormat.svg):
            from recipekit.plan.dot import render_plan_dot, render_svg, render_tensor_dot

            dot = render_tensor_dot(p.plan) if tensors else render_plan_dot(p.plan)
            typer.echo(dot if fmt is PlanFormat.dot else render_svg(dot), nl=False)
        else:
            _say(p.text(verbose=verbose))
        if chart is not None:
            from recipekit.tools.charts import draw_parameter_chart, parameter_series

            draw_parameter_chart(parameter_series(p.plan), chart)
            _say(f"wrote {echo_text(chart)}", err=True)

    _guard(debug, body, _error_doc if as_json or fmt is PlanFormat.json else None)


@app.command()
def run(
    recipe: RecipeArg,
    output: OutputOpt = None,
    device: Annotated[str, typer.Option(
        "--device", help="Where to compute: cpu, cuda, cuda:N, mps or auto.")] = "cpu",
    force: Annotated[bool, typer.Option(
        "--force", help="Write the output again even if it exists (from this or another plan); "
        "deletes only files recipekit wrote there.")] = False,
    no_fsync: Annotated[bool, typer.Option(
        "--no-fsync", help="Skip fsync of finished files (faster, less crash-safe).")] = False,
    check_finite: Annotated[bool, typer.Option(
        "--check-finite", help="Report NaN/Inf values in inputs and outputs, by tensor name "
        "(imports torch; the output is written either way).")] = False,
    frozen: Annotated[bool, typer.Option(
        "--frozen", help="Refuse to run unless the recipe's lock (`<stem>.lock.json` beside "
        "it, from `recipekit lock`) exists and every input matches it, re-hashing every local "
        "input file.")] = False,
    workers: Annotated[int | None, typer.Option(
        "--workers", min=1, help="Threads computing pieces of large elementwise tensors on the "
        "CPU side by side (default: half the cores, at most 8; the passes of a reduction over "
        "inputs held in memory use one more). Changes no byte.")] = None,
    executor: Annotated[Executor, typer.Option(
        "--executor", help="Where shards are written: local (this process) or ray (one Ray "
        "task per output shard; the output must be on a file system every node sees; needs "
        "pip install 'recipekit[ray]').")] = Executor.local,
    address: Annotated[str | None, typer.Option(
        "--address", help="The Ray cluster (default: RAY_ADDRESS, then a cluster started here "
        "by `ray start`, else a local Ray instance).", show_default=False)] = None,
    quiet: Annotated[bool, typer.Option(
        "--quiet", "-q", help="No progress bar (on a terminal) or progress lines (in a log, "
        "every RECIPEKIT_PROGRESS_INTERVAL seconds, default 10).")] = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print JSON Lines events on stdout: start, progress (at the progress "
        "interval), shard, done (or error).")] = False,
    set_: SetOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Build the recipe's output checkpoint (checking its <stem>.lock.json when there is one)."""

    def body() -> None:
        from recipekit import api

        api.check_executor(executor.value, address)  # a missing Ray: before any work
        if device != "cpu" and executor is Executor.local:
            from recipekit.run.device import resolve_device

            resolve_device(device)  # fail before reading anything on a bad device
        p = api.plan(recipe, output=output, warn=False,  # the run warns
                     variables=_settings(set_))
        if as_json:
            _json({"event": "start", "recipe": p.recipe, "output": str(p.output),
                   "total": p.bytes_written, "shards": len(p.shards), "tensors": p.tensors,
                   "plan_hash": p.plan_hash})
        result = api.run(p, device=device, fsync=not no_fsync, force=force,
                         check_finite=check_finite, workers=workers, frozen=frozen,
                         executor=executor.value, address=address,
                         progress=_run_progress(quiet=quiet, as_json=as_json))
        if as_json:
            _json({"event": "done", **_fields(result)})
            return
        _say(result.summary())
        if check_finite and not result.already_complete:
            _report_finite(dict(result.non_finite), resumed=result.shards_resumed)

    _guard(debug, body, (lambda e: _json({"event": "error", **e})) if as_json else None,
           resumes=True)


def _run_progress(*, quiet: bool, as_json: bool):
    """How `run` shows progress: JSON events (``--json``), a bar on a terminal, a line every
    interval in a log (stderr not a terminal), or nothing (``-q``)."""
    from recipekit.progress import (
        bar_callback,
        every,
        progress_event,
        progress_interval,
        progress_line,
        shard_event,
    )

    if as_json:
        throttled = every(progress_interval(), lambda u: _json(progress_event(u)))

        def events(u):
            if u.shard_done is not None:
                _json(shard_event(u.shard_done))
            throttled(u)

        return events
    if quiet:
        return None
    if _stderr_is_terminal():
        return _LazyBar(bar_callback)
    return every(progress_interval(), lambda u: _say(progress_line(u), err=True))


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class _LazyBar:
    """A tqdm bar opened at the first update (when the total is known) and closed at the
    last."""

    def __init__(self, factory) -> None:
        self.factory, self.ctx, self.bar = factory, None, None

    def __call__(self, u) -> None:
        if self.bar is None:
            self.ctx = self.factory(u.total)
            self.bar = self.ctx.__enter__()
        self.bar(u)
        if u.done >= u.total and self.ctx is not None:
            self.ctx.__exit__(None, None, None)
            self.ctx = None


@app.command()
def lock(recipe: RecipeArg, set_: SetOpt = None, debug: DebugOpt = False) -> None:
    """Write <stem>.lock.json beside the recipe: hub inputs pinned to commits, every input
    file's size and hash."""

    def body() -> None:
        from recipekit import api

        r = api.lock(recipe, variables=_settings(set_))
        _say(f"wrote {echo_text(r.path)}: {r.inputs} input(s), {r.files} file(s) pinned")

    _guard(debug, body)


class Executor(str, enum.Enum):
    local = "local"
    ray = "ray"


@app.command()
def sweep(
    recipe: RecipeArg,
    set_: Annotated[list[str], typer.Option(
        "--set", metavar="NAME=V1,V2,...", help="The values of a variable the recipe declares "
        "(repeatable; every combination runs). Values are read as YAML; a value holding a "
        "comma goes in list form: --set 'name=[\"a,b\", c]'.", show_default=False)],
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="The sweep's root directory (default: the recipe's "
        "output.path); each combination writes <root>/<name=value,...>.",
        show_default=False, parser=_local_path, metavar="<path>")] = None,
    executor: Annotated[Executor, typer.Option(
        "--executor", help="local: one combination after another; ray: each combination as "
        "a Ray task, in parallel (needs pip install 'recipekit[ray]').")] = Executor.local,
    address: Annotated[str | None, typer.Option(
        "--address", help="The Ray cluster to use with --executor ray (default: RAY_ADDRESS, "
        "else a local Ray).", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Validate and plan every combination (headers only); write "
        "nothing.")] = False,
    device: Annotated[str, typer.Option(
        "--device", help="Where to compute: cpu, cuda, cuda:N, mps or auto.")] = "cpu",
    force: Annotated[bool, typer.Option(
        "--force", help="Write each combination's output again even if it exists (deletes "
        "only files recipekit wrote there).")] = False,
    no_fsync: Annotated[bool, typer.Option(
        "--no-fsync", help="Skip fsync of finished files.")] = False,
    workers: Annotated[int | None, typer.Option(
        "--workers", min=1, help="Threads per run computing pieces of large tensors.")] = None,
    quiet: Annotated[bool, typer.Option(
        "--quiet", "-q", help="No progress bar or progress lines for each local run.")] = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the sweep's index (as sweep.json holds it) on stdout at the "
        "end.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Run the recipe once per combination of --set values, one output each, named by the
    values, with a sweep.json index. Exit 1 if any combination failed (the others still run);
    a rerun resumes."""

    def body() -> None:
        from recipekit import api
        from recipekit.errors import UsageError, display_path
        from recipekit.run.sweep import parse_sweep_settings

        if address is not None and executor is not Executor.ray:
            raise UsageError("--address is used by --executor ray", hint="add --executor ray")
        def finished(c) -> None:
            if c.status == "failed":
                _say(f"{echo_text(c.name)}: failed:\n{c.error}", err=True)
            elif not as_json:
                _say(f"{echo_text(c.name)}: {c.status} ({display_path(c.output)})")

        result = api.sweep(recipe, parse_sweep_settings(set_), output=output,
                           executor=executor.value, address=address, dry_run=dry_run,
                           device=device, force=force, fsync=not no_fsync, workers=workers,
                           on_result=finished, progress=None if as_json else (
                               lambda name: _run_progress(quiet=quiet, as_json=False)))
        if dry_run:
            for c in result.combinations:
                if c.status == "failed":
                    finished(c)
                elif not as_json:
                    _say(f"{echo_text(c.name)}: plan {c.plan_hash} -> {display_path(c.output)}")
        if as_json:
            _json(result.to_json())
        else:
            _say(result.summary())
        if result.failed:
            raise typer.Exit(1)

    _guard(debug, body, _error_doc if as_json else None, resumes=True)


def _report_finite(found: dict[str, tuple[int, int]], *, resumed: int) -> None:
    skipped = f" ({resumed} resumed shard(s) were not re-read)" if resumed else ""
    if not found:
        _say(f"check-finite: no NaN or Inf values{skipped}")
        return
    _say(f"warning: non-finite values in {len(found)} tensor(s){skipped}:", err=True)
    for label, (nan, inf) in sorted(found.items())[:50]:
        _say(f"  {label}: {nan} NaN, {inf} Inf", err=True)
    if len(found) > 50:
        _say(f"  ... and {len(found) - 50} more", err=True)


@app.command()
def convert(
    src: Annotated[Path, typer.Argument(help="Checkpoint directory with pytorch_model*.bin or "
                                        "adapter_model.bin.", show_default=False,
                                        parser=_local_path)],
    dst: Annotated[Path, typer.Argument(help="New directory for the safetensors checkpoint.",
                                        show_default=False, parser=_local_path)],
    allow_pickle: Annotated[bool, typer.Option(
        "--allow-pickle", help="Required: unpickling can run code; recipekit loads with "
        "torch.load(weights_only=True), which refuses anything but tensors.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Convert a pickle checkpoint or PEFT adapter to safetensors (which `run` reads).

    An interrupted conversion resumes when run again with the same source files."""

    def body() -> None:
        from recipekit.errors import UsageError

        if not allow_pickle:
            raise UsageError(
                "refusing to unpickle without --allow-pickle",
                hint="pickle files can run arbitrary code when loaded; if you trust "
                f"{src}, run `recipekit convert --allow-pickle {src} {dst}`")
        from recipekit.tools.convert import convert_checkpoint
        from recipekit.units import format_size

        result = convert_checkpoint(src, dst, progress=lambda m: _say(m, err=True))
        if result.already_complete:
            _say(f"{echo_text(dst)}: already complete (same source files); nothing to do")
            return
        kept = (f"; resumed an interrupted conversion: {result.resumed} file(s) it had "
                "converted were kept" if result.resumed else "")
        _say(f"wrote {echo_text(dst)}: {result.tensors} tensors in {result.written} file(s), "
             f"{format_size(result.bytes_written)}{kept}")

    _guard(debug, body, resumes=True)


ModelArg = Annotated[str, typer.Argument(
    help="A checkpoint directory, a PEFT adapter directory, a .safetensors file, or a hub repo "
    "(org/name or org/name@revision).", show_default=False, parser=_url_or_path)]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]


@app.command()
def inspect(
    model: ModelArg,
    as_json: JsonOpt = False,
    headers_only: Annotated[bool, typer.Option(
        "--headers-only", help="Names, shapes, dtypes and parameter counts from the headers "
        "alone: read (and download) no tensor data.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v",
                                          help="List every tensor.")] = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Parameter counts and per-tensor statistics (mean, std, min, max, norm, NaN/Inf)."""

    def body() -> None:
        _blas_on_caller_threads()
        from recipekit.inputs.checkpoints import open_checkpoint
        from recipekit.progress import byte_progress
        from recipekit.tools.inspect import inspect_checkpoint, render_inspect

        ckpt = open_checkpoint(model, data=not headers_only)
        total = sum(t.nbytes for t in ckpt.tensors.values())
        with byte_progress(total, disable=quiet or headers_only, desc="reading") as tick:
            report = inspect_checkpoint(ckpt, stats=not headers_only, progress=tick)
        if as_json:
            _json(report, indent=2, ensure_ascii=True)
        else:
            _say(render_inspect(report, verbose=verbose))

    _guard(debug, body, _error_doc if as_json else None)


@app.command("import-mergekit")
def import_mergekit(
    config: Annotated[Path, typer.Argument(help="A mergekit YAML config (models: or slices:).",
                                           show_default=False, parser=_local_path)],
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Write the recipe here (default: print it). Model paths are "
        "written relative to this file's directory.", show_default=False,
        parser=_local_path, metavar="<path>")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Replace an existing -o file (a symlink is replaced, not written "
        "through). The mergekit config itself is never overwritten.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Convert a mergekit config into an equivalent recipe, or say what cannot be converted."""

    def body() -> None:
        from recipekit.tools.mergekit_import import convert_file
        from recipekit.tools.single_file import check_recipe_target, write_recipe_file

        if output is not None:
            check_recipe_target(config, output, force=force)
        text = convert_file(config, output)
        if output is None:
            typer.echo(text, nl=False)
        else:
            write_recipe_file(output, text)
            _say(f"wrote {echo_text(output)}", err=True)

    _guard(debug, body)


@app.command()
def diff(
    a: ModelArg,
    b: ModelArg,
    as_json: JsonOpt = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v",
                                          help="List every compared tensor.")] = False,
    chart: ChartOpt = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Per-tensor and per-layer max/mean |a-b|, relative norm difference and cosine.

    Exit status, like diff(1): 0 when every tensor of A has a same-shaped, equal twin in B and
    B has no other; 1 when they differ, including "nothing comparable" (no tensor with the same
    name and shape in both); 2 when an input cannot be read as a checkpoint."""

    def body() -> None:
        _blas_on_caller_threads()
        from recipekit.inputs.checkpoints import open_checkpoint
        from recipekit.progress import byte_progress
        from recipekit.tools.diff import diff_checkpoints, render_diff, verdict

        _check_chart(chart)
        try:
            ca, cb = open_checkpoint(a), open_checkpoint(b)
            total = sum(t.nbytes + cb.tensors[n].nbytes for n, t in ca.tensors.items()
                        if n in cb.tensors and cb.tensors[n].shape == t.shape)
            with byte_progress(total, disable=quiet, desc="reading") as tick:
                report = diff_checkpoints(ca, cb, progress=tick)
        except RecipekitError as e:
            e.exit_code = 2  # diff(1)'s "trouble": 1 already means "they differ"
            raise
        if as_json:
            _json(report, indent=2, ensure_ascii=True)
        else:
            _say(render_diff(report, verbose=verbose))
        if chart is not None:
            from recipekit.tools.charts import diff_series, draw_diff_chart

            draw_diff_chart(diff_series(report), chart)
            _say(f"wrote {echo_text(chart)}", err=True)
        if verdict(report):
            raise typer.Exit(verdict(report))

    _guard(debug, body, _error_doc if as_json else None)


@app.command()
def verify(
    out: Annotated[str, typer.Argument(help="An output directory (or s3:// URL) written by "
                                       "`recipekit run`.", show_default=False,
                                       parser=_url_or_path)],
    load: Annotated[bool, typer.Option(
        "--load", help="Also load it with transformers (PEFT for an adapter output) and run a "
        "forward pass (imports torch).")] = False,
    base: Annotated[str | None, typer.Option(
        "--base", help="For an adapter output with --load: the model directory it adapts.",
        show_default=False, parser=_url_or_path)] = None,
    stats: Annotated[bool, typer.Option(
        "--stats", help="Also read every floating value: fail on NaN/Inf, report statistics "
        "(per tensor with --json).")] = False,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Check an output against its manifest: shard hashes and sizes, headers, index, recipe."""

    def body() -> None:
        if stats:
            _blas_on_caller_threads()
        from recipekit.errors import UsageError, display_path
        from recipekit.io.urls import is_url
        from recipekit.tools.verify import load_and_run, verify_output

        if base is not None and not load:
            raise UsageError("--base is used by --load", hint="add --load")
        if is_url(out):
            from recipekit.tools.verify_remote import verify_remote

            if load or stats:
                raise UsageError(f"{'--load' if load else '--stats'} needs a local directory",
                                 hint="download the output first (e.g. `aws s3 sync`), or "
                                 "verify without it")
            report = verify_remote(out)
            where = out.rstrip("/")
        else:
            report = verify_output(Path(out), stats=stats)
            where = display_path(Path(out))
        loaded = (load_and_run(Path(out), adapter=report.adapter, base=base)
                  if not report.problems and load else None)
        if as_json:
            _json({"output": str(out), "verified": not report.problems,
                   "adapter": report.adapter, "passed": report.passed, "notes": report.notes,
                   "loaded": loaded, "problems": [error_json(p) for p in report.problems],
                   **({"stats": report.stats} if stats else {})})
        else:
            for line in report.passed:
                _say(f"ok: {line}")
            for line in report.notes:
                _say(f"note: {line}")
            if loaded is not None:
                _say(f"ok: {loaded}")
            elif not report.problems and report.adapter:
                _say("note: a PEFT adapter output: `--load` loads it with PEFT on the base its "
                     "adapter_config.json names (or on `--base MODEL_DIR`) and runs a forward pass")
        if report.problems:
            for p in report.problems:
                _say(p.render(), err=True)
            _say(f"{where}: {len(report.problems)} problem(s) found", err=True)
            raise typer.Exit(report.exit_code)
        if not as_json:
            _say(f"{where}: verified")

    _guard(debug, body, _error_doc if as_json else None)


@app.command()
def schema() -> None:
    """Print the recipe JSON Schema (for editors: yaml-language-server, VS Code, ...)."""
    from recipekit.recipe import load_schema

    typer.echo(json.dumps(load_schema(), indent=2, ensure_ascii=False))


@app.command()
def version() -> None:
    """Print the recipekit version."""
    typer.echo(__version__)


def main() -> None:
    _terminate_like_interrupt()
    app(prog_name="recipekit")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
