"""Execute a plan: stream every output tensor into its place in its shard, then finish the
output directory.

Tensors that are only moved (a `Load` written in its own dtype) are copied in fixed-size chunks
through one reusable buffer, never becoming torch tensors; computed tensors are evaluated on the
chosen device, brought back, written and freed. Peak memory is therefore a few tensors (or one
chunk buffer), whatever the model or shard size. This is the only module that moves tensors
between devices.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import gc
import itertools
import logging
import queue
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recipekit.dtypes import torch_dtype
from recipekit.errors import CorruptCheckpointError, DeviceError, display_path
from recipekit.graph import Load, Node
from recipekit.inputs.hub import download as hub_download
from recipekit.inputs.models import iter_donor_files
from recipekit.io.header import read_header
from recipekit.io.names import ADAPTER_CONFIG, CONFIG, INDEX, MANIFEST, MODEL_CARD
from recipekit.io.output import OutputDir, dumps
from recipekit.io.reader import FileReader
from recipekit.io.writer import ShardWriter
from recipekit.plan import (
    COPY_BUFFERS,
    COPY_CHUNK,
    Plan,
    Shard,
    chunkable,
    piece_workers,
    row_sliced,
    rows_per_piece,
)
from recipekit.run.manifest import build_manifest, build_model_card

log = logging.getLogger(__name__)

Progress = Callable[[int], None]


@dataclass(frozen=True)
class RunResult:
    output: Path
    already_complete: bool
    shards_written: int
    shards_resumed: int
    bytes_written: int
    non_finite: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)


class FiniteCheck:
    """Counts NaN and Inf values per tensor label (``--check-finite``)."""

    def __init__(self) -> None:
        self.found: dict[str, tuple[int, int]] = {}

    def check(self, label: str, tensor: Any) -> None:
        import torch

        if not tensor.is_floating_point() or tensor.numel() == 0:
            return
        nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
        if nan or inf:
            old = self.found.get(label, (0, 0))
            self.found[label] = (old[0] + nan, old[1] + inf)


def resolve_device(spec: str) -> Any:
    """``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto`` -> a torch.device that exists here.

    Raises:
        DeviceError: the device is not available (exit code 2).
    """
    import torch

    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise DeviceError(f"unknown device {spec!r}",
                          hint="use cpu, cuda, cuda:N, mps or auto") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {spec}: CUDA is not available on this machine",
                              hint="use --device cpu (the default) or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {spec}: only {torch.cuda.device_count()} CUDA "
                              "device(s)", hint="use cuda:0 .. cuda:N-1")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise DeviceError(f"--device {spec}: MPS is not available on this machine",
                              hint="use --device cpu")
    elif dev.type != "cpu":
        raise DeviceError(f"unsupported device {spec!r}", hint="use cpu, cuda, cuda:N or mps")
    return dev


def output_files(plan: Plan, donor_files: list[Path]) -> list[str]:
    """Every file a run of this plan writes, relative to the output directory."""
    files = [s.filename for s in plan.shards]
    if plan.adapter:
        return [*files, ADAPTER_CONFIG, MODEL_CARD, MANIFEST]
    if len(plan.shards) > 1:
        files.append(INDEX)
    files += [CONFIG, MODEL_CARD, *(str(p) for p in donor_files), MANIFEST]
    return files


def run_plan(plan: Plan, *, device: str = "cpu", fsync: bool = True, force: bool = False,
             progress: Progress | None = None, check_finite: bool = False,
             workers: int | None = None) -> RunResult:
    """Write the plan's output directory (resuming finished shards of the same plan).

    ``workers`` threads compute row pieces side by side on the CPU (default: `piece_workers`);
    they change no byte of the output.

    Raises:
        OutputPathError: the output is a file, holds foreign files, or another plan's output.
        OutputError: disk full, another run holds the lock, I/O failure.
        CorruptCheckpointError: an input changed or broke while being read.
    """
    plan = fetch_hub_shards(plan)
    # A plan that only moves bytes never needs torch: skip its import (about a second).
    computes = any(not isinstance(t.node, Load) for s in plan.shards for t in s.tensors)
    dev = resolve_device(device) if computes or device != "cpu" or check_finite else None
    # The cyclic GC's full collections walk every object alive, and torch's import leaves about
    # a million: move them out of its reach (they live as long as the process anyway). The run
    # itself makes no reference cycles (see `evaluate`).
    gc.freeze()
    finite = FiniteCheck() if check_finite else None
    tick = progress or (lambda n: None)
    out_path = plan.recipe.output.path
    donor_files = iter_donor_files(plan.donor.path) if plan.donor is not None else []
    with OutputDir(out_path, plan_hash=plan.plan_hash(), files=output_files(plan, donor_files),
                   force=force, fsync=fsync) as out, FileReader() as reader, \
            ThreadPoolExecutor(1, thread_name_prefix="recipekit-read") as prefetch, \
            contextlib.ExitStack() as stack:
        if out.already_complete:
            return RunResult(out_path, True, 0, len(plan.shards), 0)
        todo = [s for s in plan.shards if not out.is_finished(s.filename)]
        extra = sum((plan.donor.path / p).stat().st_size  # type: ignore[union-attr]
                    for p in donor_files) + (1 << 20)
        out.begin(sum(s.size for s in todo) + extra)
        largest = max((t.nbytes for s in todo for t in s.tensors), default=1)
        n = workers if workers is not None else piece_workers()
        pool = (stack.enter_context(ThreadPoolExecutor(n, thread_name_prefix="recipekit-piece"))
                if n > 1 and dev is not None and dev.type == "cpu" else None)
        rt = Runtime(reader, dev, BufferPool(COPY_BUFFERS, max(1, min(COPY_CHUNK, largest))),
                     prefetch, finite, pool, n if pool else 1)
        for shard in plan.shards:
            if out.is_finished(shard.filename):
                tick(shard.size)
                continue
            sha = write_shard(plan, shard, out_path, rt, fsync=fsync, progress=tick)
            out.mark_finished(shard.filename, sha, shard.size)
        if len(plan.shards) > 1:
            weight_map = {t.name: s.filename for s in plan.shards for t in s.tensors}
            total = sum(t.nbytes for s in plan.shards for t in s.tensors)
            out.write_file(INDEX, dumps({"metadata": {"total_size": total},
                                         "weight_map": weight_map}))
        out.write_file(ADAPTER_CONFIG if plan.adapter else CONFIG,
                       dumps(plan.config))
        for rel in donor_files:
            if rel.as_posix() in plan.files:  # a dimension field rewritten (e.g. 1_Pooling)
                out.write_file(str(rel), plan.files[rel.as_posix()])
            else:
                out.copy_file(plan.donor.path / rel, str(rel))  # type: ignore[union-attr]
        out.write_file(MODEL_CARD, build_model_card(plan).encode())
        out.write_file(MANIFEST, dumps(build_manifest(plan, out.state.finished)))
        out.complete()
    return RunResult(out_path, False, len(todo), len(plan.shards) - len(todo),
                     sum(s.size for s in todo), finite.found if finite else {})


def fetch_hub_shards(plan: Plan) -> Plan:
    """Download the hub shards this plan reads (only those) and read their local headers.

    Planning used remote headers (offsets unknown); the downloaded files must agree with them.

    Raises:
        SourceNotFoundError: a download failed.
        CorruptCheckpointError: a downloaded shard disagrees with the header planned from.
    """
    needed: dict[str, set[Path]] = {}
    for node in plan.loads():
        info = plan.sources[node.source].tensors[node.name]
        if info.offset < 0:
            needed.setdefault(node.source, set()).add(info.file)
    if not needed:
        return plan
    sources = dict(plan.sources)
    for name, files in sorted(needed.items()):
        ckpt = sources[name]
        assert ckpt.hub is not None
        tensors = dict(ckpt.tensors)
        for planned_file in sorted(files):
            local = hub_download(ckpt.hub, planned_file.name)
            header = read_header(local)
            for tname, info in ckpt.tensors.items():
                if info.file != planned_file:
                    continue
                got = header.get(tname)
                if got is None or (got.dtype, got.shape) != (info.dtype, info.shape):
                    raise CorruptCheckpointError(
                        f"`{tname}` differs from the header planned from",
                        file=display_path(local), hint="the download is damaged; delete it from "
                        "the hub cache and run again")
                tensors[tname] = got
        sources[name] = dataclasses.replace(ckpt, tensors=tensors)
    return dataclasses.replace(plan, sources=sources)


@dataclass
class Runtime:
    """What writing one shard uses besides the plan: the input reader, the compute device,
    copy buffers, the read-ahead thread of chunked tensors, the optional finite check, and the
    threads that compute row pieces side by side."""

    reader: FileReader
    device: Any
    pool: BufferPool
    prefetch: ThreadPoolExecutor
    finite: FiniteCheck | None = None
    compute: ThreadPoolExecutor | None = None  # piece workers on the CPU; None: this thread
    workers: int = 1  # the size of `compute`

    @property
    def pin(self) -> bool:
        return _pinned(self.device)


class BufferPool:
    """Up to ``count`` reusable copy buffers, made on first use; a buffer goes back once the
    writer has hashed its bytes."""

    def __init__(self, count: int, size: int) -> None:
        self.size = size
        self._free: queue.Queue[bytearray] = queue.Queue()
        self._left = count

    def get(self) -> bytearray:
        if self._left and self._free.empty():
            self._left -= 1
            return bytearray(self.size)
        return self._free.get()

    def put(self, buf: bytearray) -> None:
        self._free.put(buf)


def write_shard(plan: Plan, shard: Shard, out_dir: Path, rt: Runtime, *, fsync: bool,
                progress: Progress) -> str:
    """Stream one shard to disk and return its sha256."""
    reader, pool, finite = rt.reader, rt.pool, rt.finite
    writer = ShardWriter(out_dir / shard.filename, shard.header, shard.size, fsync=fsync)
    progress(len(shard.header))
    try:
        for t in shard.tensors:
            node = t.node
            if isinstance(node, Load):
                info = plan.sources[node.source].tensors[node.name]
                done = 0
                while done < info.nbytes:
                    buf = pool.get()
                    n = min(pool.size, info.nbytes - done)
                    view = memoryview(buf)[:n]
                    reader.read_into(info.file, info.offset + done, view)
                    if finite is not None:
                        finite.check(f"{t.name} (from {node.source}:{node.name})",
                                     _as_tensor(view, info.dtype))
                    writer.write(view, done=lambda b=buf: pool.put(b))
                    done += n
                    progress(n)
            elif chunkable(node):
                for piece in evaluate_chunks(node, plan, rt):
                    if finite is not None:
                        finite.check(t.name, piece)
                    writer.write(_tensor_bytes(piece), done=lambda p=piece: None)
                    progress(piece.numel() * piece.element_size())
                    del piece
            else:
                tensor = evaluate(node, plan, reader, rt.device, finite).contiguous()
                if finite is not None:
                    finite.check(t.name, tensor)
                # The writer hashes after this returns; the closure keeps the tensor alive.
                writer.write(_tensor_bytes(tensor), done=lambda t=tensor: None)
                progress(t.nbytes)
                del tensor
        return writer.finish()
    except BaseException:
        writer.abort()
        raise


def _tensor_bytes(tensor: Any) -> memoryview:
    """A contiguous CPU tensor's bytes, without copying them into a Python object."""
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr()))


def evaluate(node: Node, plan: Plan, reader: FileReader, device: Any,
             finite: FiniteCheck | None = None) -> Any:
    """Compute one output tensor's expression and return it on the CPU.

    The memo is an explicit dict cleared on return (not a recursive closure, whose reference
    cycle would keep every intermediate alive until Python's cyclic GC ran).
    """
    memo: dict[Node, Any] = {}
    try:
        return _value(node, memo, plan, reader, device, finite).cpu()
    finally:
        memo.clear()


def evaluate_chunks(node: Node, plan: Plan, rt: Runtime) -> Iterator[Any]:
    """Yield ``node``'s values as contiguous CPU pieces of whole rows, in order.

    Stored inputs on the sliced paths (`plan.row_sliced`) are read piece by piece straight from
    their files on the read-ahead thread; inputs a piece needs whole (a LoRA's A factor,
    slerp's coefficients) are computed first, once per tensor, and a stored input they read
    whole anyway is then sliced in memory instead of read again. Pieces are computed at one
    torch thread each, by ``rt.compute``'s workers side by side (or by this thread): a piece
    is too small for a parallel region to pay for its start, and independent pieces scale with
    cores instead.
    Every node's `compute_rows` equals the rows of its whole result, so the bytes are those of
    the whole-tensor evaluation, whichever thread computed a piece
    (tests/test_execute.py::TestChunkedEvaluation).
    """
    import torch

    parts = row_sliced(node)
    assert parts is not None
    loads = sorted((n for n in parts[0] if isinstance(n, Load)), key=lambda n: (n.source, n.name))
    rows = rows_per_piece(node)
    gpu = rt.device is not None and rt.device.type != "cpu"
    if gpu:
        rows *= 64  # amortize kernel launches and transfers
    n_rows = node.shape[0]
    bounds = [(lo, min(lo + rows, n_rows)) for lo in range(0, n_rows, rows)]
    whole: dict[Node, Any] = {}
    held: dict[Node, Any] = {}  # sliced inputs the whole ones read anyway (slerp's a and b)
    for x in parts[1]:
        seen: dict[Node, Any] = {}
        whole[x] = _value(x, seen, plan, rt.reader, rt.device, rt.finite)
        held.update((n, seen[n]) for n in loads if n in seen)
        seen.clear()
    workers = rt.compute if not gpu else None
    threads = torch.get_num_threads()

    def read(lo: int, hi: int) -> dict[Node, Any]:
        return {n: held[n][lo:hi] if n in held else
                read_rows(n, plan, rt.reader, lo, hi, pin=rt.pin) for n in loads}

    def compute(ahead: Future[dict[Node, Any]], lo: int, hi: int) -> tuple[dict[Node, Any], Any]:
        memo = ahead.result()
        # (held inputs were checked when read whole)
        inputs = {n: v for n, v in memo.items() if n not in held} if rt.finite else {}
        if not gpu:
            torch.set_num_threads(1)  # also per worker thread: OpenMP's setting is per thread
        try:
            return inputs, _piece(node, lo, hi, memo, whole, plan, rt).cpu().contiguous()
        finally:
            memo.clear()

    # Each piece's read is queued on the read-ahead thread, and its computation on a worker;
    # pieces are taken in order, with one more in flight than there are workers.
    Job = tuple[Future[dict[Node, Any]], int, int, Future[tuple[dict[Node, Any], Any]] | None]
    inflight: collections.deque[Job] = collections.deque()
    upcoming = iter(bounds)

    def start(lo: int, hi: int) -> None:
        ahead = rt.prefetch.submit(read, lo, hi)
        job = workers.submit(compute, ahead, lo, hi) if workers is not None else None
        inflight.append((ahead, lo, hi, job))

    try:
        for lo, hi in itertools.islice(upcoming, 1 + (rt.workers if workers else 1)):
            start(lo, hi)
        while inflight:
            ahead, lo, hi, job = inflight.popleft()
            if job is None:
                inputs, piece = compute(ahead, lo, hi)
            else:
                inputs, piece = job.result()
            following = next(upcoming, None)
            if following is not None:
                start(*following)
            if rt.finite is not None:
                for n, value in inputs.items():
                    rt.finite.check(f"input {n.source}:{n.name}", value)  # type: ignore[attr-defined]
            del inputs
            yield piece
            del piece
    finally:
        for ahead, _, _, job in inflight:
            ahead.cancel()
            if job is not None:
                job.cancel()
        if workers is not None:  # a cancelled generator: let running pieces finish first
            for _, _, _, job in inflight:
                if job is not None and not job.cancelled():
                    with contextlib.suppress(BaseException):
                        job.result()
        torch.set_num_threads(threads)
        whole.clear()
        held.clear()


def _piece(n: Node, lo: int, hi: int, memo: dict[Node, Any], whole: dict[Node, Any],
           plan: Plan, rt: Runtime) -> Any:
    """Rows ``lo:hi`` of ``n`` (its stored inputs' rows are in ``memo``, the inputs it reads
    whole in ``whole``)."""
    if n in memo:
        return memo[n]
    args = []
    for x, by_rows in zip(n.inputs, n.row_inputs() or (), strict=True):
        value = _piece(x, lo, hi, memo, whole, plan, rt) if by_rows else whole[x]
        args.append(value.to(rt.device, non_blocking=True))
    result = n.compute_rows(tuple(args), lo, hi)
    memo[n] = result
    return result


def _pinned(device: Any) -> bool:
    """Read into page-locked memory, so host-to-GPU copies are asynchronous DMA."""
    return device is not None and device.type == "cuda"


def read_rows(node: Load, plan: Plan, reader: FileReader, lo: int, hi: int, *,
              pin: bool = False) -> Any:
    """Rows ``lo:hi`` of a stored tensor, as a CPU tensor over a fresh buffer (page-locked
    with ``pin``)."""
    import torch

    info = plan.sources[node.source].tensors[node.name]
    row = info.nbytes // info.shape[0]  # bytes per row
    # torch.empty is not zero-filled, unlike bytearray; pinned blocks come from torch's cache
    piece = torch.empty((hi - lo) * row, dtype=torch.uint8, pin_memory=pin)
    reader.read_into(info.file, info.offset + lo * row, _tensor_bytes(piece))
    return piece.view(torch_dtype(info.dtype)).reshape((hi - lo, *info.shape[1:]))


def _value(n: Node, memo: dict[Node, Any], plan: Plan, reader: FileReader, device: Any,
           finite: FiniteCheck | None) -> Any:
    if n in memo:
        return memo[n]
    if isinstance(n, Load):
        result = read_tensor(n, plan, reader, pin=_pinned(device))
        if finite is not None:
            finite.check(f"input {n.source}:{n.name}", result)
    else:
        args = tuple(_value(x, memo, plan, reader, device, finite).to(device, non_blocking=True)
                     for x in n.inputs)
        result = n.compute(args)
    memo[n] = result
    return result


def _as_tensor(view: memoryview, dtype: str) -> Any:
    """A tensor over a chunk of raw bytes (chunks are multiples of every item size)."""
    import torch

    return torch.frombuffer(view, dtype=torch_dtype(dtype)) if len(view) else torch.empty(0)


def read_tensor(node: Load, plan: Plan, reader: FileReader, *, pin: bool = False) -> Any:
    """A stored tensor as a CPU torch tensor over a freshly read buffer (page-locked with
    ``pin``, so that the copy to the GPU is asynchronous)."""
    import torch

    info = plan.sources[node.source].tensors[node.name]
    dtype = torch_dtype(info.dtype)
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=dtype)
    if pin:
        raw = torch.empty(info.nbytes, dtype=torch.uint8, pin_memory=True)
        reader.read_into(info.file, info.offset, _tensor_bytes(raw))
        return raw.view(dtype).reshape(info.shape)
    buf = reader.read_tensor(info)
    return torch.frombuffer(buf, dtype=dtype).reshape(info.shape)
