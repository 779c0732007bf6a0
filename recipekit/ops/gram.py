"""Spherical and angle-based merges from the inputs' Gram matrix: one pass, then a linear sum.

Why: model_stock (per tensor), karcher, multislerp and nuslerp (`flatten`) need norms and dot
products of whole flattened tensors, so their kernels (`ops.spherical`, `ops.task_arithmetic`)
hold every input whole in fp32 — ~29 GiB for a 70B `lm_head`. Yet every number they compute
is a function of the pairwise dots G_ij = v_i·v_j of their vectors (the inputs, or their
offsets from the base), and their output is a linear combination of those vectors: the
mean direction of karcher and multislerp stays in span{v_i}. So `gram` reads row pieces once
and folds a K×K fp64 matrix, the functions below replay each kernel's steps on G (every
threshold, eps and degenerate branch, in the same order) to get one coefficient per vector,
and `linear_combine` writes any rows: out = [θ_b +] Σ c_i v_i.

Numerics: the vectors are those of the kernels (x_i − θ_b in the compute dtype); their dots are
exact fp64 products summed in fp64 per piece and folded in piece order (the same bytes for
any worker count); coefficients are fp64 and the sum is fp64, rounded once by the caller. The
kernels reduce in fp32, so the two agree to ~1e-6 relative, not bit for bit (a threshold
decision that falls within that noise — karcher's stop at ‖g‖ ≈ tol — can differ).
Oracle: tests/ops/test_gram.py (each function against its whole-tensor kernel).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from recipekit.ops.spherical import NUSLERP_COLLINEAR

__all__ = ["gram", "karcher_coefficients", "linear_combine", "model_stock_coefficients",
           "multislerp_coefficients", "nuslerp_coefficients", "nuslerp_column_coefficients",
           "nuslerp_column_sums", "nuslerp_t"]

Vectors = Callable[[int, int, tuple[Any, ...]], Sequence[torch.Tensor]]


def gram(source: Any, vectors: Vectors, k: int) -> torch.Tensor:
    """G = VVᵀ over every row piece of ``source`` (a `RowSource`), fp64 [k, k] on the CPU.

    ``vectors(lo, hi, pieces)`` gives the k vectors' rows of one piece (any shape); each piece
    contributes the exact fp64 products of its values summed in fp64, and the partials are
    added in piece order, so the result depends only on the pieces (`graph.passes`).
    """

    def piece(lo: int, hi: int, pieces: tuple[Any, ...]) -> torch.Tensor:
        vs = vectors(lo, hi, pieces)
        v = torch.empty((k, vs[0].numel()), dtype=torch.float64, device=vs[0].device)
        for i, x in enumerate(vs):
            v[i] = x.reshape(-1)
        return v @ v.T

    total = torch.zeros((k, k), dtype=torch.float64)
    for part in source.map(piece):
        total += part.cpu()
    return total


def _norms(g: torch.Tensor) -> list[float]:
    return [math.sqrt(max(float(g[i, i]), 0.0)) for i in range(g.shape[0])]


def _quad(g: torch.Tensor, c: torch.Tensor) -> float:
    """‖Σ c_i v_i‖ from the Gram matrix (cᵀGc, clamped at 0 against rounding)."""
    return math.sqrt(max(float(c @ g @ c), 0.0))


def _clamp(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


def model_stock_coefficients(g: torch.Tensor) -> torch.Tensor:
    """model_stock's out = w_0 + Σ c_i o_i (o_i = w_i − w_0), from G_ij = o_i·o_j.

    Steps of `ops.task_arithmetic.model_stock` (flattened): cos_ij = clamp(G_ij /
    max(‖o_i‖‖o_j‖, 1e-6), −1, 1), their mean over pairs i < j; t = N cos/(1 + (N−1)cos), 0
    where |1 + (N−1)cos| < 1e-6; t·mean(w) + (1 − t)w_0 = w_0 + (t/N)Σ o_i, so c_i = t/N.
    """
    n = g.shape[0]
    norms = _norms(g)
    cosines = [_clamp(float(g[i, j]) / max(norms[i] * norms[j], 1e-6), -1.0, 1.0)
               for i in range(n) for j in range(i + 1, n)]
    cos = sum(cosines) / len(cosines)
    denominator = 1 + (n - 1) * cos
    t = 0.0 if abs(denominator) < 1e-6 else n * cos / denominator
    return torch.full((n,), t / n, dtype=torch.float64)


def nuslerp_t(weight_a: float, weight_b: float) -> float:
    """nuslerp's t = w_b/(w_a + w_b), or 0.5 when |w_a + w_b| < 1e-6 (`ops.spherical`)."""
    total = weight_a + weight_b
    return 0.5 if abs(total) < 1e-6 else weight_b / total


def nuslerp_coefficients(g: torch.Tensor, t: float) -> torch.Tensor:
    """nuslerp's (flattened) S(v0, v1) = c_0 v0 + c_1 v1, from the 2×2 Gram of v0, v1.

    Steps of `ops.spherical._slerp_vectors`: u = v/max(‖v‖, 1e-7), c = clamp(u0·u1, −1, 1);
    1 − c² ≤ `NUSLERP_COLLINEAR` gives (1 − t, t), else (sin((1 − t)θ), sin(tθ))/sin θ with
    θ = acos c (a zero vector has c = 0: orthogonal).
    """
    n0, n1 = _norms(g)
    cos = _clamp(float(g[0, 1]) / (max(n0, 1e-7) * max(n1, 1e-7)), -1.0, 1.0)
    if 1 - cos * cos <= NUSLERP_COLLINEAR:
        return torch.tensor([1 - t, t], dtype=torch.float64)
    theta = math.acos(cos)
    s = math.sin(theta)
    return torch.tensor([math.sin((1 - t) * theta) / s, math.sin(t * theta) / s],
                        dtype=torch.float64)


def nuslerp_column_sums(v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Σ over dim 0 of v0², v1² and v0·v1 for every position of the other axes: fp64
    [3, *shape[1:]] on the CPU, for any rows of nuslerp's `row_wise` vectors (axis 0).

    Each product is exact in fp64 and summed in fp64 over the rows given; the caller adds the
    sums of its row pieces in piece order (`nuslerp_column_coefficients` reads the total)."""
    a, b = v0.to(torch.float64), v1.to(torch.float64)
    return torch.stack([(a * a).sum(dim=0), (b * b).sum(dim=0), (a * b).sum(dim=0)]).cpu()


def nuslerp_column_coefficients(sums: torch.Tensor, t: float) -> torch.Tensor:
    """nuslerp's `row_wise` S(v0, v1) = c_0 v0 + c_1 v1 per axis-0 vector: fp64
    [2, *shape[1:]] from the `nuslerp_column_sums` of the whole tensor.

    The steps of `nuslerp_coefficients`, elementwise over the vectors: norms clamped at
    1e-7, the cosine clamped to [−1, 1], (1 − t, t) where 1 − c² ≤ `NUSLERP_COLLINEAR`, else
    (sin((1 − t)θ), sin(tθ))/sin θ.
    """
    n0, n1 = sums[0].clamp(min=0).sqrt(), sums[1].clamp(min=0).sqrt()
    cos = (sums[2] / (n0.clamp(min=1e-7) * n1.clamp(min=1e-7))).clamp(-1.0, 1.0)
    collinear = (1 - cos * cos) <= NUSLERP_COLLINEAR
    theta = torch.acos(torch.where(collinear, torch.zeros_like(cos), cos))
    s = torch.sin(theta)
    c0 = torch.where(collinear, torch.full_like(cos, 1 - t), torch.sin((1 - t) * theta) / s)
    c1 = torch.where(collinear, torch.full_like(cos, t), torch.sin(t * theta) / s)
    return torch.stack([c0, c1])


def multislerp_coefficients(g: torch.Tensor, weights: Sequence[float], *,
                            normalize_weights: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """multislerp's out = [θ_b +] Σ c_i x_i (M ≥ 2), from G_ij = x_i·x_j.

    Steps of `ops.spherical.multislerp` on coefficient vectors over the x_i: u_i = d_i x_i
    with d_i = 1/(n_i + eps); the mean m = Σ w_i d_i x_i, ‖m‖ = √(aᵀGa); ‖m‖ < eps: (w_1, w_2)
    for M = 2, else ValueError; μ = a/‖m‖; u_i·m = d_i(Gμ)_i; v = Σ w_i u_i − (Σ w_i u_i·m)m;
    s = ‖v‖ + eps; out coefficients (cos s·μ + sin s/s·ν)·Σ w_i n_i.

    Raises:
        ValueError: the weighted mean direction vanishes for M > 2 (the kernel's message).
    """
    m = g.shape[0]
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.tensor(_norms(g), dtype=torch.float64)
    d = 1 / (norms + eps)
    a = w * d
    mean_norm = _quad(g, a)
    if mean_norm < eps:
        if m != 2:
            raise ValueError(
                "multislerp: the weighted mean direction of the inputs is zero (antipodal "
                "inputs whose weights balance out); change the weights")
        return w.clone()
    mu = a / mean_norm
    dots = d * (g @ mu)
    nu = w * d - float((w * dots).sum()) * mu
    s = _quad(g, nu) + eps
    return (mu * math.cos(s) + nu * (math.sin(s) / s)) * float((norms * w).sum())


def karcher_coefficients(g: torch.Tensor, weights: Sequence[float] | None = None, *,
                         max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """The Karcher mean's out = Σ c_i x_i (N ≥ 2), from G_ij = x_i·x_j.

    Steps of `ops.spherical.karcher`, with the mean m = Σ β_j x_j: u_j = x_j/n_j; valid n_j >
    tol (none: all zero); α̂ over the valid; β = α̂_j/n_j, normalized by √(βᵀGβ) (below tol:
    the first valid u); each iteration c_j = clamp((Gβ)_j/n_j, −1, 1), φ_j = acos c_j (skip
    φ_j < tol), γ = Σ α̂_j φ_j/sin φ_j (e_j/n_j − c_j β); stop when √(γᵀGγ) < tol, else β ←
    cos‖g‖β + sin‖g‖γ/‖g‖, renormalized above tol. out = (Σ α_i n_i)·β over all inputs.
    """
    n = g.shape[0]
    alphas = [1.0 / n] * n if weights is None else [float(x) for x in weights]
    norms = _norms(g)
    valid = [i for i, x in enumerate(norms) if x > tol]
    if not valid:
        return torch.zeros(n, dtype=torch.float64)
    alpha_sum = sum(alphas[i] for i in valid)
    a_hat = {i: alphas[i] / alpha_sum for i in valid}

    def unit(j: int) -> torch.Tensor:
        e = torch.zeros(n, dtype=torch.float64)
        e[j] = 1 / norms[j]
        return e

    beta = torch.zeros(n, dtype=torch.float64)
    for i in valid:
        beta += a_hat[i] * unit(i)
    mean_norm = _quad(g, beta)
    beta = unit(valid[0]) if mean_norm < tol else beta / mean_norm
    for _ in range(max_iter):
        gram_beta = g @ beta
        grad = torch.zeros(n, dtype=torch.float64)
        for j in valid:
            c = _clamp(float(gram_beta[j]) / norms[j], -1.0, 1.0)
            phi = math.acos(c)
            if phi < tol:
                continue
            grad += a_hat[j] * (phi / math.sin(phi)) * (unit(j) - c * beta)
        grad_norm = _quad(g, grad)
        if grad_norm < tol:
            break
        beta = math.cos(grad_norm) * beta + math.sin(grad_norm) * (grad / grad_norm)
        unit_norm = _quad(g, beta)
        if unit_norm > tol:
            beta = beta / unit_norm
    scale = sum(a * x for a, x in zip(alphas, norms, strict=True))
    return scale * beta


def linear_combine(vectors: Sequence[torch.Tensor], coefficients: torch.Tensor,
                   base: torch.Tensor | None = None) -> torch.Tensor:
    """[θ_b +] Σ c_i v_i in fp64 (any rows of the v_i: elementwise), a zero start so that an
    all-zero combination is +0 as the kernels' `zeros_like`."""
    acc = torch.zeros(vectors[0].shape, dtype=torch.float64, device=vectors[0].device)
    for v, c in zip(vectors, coefficients.tolist(), strict=True):
        acc.add_(v.to(torch.float64), alpha=c)
    if base is not None:
        acc.add_(base.to(torch.float64))
    return acc
