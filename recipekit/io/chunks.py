"""Read a stored tensor as flat chunks of at most N elements, through reusable buffers.

`inspect` and `diff` summarise tensors of any size; reading a whole 7B embedding matrix
(500M elements) at once would cost gigabytes. Here the bytes of elements [i, i + N) are read
into a buffer owned by the caller and viewed as a numpy array, so memory stays at the chunk
size. A returned array is only valid until its buffer is filled again (it aliases it).
"""

from __future__ import annotations

from typing import Any

from recipekit.dtypes import itemsize, numpy_dtype
from recipekit.io.header import TensorInfo
from recipekit.io.reader import FileReader

#: Elements per chunk: 2 MiB as fp64 scratch, small enough for a chunk's passes to stay in the
#: cache (fp64 reductions over 2Mi values measured 3-5x slower per value than over 64Ki), large
#: enough that the ~15 numpy calls of a piece are a small cost (`tools.stream_stats`).
CHUNK_ELEMENTS = 1 << 18


def chunk_bounds(info: TensorInfo, *, elements: int | None = None) -> list[tuple[int, int]]:
    """The element ranges [lo, hi) of ``info``'s chunks: `CHUNK_ELEMENTS` each (read at call
    time), the last one shorter; one empty range for a tensor without elements, so that every
    tensor has at least one chunk."""
    elements = elements or CHUNK_ELEMENTS
    total = info.nbytes // itemsize(info.dtype)
    return [(lo, min(lo + elements, total)) for lo in range(0, total, elements)] or [(0, 0)]


def read_elements(reader: FileReader, info: TensorInfo, lo: int, hi: int,
                  buffer: bytearray | memoryview) -> Any:
    """Elements [lo, hi) of ``info`` as a 1-D numpy array viewing ``buffer`` (which must hold
    them: ``(hi - lo) * itemsize`` bytes); bfloat16 as its uint16 bits (`numpy_dtype`).

    Raises:
        CorruptCheckpointError: the file is shorter than its header says (from the reader).
    """
    import numpy as np  # only when tensor values are read

    dtype = numpy_dtype(info.dtype)
    if hi <= lo:
        return np.empty(0, dtype=dtype)
    size = itemsize(info.dtype)
    part = memoryview(buffer)[:(hi - lo) * size]
    reader.read_into(info.file, info.offset + lo * size, part)
    return np.frombuffer(part, dtype=dtype, count=hi - lo)
