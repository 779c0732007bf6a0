"""Per-tensor random generators, so a tensor's random draw is reproducible on its own.

A random method (DARE, DELLA, ...) or a random initializer seeds one CPU generator per output
tensor from (``seed``, tensor name): the draw does not depend on which other tensors the recipe
touches, nor on the order they are computed in (DESIGN.md §2).
"""

from __future__ import annotations

import hashlib

import torch


def tensor_generator(seed: int, tensor: str) -> torch.Generator:
    """A CPU generator seeded by (``seed``, ``tensor``) through sha256."""
    digest = hashlib.sha256(f"{seed}\0{tensor}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
