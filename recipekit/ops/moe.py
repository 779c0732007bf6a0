"""Tensor math of sparse-MoE building: mergekit-moe's random routers and expert perturbations.

`random_router` reproduces mergekit-moe 0.1.5's ``random`` and ``uniform_random`` gates bit for
bit (reference/moe.md §3.1-3.2): mergekit draws the whole (layers, gates, hidden) tensor at once
from torch's CPU generator seeded with ``--random-seed``, so one layer's rows are that draw's
slice; the draw is small (32 × 8 × 4096 fp32 is 4 MiB) and is redone for each layer so that each
router stays an independent plan node. `perturb_expert` is mergekit's ``noise_scale`` /
``residual_scale`` (§3.6) on rows ``lo:hi`` of one expert weight; its noise comes from a
counter-based draw (`ops.rng.counter_draw`, Box-Muller), so that any row piece is the same
whoever computes it, and it is computed in fp32 and rounded once (DESIGN.md §2), where mergekit
adds bf16 noise in the source dtype from its global generator: the two agree in distribution,
not bit for bit. Oracles: tests/ops/test_moe.py (torch.manual_seed + one randn/rand call, as
mergekit; noise mean/std and piece independence) and tests/steps/test_moe.py (mergekit-moe's
own output).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where tensors are made: planning reads NOISE_BYTES
    import torch


def random_router(mode: str, *, seed: int, layers: int, gates: int, hidden: int, layer: int,
                  rows: tuple[int, int]) -> torch.Tensor:
    """Rows ``rows`` of layer ``layer`` of mergekit's gate tensor G, fp32 ``[rows, hidden]``.

    ``random``: G = ``torch.randn(layers, gates, hidden)`` (N(0, 1), not normalised).
    ``uniform_random``: G = ``torch.rand(...) * 2 * a - a`` with a = 1/√hidden (nn.Linear's
    default init range). Both drawn from a CPU generator seeded with ``seed``, which is
    ``torch.manual_seed(seed)``'s stream.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    shape = (layers, gates, hidden)
    if mode == "random":
        full = torch.randn(shape, generator=gen)
        return full[layer, rows[0]:rows[1]].clone()
    if mode == "uniform_random":
        scale = math.sqrt(1.0 / hidden)
        part = torch.rand(shape, generator=gen)[layer, rows[0]:rows[1]]
        return part * 2 * scale - scale  # elementwise: the slice of mergekit's whole result
    raise ValueError(f"not a random gate mode: {mode!r}")


def expert_noise(key: tuple[int, int], lo: int, hi: int, row_len: int) -> torch.Tensor:
    """N(0, 1) fp32 ``[hi - lo, row_len]`` for rows ``lo:hi``, by Box-Muller over two counter
    draws keyed ``key`` (piece-independent: any rows equal the whole draw's rows), computed in
    place: `NOISE_BYTES` per value at most."""
    import torch

    from recipekit.ops.rng import DRAW_BITS, counter_draw

    scale = 1.0 / (1 << DRAW_BITS)
    radius = counter_draw(key[0], lo, hi, row_len).to(torch.float32)
    radius.add_(1.0).mul_(scale).log_().mul_(-2.0).sqrt_()  # u1 in (0, 1]: finite
    angle = counter_draw(key[1], lo, hi, row_len).to(torch.float32)
    angle.mul_(2.0 * math.pi * scale).cos_()
    return radius.mul_(angle)


#: scratch bytes per value of `perturb_expert` with noise: two int32 draws and their fp32
#: conversions, the fp32 copy of the weight (`steps.moe.PerturbExpert.workspace`)
NOISE_BYTES = 20


def perturb_expert(rows: torch.Tensor, *, lo: int, noise_scale: float | None,
                   residual_scale: float | None, key: tuple[int, int],
                   dtype: torch.dtype) -> torch.Tensor:
    """Rows ``lo:lo+len(rows)`` of an expert weight after mergekit's modifiers: ``t + s·z``
    (z ~ N(0, 1), `expert_noise`) when ``noise_scale`` s is set, then ``t · r`` when
    ``residual_scale`` r is set (the caller passes r only for ``down_proj``); computed in fp32
    (fp64 for fp64 weights) and rounded once to ``dtype``."""
    import torch

    work = torch.float64 if rows.dtype == torch.float64 else torch.float32
    out = rows.to(work, copy=True)
    if noise_scale is not None:
        row_len = out[0].numel() if out.dim() > 1 else 1
        # drawn on the CPU whatever the device: the same bytes on any device (DESIGN.md §3)
        z = expert_noise(key, lo, lo + out.shape[0], row_len).reshape(out.shape)
        out.add_(z.to(device=out.device, dtype=work).mul_(noise_scale))
        del z
    if residual_scale is not None:
        out.mul_(residual_scale)
    return out.to(dtype)
