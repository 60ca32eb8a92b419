"""Reference kernel matrix, written from the formula (docs/maths.md). Slow, obviously right, float64-capable.

    laplace:  k_M(z, x) = exp(-||z - x||_M / L)
    gaussian: k_M(z, x) = exp(-||z - x||_M^2 / (2 L^2)),   ||u||_M = sqrt(u^T M u)

M is None (identity), a (d,) diagonal, a metric given by its factor S (M = S S^T, used through S), or a (d, d)
symmetric PSD matrix, used through its positive semi-definite
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


def metric_factor(M, like: torch.Tensor) -> Optional[torch.Tensor]:
    """For a metric given by its factor S (a rfm_fast.core.metric.MetricFactor), S in the dtype of ``like``;
    None for a matrix. With the factor, ||u||_M^2 = ||u S||^2 and M u = S (S^T u): forming S S^T instead would
    lose the small distances of a low-rank metric to the rounding of the dense product."""
    if M is None or isinstance(M, torch.Tensor):
        return None
    return M.source.to(device=like.device, dtype=like.dtype)


def metric_distances(diff: torch.Tensor, Mf: Optional[torch.Tensor], S: Optional[torch.Tensor]):
    """(squared distances, rows of M (z - x_i)) of a chunk of differences, by the dense M or the factor S."""
    if S is not None:
        t = diff @ S
        return (t * t).sum(-1), t @ S.T
    mdiff = diff @ Mf  # M symmetric
    return (mdiff * diff).sum(-1).clamp_min(0), mdiff


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
    S = metric_factor(M, z)
    Mf = None if S is not None else metric_matrix(M, z.shape[1], z)
    out = torch.empty(z.shape[0], x.shape[0], dtype=z.dtype, device=z.device)
    for rows, diff in pair_differences(z, x):
        sq = metric_distances(diff, Mf, S)[0]
        out[rows] = kernel_of_sq_dist(sq, kernel, bandwidth)
    return out
