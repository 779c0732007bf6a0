"""Merge kernels: one function per formula of mergekit 0.1.5's merge methods.

The formulas, defaults, thresholds and edge cases are those of `reference/merge-methods.md`
(mergekit 0.1.5), with one deliberate difference (DESIGN.md §2 "Numerics"): every kernel
computes in fp32 (fp64 if an input is fp64) and returns that dtype, and the caller rounds once
to the output dtype. mergekit computes most methods in the inputs' own dtype, so bf16 inputs
agree with it only to bf16 rounding; fp32 inputs agree within 1e-6 (tests/goldens/merge/).

Naming: θ_b is the base, θ_1 … θ_M the non-base inputs in order, τ_i = θ_i − θ_b.
Inputs are tensors of one shape on one device; parameters are Python numbers (per-input ones
are sequences aligned with the inputs, or one number for all). Random kernels draw from an
explicit `torch.Generator`, never the global one.

`recipekit.merge.METHODS` describes each method as data (base policy, input counts,
parameters with scope, default and whether required) without importing torch; `KERNELS` maps
its kernel names to the functions (here, in `ops.spherical`, `ops.task_arithmetic`, `ops.ram`
and `ops.fusion`), and `apply_method` calls a kernel from a method name and mergekit-style
parameters.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from recipekit.merge import METHODS, MethodSpec, ParamSpec, resolve_params
from recipekit.ops.fusion import arcee_fusion
from recipekit.ops.operands import Floats, check_inputs, per_input
from recipekit.ops.precision import compute_dtype, upcast_dtype
from recipekit.ops.ram import ram, ramplus_tl
from recipekit.ops.spherical import karcher, multislerp, nuslerp
from recipekit.ops.task_arithmetic import (
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    della,
    della_linear,
    generalized_task_arithmetic,
    model_stock,
    sce,
    task_arithmetic,
    ties,
)

__all__ = [
    "KERNELS", "METHODS", "Floats", "MethodSpec", "ParamSpec", "apply_method", "arcee_fusion",
    "breadcrumbs", "breadcrumbs_ties", "dare_linear", "dare_ties", "della", "della_linear",
    "generalized_task_arithmetic", "karcher", "lerp", "linear", "model_stock", "multislerp",
    "nearswap", "nuslerp", "passthrough", "ram", "ramplus_tl", "sce", "slerp", "slerp_apply",
    "slerp_coefficients", "task_arithmetic", "ties",
]

#: the examples of the kernels defined in the other `ops` modules named above, so that
#: ``doctest.testmod(recipekit.ops.merge)`` runs every merge kernel's example
__test__ = {f.__name__: f for f in (
    nuslerp, multislerp, karcher,
    generalized_task_arithmetic, task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs,
    breadcrumbs_ties, della, della_linear, sce, model_stock, ram, ramplus_tl, arcee_fusion)}

# --------------------------------------------------------------------------------------------
# Interpolations


def lerp(a: torch.Tensor, b: torch.Tensor, *, t: float) -> torch.Tensor:
    """Linear interpolation ``a + t·(b − a)``: recipekit's `interpolate` op.

    Formula: ``torch.lerp`` in fp32, which computes a + t(b − a) for |t| < 0.5 and
    b − (b − a)(1 − t) otherwise, so t = 0 gives a and t = 1 gives b exactly (for finite
    inputs). t is not clamped.

    Shapes: a, b [...] → [...]. Oracle: the formula (tests/ops/test_merge.py::TestLerp).

    Args:
        a: the value at t = 0.
        b: the value at t = 1.
        t: the interpolation factor.

    Returns:
        The fp32 (fp64) interpolation.

    Example:
        >>> lerp(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 4.0]), t=0.25)
        tensor([0.2500, 2.5000])
    """
    check_inputs("lerp", [a, b])
    dtype = compute_dtype(a, b)
    return torch.lerp(a.to(dtype), b.to(dtype), t)


def linear(tensors: Sequence[torch.Tensor], *, weights: Floats,
           normalize: bool = True) -> torch.Tensor:
    """Weighted average (model soup): ``Σ_j w_j x_j / Σ_j w_j``.

    Formula: acc = Σ_j w_j·x_j accumulated in input order in fp32 with fp32 weights; with
    `normalize`, acc / Σ_j w_j with **no zero guard** (Σw = 0 gives ±inf/NaN, as mergekit).
    A configured base is just another input here.

    Paper: Wortsman et al. 2022, "Model soups", https://arxiv.org/abs/2203.05482.
    Shapes: N × [...] → [...]. Oracle: the formula; mergekit 0.1.5 `linear` goldens.

    Args:
        tensors: the inputs x_1 … x_N.
        weights: one weight per input (negative allowed).
        normalize: divide by the sum of the weights.

    Returns:
        The fp32 (fp64) weighted sum.

    Raises:
        ValueError: no input, shapes differ, or the weight count is wrong.

    Example:
        >>> linear([torch.tensor([1.0]), torch.tensor([3.0])], weights=[1.0, 3.0])
        tensor([2.5000])
    """
    check_inputs("linear", tensors)
    w = per_input("linear weight", weights, len(tensors))
    dtype = upcast_dtype(*tensors)
    wt = torch.tensor(w, dtype=dtype)
    acc = torch.zeros(tensors[0].shape, dtype=dtype, device=tensors[0].device)
    for x, wj in zip(tensors, wt, strict=True):
        acc.addcmul_(x.to(dtype), wj.to(acc.device))
    if normalize:
        acc.div_(wt.sum().to(acc.device))
    return acc


#: slerp reduces norms and dots over chunks of this many elements (mergekit's chunking)
SLERP_CHUNK = 1 << 20


def slerp(a: torch.Tensor, b: torch.Tensor, *, t: float, eps: float = 1e-8,
          dot_threshold: float = 0.9995) -> torch.Tensor:
    """Spherical interpolation of two whole tensors, each flattened to one vector.

    Formula: na = ‖a‖, nb = ‖b‖ (set to 1 when ≤ eps); d = clamp(⟨a/na, b/nb⟩, −1, 1). If
    |d| > dot_threshold (nearly parallel or antiparallel) ``(1 − t)·a + t·b``; otherwise with
    θ = acos d, ``sin((1 − t)θ)/sin θ · a + sin(tθ)/sin θ · b``. The coefficients multiply the
    unnormalized a and b; t is not clamped. Norms and dots are reduced over chunks of 2^20
    elements (norm of the chunk norms), as in mergekit.

    Paper: Shoemake 1985, "Animating rotation with quaternion curves"; mergekit `slerp`.
    Shapes: a, b [...] → [...]. Oracle: the formula; mergekit 0.1.5 `slerp` goldens (a is the
    base, so t = 0 gives a).

    Args:
        a: the value at t = 0 (mergekit's base).
        b: the value at t = 1.
        t: the interpolation factor.
        eps: norms at or below this count as 1 (zero tensors are allowed).
        dot_threshold: above this |cos| the lerp is used.

    Returns:
        The fp32 (fp64) interpolation.

    Example:
        >>> slerp(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), t=0.5)
        tensor([0.7071, 0.7071])
    """
    return slerp_apply(a, b, slerp_coefficients(a, b, t=t, eps=eps, dot_threshold=dot_threshold))


def slerp_coefficients(a: torch.Tensor, b: torch.Tensor, *, t: float, eps: float = 1e-8,
                       dot_threshold: float = 0.9995) -> torch.Tensor:
    """`slerp`'s two coefficients (c_a, c_b), a tensor of 2 in the compute dtype.

    Why separate: the norms and the dot product need both whole tensors but give two numbers;
    the output, c_a·a + c_b·b (`slerp_apply`), is elementwise, so the executor can compute it
    in row pieces once the coefficients are known (`steps.merge`'s `SlerpCoefficients` and
    `Slerp` nodes), and the coefficients themselves by passes over pieces that start on chunk
    boundaries (`slerp_chunk_norms`, `slerp_chunk_dots`, `slerp_finish`).
    Shapes: a, b [...] → [2]. Oracle: `slerp`, which is `slerp_apply` of these.
    """
    check_inputs("slerp", [a, b])
    dtype = upcast_dtype(a, b)
    x, y = a.reshape(-1), b.reshape(-1)
    na = slerp_norm(slerp_chunk_norms(x, dtype), eps)
    nb = slerp_norm(slerp_chunk_norms(y, dtype), eps)
    return slerp_finish(slerp_chunk_dots(x, y, na, nb, dtype), t, dtype, x.device,
                        dot_threshold)


_SCRATCH = threading.local()


def _chunk_buffer(slot: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reused `SLERP_CHUNK`-element buffer of this thread (``slot`` 0 or 1): the passes of
    every piece and tensor share it instead of allocating 4 MiB twice per piece."""
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    key = (slot, dtype, str(device))
    buf = buffers.get(key)
    if buf is None:
        buf = buffers[key] = torch.empty(SLERP_CHUNK, dtype=dtype, device=device)
    return buf


def _chunks(v: torch.Tensor, buf: torch.Tensor) -> Iterator[torch.Tensor]:
    """The `SLERP_CHUNK`-element chunks of the flat vector ``v``, each copied into ``buf`` (in
    its dtype): one reused buffer instead of a stream of short-lived 4 MiB temporaries, which
    grew glibc's heap by ~70 MiB."""
    for s in range(0, v.numel(), SLERP_CHUNK):
        part = v[s:s + SLERP_CHUNK]
        yield buf[:part.numel()].copy_(part)


def slerp_chunk_norms(x: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    """The norm of each `SLERP_CHUNK`-element chunk of the flat vector ``x`` (its first chunk
    starts at x[0]), computed in ``dtype``."""
    return [torch.linalg.vector_norm(c)
            for c in _chunks(x, _chunk_buffer(0, dtype, x.device))]


def slerp_norm(parts: list[torch.Tensor], eps: float) -> torch.Tensor:
    """The norm of the chunk norms; 1 where it is at most ``eps`` (zero tensors allowed)."""
    if not parts:
        return torch.ones(())
    total = torch.linalg.vector_norm(torch.stack(parts))
    return torch.where(total > eps, total, torch.ones_like(total))


def slerp_chunk_dots(x: torch.Tensor, y: torch.Tensor, na: torch.Tensor, nb: torch.Tensor,
                     dtype: torch.dtype) -> list[torch.Tensor]:
    """⟨x/na, y/nb⟩ of each chunk of the flat vectors, in ``dtype``."""
    bx, by = _chunk_buffer(0, dtype, x.device), _chunk_buffer(1, dtype, x.device)
    return [cx.div_(na).mul_(cy.div_(nb)).sum()
            for cx, cy in zip(_chunks(x, bx), _chunks(y, by), strict=True)]


def slerp_finish(dots: list[torch.Tensor], t: float, dtype: torch.dtype, device: torch.device,
                 dot_threshold: float = 0.9995) -> torch.Tensor:
    """(c_a, c_b) from the chunk dots: the lerp's when nearly (anti)parallel, else slerp's."""
    tt = torch.tensor(t, dtype=dtype, device=device)
    if not dots:
        return torch.stack([1 - tt, tt])
    dot = torch.stack(dots).sum().clamp(-1, 1)
    if dot.abs() > dot_threshold:
        return torch.stack([1 - tt, tt])
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    return torch.stack([torch.sin((1 - tt) * theta) / sin_theta, torch.sin(tt * theta) / sin_theta])


def slerp_apply(a: torch.Tensor, b: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """c_a·a + c_b·b in the coefficients' dtype: elementwise, so any rows of a and b give
    those rows of the result, bit for bit.

    Shapes: a, b [...], coefficients [2] → [...]. Oracle: the formula.
    """
    dtype = coefficients.dtype
    return coefficients[0] * a.to(dtype) + coefficients[1] * b.to(dtype)


def nearswap(a: torch.Tensor, b: torch.Tensor, *, t: float) -> torch.Tensor:
    """NearSwap: take b where it is within t of a, and move only a little elsewhere.

    Formula: ω = clamp(t / max(|a − b|, 1e-6), 0, 1); out = ω·b + (1 − ω)·a, elementwise.
    t is a distance threshold, not an interpolation factor.

    Paper: mergekit `nearswap` (alchemonaut, QuartetAnemoi-70B-t0.0001).
    Shapes: a, b [...] → [...]. Oracle: mergekit 0.1.5 `nearswap` goldens (a is the base).

    Args:
        a: the base.
        b: the other input.
        t: the distance threshold.

    Returns:
        The fp32 (fp64) result.

    Example:
        >>> nearswap(torch.tensor([0.0, 0.0]), torch.tensor([0.05, 1.0]), t=0.1)
        tensor([0.0500, 0.1000])
    """
    check_inputs("nearswap", [a, b])
    dtype = compute_dtype(a, b)
    x, y = a.to(dtype), b.to(dtype)
    omega = (t / (x - y).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return omega * y + (1 - omega) * x


def passthrough(x: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """The single input, optionally scaled: ``x`` or ``scale·x``.

    Shapes: [...] → [...]. Oracle: the formula; mergekit 0.1.5 `passthrough` goldens.

    Args:
        x: the input.
        scale: the factor; None means 1 (a copy).

    Returns:
        An fp32 (fp64) tensor (never the input object itself).

    Example:
        >>> passthrough(torch.tensor([1.0, -2.0]), scale=0.5)
        tensor([ 0.5000, -1.0000])
    """
    y = x.to(compute_dtype(x), copy=True)
    return y if scale is None else y * scale


# --------------------------------------------------------------------------------------------
# Dispatch

#: kernel name (MethodSpec.kernel) → function: each method's `kernel` names a function of this
#: module's namespace (defined or imported here), so no second list of methods is kept
KERNELS: dict[str, Callable[..., torch.Tensor]] = {
    spec.kernel: globals()[spec.kernel] for spec in METHODS.values()}


def apply_method(name: str, inputs: Sequence[torch.Tensor], *,
                 base: torch.Tensor | None = None, params: Mapping[str, Any] | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Run merge method `name` on one tensor, with mergekit-style parameter names.

    `inputs` are the non-base inputs in order (for base-ignoring methods: all inputs), and
    `base` the base. Per-input and per-non-base parameters are sequences aligned with
    `inputs` (or one value for all); missing ones take `METHODS[name]` defaults.

    Args:
        name: a key of `METHODS`.
        inputs: the non-base tensors.
        base: the base tensor, if the method takes one.
        params: parameter values by mergekit key (``weight``, ``lambda``, ``t``, ...).
        generator: for random methods.

    Returns:
        The kernel's fp32 (fp64) result.

    Raises:
        ValueError: an unknown method or parameter, a missing required parameter, a base
            given to or missing from a method, input counts outside the contract, or the
            kernel's own errors.

    Example:
        >>> apply_method("slerp", [torch.tensor([0.0, 1.0])], base=torch.tensor([1.0, 0.0]),
        ...              params={"t": 0.5})
        tensor([0.7071, 0.7071])
    """
    spec = METHODS.get(name)
    if spec is None:
        raise ValueError(f"unknown merge method {name!r}; expected one of "
                         f"{', '.join(METHODS)}")
    _check_contract(spec, len(inputs), base is not None)
    kw = resolve_params(spec, params or {}, len(inputs))
    kernel = KERNELS[spec.kernel]
    if spec.random:
        kw["generator"] = generator
    if spec.call == "inputs":
        if spec.base == "optional":
            kw["base"] = base
        return kernel(list(inputs), **kw)
    if spec.call == "pair":
        return kernel(base, inputs[0], **kw)
    if spec.call == "pair_weights":
        weight_a, weight_b = kw.pop("weights")
        return kernel(inputs[0], inputs[1], weight_a=weight_a, weight_b=weight_b,
                      base=base, **kw)
    if spec.call == "base_inputs":
        return kernel(base, list(inputs), **kw)
    (scale,) = kw["scale"]
    return kernel(inputs[0], scale=scale)


def _check_contract(spec: MethodSpec, n_inputs: int, has_base: bool) -> None:
    """Raise ValueError when the base or the input counts break the method's contract."""
    name = spec.name
    if not has_base and spec.base == "required":
        raise ValueError(f"{name} needs a base")
    if has_base and spec.base == "ignored":
        raise ValueError(f"{name} takes no base: pass it as an ordinary input")
    n_total = n_inputs + has_base
    if n_total < spec.min_inputs or (spec.max_inputs is not None and n_total > spec.max_inputs):
        bound = (f"{spec.min_inputs}" if spec.max_inputs == spec.min_inputs
                 else f"{spec.min_inputs} to {spec.max_inputs or 'any number of'}")
        raise ValueError(f"{name} takes {bound} inputs (base included), got {n_total}")
    if n_inputs < spec.min_non_base or (spec.max_non_base is not None
                                        and n_inputs > spec.max_non_base):
        raise ValueError(f"{name} takes {spec.min_non_base} to "
                         f"{spec.max_non_base or 'any number of'} non-base inputs, "
                         f"got {n_inputs}")
