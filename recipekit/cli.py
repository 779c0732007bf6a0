"""The `recipekit` command: validate, plan and run recipes.

Only this module prints. Every `RecipekitError` is rendered like a compiler message and mapped
to its exit code (2: the recipe or its inputs, 1: reading/writing tensor data); anything else is
an internal error, shown with a traceback only under ``--debug``. torch is imported only when a
command computes tensors, so `validate`, `plan` and ``--help`` answer at once.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from recipekit import __version__
from recipekit.errors import RecipekitError, echo_text, terminal_text

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Compile merge/grow/shrink/adapt recipes into a tensor plan and stream it to disk.",
)

T = TypeVar("T")

RecipeArg = Annotated[Path, typer.Argument(help="The recipe file (YAML or JSON).",
                                           show_default=False)]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")]
OutputOpt = Annotated[Path | None, typer.Option(
    "--output", "-o", help="Output directory (overrides the recipe's output.path).",
    show_default=False)]


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


class PlanFormat(str, enum.Enum):
    text = "text"
    json = "json"
    dot = "dot"


def _guard(debug: bool, body: Callable[[], T]) -> T:
    """Run a command body, rendering errors as one paragraph with the right exit code."""
    _configure_logging(debug)
    try:
        return body()
    except RecipekitError as e:
        if debug:
            raise
        _say(e.render(), err=True)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        _say("interrupted; finished shards are kept and a rerun resumes", err=True)
        raise typer.Exit(130) from None
    except typer.Exit:
        raise
    except Exception as e:
        if debug:
            raise
        _say(f"internal error: {type(e).__name__}: {e}\n"
             "rerun with --debug for the traceback, and please report it", err=True)
        raise typer.Exit(1) from None


def _compile(recipe_path: Path, output: Path | None):
    from recipekit.inputs.resolve import resolve_sources
    from recipekit.plan import compile_plan
    from recipekit.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    if output is not None:
        recipe = dataclasses.replace(
            recipe, output=dataclasses.replace(recipe.output, path=output.resolve()))
    return compile_plan(recipe, resolve_sources(recipe))


@app.command()
def validate(
    recipes: Annotated[list[Path], typer.Argument(help="Recipe files (YAML or JSON).",
                                                  show_default=False)],
    no_inputs: Annotated[bool, typer.Option(
        "--no-inputs", help="Check the recipe documents only (schema, names, layer-range "
        "grammar), without opening the models they name: for pre-commit and CI.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Check recipes and their inputs (headers only) without writing anything."""

    def check(recipe: Path) -> None:
        if no_inputs:
            from recipekit.recipe import load_recipe

            r = load_recipe(recipe)
            _say(f"{echo_text(recipe)}: ok ({len(r.steps)} step(s); inputs not checked)")
            return
        plan = _compile(recipe, None)
        what = "PEFT adapter" if plan.adapter else f"{plan.model.stack.num_layers} layers"
        _say(f"{echo_text(recipe)}: ok ({len(plan.recipe.steps)} step(s); output "
             f"'{echo_text(plan.recipe.output.model)}': {what}, {plan.num_tensors} tensors)")

    def body() -> None:
        if len(recipes) == 1:
            check(recipes[0])
            return
        code = 0
        for recipe in recipes:  # every file is checked; the worst exit code wins
            try:
                _guard(debug, lambda r=recipe: check(r))
            except typer.Exit as e:
                code = max(code, e.exit_code)
        if code:
            raise typer.Exit(code)

    _guard(debug, body)


@app.command()
def plan(
    recipe: RecipeArg,
    output: OutputOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v",
                                          help="List every tensor and its source.")] = False,
    fmt: Annotated[PlanFormat, typer.Option(
        "--format", "-f", help="text (a summary), json (the DAG and the schedule) or dot "
        "(Graphviz).")] = PlanFormat.text,
    debug: DebugOpt = False,
) -> None:
    """Show what a run would read and write: tensors, bytes, shards, memory and disk."""

    def body() -> None:
        from recipekit.inputs.models import iter_donor_files
        from recipekit.plan.render import render_dot, render_json, render_text

        p = _compile(recipe, output)
        extra = sum((p.donor.path / f).stat().st_size
                    for f in iter_donor_files(p.donor.path)) if p.donor is not None else 0
        if fmt is PlanFormat.json:
            typer.echo(render_json(p, disk_extra=extra))
        elif fmt is PlanFormat.dot:
            typer.echo(render_dot(p), nl=False)
        else:
            _say(render_text(p, disk_extra=extra, verbose=verbose))

    _guard(debug, body)


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
        "--frozen", help="Refuse to run unless recipe.lock.json (from `recipekit lock`) exists "
        "and every input matches it, re-hashing every local input file.")] = False,
    workers: Annotated[int | None, typer.Option(
        "--workers", min=1, help="Threads computing pieces of large elementwise tensors on the "
        "CPU side by side (default: half the cores, at most 8). Changes no byte.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Build the recipe's output checkpoint (checking recipe.lock.json when there is one)."""

    def body() -> None:
        from recipekit.progress import byte_progress
        from recipekit.run.device import resolve_device
        from recipekit.run.local import run_plan

        if device != "cpu":
            resolve_device(device)  # fail before reading anything on a bad device
        p = _compile(recipe, output)
        _check_lock(recipe, p, frozen)
        start = time.perf_counter()
        with byte_progress(p.bytes_written, disable=quiet) as tick:
            result = run_plan(p, device=device, fsync=not no_fsync, force=force, progress=tick,
                              check_finite=check_finite, workers=workers)
        _report_run(p, result, time.perf_counter() - start, check_finite=check_finite)

    _guard(debug, body)


def _report_run(p, result, secs: float, *, check_finite: bool) -> None:
    """The one-line summary of a run (and its non-finite values, when checked)."""
    from recipekit.errors import display_path
    from recipekit.units import format_size

    where = display_path(result.output)
    if result.already_complete:
        _say(f"{where}: already complete (same recipe and inputs); nothing to do")
        return
    rate = format_size(result.bytes_written / secs) + "/s" if secs > 0 else ""
    resumed = f", {result.shards_resumed} resumed" if result.shards_resumed else ""
    what = "a PEFT adapter" if p.adapter else f"{p.model.stack.num_layers} layers"
    _say(f"wrote {where}: {what}, {len(p.shards)} shard(s)"
         f"{resumed}, {format_size(result.bytes_written)} in {secs:.1f} s ({rate})")
    if check_finite:
        _report_finite(result.non_finite, resumed=result.shards_resumed)


def _check_lock(recipe_file: Path, p, frozen: bool) -> None:
    from recipekit.errors import UsageError
    from recipekit.tools.lock import check_lock, lock_path

    path = lock_path(recipe_file)
    if path.exists():
        check_lock(p.recipe, dict(p.sources), path, full_hash=frozen)
    elif frozen:
        raise UsageError(f"--frozen: no lock file {path.name} beside the recipe",
                         file=str(recipe_file),
                         hint=f"create it with `recipekit lock {recipe_file}` and commit it")


@app.command()
def lock(recipe: RecipeArg, debug: DebugOpt = False) -> None:
    """Write recipe.lock.json: hub inputs pinned to commits, every input file's size and hash."""

    def body() -> None:
        from recipekit.inputs.resolve import resolve_sources
        from recipekit.recipe import load_recipe
        from recipekit.tools.lock import build_lock, lock_path, write_lock

        r = load_recipe(recipe)
        doc = build_lock(r, resolve_sources(r))
        path = lock_path(recipe)
        write_lock(path, doc)
        n = sum(len(e["files"]) for e in doc["inputs"].values())
        _say(f"wrote {echo_text(path)}: {len(doc['inputs'])} input(s), {n} file(s) pinned")

    _guard(debug, body)


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
                                        "adapter_model.bin.", show_default=False)],
    dst: Annotated[Path, typer.Argument(help="New directory for the safetensors checkpoint.",
                                        show_default=False)],
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
        _say(f"wrote {echo_text(dst)}: {result.tensors} tensors in {len(result.files)} file(s), "
             f"{format_size(result.bytes_written)}")

    _guard(debug, body)


ModelArg = Annotated[str, typer.Argument(
    help="A checkpoint directory, a PEFT adapter directory, a .safetensors file, or a hub repo "
    "(org/name or org/name@revision).", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the full report as JSON.")]
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
        import json

        from recipekit.inputs.checkpoints import open_checkpoint
        from recipekit.progress import byte_progress
        from recipekit.tools.inspect import inspect_checkpoint, render_inspect

        ckpt = open_checkpoint(model, data=not headers_only)
        total = sum(t.nbytes for t in ckpt.tensors.values())
        with byte_progress(total, disable=quiet or headers_only, desc="reading") as tick:
            report = inspect_checkpoint(ckpt, stats=not headers_only, progress=tick)
        if as_json:
            typer.echo(json.dumps(report, indent=2, allow_nan=False))
        else:
            _say(render_inspect(report, verbose=verbose))

    _guard(debug, body)


@app.command("import-mergekit")
def import_mergekit(
    config: Annotated[Path, typer.Argument(help="A mergekit YAML config (models: or slices:).",
                                           show_default=False)],
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Write the recipe here (default: print it). Model paths are "
        "written relative to this file's directory.", show_default=False)] = None,
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
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Per-tensor and per-layer max/mean |a-b|, relative norm difference and cosine.

    Exit status, like diff(1): 0 when every tensor of A has a same-shaped, equal twin in B and
    B has no other; 1 when they differ, including "nothing comparable" (no tensor with the same
    name and shape in both); 2 when an input cannot be read as a checkpoint."""

    def body() -> None:
        import json

        from recipekit.inputs.checkpoints import open_checkpoint
        from recipekit.progress import byte_progress
        from recipekit.tools.diff import diff_checkpoints, render_diff, verdict

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
            typer.echo(json.dumps(report, indent=2, allow_nan=False))
        else:
            _say(render_diff(report, verbose=verbose))
        if verdict(report):
            raise typer.Exit(verdict(report))

    _guard(debug, body)


@app.command()
def verify(
    out: Annotated[Path, typer.Argument(help="An output directory written by `recipekit run`.",
                                        show_default=False)],
    load: Annotated[bool, typer.Option(
        "--load", help="Also load it with transformers (PEFT for an adapter output) and run a "
        "forward pass (imports torch).")] = False,
    base: Annotated[str | None, typer.Option(
        "--base", help="For an adapter output with --load: the model directory it adapts.",
        show_default=False)] = None,
    debug: DebugOpt = False,
) -> None:
    """Check an output against its manifest: shard hashes and sizes, headers, index, recipe."""

    def body() -> None:
        from recipekit.errors import UsageError, display_path
        from recipekit.tools.verify import load_and_run, verify_output

        if base is not None and not load:
            raise UsageError("--base is used by --load", hint="add --load")
        report = verify_output(out)
        for line in report.passed:
            _say(f"ok: {line}")
        for line in report.notes:
            _say(f"note: {line}")
        if not report.problems and load:
            _say(f"ok: {load_and_run(out, adapter=report.adapter, base=base)}")
        elif not report.problems and report.adapter:
            _say("note: a PEFT adapter output: `--load` loads it with PEFT on the base its "
                 "adapter_config.json names (or on `--base MODEL_DIR`) and runs a forward pass")
        where = display_path(out)
        if report.problems:
            for p in report.problems:
                _say(p.render(), err=True)
            _say(f"{where}: {len(report.problems)} problem(s) found", err=True)
            raise typer.Exit(report.exit_code)
        _say(f"{where}: verified")

    _guard(debug, body)


@app.command()
def schema() -> None:
    """Print the recipe JSON Schema (for editors: yaml-language-server, VS Code, ...)."""
    import json

    from recipekit.recipe import load_schema

    typer.echo(json.dumps(load_schema(), indent=2, ensure_ascii=False))


@app.command()
def version() -> None:
    """Print the recipekit version."""
    typer.echo(__version__)


def main() -> None:
    app(prog_name="recipekit")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
