"""Randomized truncated SVD of a matrix seen only as row pieces (block Krylov, one pass per step).

Why: a full SVD of a 2048×5632 difference costs seconds and needs the whole fp32 matrix, yet a
rank-64 LoRA only wants the top 64 singular triplets. Randomized methods find them with
products by thin matrices, and each product is a sum over row pieces. On a CPU a pass costs
mostly forming the piece (reading two bf16 inputs, widening, subtracting), so the method here
gets the most out of each pass: a pass multiplies every piece twice, Y = ΔZ row by row and
W = ΔᵀΔZ = Σ Δ[lo:hi]ᵀ Y[lo:hi] folded in piece order, and every block is kept (block Krylov,
Musco & Musco, "Randomized Block Krylov Methods for Stronger and Faster Approximate Singular
Value Decomposition", NeurIPS 2015) rather than only the last (subspace iteration, Halko,
Martinsson & Tropp 2011, Alg. 4.4). ``power_iters = q`` gives the left Krylov space
span[ΔΩ, (ΔΔᵀ)ΔΩ, …, (ΔΔᵀ)^q ΔΩ] in q + 1 passes, where subspace iteration needs 2q + 2 for
its last block alone. Measured on a Gaussian 2048×2048 difference (flat spectrum, the hard
case) at rank 64: 6 passes of the old subspace iteration (block 80) erred 0.84% above the
Eckart–Young optimum, 5 passes here (block 128) 0.014%.

Only m×L and n×L matrices are kept (L = blocks × (rank + oversample) ≤ min(m, n)), never Δ.
Partial sums are folded in piece order, so the bytes do not depend on how many threads
computed the pieces. Oracle: tests/ops/test_lowrank.py (Eckart–Young against
`torch.linalg.svdvals` of the same matrices, flat and decaying spectra).

Precision: the fused pass forms ΔᵀΔZ without re-orthonormalizing ΔZ, so directions whose
singular value is below about √ε·σ₁ are lost to rounding, and those below `cutoff` (3·√ε·σ₁,
fp32: 1e-3·σ₁) are dropped: a difference whose top-rank spectrum falls that steeply (σ_r <
1e-3·σ₁, unusual for a fine-tune) gets fewer components, and wants ``method: exact``.

Pure math: no files; the caller says how to visit the pieces (`MapPieces`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

import torch

T = TypeVar("T")

#: ``map_pieces(fn)`` calls ``fn(lo, hi, piece)`` for every row piece ``piece = Δ[lo:hi]``
#: (in the working dtype) and yields the results in piece order.
MapPieces = Callable[[Callable[[int, int, torch.Tensor], T]], Iterable[T]]


def randomized_svd(map_pieces: MapPieces, rows: int, cols: int, *, rank: int,
                   oversample: int, power_iters: int, tolerance: float = 0.0,
                   generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu"
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top singular triplets (U (m, k), S (k,), Vh (k, n)) of Δ (m×n), k ≤ min(rank, m,
    n), from at most ``power_iters + 1`` passes over its row pieces.

    ``tolerance`` > 0 stops the passes early, after the second or a later one, once it took
    less than that fraction off the residual energy: E = Σ of the top-``rank`` eigenvalues of YᵀY
    (Ritz values of ΔᵀΔ on span R, which only grow with R), stop when Eᵢ − Eᵢ₋₁ ≤ tolerance ×
    (‖Δ‖²_F − Eᵢ), ‖Δ‖²_F summed in the first pass. Why: a fine-tune's difference has a
    decaying spectrum, found to rounding in 2–3 passes (tests/ops/test_lowrank.py), while a
    flat one keeps gaining through all of them; each pass costs as much as the first. Checked
    with an eigvalsh of YᵀY (L ≤ 512: ≤ 11 ms), which the Rayleigh–Ritz needs anyway.

    Ω (n×b, b = min(rank + ``oversample``, m, n)) is drawn from ``generator`` on the CPU (the
    same draw on every device) and Z₀ = qr(Ω). Pass i computes Yᵢ = ΔZᵢ and Wᵢ = ΔᵀYᵢ; the
    next block Zᵢ₊₁ is Wᵢ orthogonalized against R = [Z₀ … Zᵢ] (twice, classical
    Gram–Schmidt) and then orthonormalized. The passes stop early once R spans min(m, n)
    columns (then the result is an exact SVD up to rounding). With Y = [Y₀ …] = ΔR and
    W = ΔᵀY, Rayleigh–Ritz on the range of Y, in fp64 on L×L and L×n matrices: Y = K·T
    (Cholesky of YᵀY), B = KᵀΔ = T⁻ᵀWᵀ, B = Ũ·S·Vh (eigh of BBᵀ), U = KŨ = Y·T⁻¹·Ũ. When Y
    is nearly rank-deficient (a Cholesky pivot ≤ `cutoff` × the largest) an eigh of YᵀY =
    P·S_y²·Pᵀ replaces it and directions with S_y ≤ `cutoff` × the largest are dropped (Δ is
    below rounding there); components with S ≤ `cutoff` × S₁ are dropped too. So a
    rank-deficient Δ gives fewer than ``rank`` triplets (the caller pads), and Δ = 0 none.

    Example:
        >>> d = torch.outer(torch.arange(4.0), torch.ones(3))
        >>> fn = lambda f: [f(0, 2, d[:2]), f(2, 4, d[2:])]
        >>> u, s, vh = randomized_svd(fn, 4, 3, rank=1, oversample=1,
        ...                       power_iters=1, generator=torch.Generator().manual_seed(0))
        >>> torch.allclose((u * s) @ vh, d, atol=1e-5)
        True
    """
    limit = min(rows, cols)
    block = min(rank + oversample, limit)
    width = min(block * (power_iters + 1), limit)  # L: columns of R, Y and W
    y = torch.empty(rows, width, dtype=dtype, device=device)
    w = torch.empty(cols, width, dtype=dtype, device=device)
    basis = torch.empty(cols, width, dtype=dtype, device=device)  # R
    gram = torch.zeros(width, width, dtype=torch.float64, device=device)  # YᵀY, by blocks
    omega = torch.randn(cols, block, generator=generator, dtype=dtype).to(device)
    z = _orthonormal(omega)
    done, energy, before = 0, 0.0, None
    while True:
        end = done + z.shape[1]
        basis[:, done:end] = z
        square = _fused_pass(map_pieces, z, y[:, done:end], w[:, done:end],
                             norm=tolerance > 0 and done == 0)
        energy = square if done == 0 else energy
        _gram_block(y, gram, done, end)
        done = end
        if done == width:
            break
        if tolerance > 0:
            now = _ritz_energy(gram[:done, :done], rank)
            if before is not None and now - before <= tolerance * max(0.0, energy - now):
                break
            before = now
        r = basis[:, :done]
        nxt = w[:, done - z.shape[1]:done].clone()
        nxt -= r @ (r.T @ nxt)
        nxt -= r @ (r.T @ nxt)
        z = _orthonormal(nxt)[:, :width - done]
    del basis
    width = done
    y, w, gram = y[:, :width], w[:, :width], gram[:width, :width]
    # Rayleigh–Ritz in fp64 on small matrices (Cholesky and eigh of Gram matrices: LAPACK's
    # SVD of an L×n matrix costs seconds on a shared CPU, these a fraction of that)
    tri, info = torch.linalg.cholesky_ex(gram, upper=True)  # Y = K·T
    diag = tri.diagonal().abs()
    if int(info) == 0 and bool(diag.min() > diag.max() * cutoff(dtype)):
        b = torch.linalg.solve_triangular(tri.T, w.T.double(), upper=False)  # KᵀΔ = T⁻ᵀWᵀ
        keep = width
    else:  # Y (nearly) rank-deficient: drop its weak directions
        s_y, p = _descending_eigh(gram)
        s_y = s_y.clamp_min(0).sqrt()  # Y = K·diag(s_y)·Pᵀ
        keep = _count_above(s_y, cutoff(dtype))
        b = (p[:, :keep].T @ w.T.double()).div_(s_y[:keep, None])  # KᵀΔ = S⁻¹PᵀWᵀ
    del w, gram
    s2, u_b = _descending_eigh(b @ b.T)  # B = U_b·diag(s)·Vh
    s = s2[:keep].clamp_min(0).sqrt()
    k = min(rank, _count_above(s, cutoff(dtype)))
    s, u_b = s[:k], u_b[:, :k]
    vh = (u_b.T @ b).div_(s[:, None])
    if keep == width:  # U = K·U_b = Y·T⁻¹·U_b
        coef = torch.linalg.solve_triangular(tri, u_b, upper=True)
    else:  # U = Y·P·S⁻¹·U_b
        coef = p[:, :keep] @ (u_b / s_y[:keep, None])
    u = y @ coef.to(dtype)
    return u.contiguous(), s.to(dtype), vh.to(dtype).contiguous()


#: Values per row chunk of the fp64 Gram matrix YᵀY (8 MiB).
GRAM_ELEMS = 1 << 20


def _gram_block(y: torch.Tensor, gram: torch.Tensor, start: int, end: int) -> None:
    """Fill the columns ``start:end`` of YᵀY (and their mirror rows) in fp64, from Y's columns
    ``:end``, summed over row chunks in order (bounded memory, fixed bytes)."""
    step = max(1, GRAM_ELEMS // max(1, end))
    part = gram[:end, start:end]
    for lo in range(0, y.shape[0], step):
        chunk = y[lo:lo + step, :end].double()
        part.addmm_(chunk.T, chunk[:, start:])
    gram[start:end, :start] = gram[:start, start:end].T


def _ritz_energy(gram: torch.Tensor, rank: int) -> float:
    """The sum of the top-``rank`` eigenvalues of YᵀY = RᵀΔᵀΔR: Δ's energy in the best rank-r
    subspace of span R (`randomized_svd`'s stopping rule)."""
    return float(torch.linalg.eigvalsh(gram).flip(0)[:rank].clamp_min(0).sum())


def _descending_eigh(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (largest first) and eigenvectors (columns) of a symmetric matrix."""
    values, vectors = torch.linalg.eigh(g)
    return values.flip(0), vectors.flip(1)


def _count_above(s: torch.Tensor, relative: float) -> int:
    """How many of the descending ``s`` exceed ``relative`` × the largest (0 when it is 0)."""
    if s.numel() == 0 or not bool(s[0] > 0):
        return 0
    return int((s > s[0] * relative).sum())


def cutoff(dtype: torch.dtype) -> float:
    """Relative singular value of Y = ΔR below which its direction is dropped: 3·√ε.

    B's row for a direction with singular value s carries a rounding error of about
    ε·σ₁²/s (W = ΔᵀΔR is formed in one pass), i.e. a relative error ε·(σ₁/s)² ≤ 1/9 at the
    cut-off; such weak directions hold next to none of Δ's top-rank energy."""
    return 3.0 * torch.finfo(dtype).eps ** 0.5


def _fused_pass(map_pieces: MapPieces, z: torch.Tensor, y: torch.Tensor,
                w: torch.Tensor, *, norm: bool = False) -> float:
    """One pass: ``y`` = ΔZ row piece by row piece, ``w`` = ΔᵀΔZ = Σ Δ[lo:hi]ᵀ (ΔZ)[lo:hi]
    folded in piece order. Returns ‖Δ‖²_F (fp64, in piece order) when ``norm``, else 0."""
    total: torch.Tensor | None = None
    square = 0.0

    def piece(lo: int, hi: int, d: torch.Tensor
              ) -> tuple[int, int, torch.Tensor, torch.Tensor, float]:
        part = d @ z
        sq = float(torch.linalg.vector_norm(d, dtype=torch.float64) ** 2) if norm else 0.0
        return lo, hi, part, d.T @ part, sq

    for lo, hi, part, back, sq in map_pieces(piece):
        y[lo:hi] = part
        total = back if total is None else total.add_(back)
        square += sq
    assert total is not None, "a matrix with no rows"
    w.copy_(total)
    return square


def _orthonormal(y: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of y's columns (n×b, n ≥ b), in y's dtype: Cholesky QR twice in
    fp64 (CholeskyQR2, Fukaya et al. 2014), falling back to Householder QR when the Gram
    matrix is not positive definite (y rank-deficient, e.g. Δ = 0).

    Why not `torch.linalg.qr` alone: its LAPACK Householder QR of a 2048×128 block took 1.8 s
    with 2 intra-op threads on this project's shared 2-core machine (threads spinning against
    each other; 6 ms on one thread), where a Gram product, a Cholesky factor and a triangular
    solve take a few ms either way. In fp64 the twice-repeated factorization is orthonormal
    to rounding for blocks with condition numbers up to ~1e7."""
    q = y.double()
    for _ in range(2):
        r, info = torch.linalg.cholesky_ex(q.T @ q, upper=True)
        if int(info) != 0:
            return torch.linalg.qr(y, mode="reduced").Q
        q = torch.linalg.solve_triangular(r, q, upper=True, left=False)
    return q.to(y.dtype)


def factors_from_svd(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, *, rank: int,
                     transposed: bool, epsilon: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors (A (rank, in), B (out, rank)) from singular triplets of the stored Δ.

    A = diag(√S)·Vh and B = U·diag(√S) (mergekit's "distribute scale"); for a transposed
    module (embeddings, `Conv1D`: Δ stored (in, out)) M = Δᵀ = Vhᵀ S Uᵀ, so A = √S·Uᵀ and
    B = Vhᵀ·√S. Components with S ≤ ``epsilon`` are zeroed and missing ones padded with zeros,
    so the shapes are fixed whatever survives.

    Example:
        >>> u, s, vh = torch.linalg.svd(torch.eye(2))
        >>> a, b = factors_from_svd(u, s, vh, rank=3, transposed=False)
        >>> a.shape, b.shape
        (torch.Size([3, 2]), torch.Size([2, 3]))
    """
    k = s.shape[0]
    s = s.clone()
    if epsilon > 0:
        s[s <= epsilon] = 0
    root = s.sqrt()
    left, right = (vh.T, u.T) if transposed else (u, vh)
    a = root[:, None] * right
    b = left * root[None, :]
    if k < rank:
        a = torch.cat([a, a.new_zeros(rank - k, a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - k)], dim=1)
    return a.contiguous(), b.contiguous()
