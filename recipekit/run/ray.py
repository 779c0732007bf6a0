"""Run a plan on a Ray cluster (``recipekit run --executor ray``): one task per output shard.

Why this shape: the driver does everything a local run does around the shards — compile and
check the plan, fetch hub shards, take the output directory's lock, write and update its state
file, finish the directory (index, config, donor files, card, manifest last) — through the same
code (`recipekit.run.local.run_plan`); only streaming the shards is handed out. Each unfinished
shard becomes one Ray task that streams it exactly as a local run does (`execute.write_shard`:
temp name, fsync, rename) into the output directory, which every node must see at the same
path, and returns its sha256. The driver records each shard in the state file as it arrives, so
a run whose driver dies resumes from the finished shards, locally or on Ray.

*One task per shard, not per group of tensors:* a shard is the unit that is committed
atomically (rename) and resumed; pieces of one file written by several tasks would need a
second assembling pass. Memory does not call for smaller units either: a task holds the
working set of its largest computed tensor (row pieces and copy buffers), not its shard, so a
task's ``memory`` request is that estimate whatever ``output.shard_size`` is. For more
parallelism, lower ``output.shard_size``.

*How a task gets its plan:* the driver submits a slim plan for each shard — the shard (its
header and expression DAG) and the headers of only the input tensors it reads — as the task's
argument, which Ray serializes like any other (recipekit itself unpickles nothing); the task
first checks that it runs the driver's recipekit version (a worker too different to even read
the plan fails in Ray's deserialization, reported as a `ClusterError` naming the shard).
Recompiling on every worker would read every input header and rebuild the whole DAG once per
task; measured on the 405B-shaped sparse plan by `bench/ray_throughput.py` (README, "Running
on a cluster").

Oracles: tests/run/test_ray.py compares every output file's sha256 with a local run's, on a
two-node local cluster, and kills workers and drivers mid-run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from recipekit import __version__
from recipekit.errors import (
    ClusterError,
    DeviceError,
    ExtraMissingError,
    RecipekitError,
    TensorDataError,
    display_path,
)
from recipekit.graph import Load, expression_nodes
from recipekit.io.header import FileStamp
from recipekit.io.output import OutputDir
from recipekit.io.reader import FileReader
from recipekit.io.remote_output import RemoteOutput
from recipekit.io.urls import is_url
from recipekit.io.writer import partial_path
from recipekit.plan import COPY_BUFFERS, COPY_CHUNK, Plan, Shard
from recipekit.plan.cost import computing_bytes, kept_read_bytes
from recipekit.run.execute import Progress, RunEvents, RunResult, input_stamps
from recipekit.run.target import output_location

log = logging.getLogger(__name__)

#: Bytes a task's worker holds besides the plan's working set (torch, buffers, the hasher).
TASK_OVERHEAD = 512 << 20
#: Seconds between progress updates while shards are running (from their temp files' sizes).
PROGRESS_EVERY = 0.5
INSTALL_HINT = "pip install 'recipekit[ray]'"
#: Ray's settings that bound connecting to a cluster at an address, unless the user set them:
#: one attempt (Ray makes 20) that waits up to 10 s for the cluster's answer after Ray's own
#: 5 s connect timeouts, so a wrong address fails in about 20 s instead of ~13 minutes.
CONNECT_BOUNDS = {"RAY_gcs_server_port_wait_time_s": "1", "RAY_py_gcs_connect_timeout_s": "10"}

#: Where the shards go: a local folder the nodes share, or an object-storage prefix.
Output = OutputDir | RemoteOutput


def import_ray(address: str | None = None) -> Any:
    """The ``ray`` module, or a one-line error naming the extra to install. ``address``: the
    cluster it will connect to (`connect`): Ray reads how long it waits for a cluster's answer
    when first imported, so the import is where that is bounded (`_bounded`).

    Raises:
        ExtraMissingError: Ray is not installed (exit code 2).
    """
    try:
        with _bounded(address):
            import ray
    except ImportError:
        raise ExtraMissingError("--executor ray needs Ray, which is not installed",
                                hint=INSTALL_HINT) from None
    return ray


@contextlib.contextmanager
def connect(address: str | None) -> Iterator[Any]:
    """Connect to the Ray cluster at ``address`` (None: Ray's own lookup — ``RAY_ADDRESS``,
    then a cluster started on this machine by ``ray start``, else a local instance it starts)
    and disconnect at the end; a connection the caller made already (``ray.init`` in a
    notebook) is used as it is and left open.

    Raises:
        ExtraMissingError: Ray is not installed.
        ClusterError: the cluster cannot be reached.
    """
    ray, ours = _connected(address)
    if not ours:
        yield ray
        return
    try:
        yield ray
    finally:
        ray.shutdown()


def _connected(address: str | None) -> tuple[Any, bool]:
    """The ``ray`` module connected (`connect`), and whether this call connected it (False:
    the caller had)."""
    where = address or os.environ.get("RAY_ADDRESS")
    ray = import_ray(address)
    with _bounded(address):
        if ray.is_initialized():
            return ray, False
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        except Exception as e:  # ConnectionError, AuthenticationError, ValueError, ...
            raise ClusterError(
                f"cannot connect to the Ray cluster at {where or 'a local instance'}: "
                f"{type(e).__name__}: {e}".rstrip(": "),
                hint="check --address (or RAY_ADDRESS) and that the cluster runs the same Ray "
                "version; `ray status` shows it") from None
    return ray, True


@contextlib.contextmanager
def _bounded(address: str | None) -> Iterator[None]:
    """Ray's connection settings bounded (`CONNECT_BOUNDS`, those the user did not set) while
    Ray is imported and ``ray.init`` connects to the cluster at ``address`` (else
    ``RAY_ADDRESS``), then the environment as it was. Ray reads the wait for the cluster's
    answer when first imported: in a process that imported it before, only the number of
    attempts is bounded (about 40 s). Not when Ray looks for a cluster or starts a local
    instance (no address, ``auto``, ``local``): its processes inherit the environment, and
    starting one may take longer than these bounds."""
    where = address or os.environ.get("RAY_ADDRESS")
    connecting = where not in (None, "", "auto", "local")
    added = ({k: v for k, v in CONNECT_BOUNDS.items() if k not in os.environ} if connecting
             else {})
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def run_plan_on_ray(plan: Plan, *, address: str | None = None, device: str = "cpu",
                    fsync: bool = True, force: bool = False, progress: Progress | None = None,
                    check_finite: bool = False, workers: int | None = None,
                    events: RunEvents | None = None) -> RunResult:
    """`recipekit.run.local.run_plan` with the shards written by Ray tasks: same bytes, same
    output directory, same resume. ``workers``: threads per task computing row pieces
    (default 1: Ray already runs one task per CPU); ``device`` is resolved on each worker.

    Raises:
        as `run_plan`; ClusterError: the cluster cannot be reached, or a task's worker died
            more often than Ray retries it.
    """
    from recipekit.run.local import run_plan

    with connect(address) as ray:
        def stream(plan: Plan, out: Output, *, fsync: bool, progress: Progress | None,
                   check_finite: bool, events: RunEvents | None) -> dict[str, tuple[int, int]]:
            return stream_shards_on_ray(ray, plan, out, device=device, fsync=fsync,
                                        progress=progress, check_finite=check_finite,
                                        workers=workers or 1, events=events)

        return run_plan(plan, device=device, fsync=fsync, force=force, progress=progress,
                        check_finite=check_finite, workers=workers, events=events,
                        stream=stream)


def stream_shards_on_ray(ray: Any, plan: Plan, out: Output, *, device: str, fsync: bool,
                         progress: Progress | None, check_finite: bool, workers: int,
                         events: RunEvents | None) -> dict[str, tuple[int, int]]:
    """Submit one task per unfinished shard and record each in ``out`` as it finishes (in
    completion order); returns the non-finite counts (``check_finite``) by tensor label.

    On the first failed task the others still pending are cancelled (a running one stops at
    its next write and removes its temp file); those already finished are recorded, then the
    error is raised: a `RecipekitError` a task raised is raised as it is.
    """
    tick = progress or (lambda n: None)
    events = events or RunEvents()
    todo = []
    for shard in plan.shards:
        if out.is_finished(shard.filename):
            events.shard(shard.filename, out.state.finished[shard.filename]["sha256"],
                         shard.size, resumed=True)
            tick(shard.size)
        else:
            todo.append(shard)
    if not todo:
        return {}
    if device.startswith("cuda") and not ray.cluster_resources().get("GPU"):
        raise DeviceError(f"--device {device}: the Ray cluster has no GPU",
                          hint="add nodes with GPUs, or use --device cpu (or auto)")
    # refuse an input that changed since the plan before any task starts (each task checks
    # its own files again when it opens them, and after its reads)
    stamps = input_stamps(plan, todo)
    with FileReader({p: st for p, st in stamps.items() if st}) as reader:
        reader.open_files(stamps)
    task = ray.remote(write_shard_task)
    largest_node = _largest_node_memory(ray)
    location = output_location(plan)  # a local folder the nodes share, or a URL
    out_dir = location if isinstance(location, str) else str(Path(location).resolve())
    pending: dict[Any, Shard] = {}
    for shard in todo:
        memory = shard_memory(shard, workers)
        if largest_node and memory > largest_node:
            log.warning("%s: planned %d bytes, more than any node offers; asking for %d",
                        shard.filename, memory, largest_node)
            memory = largest_node
        options: dict[str, Any] = {"num_cpus": 1, "memory": memory, "scheduling_strategy":
                                   "SPREAD", "name": f"recipekit:{shard.filename}"}
        if device.startswith("cuda"):
            options["num_gpus"] = 1
        # a name the interrupted run had not recorded, where a file is now: the task refuses
        # to replace that file unless it holds the shard's bytes, as a local run does
        taken = out.unrecorded & {shard.filename}
        ref = task.options(**options).remote(__version__, shard_payload(plan, shard), out_dir,
                                              device, fsync, check_finite, workers, taken)
        pending[ref] = shard
    found: dict[str, tuple[int, int]] = {}
    failure: BaseException | None = None
    shown: dict[str, int] = {}  # bytes of each running shard the progress has counted
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=PROGRESS_EVERY)
            if not done:
                _tick_partial(out_dir, pending.values(), shown, tick)
            for ref in done:
                shard = pending.pop(ref)
                counted = shown.pop(shard.filename, 0)
                try:
                    result = ray.get(ref)
                except Exception as e:
                    if failure is None:
                        failure = _task_failure(ray, e, shard, out, stamps)
                        if failure is not getattr(e, "cause", None):
                            failure.__cause__ = e  # --debug shows Ray's report
                        for other in pending:
                            ray.cancel(other)
                    continue
                out.mark_finished(shard.filename, result["sha256"], result["size"])
                events.shard(shard.filename, result["sha256"], result["size"], resumed=False)
                tick(shard.size - counted)
                for label, (nan, inf) in result["non_finite"].items():
                    old = found.get(label, (0, 0))
                    found[label] = (old[0] + nan, old[1] + inf)
    finally:
        for ref in pending:  # interrupted (Ctrl-C): stop what has not run yet
            with contextlib.suppress(Exception):
                ray.cancel(ref)
    if failure is not None:
        raise failure
    return found


def _tick_partial(out_dir: str, running: Iterable[Shard], shown: dict[str, int],
                  tick: Progress) -> None:
    """Count the bytes running tasks have written so far, read off their temp files' sizes
    (on the file system the driver shares with the workers; nothing where there is none): the
    progress moves within a shard without any message from the tasks. A retry starts its temp
    file again; the count never goes back."""
    if is_url(out_dir):
        return  # an upload in progress is not visible until it completes
    for shard in running:
        try:
            size = os.lstat(partial_path(Path(out_dir) / shard.filename)).st_size
        except OSError:
            continue
        grown = min(size, shard.size) - shown.get(shard.filename, 0)
        if grown > 0:
            shown[shard.filename] = shown.get(shard.filename, 0) + grown
            tick(grown)


def _where(out: Output) -> str:
    """The output as an error names it: its URL or its folder."""
    return out.url if isinstance(out, RemoteOutput) else str(out.path)


def _task_failure(ray: Any, e: Exception, shard: Shard, out: Output,
                  stamps: Mapping[Path, FileStamp | None]) -> BaseException:
    """The error to raise for a failed task: the task's own `RecipekitError` as it was
    raised (an input its node sees otherwise than the plan: as a change if the driver sees it
    changed too, `_changed_on_driver`), or a `ClusterError` saying what Ray reported."""
    cause = getattr(e, "cause", None)
    if isinstance(e, ray.exceptions.RayTaskError) and isinstance(cause, NodeInputError):
        return _changed_on_driver(Path(cause.path), stamps.get(Path(cause.path)), shard) or cause
    if isinstance(e, ray.exceptions.RayTaskError) and isinstance(cause, RecipekitError):
        return cause
    if isinstance(e, ray.exceptions.WorkerCrashedError | ray.exceptions.NodeDiedError
                  | ray.exceptions.OutOfMemoryError):
        what = {"WorkerCrashedError": "its worker process died",
                "NodeDiedError": "its node died",
                "OutOfMemoryError": "its worker was killed for memory"}.get(type(e).__name__,
                                                                              type(e).__name__)
        return ClusterError(f"a Ray task writing {shard.filename} failed: {what}, more often "
                            "than Ray retries a task (RAY_TASK_MAX_RETRIES, default 3)",
                            file=_where(out), hint="finished shards are kept: run the same "
                            "command again to resume")
    return ClusterError(f"a Ray task writing {shard.filename} failed: {type(e).__name__}: "
                        f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''}",
                        file=_where(out), hint="finished shards are kept: run the same "
                        "command again to resume (--debug shows the traceback)")


def _changed_on_driver(path: Path, stamp: FileStamp | None, shard: Shard
                       ) -> TensorDataError | None:
    """A task found input ``path`` missing or of another size than the plan's version: if
    the driver's own view of it is not that version either, the file changed during the run
    (the driver checked every input before the first task), which is what to say, as a local
    run does; None when the driver still sees the plan's version (the node sees another file).
    """
    if stamp is None:
        return None
    try:
        why = stamp.change(os.stat(path))
    except OSError as e:
        why = f"it can no longer be read: {e.strerror or e}"
    if why is None:
        return None
    return TensorDataError(
        f"the file changed during the run ({why}): {shard.filename}, which reads it, was not "
        "written", file=display_path(path),
        hint="finished shards are kept; run again once nothing writes to the file, to plan "
        "from its current version (an output begun from the old one then needs --force)")


def _largest_node_memory(ray: Any) -> int:
    """The largest ``memory`` resource of an alive node (0: unknown): a task asking for more
    could never be scheduled and would wait forever."""
    try:
        return int(max((n.get("Resources", {}).get("memory", 0) for n in ray.nodes()
                        if n.get("Alive")), default=0))
    except Exception:  # pragma: no cover - the State API changed
        return 0


def shard_memory(shard: Shard, workers: int = 1) -> int:
    """Bytes one task writing ``shard`` holds (Ray's ``memory`` request, which keeps a node
    from running more shards than fit): the copy buffers if it copies a tensor, the reader's
    kept buffers (`plan.cost.kept_read_bytes`), plus the largest computed tensor's working set
    with the next tensor's inputs read ahead (`plan.cost.computing_bytes`), plus
    `TASK_OVERHEAD`."""
    copied = [t.nbytes for t in shard.tensors if isinstance(t.node, Load)]
    buffers = COPY_BUFFERS * min(COPY_CHUNK, max(copied)) if copied else 0
    nodes = [t.node for t in shard.tensors if not isinstance(t.node, Load)]
    computed = computing_bytes([t.node for t in shard.tensors], workers)
    return TASK_OVERHEAD + buffers + kept_read_bytes(nodes) + computed


def shard_payload(plan: Plan, shard: Shard) -> tuple[Plan, dict[str, int], str, str]:
    """The plan one task needs, as its argument (Ray serializes it): ``shard`` (header and
    expression DAG), the headers of the input tensors it reads, those files' sizes, the
    driver's host name and working directory; the rest of the plan (other shards, the model's
    other nodes, the donor) stays on the driver."""
    reads: dict[str, set[str]] = {}
    for t in shard.tensors:
        for n in expression_nodes(t.node):
            if isinstance(n, Load):
                reads.setdefault(n.source, set()).add(n.name)
    sources = {name: dataclasses.replace(plan.sources[name], tensors={
        k: plan.sources[name].tensors[k] for k in sorted(names)})
        for name, names in sorted(reads.items())}
    files = {info.file for ckpt in sources.values() for info in ckpt.tensors.values()}
    slim = dataclasses.replace(plan, sources=sources, shards=(shard,), donor=None, files={},
                               operators={}, model=_without_nodes(plan.model))
    # local files only: the driver checked URL inputs' ETags (`target.check_remote_inputs`);
    # the sizes of the versions planned from (their headers' `FileStamp`), not of what is there
    # now: a file that changed since is refused, never read at the old offsets
    local = {info.file: info.stamp for ckpt in sources.values()
             if getattr(ckpt, "remote", None) is None for info in ckpt.tensors.values()}
    sizes = {str(f): st.size if st is not None else os.stat(f).st_size
             for f, st in sorted(local.items()) if f in files}
    return slim, sizes, socket.gethostname(), os.getcwd()


def _without_nodes(model: Any) -> Any:
    """``model`` (a VirtualModel or AdapterSet) with its node maps emptied: a task needs none
    of them, and a 405B model's are most of a serialized plan."""
    empty = {f.name: {} for f in dataclasses.fields(model)
             if f.name in ("tensors", "stored", "targets", "biases", "replacements")}
    return dataclasses.replace(model, **empty)


def write_shard_task(version: str, payload: tuple[Plan, dict[str, int], str, str], out_dir: str,
                     device: str, fsync: bool, check_finite: bool, workers: int,
                     unrecorded: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The Ray task: stream one shard into ``out_dir`` (a folder, or a URL: a multipart upload)
    as a local run does, return its sha256. ``unrecorded``: the shard's name if the driver's
    output found it taken by a file the interrupted run had not recorded (`OutputDir.
    unrecorded`): that file is replaced only if it holds the shard's very bytes.

    Each attempt starts from scratch; the shard's temp name is fixed, so a retry after a
    killed attempt replaces that attempt's file (`io.writer.open_exclusive`), and an attempt
    that fails removes its own.

    Raises:
        ClusterError: this worker runs another recipekit version than the driver.
        TensorDataError: an input file is missing here, has another size than the driver saw,
            or is not the version the plan read (size, mtime), or changed during the task.
        OutputPathError: a file the run did not write is at the shard's name (``unrecorded``)
            or its temp name.
        as `execute.write_shard`.
    """
    if version != __version__:
        raise ClusterError(f"a Ray worker runs recipekit {__version__}, the driver {version}",
                           hint="install the same recipekit version on every node")
    from recipekit.run.device import resolve_device
    from recipekit.run.execute import open_runtime, write_shard
    from recipekit.run.target import shard_target

    plan, sizes, driver, folder = payload
    _check_sizes(sizes)
    shard = plan.shards[0]
    computes = any(not isinstance(t.node, Load) for t in shard.tensors)
    dev = resolve_device(device) if computes or device != "cpu" or check_finite else None
    # each file checked against the version planned from when opened and after the reads;
    # on another node by size and mtime only: its mount of a shared file system has its own
    # device and (on some file systems) inode numbers
    with _paths_shown_from(folder), \
            open_runtime([shard], dev, workers=workers, check_finite=check_finite,
                         stamps=input_stamps(plan, [shard]),
                         inode=socket.gethostname() == driver) as rt:
        sha = write_shard(plan, shard, shard_target(out_dir, unrecorded), rt, fsync=fsync,
                          progress=_ignore)
    return {"name": shard.filename, "sha256": sha, "size": shard.size,
            "non_finite": rt.finite.found if rt.finite else {}}


def _ignore(n: int) -> None:
    pass


@contextlib.contextmanager
def _paths_shown_from(folder: str) -> Iterator[None]:
    """Run in the driver's working directory ``folder`` where this node has it (every path a
    task uses is absolute): messages name paths relative to the working directory
    (`errors.display_path`), and a task's error is shown by the driver, so it names them as a
    local run would, not relative to the worker's own folder. Ray runs one task at a time in
    a worker process; the folder it had is restored after."""
    try:
        before = os.getcwd()
        os.chdir(folder)
    except OSError:
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.chdir(before)


class NodeInputError(TensorDataError):
    """An input file a task's node does not have, or has with another size than the plan's
    version (`_check_sizes`); ``path``: that file. The driver tells a file that changed during
    the run from one the node does not share (`_changed_on_driver`)."""

    def __init__(self, message: str, *, path: str = "", **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.path = path


def _check_sizes(sizes: Mapping[str, int]) -> None:
    """Every input file this task reads has the size the driver planned with (an input missing
    or different on this node would otherwise be read as garbage or fail mid-shard)."""

    for path, size in sizes.items():
        try:
            got = os.stat(path).st_size
        except OSError as e:
            raise NodeInputError(f"cannot read this input on Ray node {socket.gethostname()}: "
                                 f"{e.strerror or e}", path=path, file=path,
                                 hint="every node must see the inputs at the same path "
                                 "(a shared file system)") from None
        if got != size:
            raise NodeInputError(f"this input has {got} bytes on Ray node "
                                 f"{socket.gethostname()}, {size} in the version the driver "
                                 "planned from", path=path, file=path,
                                 hint="every node must see the same input files") from None
