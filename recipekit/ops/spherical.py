"""Spherical merge kernels of weighted inputs: nuslerp, multislerp and the Karcher mean.

(slerp of a pair lives in `ops.merge` with lerp: the executor runs both in row pieces.)

Formulas, defaults and oracles as in `recipekit.ops.merge`'s module docstring: fp32 (fp64)
compute, the caller rounds once; mergekit 0.1.5 goldens in tests/goldens/merge/.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from recipekit.ops.operands import Floats, check_inputs, per_input
from recipekit.ops.sparsify import compute_dtype

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
    check_inputs("nuslerp", [a, b] + ([base] if base is not None else []))
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
    check_inputs("multislerp", list(tensors) + ([base] if base is not None else []))
    w = per_input("multislerp weight", weights, len(tensors))
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
    check_inputs("karcher", tensors)
    dtype = compute_dtype(*tensors)
    alphas = ([1.0 / len(tensors)] * len(tensors) if weights is None
              else per_input("karcher weight", weights, len(tensors)))
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
