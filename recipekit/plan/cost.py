"""The executor's chunk and memory policy, shared by planning (estimates) and running.

A tensor that is only moved is copied through a few fixed-size buffers; a large elementwise
expression is computed in row pieces of about `CHUNK_ELEMS` values, by `piece_workers` threads
side by side; everything else is computed whole. `working_set` is what each choice holds, and
`Plan.peak_memory_estimate` adds it up. No torch.
"""

from __future__ import annotations

import math
import os

from recipekit.graph import Load, Node, expression_nodes

#: Bytes the executor moves per read when a tensor is copied without compute, and how many such
#: buffers circulate between reading/writing and the hashing worker.
COPY_CHUNK = 8 * 1024 * 1024
COPY_BUFFERS = 4
#: Elements per piece when a large elementwise expression (linear, task arithmetic, lerp, casts)
#: is computed piecewise: 256Ki values, so each fp32 intermediate is 1 MiB whatever the tensor
#: size, and a piece's passes (convert, multiply-add, round) stay in the CPU's L2 cache.
CHUNK_ELEMS = 1 << 18


def expression_bytes(node: Node) -> int:
    return sum(n.nbytes + n.workspace for n in expression_nodes(node))


def reads_whole_tensor(node: Node) -> bool:
    """Some op of ``node``'s expression needs whole input tensors at once (norms, quantiles)."""
    return not all(not n.inputs or n.row_inputs() is not None
                   for n in expression_nodes(node))


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
    """Rows of ``node`` per piece: about `CHUNK_ELEMS` values, a multiple of 64 values so that
    every piece starts where the whole tensor's vectorized loops would, and of every sliced
    node's `row_block` (bit-identical results; see `Node.compute_rows`)."""
    row = node.numel // node.shape[0]
    rows = max(1, CHUNK_ELEMS // row)
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
#: (tests/test_execute.py: 16-35 MiB from run to run, and up to 40 MiB above a slerp's inputs
#: and chunk buffers): the worker threads' malloc arenas and the allocator's retained pieces.
CHUNKED_OVERHEAD = 32 * 1024 * 1024


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
    it reads whole, plus one piece per worker computing and one read ahead, the writer's
    queue of pieces and `CHUNKED_OVERHEAD`."""
    whole = expression_bytes(node) + node.nbytes
    parts = row_sliced(node) if chunkable(node) else None
    if parts is None:
        return whole
    sliced, whole_inputs = parts
    kept = sum(expression_bytes(x) for x in whole_inputs)
    rows = min(rows_per_piece(node), node.shape[0])
    per_piece = -(-sum(n.nbytes + n.workspace for n in sliced) * rows // node.shape[0])
    queued = 4 * rows * (node.nbytes // node.shape[0])
    return kept + (workers + 1) * per_piece + queued + CHUNKED_OVERHEAD
