"""A measurement, not a feature: SCE's window pass over one piece fused in numba, against the
numpy/torch steps recipekit runs (`ops.stream_sce`, `ops.select`).

Why it exists: issue 18's SCE target (≤ 4× the copy floor) is missed at 6–7× on 2 vCPUs, and the
numpy steps cannot be made much cheaper (bench/README.md, "Where SCE's and DELLA's time goes").
Whether a compiled kernel would pay for a new dependency is the project's decision; this script
gives it a number. The fused sweep computes what one window-pass piece needs: the task vectors
of a base and two models (bf16), the variance key (`_welford_two`'s fp64 operations, in its
order), the zero count, the keys above the window (count, packed bits, fp64 energies) and the
entries inside it. It checks its results against recipekit's before timing.

numba is not a dependency of recipekit: install it beside this checkout, e.g.
``pip install --target /tmp/nbpkg --no-deps numba llvmlite``, then
``PYTHONPATH=/tmp/nbpkg python bench/fused_sce.py`` (the TinyLlama fixtures of
``python bench/fixtures.py tinyllama --seeds 0,1,2``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

try:
    import numba as nb
except ImportError:
    sys.exit("bench/fused_sce.py needs numba (see its docstring: a measurement outside the "
             "package's dependencies)")

from recipekit.ops.bitmask import pack
from recipekit.ops.select import count_zeros, key_positions, keys_at_least
from recipekit.ops.stream_sce import _energies, variance_key
from recipekit.ops.task_arithmetic import task_vectors
from recipekit.run.execute import _fixed_mmap_threshold

sys.path.insert(0, str(Path(__file__).parent))
from lora_error import get, open_tensors  # noqa: E402 - bench/ is a folder of scripts

FIXTURES = Path(__file__).parent / ".fixtures"
TENSOR = "model.layers.3.mlp.gate_proj.weight"


@nb.njit(nogil=True)
def _variance(xa, xb, xc, var):
    """fp32 of `ops.sparsify._welford_two` of (xb − xa, xc − xa), the same operations."""
    for i in range(xa.size):
        t0 = xb[i] - xa[i]
        t1 = xc[i] - xa[i]
        mean = np.float64(t0)
        value = np.float64(t1)
        delta = value - mean
        mean += delta * 0.5
        value -= mean
        value *= delta
        value += 0.0
        value *= 0.5
        var[i] = np.float32(value)


@nb.njit(nogil=True)
def _classify(xa, xb, xc, keys, lower, upper, bits, pos, inside_keys, inside_tau, sums):
    """Zeros, keys at or above ``upper`` (count, bits, Σ τ_i²) and those in [lower, upper)."""
    n = xa.size
    zeros = above = inside = 0
    s0 = s1 = 0.0
    for i0 in range(0, n, 8):
        byte = 0
        for i in range(i0, min(i0 + 8, n)):
            key = keys[i] & 0x7FFFFFFF
            t0 = np.float64(xb[i] - xa[i])
            t1 = np.float64(xc[i] - xa[i])
            up = key >= upper
            zeros += key == 0
            above += up
            w = 1.0 if up else 0.0
            s0 += w * (t0 * t0)
            s1 += w * (t1 * t1)
            byte |= np.int64(up) << (7 - (i - i0))
            if (key >= lower) & (not up):
                pos[inside] = i
                inside_keys[inside] = key
                inside_tau[0, inside] = t0
                inside_tau[1, inside] = t1
                inside += 1
        bits[i0 // 8] = byte
    sums[0] = s0
    sums[1] = s1
    return zeros, above, inside


def main() -> None:
    torch.set_num_threads(1)
    _fixed_mmap_threshold()  # the executor's allocator settings: temporaries reuse the heap
    base, x, y = (get(open_tensors(FIXTURES / f"tinyllama-seed{s}"), TENSOR)
                  for s in (0, 1, 2))
    rows = (1 << 17) // base.shape[1]
    a, b, c = (t[:rows].contiguous() for t in (base, x, y))
    n = a.numel()
    ordered = np.sort(variance_key(task_vectors([b, c, a], torch.float32)).numpy().reshape(-1))
    lower, upper = int(ordered[n // 2 - n // 40]), int(ordered[n // 2 + n // 40])  # a 5% window

    def numpy_way() -> tuple:
        tau = task_vectors([b, c, a], torch.float32)
        key = variance_key(tau)
        above = keys_at_least(key, upper)
        return (count_zeros(key), _energies(tau, above.reshape(tau.shape[1:])), pack(above),
                key_positions(key, lower, upper))

    bits = np.empty((n + 7) // 8, np.uint8)
    pos, inside_keys = np.empty(n, np.int64), np.empty(n, np.int32)
    inside_tau, sums = np.empty((2, n), np.float32), np.empty(2, np.float64)
    stored = [t.view(torch.int16).numpy().view(np.uint16).reshape(-1) for t in (a, b, c)]

    def fused() -> tuple:
        words = np.empty((3, n), np.uint32)
        for k, s in enumerate(stored):  # bf16 bits to the equal fp32 values
            np.copyto(words[k], s)
            np.left_shift(words[k], 16, out=words[k])
        f = words.view(np.float32)
        var = np.empty(n, np.float32)
        _variance(f[0], f[1], f[2], var)
        return _classify(f[0], f[1], f[2], var.view(np.int32), lower, upper, bits, pos,
                         inside_keys, inside_tau, sums)

    zeros, energies, packed, at = numpy_way()
    got_zeros, _, inside = fused()
    assert int(zeros) == got_zeros
    assert np.array_equal(np.asarray(packed).view(np.uint8)[:len(bits)], bits)
    assert np.array_equal(np.asarray(at).reshape(-1), pos[:inside])
    assert torch.allclose(torch.from_numpy(sums), energies, rtol=1e-12, atol=0)
    best: dict[str, float] = {}
    for _ in range(7):  # alternated; the minimum of each
        for label, fn in (("numpy/torch (recipekit)", numpy_way), ("numba, fused", fused)):
            start = time.perf_counter()
            for _ in range(30):
                fn()
            best[label] = min(best.get(label, 1e9), (time.perf_counter() - start) / 30 / n * 1e9)
    print(f"{TENSOR}, {rows} rows: same zeros, bits and window entries; energies within 1e-12")
    for label, ns in best.items():
        print(f"  {label:26s} {ns:5.2f} ns a position (three bf16 inputs)")


if __name__ == "__main__":
    main()
