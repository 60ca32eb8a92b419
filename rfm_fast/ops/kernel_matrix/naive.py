"""Reference kernel matrix, written from the formula (CONVENTIONS.md). Slow, obviously right, float64-capable.

    laplace:  k_M(z, x) = exp(-||z - x||_M / L)
    gaussian: k_M(z, x) = exp(-||z - x||_M^2 / (2 L^2)),   ||u||_M = sqrt(u^T M u)

M is None (identity), a (d,) diagonal or a (d, d) symmetric PSD matrix, used through its positive semi-definite
part: eigenvalues below zero (the rounding of a PSD matrix stored in float32 leaves some at -eps * e_max) are
clipped to 0, as in every backend. Works on any device and dtype.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

# Rows of z per step: keeps the (rows, n, d) difference tensor near 2^24 elements.
_CHUNK_ELEMS = 2**24


def metric_matrix(M: Optional[torch.Tensor], d: int, like: torch.Tensor) -> torch.Tensor:
    """M as a dense (d, d) matrix in the dtype and device of ``like``."""
    if M is None:
        return torch.eye(d, dtype=like.dtype, device=like.device)
    M = M.to(dtype=like.dtype, device=like.device)
    if M.ndim == 1:
        return torch.diag(M.clamp_min(0))
    M64 = M.to(torch.float64)
    evals, evecs = torch.linalg.eigh(0.5 * (M64 + M64.T))
    return ((evecs * evals.clamp_min(0)) @ evecs.T).to(M.dtype)


def pair_differences(z: torch.Tensor, x: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield (row slice, z[rows, None, :] - x[None, :, :]) in chunks of bounded size."""
    m, n, d = z.shape[0], x.shape[0], x.shape[1]
    step = max(1, _CHUNK_ELEMS // max(1, n * d))
    for start in range(0, m, step):
        rows = slice(start, min(m, start + step))
        yield rows, z[rows, None, :] - x[None, :, :]


def kernel_of_sq_dist(sq: torch.Tensor, kernel: str, bandwidth: float) -> torch.Tensor:
    if kernel == "laplace":
        return torch.exp(-torch.sqrt(sq) / bandwidth)
    return torch.exp(-sq / (2.0 * bandwidth**2))


def kernel_matrix(z: torch.Tensor, x: torch.Tensor, M: Optional[torch.Tensor], kernel: str,
                  bandwidth: float) -> torch.Tensor:
    """K[j, i] = k_M(z_j, x_i): z (m, d), x (n, d) -> (m, n)."""
    Mf = metric_matrix(M, z.shape[1], z)
    out = torch.empty(z.shape[0], x.shape[0], dtype=z.dtype, device=z.device)
    for rows, diff in pair_differences(z, x):
        sq = torch.einsum("bnd,de,bne->bn", diff, Mf, diff).clamp_min(0)
        out[rows] = kernel_of_sq_dist(sq, kernel, bandwidth)
    return out
