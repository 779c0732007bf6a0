"""Read a stored tensor as flat chunks of at most N elements, through one reusable buffer.

`inspect` and `diff` summarise tensors of any size; reading a whole 7B embedding matrix
(500M elements) at once would cost gigabytes. Here the bytes of elements [i, i + N) are read
into a buffer owned by the caller and viewed as a torch tensor, so memory stays at the chunk
size. A yielded tensor is only valid until the next one is requested (it aliases the buffer).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from recipekit.dtypes import itemsize, torch_dtype
from recipekit.io.header import TensorInfo
from recipekit.io.reader import FileReader

#: Elements per chunk: 1 MiB of fp64 per temporary, a few MiB in all.
CHUNK_ELEMENTS = 1 << 17


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
