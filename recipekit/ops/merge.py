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
its kernel names to the functions here, and `apply_method` calls a kernel from a method name
and mergekit-style parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from recipekit.merge import METHODS, MethodSpec, ParamSpec, resolve_params
from recipekit.ops.sparsify import (
    CONSENSUS_METHODS,
    SPARSIFIERS,
    compute_dtype,
    sce_topk_mask,
    sign_consensus_mask,
)
from recipekit.ops.sparsify import sparsify as sparsify_delta

Floats = float | Sequence[float]

#: slerp reduces norms and dots over chunks of this many elements (mergekit's chunking)
SLERP_CHUNK = 1 << 20


def _check_inputs(what: str, tensors: Sequence[torch.Tensor], minimum: int = 1) -> None:
    if len(tensors) < minimum:
        raise ValueError(f"{what} needs at least {minimum} input(s), got {len(tensors)}")
    shape = tensors[0].shape
    for x in tensors[1:]:
        if x.shape != shape:
            raise ValueError(
                f"{what}: input shapes differ: {list(shape)} and {list(x.shape)}")


def _per_input(what: str, value: Floats, n: int) -> list[float]:
    """A per-input parameter as a list of n floats (one number stands for all)."""
    if isinstance(value, (int, float)):
        return [float(value)] * n
    values = [float(v) for v in value]
    if len(values) != n:
        raise ValueError(f"{what}: expected {n} value(s), one per input, got {len(values)}")
    return values


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
    _check_inputs("lerp", [a, b])
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
    _check_inputs("linear", tensors)
    w = _per_input("linear weight", weights, len(tensors))
    dtype = compute_dtype(*tensors)
    wt = torch.tensor(w, dtype=dtype)
    acc = torch.zeros(tensors[0].shape, dtype=dtype, device=tensors[0].device)
    for x, wj in zip(tensors, wt, strict=True):
        acc.addcmul_(x.to(dtype), wj.to(acc.device))
    if normalize:
        acc.div_(wt.sum().to(acc.device))
    return acc


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
    in row pieces once the coefficients are known (`model.SlerpCoefficients`, `model.Slerp`).
    Shapes: a, b [...] → [2]. Oracle: `slerp`, which is `slerp_apply` of these.
    """
    _check_inputs("slerp", [a, b])
    dtype = compute_dtype(a, b)
    x, y = a.reshape(-1), b.reshape(-1)
    n = x.numel()
    tt = torch.tensor(t, dtype=dtype, device=x.device)
    if n == 0:
        return torch.stack([1 - tt, tt])
    starts = range(0, n, SLERP_CHUNK)
    # Two chunk buffers, reused: the same arithmetic as converting each chunk anew, without
    # a stream of short-lived 4 MiB temporaries (which grew glibc's heap by ~70 MiB).
    bx = torch.empty(min(n, SLERP_CHUNK), dtype=dtype, device=x.device)
    by = torch.empty_like(bx)

    def chunk(buf: torch.Tensor, v: torch.Tensor, s: int) -> torch.Tensor:
        part = v[s:s + SLERP_CHUNK]
        return buf[:part.numel()].copy_(part)

    def norm(v: torch.Tensor) -> torch.Tensor:
        parts = [torch.linalg.vector_norm(chunk(bx, v, s)) for s in starts]
        total = torch.linalg.vector_norm(torch.stack(parts))
        return torch.where(total > eps, total, torch.ones_like(total))

    na, nb = norm(x), norm(y)
    dots = [chunk(bx, x, s).div_(na).mul_(chunk(by, y, s).div_(nb)).sum() for s in starts]
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


#: nuslerp: vectors whose 1 − cos² is at most this are collinear (mergekit: eps² with 1e-8)
NUSLERP_COLLINEAR = 1e-8 ** 2


def _slerp_vectors(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    """Slerp along the last axis of v0, v1 (nuslerp's S), t a Python float."""

    def unit(v: torch.Tensor) -> torch.Tensor:
        return v / torch.norm(v, dim=-1, keepdim=True).clamp(min=1e-7)

    cos = (unit(v0) * unit(v1)).sum(dim=-1, keepdim=True).clamp(-1, 1)
    collinear = (1 - cos.square()) <= NUSLERP_COLLINEAR
    theta = torch.acos(torch.where(collinear, torch.zeros_like(cos), cos))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    return torch.where(collinear, (1 - t) * v0 + t * v1, spherical)


def nuslerp(a: torch.Tensor, b: torch.Tensor, *, weight_a: float, weight_b: float,
            base: torch.Tensor | None = None, flatten: bool = True,
            row_wise: bool = False) -> torch.Tensor:
    """Weighted slerp of two inputs (or of their task vectors), per tensor, row or column.

    Formula: t = w_b/(w_a + w_b), or 0.5 if |w_a + w_b| < 1e-6 (not clamped). With a base,
    v0 = a − θ_b, v1 = b − θ_b and out = θ_b + S(v0, v1); without, out = S(a, b). S works on
    vectors: the whole tensor (`flatten`), else the last axis (rows W[i, :]), or with
    `row_wise` axis 0 (columns W[:, j], via transpose(0, −1)); a 1-D tensor is one vector.
    u = v / max(‖v‖, 1e-7), c = clamp(u0·u1, −1, 1); if 1 − c² ≤ 1e-16,
    ``(1 − t)v0 + t·v1``, else ``(sin((1 − t)θ)v0 + sin(tθ)v1)/sin θ`` with θ = acos c.
    A zero vector has c = 0: it is treated as orthogonal.

    Paper: mergekit `nuslerp` (Goddard); slerp after Shoemake 1985.
    Shapes: a, b (, base) [...] → [...]. Oracle: mergekit 0.1.5 `nuslerp` goldens (3
    orientations × with/without base).

    Args:
        a: the first non-base input (t = 0 end).
        b: the second non-base input (t = 1 end).
        weight_a: a's weight.
        weight_b: b's weight.
        base: the optional base: slerp the task vectors instead.
        flatten: one vector per tensor (mergekit's `nuslerp_flatten`).
        row_wise: with flatten false, slerp axis-0 vectors (mergekit's `nuslerp_row_wise`).

    Returns:
        The fp32 (fp64) result.

    Example:
        >>> nuslerp(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), weight_a=1, weight_b=1)
        tensor([0.7071, 0.7071])
    """
    _check_inputs("nuslerp", [a, b] + ([base] if base is not None else []))
    total = weight_a + weight_b
    t = 0.5 if abs(total) < 1e-6 else weight_b / total
    dtype = compute_dtype(a, b, *([base] if base is not None else []))
    v0, v1 = a.to(dtype), b.to(dtype)
    if base is not None:
        base = base.to(dtype)
        v0, v1 = v0 - base, v1 - base
    shape = v0.shape
    if flatten:
        out = _slerp_vectors(v0.reshape(-1), v1.reshape(-1), t).reshape(shape)
    elif row_wise:
        out = _slerp_vectors(v0.transpose(0, -1), v1.transpose(0, -1), t).transpose(0, -1)
    else:
        out = _slerp_vectors(v0, v1, t)
    return out if base is None else base + out


def multislerp(tensors: Sequence[torch.Tensor], *, weights: Floats,
               base: torch.Tensor | None = None, normalize_weights: bool = True,
               eps: float = 1e-8) -> torch.Tensor:
    """Barycentric interpolation of M inputs on the hypersphere: one tangent-space step.

    Formula: M = 1 returns θ_1. Otherwise x_i = τ_i with a base, else θ_i (flattened);
    w ← w/Σw if `normalize_weights` (no zero guard); n_i = ‖x_i‖, u_i = x_i/(n_i + eps);
    m = Σ w_i u_i. If ‖m‖ < eps: for M = 2 return w_1x_1 + w_2x_2 (+ base), else raise.
    m ← m/‖m‖; g_i = u_i − (u_i·m)m; v = Σ w_i g_i; s = ‖v‖ + eps;
    ``r = (cos s·m + sin s/s·v) · Σ w_i n_i`` (+ θ_b). Not an iterated Karcher mean.

    Paper: Goddard, "Multi-SLERP", https://goddard.blog/posts/multislerp-wow-what-a-cool-idea.
    Shapes: M × [...] (, base) → [...]. Oracle: mergekit 0.1.5 `multislerp` goldens.

    Args:
        tensors: the non-base inputs.
        weights: one weight per non-base input.
        base: the optional base (the sphere's origin).
        normalize_weights: divide the weights by their sum.
        eps: added to norms; the threshold for a vanishing mean direction.

    Returns:
        The fp32 (fp64) result.

    Raises:
        ValueError: the weighted mean direction vanishes for M > 2 (antipodal inputs whose
            weights balance), or bad inputs.

    Example:
        >>> multislerp([torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])], weights=[1, 1])
        tensor([0.7071, 0.7071])
    """
    _check_inputs("multislerp", list(tensors) + ([base] if base is not None else []))
    w = _per_input("multislerp weight", weights, len(tensors))
    dtype = compute_dtype(*tensors, *([base] if base is not None else []))
    if len(tensors) == 1:
        return tensors[0].to(dtype, copy=True)
    shape = tensors[0].shape
    x = torch.stack([t.to(dtype) for t in tensors])
    if base is not None:
        base = base.to(dtype)
        x = x - base
    x = x.reshape(len(tensors), -1)
    wt = torch.tensor(w, dtype=dtype, device=x.device)
    if normalize_weights:
        wt = wt / wt.sum()
    norms = torch.norm(x, dim=-1, keepdim=True)
    units = x / (norms + eps)
    mean = (units * wt.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if len(tensors) != 2:
            raise ValueError(
                "multislerp: the weighted mean direction of the inputs is zero (antipodal "
                "inputs whose weights balance out); change the weights")
        out = (x[0] * wt[0] + x[1] * wt[1]).reshape(shape)
        return out if base is None else out + base
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    v = (tangents * wt.view(-1, 1)).sum(0)
    s = torch.norm(v) + eps
    out = (mean * torch.cos(s) + v * (torch.sin(s) / s)) * (norms.squeeze(-1) * wt).sum()
    out = out.reshape(shape)
    return out if base is None else out + base


def karcher(tensors: Sequence[torch.Tensor], *, weights: Sequence[float] | None = None,
            max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """Weighted Karcher (Riemannian) mean of the inputs' directions, scaled by their norms.

    Formula: n_i = ‖x_i‖, u_i = x_i/n_i (0 if n_i = 0); only n_i > tol are valid (none: return
    0). α̂ = α renormalized over the valid inputs; m = normalize(Σ α̂ u_i) (the first valid u
    if that norm is < tol). Up to `max_iter` times: c_i = clamp(m·u_i, −1, 1), φ_i = acos c_i,
    skipping φ_i < tol; g = Σ α̂ φ_i/sin φ_i (u_i − c_i m); stop if ‖g‖ < tol, else
    m ← cos‖g‖·m + sin‖g‖·g/‖g‖, renormalized. out = (Σ_i α_i n_i)·m over **all** inputs.
    N = 1 returns the input.

    Paper: mergekit `karcher` (https://arxiv.org/abs/2603.04972); Karcher 1977.
    Shapes: N × [...] → [...]. Oracle: mergekit 0.1.5 `karcher` goldens (α = 1/N).

    Args:
        tensors: all inputs (a configured base is an ordinary input).
        weights: α_i, used as given (not renormalized for the scale); default 1/N each, which
            is the only choice mergekit's `karcher` method makes.
        max_iter: the iteration limit.
        tol: validity, skip-angle, stop and renormalization threshold.

    Returns:
        The fp32 (fp64) mean.

    Example:
        >>> karcher([torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0])])
        tensor([1.4142, 1.4142])
    """
    _check_inputs("karcher", tensors)
    dtype = compute_dtype(*tensors)
    alphas = ([1.0 / len(tensors)] * len(tensors) if weights is None
              else _per_input("karcher weight", weights, len(tensors)))
    xs = [t.to(dtype) for t in tensors]
    if len(xs) == 1:
        return xs[0].clone() if xs[0] is tensors[0] else xs[0]
    norms = [torch.linalg.vector_norm(x) for x in xs]
    units = [torch.zeros_like(x) if n.item() == 0 else x / n
             for x, n in zip(xs, norms, strict=True)]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(xs[0])
    alpha_sum = sum(alphas[i] for i in valid)
    a_hat = [alphas[i] / alpha_sum for i in valid]
    u = [units[i] for i in valid]

    mean = torch.zeros_like(u[0])
    for a, ui in zip(a_hat, u, strict=True):
        mean += a * ui
    mean_norm = torch.linalg.vector_norm(mean)
    mean = u[0].clone() if mean_norm.item() < tol else mean / mean_norm
    for _ in range(max_iter):
        grad = torch.zeros_like(mean)
        for a, ui in zip(a_hat, u, strict=True):
            c = torch.clamp(torch.dot(mean.reshape(-1), ui.reshape(-1)), -1.0, 1.0)
            phi = torch.arccos(c)
            if phi.item() < tol:
                continue
            grad += a * (phi / torch.sin(phi)) * (ui - c * mean)
        grad_norm = torch.linalg.vector_norm(grad)
        if grad_norm.item() < tol:
            break
        mean = torch.cos(grad_norm) * mean + torch.sin(grad_norm) * (grad / grad_norm)
        unit_norm = torch.linalg.vector_norm(mean)
        if unit_norm.item() > tol:
            mean = mean / unit_norm
    scale = sum(a * n for a, n in zip(alphas, norms, strict=True))
    return scale * mean


# --------------------------------------------------------------------------------------------
# Task arithmetic family


def generalized_task_arithmetic(
        base: torch.Tensor, tensors: Sequence[torch.Tensor], *, weights: Floats,
        densities: Floats = 1.0, sparsify: str | None = None, consensus: str | None = None,
        lambda_: float = 1.0, normalize: bool = False, rescale: bool = False,
        gamma: Floats = 0.01, epsilon: Floats = 0.15, int8_mask: bool = False,
        generator: torch.Generator | None = None) -> torch.Tensor:
    """Task arithmetic with optional pruning and sign consensus: the kernel of 8 methods.

    Formula (per tensor, in order): M = 0 returns θ_b. τ_i = θ_i − θ_b;
    τ̃_i = sparsify(τ_i; d_i, γ_i | ε_i, rescale) on |τ_i| of each model alone (weights never
    change the selection); δ_i = w_i·τ̃_i. With consensus: s = elected sign of Σδ
    (`sparsify.elect_sign`), m_i = [sign δ_i = s], Δ = Σ m_i δ_i, D = Σ m_i w_i elementwise
    (D = 0 → 1). Without: Δ = Σ δ_i, D = Σ w_i (|D| < 1e-8 → 1). If `normalize`, Δ ← Δ/D; if
    λ ≠ 1, Δ ← λΔ; out = θ_b + Δ. Negative weights are allowed (with normalize a lone
    negative weight cancels).

    Papers: Ilharco et al. 2022 (task arithmetic), https://arxiv.org/abs/2212.04089; TIES,
    DARE, breadcrumbs, DELLA (see the named wrappers).
    Shapes: base and M × [...] → [...]. Oracle: mergekit 0.1.5 goldens for each named
    method (same seed for the random ones).

    Args:
        base: θ_b.
        tensors: θ_1 … θ_M.
        weights: w_i, one per non-base input.
        densities: d_i (unused without a sparsifier).
        sparsify: None or one of `sparsify.SPARSIFIERS`.
        consensus: None or one of `sparsify.CONSENSUS_METHODS`.
        lambda_: the final scale λ (mergekit's `lambda`).
        normalize: divide by D.
        rescale: L1 rescaling inside the sparsifier.
        gamma: breadcrumbs' outlier fraction γ_i.
        epsilon: DELLA's half-width ε_i.
        int8_mask: hold signs as int8 in the consensus (less memory, same result).
        generator: required with the "random" and "della_magprune" sparsifiers.

    Returns:
        The fp32 (fp64) merged tensor.

    Raises:
        ValueError: unknown sparsifier/consensus, no generator for a random one, counts or
            shapes that do not line up, or the sparsifier's own errors (DELLA's ε, rows of 1).

    Example:
        >>> base = torch.zeros(3)
        >>> task_arithmetic(base, [torch.tensor([1.0, 2.0, 3.0])], weights=[0.5])
        tensor([0.5000, 1.0000, 1.5000])
    """
    _check_inputs("task arithmetic", [base, *tensors])
    if sparsify is not None and sparsify not in SPARSIFIERS:
        raise ValueError(f"unknown sparsifier {sparsify!r}; expected one of "
                         f"{', '.join(SPARSIFIERS)}")
    if consensus is not None and consensus not in CONSENSUS_METHODS:
        raise ValueError(f"unknown sign consensus {consensus!r}; expected 'sum' or 'count'")
    if sparsify in ("random", "della_magprune") and generator is None:
        raise ValueError(f"the {sparsify!r} sparsifier is random: pass a torch.Generator")
    m = len(tensors)
    dtype = compute_dtype(base, *tensors)
    b = base.to(dtype)
    if m == 0:
        return b.clone() if b is base else b
    w = _per_input("weight", weights, m)
    d = _per_input("density", densities, m)
    g = _per_input("gamma", gamma, m)
    e = _per_input("epsilon", epsilon, m)

    deltas = torch.empty((m, *b.shape), dtype=dtype, device=b.device)
    for i, x in enumerate(tensors):
        tau = x.to(dtype) - b
        if sparsify is not None:
            tau = sparsify_delta(tau, sparsify, density=d[i], rescale=rescale, gamma=g[i],
                                 epsilon=e[i], generator=generator)
        deltas[i] = tau
        del tau
    wt = torch.tensor(w, dtype=dtype, device=b.device).reshape((m,) + (1,) * b.dim())
    deltas.mul_(wt)

    if consensus is not None:
        agree = sign_consensus_mask(deltas, method=consensus, int8=int8_mask)
        mixed = (deltas * agree).sum(dim=0)
        divisor = (wt * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = wt.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    del deltas
    if normalize:
        mixed /= divisor
    if lambda_ != 1:
        mixed *= lambda_
    return b + mixed


def task_arithmetic(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, weights: Floats,
                    densities: Floats = 1.0, lambda_: float = 1.0, normalize: bool = False,
                    rescale: bool = False, int8_mask: bool = False) -> torch.Tensor:
    """Task arithmetic: ``θ_b + λ·Σ w_i τ_i`` (÷ Σw if `normalize`, default false).

    `densities` and `rescale` are accepted, as mergekit accepts them, and have no effect.
    Paper: Ilharco et al. 2022, https://arxiv.org/abs/2212.04089. Shapes, oracle, errors:
    `generalized_task_arithmetic`.

    Example:
        >>> task_arithmetic(torch.zeros(2), [torch.ones(2), -torch.ones(2)], weights=[1, 0.5])
        tensor([0.5000, 0.5000])
    """
    return generalized_task_arithmetic(
        base, tensors, weights=weights, densities=densities, lambda_=lambda_,
        normalize=normalize, rescale=rescale, int8_mask=int8_mask)


def ties(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, weights: Floats,
         densities: Floats = 1.0, lambda_: float = 1.0, normalize: bool = True,
         rescale: bool = False, int8_mask: bool = False) -> torch.Tensor:
    """TIES: magnitude top-k per model, sign election, disjoint mean (normalize default true).

    Paper: Yadav et al. 2023, https://arxiv.org/abs/2306.01708. Formula, shapes, oracle,
    errors: `generalized_task_arithmetic` with sparsify="magnitude", consensus="sum".

    Example:
        >>> ties(torch.zeros(2), [torch.tensor([1.0, -1.0]), torch.tensor([3.0, 1.0])],
        ...      weights=[1, 1])
        tensor([2., 1.])
    """
    return generalized_task_arithmetic(
        base, tensors, weights=weights, densities=densities, sparsify="magnitude",
        consensus="sum", lambda_=lambda_, normalize=normalize, rescale=rescale,
        int8_mask=int8_mask)


def dare_linear(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, weights: Floats,
                densities: Floats = 1.0, lambda_: float = 1.0, normalize: bool = False,
                rescale: bool = True, int8_mask: bool = False,
                generator: torch.Generator) -> torch.Tensor:
    """DARE without sign consensus: Bernoulli(d) drop per model, L1 rescale (default true).

    Paper: Yu et al. 2023, https://arxiv.org/abs/2311.03099. Formula, shapes, oracle,
    errors: `generalized_task_arithmetic` with sparsify="random", no consensus.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> dare_linear(torch.zeros(4), [torch.ones(4)], weights=[1], densities=[0.5],
        ...             generator=g)
        tensor([1.3333, 0.0000, 1.3333, 1.3333])
    """
    return generalized_task_arithmetic(
        base, tensors, weights=weights, densities=densities, sparsify="random",
        lambda_=lambda_, normalize=normalize, rescale=rescale, int8_mask=int8_mask,
        generator=generator)


def dare_ties(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, weights: Floats,
              densities: Floats = 1.0, lambda_: float = 1.0, normalize: bool = False,
              rescale: bool = True, int8_mask: bool = False,
              generator: torch.Generator) -> torch.Tensor:
    """DARE with TIES sign consensus (normalize default **false**, rescale true).

    Paper: Yu et al. 2023, https://arxiv.org/abs/2311.03099. Formula, shapes, oracle,
    errors: `generalized_task_arithmetic` with sparsify="random", consensus="sum".

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> dare_ties(torch.zeros(2), [torch.ones(2)], weights=[1], generator=g)
        tensor([1., 1.])
    """
    return generalized_task_arithmetic(
        base, tensors, weights=weights, densities=densities, sparsify="random",
        consensus="sum", lambda_=lambda_, normalize=normalize, rescale=rescale,
        int8_mask=int8_mask, generator=generator)


def breadcrumbs(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, weights: Floats,
                densities: Floats = 1.0, gamma: Floats = 0.01, lambda_: float = 1.0,
                normalize: bool = False, rescale: bool = False,
                int8_mask: bool = False) -> torch.Tensor:
    """Model breadcrumbs: drop small entries and the γ largest outliers per model, then sum.

    Deterministic. Paper: Davari & Belilovsky 2023, https://arxiv.org/abs/2312.06795.
    Formula, shapes, oracle, errors: `generalized_task_arithmetic` with
    sparsify="magnitude_outliers", no consensus.

    Example:
        >>> breadcrumbs(torch.zeros(4), [torch.tensor([4.0, 3.0, 2.0, 1.0])], weights=[1],
        ...             densities=[0.5], gamma=[0.25])
        tensor([0., 3., 2., 0.])
    """
    return generalized_task_arithmetic(
        base, tensors, weights=weights, densities=densities, sparsify="magnitude_outliers",
        lambda_=lambda_, normalize=normalize, rescale=rescale, gamma=gamma,
        int8_mask=int8_mask)


def breadcrumbs_ties(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, weights: Floats,
                     densities: Floats = 1.0, gamma: Floats = 0.01, lambda_: float = 1.0,
                     normalize: bool = False, rescale: bool = False,
                     int8_mask: bool = False) -> torch.Tensor:
    """Breadcrumbs pruning with TIES sign consensus (normalize default **false**).

    Paper: Davari & Belilovsky 2023, https://arxiv.org/abs/2312.06795. Formula, shapes,
    oracle, errors: `generalized_task_arithmetic` with sparsify="magnitude_outliers",
    consensus="sum".

    Example:
        >>> breadcrumbs_ties(torch.zeros(2), [torch.tensor([1.0, -1.0])], weights=[1])
        tensor([ 1., -1.])
    """
    return generalized_task_arithmetic(
        base, tensors, weights=weights, densities=densities, sparsify="magnitude_outliers",
        consensus="sum", lambda_=lambda_, normalize=normalize, rescale=rescale, gamma=gamma,
        int8_mask=int8_mask)


def della(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, weights: Floats,
          densities: Floats = 1.0, epsilon: Floats = 0.15, lambda_: float = 1.0,
          normalize: bool = True, rescale: bool = True, int8_mask: bool = False,
          generator: torch.Generator) -> torch.Tensor:
    """DELLA: rank-dependent random drop (MAGPRUNE), sign consensus (normalize default true).

    Paper: Deep et al. 2024, https://arxiv.org/abs/2406.11617. Formula, shapes, oracle,
    errors: `generalized_task_arithmetic` with sparsify="della_magprune", consensus="sum".

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> della(torch.zeros(2), [torch.ones(2)], weights=[1], generator=g)
        tensor([1., 1.])
    """
    return generalized_task_arithmetic(
        base, tensors, weights=weights, densities=densities, sparsify="della_magprune",
        consensus="sum", lambda_=lambda_, normalize=normalize, rescale=rescale,
        epsilon=epsilon, int8_mask=int8_mask, generator=generator)


def della_linear(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, weights: Floats,
                 densities: Floats = 1.0, epsilon: Floats = 0.15, lambda_: float = 1.0,
                 normalize: bool = False, rescale: bool = True, int8_mask: bool = False,
                 generator: torch.Generator) -> torch.Tensor:
    """DELLA without sign consensus (normalize default false, rescale true).

    Paper: Deep et al. 2024, https://arxiv.org/abs/2406.11617. Formula, shapes, oracle,
    errors: `generalized_task_arithmetic` with sparsify="della_magprune", no consensus.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> della_linear(torch.zeros(2), [torch.ones(2)], weights=[2], generator=g)
        tensor([2., 2.])
    """
    return generalized_task_arithmetic(
        base, tensors, weights=weights, densities=densities, sparsify="della_magprune",
        lambda_=lambda_, normalize=normalize, rescale=rescale, epsilon=epsilon,
        int8_mask=int8_mask, generator=generator)


def sce(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, select_topk: float = 1.0,
        int8_mask: bool = False) -> torch.Tensor:
    """SCE: select high-variance entries, weight task vectors by their energy, erase sign
    conflicts.

    Formula: T = stack(τ_i). Select (f < 1): T ← T ⊙ `sparsify.sce_topk_mask`(T, f).
    Erase: e_i = [sign τ_i = s], s the **unweighted** elected sign of Σ τ_i. Calculate:
    c_i = mean(τ_i²) over the (selected) tensor, ω_i = c_i/Σc (1/M if Σc < 1e-6 — an absolute
    threshold, so small fine-tuning deltas usually get uniform weights). out = θ_b +
    Σ ω_i e_i τ_i / max(Σ ω_i e_i, 1e-6). No user weights. M = 0 returns θ_b.

    Paper: Wan et al. 2024, "FuseChat", https://arxiv.org/abs/2408.07990.
    Shapes: base and M × [...] → [...]. Oracle: mergekit 0.1.5 `sce` goldens.

    Args:
        base: θ_b.
        tensors: θ_1 … θ_M.
        select_topk: the fraction f of entries kept by variance.
        int8_mask: signs held as int8 (same result).

    Returns:
        The fp32 (fp64) merged tensor.

    Example:
        >>> sce(torch.zeros(2), [torch.tensor([1.0, -1.0]), torch.tensor([1.0, 1.0])])
        tensor([1., 1.])
    """
    _check_inputs("sce", [base, *tensors])
    dtype = compute_dtype(base, *tensors)
    b = base.to(dtype)
    if not tensors:
        return b.clone() if b is base else b
    deltas = torch.stack([x.to(dtype) - b for x in tensors])
    if select_topk < 1:
        deltas = deltas * sce_topk_mask(deltas, fraction=select_topk).unsqueeze(0)
    agree = sign_consensus_mask(deltas, method="sum", int8=int8_mask)
    energy = deltas.square().reshape(len(tensors), -1).mean(dim=1)
    total = energy.sum().item()
    omega = (torch.full_like(energy, 1.0 / len(tensors)) if abs(total) < 1e-6
             else energy / total)
    omega = omega.reshape((len(tensors),) + (1,) * b.dim()) * agree
    return b + (deltas * omega).sum(dim=0) / omega.sum(dim=0).clamp(min=1e-6)


def model_stock(base: torch.Tensor, tensors: Sequence[torch.Tensor], *,
                filter_wise: bool = False) -> torch.Tensor:
    """Model Stock: move from the base toward the average by a factor set by the angle.

    Formula: o_i = w_i − w_0 per vector (the whole tensor flattened, or with `filter_wise`
    each last-axis row; a 1-D tensor is one row). cos θ = mean over pairs i < j of
    clamp(o_i·o_j / max(‖o_i‖‖o_j‖, 1e-6), −1, 1) (no arccos). t = N cos θ/(1 + (N−1)cos θ),
    or 0 where |1 + (N−1)cos θ| < 1e-6; not clamped. out = t·(1/N)Σ w_i + (1 − t)·w_0.

    Paper: Jang et al. 2024, "Model Stock", https://arxiv.org/abs/2403.19522.
    Shapes: base and N ≥ 2 × [...] → [...]. Oracle: mergekit 0.1.5 `model_stock` goldens.

    Args:
        base: w_0.
        tensors: w_1 … w_N, N ≥ 2.
        filter_wise: one t per last-axis row instead of per tensor.

    Returns:
        The fp32 (fp64) merged tensor.

    Raises:
        ValueError: fewer than 2 non-base inputs.

    Example:
        >>> model_stock(torch.zeros(2), [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])])
        tensor([0., 0.])
    """
    _check_inputs("model_stock", [base, *tensors])
    if len(tensors) < 2:
        raise ValueError(f"model_stock needs at least 2 non-base inputs, got {len(tensors)}")
    dtype = compute_dtype(base, *tensors)
    shape = base.shape
    w0 = base.to(dtype)
    ws = [x.to(dtype) for x in tensors]
    if filter_wise:
        if w0.dim() < 2:
            w0, ws = w0.reshape(1, -1), [x.reshape(1, -1) for x in ws]
    else:
        w0, ws = w0.reshape(-1), [x.reshape(-1) for x in ws]
    offsets = [x - w0 for x in ws]
    cosines = []
    for i, oi in enumerate(offsets):
        for oj in offsets[i + 1:]:
            scale = (torch.norm(oi, dim=-1) * torch.norm(oj, dim=-1)).clamp(min=1e-6)
            cosines.append(((oi * oj).sum(dim=-1) / scale).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos),
                    n * cos / torch.where(singular, torch.ones_like(denominator), denominator))
    average = sum(ws) / n
    return (t * average + (1 - t) * w0).reshape(shape)


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
    _check_inputs("nearswap", [a, b])
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
#: module, so a new method adds its kernel here and its `MethodSpec` in recipekit.merge, nothing
#: else
KERNELS: dict[str, Callable[..., torch.Tensor]] = {
    spec.kernel: globals()[spec.kernel] for spec in METHODS.values()}

__all__ = ["KERNELS", "METHODS", "MethodSpec", "ParamSpec", "apply_method",
           "generalized_task_arithmetic", "lerp", *KERNELS]


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
    if base is None and spec.base == "required":
        raise ValueError(f"{name} needs a base")
    if base is not None and spec.base == "ignored":
        raise ValueError(f"{name} takes no base: pass it as an ordinary input")
    n_total = len(inputs) + (base is not None)
    if n_total < spec.min_inputs or (spec.max_inputs is not None and n_total > spec.max_inputs):
        bound = (f"{spec.min_inputs}" if spec.max_inputs == spec.min_inputs
                 else f"{spec.min_inputs} to {spec.max_inputs or 'any number of'}")
        raise ValueError(f"{name} takes {bound} inputs (base included), got {n_total}")
    if len(inputs) < spec.min_non_base or (spec.max_non_base is not None
                                           and len(inputs) > spec.max_non_base):
        raise ValueError(f"{name} takes {spec.min_non_base} to "
                         f"{spec.max_non_base or 'any number of'} non-base inputs, "
                         f"got {len(inputs)}")
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

