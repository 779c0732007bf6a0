"""The dtype a merge kernel computes in: recipekit's fp32, or mergekit's own compute dtype.

recipekit computes every kernel in fp32 (fp64 if an input is fp64) and rounds once
(DESIGN.md §2 "Numerics"). mergekit 0.1.5 instead casts the inputs to its `dtype:` (or their
promoted dtype) and computes most methods in it; for the TIES family in bf16 that decides which
elements survive (issue 16 item 4). A merge step's `compute_dtype:` asks for mergekit's way:
its node casts the inputs and runs the kernel inside `native_dtype()`, where `compute_dtype`
returns the inputs' own dtype. The methods mergekit upcasts internally (linear, slerp: fp32, or
fp64 for fp64 inputs) ask `upcast_dtype`, which does not change. Oracle: mergekit 0.1.5's
outputs on bf16 models (tests/tools/test_mergekit_import_methods.py).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

_NATIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("native_dtype", default=False)


def upcast_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp64 if any input is fp64, else fp32: the dtype linear and slerp compute in, in
    mergekit and in recipekit alike."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype a kernel computes in: `upcast_dtype` (recipekit's default), or inside
    `native_dtype()` the promoted dtype of the inputs (mergekit's).

    Example:
        >>> compute_dtype(torch.zeros(2, dtype=torch.bfloat16))
        torch.float32
        >>> with native_dtype():
        ...     compute_dtype(torch.zeros(2, dtype=torch.bfloat16))
        torch.bfloat16
    """
    if _NATIVE.get() and tensors:
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        return dtype
    return upcast_dtype(*tensors)


def numpy_floats(*tensors: torch.Tensor, dtypes: tuple[torch.dtype, ...] = (
        torch.float32, torch.float64)) -> bool:
    """Whether the ops' numpy fast paths may take ``tensors`` (CPU, one of ``dtypes``, no
    autograd): numpy's elementwise ops cost a half to a third of torch's on 128Ki-value pieces
    here, with the same IEEE roundings."""
    return all(t.device.type == "cpu" and t.dtype in dtypes and not t.requires_grad
               for t in tensors)


@contextlib.contextmanager
def native_dtype() -> Iterator[None]:
    """Kernels called inside compute in their inputs' dtype, as mergekit does (this thread
    only: the flag is a context variable)."""
    token = _NATIVE.set(True)
    try:
        yield
    finally:
        _NATIVE.reset(token)
