"""Read a stored tensor as flat chunks of at most N elements, through reusable buffers.

`inspect` and `diff` summarise tensors of any size; reading a whole 7B embedding matrix
(500M elements) at once would cost gigabytes. Here the bytes of elements [i, i + N) are read
into a buffer owned by the caller and viewed as a torch tensor, so memory stays at the chunk
size. A returned tensor is only valid until its buffer is filled again (it aliases it).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from recipekit.dtypes import itemsize, torch_dtype
from recipekit.io.header import TensorInfo
from recipekit.io.reader import FileReader

#: Elements per chunk: 1 MiB as fp64 scratch, so that a chunk's passes stay in a core's L2
#: cache (fp64 reductions over 2Mi values measured 3-5x slower per value than over 64Ki).
CHUNK_ELEMENTS = 1 << 17


def chunk_bounds(info: TensorInfo, *, elements: int | None = None) -> list[tuple[int, int]]:
    """The element ranges [lo, hi) of ``info``'s chunks: `CHUNK_ELEMENTS` each (read at call
    time), the last one shorter; one empty range for a tensor without elements, so that every
    tensor has at least one chunk."""
    elements = elements or CHUNK_ELEMENTS
    total = info.nbytes // itemsize(info.dtype)
    return [(lo, min(lo + elements, total)) for lo in range(0, total, elements)] or [(0, 0)]


def read_elements(reader: FileReader, info: TensorInfo, lo: int, hi: int,
                  buffer: bytearray | memoryview) -> Any:
    """Elements [lo, hi) of ``info`` as a 1-D torch tensor viewing ``buffer`` (which must hold
    them: ``(hi - lo) * itemsize`` bytes).

    Raises:
        CorruptCheckpointError: the file is shorter than its header says (from the reader).
    """
    import torch  # only when tensor values are read

    dtype = torch_dtype(info.dtype)
    if hi <= lo:
        return torch.empty(0, dtype=dtype)
    size = itemsize(info.dtype)
    part = memoryview(buffer)[:(hi - lo) * size]
    reader.read_into(info.file, info.offset + lo * size, part)
    return torch.frombuffer(part, dtype=dtype, count=hi - lo)


def iter_chunks(reader: FileReader, info: TensorInfo, buffer: bytearray, *,
                elements: int | None = None) -> Iterator[Any]:
    """Yield ``info``'s values as 1-D torch tensors of at most ``elements`` values each.

    ``elements`` defaults to `CHUNK_ELEMENTS` (read at call time); ``buffer`` must hold that
    many values of the widest dtype read (8 bytes each covers all).

    Raises:
        CorruptCheckpointError: the file is shorter than its header says (from the reader).
    """
    import torch  # only when tensor values are read: `inspect` without --stats never loads it

    elements = elements or CHUNK_ELEMENTS
    size = itemsize(info.dtype)
    dtype = torch_dtype(info.dtype)
    total = info.nbytes // size
    view = memoryview(buffer)
    for start in range(0, total, elements):
        n = min(elements, total - start)
        part = view[:n * size]
        reader.read_into(info.file, info.offset + start * size, part)
        yield torch.frombuffer(part, dtype=dtype, count=n)
