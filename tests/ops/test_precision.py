"""recipekit/ops/precision.py: recipekit's fp32 compute dtype and mergekit's own.

Oracles: mergekit 0.1.5's rules (reference/merge-methods.md §3: the compute dtype is the
inputs' promoted dtype; linear and slerp upcast to fp32, fp64 for fp64 inputs) and its
`test_ties_merge` arithmetic recomputed step by step in bf16 here.
"""

from __future__ import annotations

import doctest
import threading

import torch

from recipekit.ops import precision
from recipekit.ops.merge import apply_method
from recipekit.ops.precision import compute_dtype, native_dtype, upcast_dtype


def test_docstring_examples_run():
    assert doctest.testmod(precision).failed == 0


def test_default_and_native():
    bf, half, f64 = (torch.zeros(2, dtype=d) for d in (torch.bfloat16, torch.float16,
                                                      torch.float64))
    assert compute_dtype(bf, half) == torch.float32
    assert compute_dtype(bf, f64) == torch.float64
    with native_dtype():
        assert compute_dtype(bf) == torch.bfloat16
        assert compute_dtype(bf, half) == torch.float32  # torch's promotion, as mergekit
        assert upcast_dtype(bf) == torch.float32
    assert compute_dtype(bf) == torch.float32


def test_the_flag_is_per_thread():
    seen = []
    with native_dtype():
        t = threading.Thread(target=lambda: seen.append(compute_dtype(torch.zeros(1).bfloat16())))
        t.start()
        t.join()
    assert seen == [torch.float32]


def test_ties_in_bfloat16_is_the_bfloat16_arithmetic():
    """mergekit's TIES in bf16: τ in bf16, top-k on |τ| as fp32, bf16 weights (0.6 → 0.6015625),
    sign election and the disjoint mean in bf16."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(8, 16, generator=g).bfloat16()
    xs = [(base.float() + 0.1 * torch.randn(8, 16, generator=g)).bfloat16() for _ in range(2)]
    with native_dtype():
        ours = apply_method("ties", xs, base=base, params={"weight": [0.6, 0.4], "density": 0.3})
    assert ours.dtype == torch.bfloat16
    taus = []
    for x in xs:
        tau = x - base
        k = int(0.3 * tau.numel())
        keep = torch.zeros(tau.numel(), dtype=tau.dtype)
        keep[torch.argsort(tau.abs().reshape(-1).float(), descending=True)[:k]] = 1
        taus.append(tau * keep.reshape(tau.shape))
    w = torch.tensor([0.6, 0.4], dtype=torch.bfloat16).reshape(2, 1, 1)
    d = torch.stack(taus) * w
    sign = (d.sum(0) >= 0).to(torch.bfloat16) * 2 - 1
    agree = d.sign() == sign
    div = (w * agree).sum(0)
    div[div == 0] = 1
    assert torch.equal(ours, base + (d * agree).sum(0) / div)


def test_linear_and_slerp_upcast_inside_native():
    g = torch.Generator().manual_seed(2)
    a, b = (torch.randn(4, 8, generator=g).bfloat16() for _ in range(2))
    with native_dtype():
        lin = apply_method("linear", [a, b], params={"weight": [0.3, 0.7]})
        sl = apply_method("slerp", [b], base=a, params={"t": 0.35})
    assert lin.dtype == sl.dtype == torch.float32
    assert torch.equal(lin, apply_method("linear", [a, b], params={"weight": [0.3, 0.7]}))
    assert torch.equal(sl, apply_method("slerp", [b], base=a, params={"t": 0.35}))
