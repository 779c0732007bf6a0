"""Safetensors dtype codes and their sizes, without importing torch.

The plan works on these codes (``"BF16"``, ``"I64"``); only the executor maps them to torch
dtypes, through `torch_dtype`.
"""

from __future__ import annotations

from typing import Any

#: code -> (bytes per element, torch attribute name, is floating point)
DTYPES: dict[str, tuple[int, str, bool]] = {
    "BOOL": (1, "bool", False),
    "U8": (1, "uint8", False),
    "I8": (1, "int8", False),
    "I16": (2, "int16", False),
    "U16": (2, "uint16", False),
    "I32": (4, "int32", False),
    "U32": (4, "uint32", False),
    "I64": (8, "int64", False),
    "U64": (8, "uint64", False),
    "F16": (2, "float16", True),
    "BF16": (2, "bfloat16", True),
    "F32": (4, "float32", True),
    "F64": (8, "float64", True),
}

#: fp8 codes: recognised so that they are refused with a specific message (DESIGN.md §5).
FP8_CODES = frozenset({"F8_E4M3", "F8_E5M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ"})

#: recipe / config.json spellings -> code
NAME_TO_CODE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
CODE_TO_NAME = {v: k for k, v in NAME_TO_CODE.items()}


def itemsize(code: str) -> int:
    return DTYPES[code][0]


def is_floating(code: str) -> bool:
    return DTYPES[code][2]


def torch_dtype(code: str) -> Any:
    """The torch dtype for a safetensors code (imports torch)."""
    import torch

    return getattr(torch, DTYPES[code][1])


def numpy_dtype(code: str) -> str:
    """The numpy dtype name for a safetensors code; bfloat16, which numpy lacks, as its uint16
    bits (`ops.stats.bf16_values` widens them)."""
    return "uint16" if code == "BF16" else DTYPES[code][1]


def promote(codes: list[str]) -> str:
    """The dtype a merge of these floating dtypes is computed into (bf16+fp16 -> fp32)."""
    unique = sorted(set(codes))
    if len(unique) == 1:
        return unique[0]
    widest = max(unique, key=itemsize)
    return "F32" if itemsize(widest) <= 4 and widest != "F64" else widest
