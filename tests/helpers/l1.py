"""The L1 rescale factor of DARE/DELLA as the oracles compute it: exact norms, one rounding.

The streamed factor sums each row in fp32 and the rows in fp64 (ops/stream_prune.py
`_piece_sum`), ~1e-9 relative, so it is the correctly rounded ratio of the exact norms or an
fp32 neighbour of it; the oracles try the three.
"""

from __future__ import annotations

import math

import torch

#: fp32 ulps by which the streamed factor may differ from the correctly rounded one
NEIGHBOURS = (0, 1, -1)


def exact_l1_norms(tau: torch.Tensor, kept: torch.Tensor) -> tuple[float, float]:
    """(‖τ‖₁, ‖kept‖₁) summed exactly (`math.fsum`)."""
    return (math.fsum(tau.abs().double().reshape(-1).tolist()),
            math.fsum(kept.abs().double().reshape(-1).tolist()))


def nudged(ratio: float, ulps: int) -> torch.Tensor:
    """``ratio`` rounded to fp32, then moved by ``ulps`` fp32 ulps (up when positive)."""
    scale = torch.tensor(ratio, dtype=torch.float64).float()
    for _ in range(abs(ulps)):
        scale = torch.nextafter(scale, torch.tensor(math.copysign(math.inf, ulps)))
    return scale
