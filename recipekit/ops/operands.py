"""Checks shared by the merge kernels: operand shapes and counts, per-input parameters.

Why a module: the interpolation kernels (`ops.spherical`), the task-arithmetic family
(`ops.task_arithmetic`) and the simple kernels in `ops.merge` raise the same messages for the
same mistakes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Floats = float | Sequence[float]


def check_inputs(what: str, tensors: Sequence[torch.Tensor], minimum: int = 1) -> None:
    """Raise ValueError unless there are at least `minimum` tensors, all of one shape."""
    if len(tensors) < minimum:
        raise ValueError(f"{what} needs at least {minimum} input(s), got {len(tensors)}")
    shape = tensors[0].shape
    for x in tensors[1:]:
        if x.shape != shape:
            raise ValueError(
                f"{what}: input shapes differ: {list(shape)} and {list(x.shape)}")


def per_input(what: str, value: Floats, n: int) -> list[float]:
    """A per-input parameter as a list of n floats (one number stands for all)."""
    if isinstance(value, (int, float)):
        return [float(value)] * n
    values = [float(v) for v in value]
    if len(values) != n:
        raise ValueError(f"{what}: expected {n} value(s), one per input, got {len(values)}")
    return values

