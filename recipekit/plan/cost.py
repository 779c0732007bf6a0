"""The executor's chunk and memory policy, shared by planning (estimates) and running.

A tensor that is only moved is copied through a few fixed-size buffers; a large elementwise
expression is computed in row pieces of about `CHUNK_ELEMS` values, by `piece_workers` threads
side by side; everything else is computed whole. `working_set` is what each choice holds, and
`Plan.peak_memory_estimate` adds it up. No torch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence

from recipekit.graph import Load, Node
from recipekit.graph.gather import RowGather
from recipekit.graph.passes import Reduction, Sweep

#: Bytes the executor moves per read when a tensor is copied without compute, and how many such
#: buffers circulate between reading/writing and the hashing worker.
COPY_CHUNK = 8 * 1024 * 1024
COPY_BUFFERS = 4
#: Computed pieces are copied one after another into a copy buffer and handed to the writer
#: once this many bytes are in: one hand-over, ``write`` and thread wake-up per MiB instead of
#: per piece (a piece is 256-512 KiB).
BATCH_BYTES = 1024 * 1024
#: Elements per piece when a large elementwise expression (linear, task arithmetic, lerp, casts)
#: is computed piecewise: 128Ki values, so each fp32 intermediate is 512 KiB whatever the tensor
#: size, a piece's passes (convert, multiply-add, round) stay in the CPU's L2 cache, and its
#: temporaries stay under the allocator's mapping threshold (`run.execute`): a fresh mapping
#: per temporary costs page faults of ~0.8 ns per value, more than the op (measured: 30 s of
#: system time in a TIES merge of TinyLlama-shaped models with 1 MiB temporaries, 10 s now).
CHUNK_ELEMS = 1 << 17


#: A reduction (graph/passes.py) whose streamed inputs read at most this many stored bytes
#: reads them whole, once, and keeps them for the output's pieces (no re-reads); above it,
#: every pass reads row pieces from the files, so its memory does not grow with the tensor.
HOLD_BYTES = 64 * 1024 * 1024
#: What a reduction may keep between its passes to spare its output pass work, at most: SCE's
#: int32 variance keys (the variance is ~7 ns a value, and it was computed in every pass;
#: `ops.stream_sce.sce_rules`) and DARE/DELLA's random masks as bits (drawn for the L1
#: rescale, read again by the output pass instead of a second draw and, for DELLA, a second
#: ranking of every row: 31 → 21 ns a value on TinyLlama's lm_head; `ops.stream_prune`).
KEPT_BYTES = 64 * 1024 * 1024


def stream_loads(node: Reduction) -> set[Load] | None:
    """The stored tensors a reduction's streamed inputs read by rows, or None when some
    streamed input cannot be computed in row pieces (then it is computed whole)."""
    loads: set[Load] = set()
    for x, streamed in zip(node.inputs, node.streamed(), strict=True):
        if not streamed:
            continue
        parts = row_sliced(x)
        if parts is None:
            return None
        loads.update(n for n in parts[0] if isinstance(n, Load))
        loads.update(t for n in parts[0] if isinstance(n, RowGather) and n.streams
                     for t in n.read_tables())
    return loads


def streams_from_files(node: Node) -> bool:
    """``node`` is a reduction whose passes read row pieces from the input files (rather
    than from its inputs computed whole: small inputs, `HOLD_BYTES`)."""
    if not isinstance(node, Reduction):
        return False
    loads = stream_loads(node)
    return loads is not None and sum(n.nbytes for n in loads) > HOLD_BYTES


#: Methods whose streamed form sums in fp64 by pieces (model_stock, karcher, multislerp,
#: nuslerp, SCE: `steps.gram`, `steps.task_vectors.streamed_sce`) keep mergekit's exact
#: whole-tensor kernel for tensors whose inputs hold at most this many stored bytes: small
#: tensors stay bit for bit mergekit's, and a whole kernel's fp32 copies stay well under 1 GiB.
EXACT_BYTES = 32 * 1024 * 1024


def keeps_exact_kernel(node: Reduction) -> bool:
    """Whether a tensor whose streamed form is ``node`` keeps the exact whole-tensor kernel
    instead (`EXACT_BYTES`; or its inputs cannot be read in row pieces)."""
    loads = stream_loads(node)
    return loads is None or sum(n.nbytes for n in loads) <= EXACT_BYTES


def whole_inputs(node: Node) -> tuple[Node, ...]:
    """The inputs computed whole before ``node`` is: all of them, except those a reduction
    streams from the files, the tables a streaming row gather reads row by row, and those a
    sweep reads itself (one layer at a time)."""
    if isinstance(node, RowGather) and node.streams:
        return node.whole_inputs()
    if isinstance(node, Sweep):
        return tuple(x for x, s in zip(node.inputs, node.swept(), strict=True) if not s)
    if not streams_from_files(node):
        return node.inputs
    return tuple(x for x, s in zip(node.inputs, node.streamed(), strict=True)  # type: ignore[attr-defined]
                 if not s)


def held_nodes(node: Node) -> tuple[set[Node], set[Reduction]]:
    """(the nodes whose whole values computing ``node`` holds, the reductions among them that
    stream their inputs from the files)."""
    held: set[Node] = set()
    streaming: set[Reduction] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in held:
            continue
        held.add(n)
        if streams_from_files(n):
            streaming.add(n)  # type: ignore[arg-type]
        stack.extend(whole_inputs(n))
    return held, streaming


def pass_bytes(node: Reduction, workers: int = 1) -> int:
    """What one streaming reduction holds during a pass: its state, and one piece of its
    streamed expression (values and scratch) per worker plus one read ahead."""
    bounds = node.bounds()
    rows = max(1, node.stream_rows)
    piece_rows = bounds[0][1] - bounds[0][0] if bounds else 0
    sliced: set[Node] = {node}
    for x, streamed in zip(node.inputs, node.streamed(), strict=True):
        parts = row_sliced(x) if streamed else None
        sliced.update(parts[0] if parts else ())
    piece = -(-sum(n.nbytes if n is not node else 0 for n in sliced) * piece_rows // rows)
    piece += -(-sum(n.workspace for n in sliced) * piece_rows // rows)
    return node.state_bytes + (workers + 1) * piece + CHUNKED_OVERHEAD


def _piece_fraction(node: Reduction) -> float:
    bounds = node.bounds()
    return (bounds[0][1] - bounds[0][0]) / max(1, node.stream_rows) if bounds else 0.0


def held_pass_bytes(node: Reduction, workers: int = 1) -> int:
    """What a reduction over inputs held in memory holds during its passes: its state, the
    scratch of a piece on each of its ``workers`` + 1 threads (`run.execute.Runtime.passes`),
    and what any piece loop of the executor holds besides (`CHUNKED_OVERHEAD`: measured 12-20
    MiB above the held inputs for a LoRA extraction's range finder, whose own scratch is ~4
    MiB a piece; tests/run/test_execute_estimates.py)."""
    return (node.state_bytes + (workers + 1) * math.ceil(node.workspace * _piece_fraction(node))
            + CHUNKED_OVERHEAD)


def expression_parts(node: Node, workers: int = 1) -> tuple[int, int]:
    """(bytes kept while computing ``node`` whole: every value computed whole with its
    scratch; bytes of the largest reduction's passes — streaming from the files, or over
    held inputs — which run one at a time and keep only their small result)."""
    held, streaming = held_nodes(node)
    kept = 0
    passes = 0
    for n in held:
        kept += n.nbytes
        if isinstance(n, Reduction) and n not in streaming:
            passes = max(passes, held_pass_bytes(n, workers))
        elif n not in streaming:
            kept += n.workspace
    return kept, max(passes, max((pass_bytes(r, workers) for r in streaming), default=0))


def expression_bytes(node: Node, workers: int = 1) -> int:
    """Bytes computing ``node`` whole holds at its peak (`expression_parts`)."""
    kept, passes = expression_parts(node, workers)
    return kept + passes


def reads_whole_tensor(node: Node) -> bool:
    """Some op of ``node``'s expression needs whole input tensors at once (norms, quantiles)
    and is not a reduction that streams them (graph/passes.py)."""
    held, _ = held_nodes(node)
    return any(n.inputs and n.row_inputs() is None and not isinstance(n, (Reduction, Sweep))
               and not (isinstance(n, RowGather) and n.streams) for n in held)


def row_sliced(node: Node) -> tuple[set[Node], set[Node]] | None:
    """For row-piece evaluation of ``node``: (the nodes evaluated piece by piece, the nodes
    they read whole), or None when some node on a sliced path needs its whole inputs (or a
    sliced input's rows do not line up with the output's)."""
    sliced: set[Node] = set()
    whole: set[Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in sliced:
            continue
        sliced.add(n)
        if isinstance(n, Load):
            continue
        if isinstance(n, RowGather) and n.streams:  # the executor reads the rows it names
            whole.update(n.whole_inputs())
            continue
        rows = n.row_inputs()
        if rows is None:
            return None
        for x, by_rows in zip(n.inputs, rows, strict=True):
            if not by_rows:
                whole.add(x)
            elif not x.shape or x.shape[0] != node.shape[0]:
                return None
            else:
                stack.append(x)
    return sliced, whole


def rows_per_piece(node: Node) -> int:
    """Rows of ``node`` per piece: about `CHUNK_ELEMS` values (times its `Node.piece_scale`), a
    multiple of 64 values so that every piece starts where the whole tensor's vectorized loops
    would, and of every sliced node's `row_block` (bit-identical results; see
    `Node.compute_rows`)."""
    row = node.numel // node.shape[0]
    rows = max(1, node.piece_scale * CHUNK_ELEMS // row)
    align = 64 // math.gcd(row, 64)
    parts = row_sliced(node)
    for n in parts[0] if parts else ():
        align = math.lcm(align, n.row_block)
    return -(-rows // align) * align


def chunkable(node: Node) -> bool:
    """Whether the executor computes ``node`` in row pieces: it is larger than `CHUNK_ELEMS`
    and `row_sliced`. (Generated tensors make their own chunks: ops/init.py.)"""
    return bool(node.shape) and node.numel > CHUNK_ELEMS and row_sliced(node) is not None


#: What chunked evaluation holds besides its pieces and whole inputs, measured
#: (tests/run/test_execute.py, tests/run/test_execute_estimates.py): 7-8 MiB in all for a cast
#: since a piece's temporaries stay under the mapping threshold and the heap is trimmed after
#: a tensor that left more than `KEPT_HEAP` free (`run.execute._release_heap`; what it keeps
#: is counted apart), 8-16 MiB beside the pieces of a linear merge,
#: nearswap or interpolate, and once 16.02 MiB (nearswap over row pieces, on a loaded
#: machine): the worker threads' stacks and malloc arenas (how many arenas the threads touch
#: depends on their timing), and the allocator's small retained blocks. 24 MiB keeps a margin
#: above that tail.
CHUNKED_OVERHEAD = 24 * 1024 * 1024

#: Free heap the executor keeps from one chunked tensor to the next instead of giving it back
#: (`run.execute._release_heap`): the next tensor's pieces take it first, but a tensor whose
#: allocations come from another thread's arena or from mappings of their own holds it beside
#: its own peak (measured +20-30 MiB for arcee_fusion over 8-16 MiB tensors). `plan` adds it
#: once to a plan that computes any tensor in pieces. The least `kept_heap` keeps.
KEPT_HEAP = 32 * 1024 * 1024
#: The most `kept_heap` keeps.
KEPT_HEAP_MAX = 128 * 1024 * 1024


#: How many reduction and sweep values the executor keeps for the output tensors that follow
#: (`run.execute.Runtime.SHARED_KEEP`; a LoRA extraction's packed factors serve two tensors).
SHARED_KEEP = 8


def shared_values(tensors: Iterable[Node]) -> frozenset[Node]:
    """The reduction and sweep values that more than one of the output tensors ``tensors``
    holds whole (a LoRA module's packed factors, read by its A and by its B): the ones the
    executor keeps for the tensors that follow (`run.execute.Runtime.keep`). Why not every
    one: a value read by one tensor is dead once it is written, and some are large (DARE's
    kept masks as bits, up to `KEPT_BYTES`: eight of them kept 110 MiB more at Mistral-7B
    width)."""
    seen: set[Node] = set()
    shared: set[Node] = set()
    for t in tensors:
        for n in held_nodes(t)[0]:
            if isinstance(n, (Reduction, Sweep)):
                (shared if n in seen else seen).add(n)
    return frozenset(shared)


def whole_loads(node: Node) -> set[Load]:
    """The stored inputs computing the output tensor ``node`` reads whole (not by row pieces):
    those under the values its pieces need whole, or under the node itself when it is
    computed whole."""
    parts = row_sliced(node) if chunkable(node) else None
    loads: set[Load] = set()
    for root in (parts[1] if parts is not None else {node}):
        loads |= {n for n in held_nodes(root)[0] if isinstance(n, Load)}
    return loads


def kept_read_bytes(nodes: Iterable[Node]) -> int:
    """Bytes of the buffers the reader keeps for whole reads between tensors
    (`io.reader.KEEP_BYTES`) while it computes the output tensors ``nodes``: at most the stored
    inputs they read whole (`whole_loads`) that are small enough to reuse a buffer
    (`io.reader.REUSE_BYTES`)."""
    from recipekit.io.reader import KEEP_BYTES, REUSE_BYTES

    loads: set[Node] = set()
    for node in nodes:
        loads |= whole_loads(node)
    return min(KEEP_BYTES, sum(n.nbytes for n in loads if n.nbytes <= REUSE_BYTES))


#: While one output tensor is computed, the read-ahead thread reads the stored inputs the next
#: one reads whole, when they hold at most this many bytes: a TIES or DARE merge of small
#: tensors otherwise waits for each tensor's reads (~5% of a TinyLlama DARE-TIES run).
PREFETCH_BYTES = HOLD_BYTES


def prefetch_loads(node: Node) -> set[Load]:
    """What the read-ahead thread reads for ``node`` while the tensor before it is computed:
    its `whole_loads`, if they hold at most `PREFETCH_BYTES`; else nothing."""
    loads = whole_loads(node)
    return loads if sum(n.nbytes for n in loads) <= PREFETCH_BYTES else set()


def computing_bytes(tensors: Sequence[Node], workers: int = 1) -> int:
    """The most computing one shard's output tensors (``tensors``, in write order) holds at
    once: a computed tensor's `working_set` plus the whole inputs of the tensor after it,
    which the read-ahead thread reads meanwhile (`prefetch_loads`)."""
    most = 0
    for node, following in zip(tensors, [*tensors[1:], None][:len(tensors)], strict=True):
        ahead = (sum(n.nbytes for n in prefetch_loads(following))
                 if following is not None and not isinstance(following, Load) else 0)
        own = 0 if isinstance(node, Load) else working_set(node, workers)
        most = max(most, own + ahead)
    return most


def kept_heap(nodes: Iterable[Node], workers: int = 1) -> int:
    """Free heap the executor keeps from one chunked tensor to the next (``nodes``: the
    computed tensors): the largest chunked tensor's `working_set`, at least `KEPT_HEAP` and at
    most `KEPT_HEAP_MAX`; 0 when none is computed in pieces. `plan` adds it once.

    Why not a fixed 32 MiB: a tensor leaves about what its passes used free (temporaries in
    the arenas of the threads that ran them, SCE's kept variance keys), and the next tensor
    faults in again whatever was given back. A TinyLlama SCE of three left 100-138 MiB free
    after each MLP tensor; trimming it cost 2.6-2.8 million page faults a run (11 GB, 11-13 s
    of system time), keeping it (with `run.execute._TRIM_THRESHOLD`) 0.3 million (7-8 s), and
    the run took 30-34 instead of 40-42 s. The
    free heap after a tensor does not exceed what that tensor used, so a plan whose tensors
    are light keeps no more than before."""
    chunked = [working_set(n, workers) for n in nodes if chunkable(n)]
    return min(KEPT_HEAP_MAX, max(KEPT_HEAP, *chunked)) if chunked else 0


def retained_bytes(nodes: Iterable[Node]) -> int:
    """Bytes of the reduction and sweep values the executor may still keep from earlier
    tensors while it computes one (`SHARED_KEEP` of them, the last computed, of the
    `shared_values`): at most the `SHARED_KEEP` largest of ``nodes``. Measured at Mistral-7B
    width (bench/peaks.py): a rank-64 extraction keeps 4.5-8.8 MiB of factors per weight, 10
    MiB above a plan that ignored them."""
    values = sorted((n.nbytes for n in set(nodes) if isinstance(n, (Reduction, Sweep))),
                    reverse=True)
    return sum(values[:SHARED_KEEP])


def piece_workers() -> int:
    """Threads that compute row pieces side by side on the CPU by default: half the usable
    cores, at most 8. The other half reads ahead, hashes and writes; on 2 cores that leaves
    one, which measured fastest there (bench/README.md)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores // 2))


def working_set(node: Node, workers: int = 1) -> int:
    """Bytes computing one output tensor holds: its expression (inputs, intermediates, fp32
    scratch) and its result waiting for the hashing worker. For a chunked tensor: the inputs
    it reads whole, plus the larger of their passes over row pieces (`pass_bytes`,
    `held_pass_bytes`) and one piece per worker computing, one read ahead, the writer's
    queue (`COPY_BUFFERS` batches of pieces, `BATCH_BYTES`) and `CHUNKED_OVERHEAD` (the
    passes count it too)."""
    whole = expression_bytes(node, workers) + node.nbytes
    parts = row_sliced(node) if chunkable(node) else None
    if parts is None:
        return whole
    sliced, read_whole = parts
    whole_parts = [expression_parts(x, workers) for x in read_whole]
    kept = sum(k for k, _ in whole_parts)
    passes = max((p for _, p in whole_parts), default=0)  # before the pieces, one at a time
    rows = min(rows_per_piece(node), node.shape[0])
    per_piece = -(-sum(n.nbytes + n.workspace for n in sliced) * rows // node.shape[0])
    queued = COPY_BUFFERS * (BATCH_BYTES + rows * (node.nbytes // node.shape[0]))
    return kept + max(passes, (workers + 1) * per_piece + queued + CHUNKED_OVERHEAD)
