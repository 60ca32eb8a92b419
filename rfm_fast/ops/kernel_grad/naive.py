"""Reference gradient of the kernel predictor from the formula (docs/maths.md):

    laplace:  J(z) = sum_i alpha_i (-(1/L) k_M(z, x_i) / ||z - x_i||_M) (M (z - x_i))^T,  0 where z = x_i
    gaussian: J(z) = sum_i alpha_i (-(1/L^2) k_M(z, x_i)) (M (z - x_i))^T

Slow, obviously right, float64-capable, any device.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..kernel_matrix.naive import (kernel_of_sq_dist, metric_distances, metric_factor, metric_matrix,
                                  pair_differences)


def kernel_grad(z: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, M: Optional[torch.Tensor], kernel: str,
                bandwidth: float) -> torch.Tensor:
    """z (m, d), x (n, d), alpha (n, c) -> J (m, c, d)."""
    S = metric_factor(M, z)
    Mf = None if S is not None else metric_matrix(M, z.shape[1], z)
    m, d, c = z.shape[0], z.shape[1], alpha.shape[1]
    out = torch.empty(m, c, d, dtype=z.dtype, device=z.device)
    for rows, diff in pair_differences(z, x):
        sq, mdiff = metric_distances(diff, Mf, S)
        k = kernel_of_sq_dist(sq, kernel, bandwidth)
        if kernel == "laplace":
            r = torch.sqrt(sq)
            w = torch.where(r > 0, -k / (bandwidth * r), torch.zeros_like(r))
        else:
            w = -k / bandwidth**2
        out[rows] = torch.einsum("bn,nc,bnd->bcd", w, alpha, mdiff)
    return out
