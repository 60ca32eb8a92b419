"""Kernel mat-vec as one KeOps reduction: f(z_j) = sum_i k(z_j, x_i) alpha_i, with the m x n kernel evaluated on
the fly (formula and parameters: rfm_fast/backends/keops.py). Extra memory: the metric-transformed copies of the
points when M is given; nothing of size m x n.
"""

from __future__ import annotations

from typing import Optional

import torch

from ...backends import keops as _keops


def kernel_mv(z: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, M: Optional[torch.Tensor], kernel: str,
              bandwidth: float, memory_budget: Optional[int] = None) -> torch.Tensor:
    """z (m, d), x (n, d), alpha (n, c) -> K_M(z, x) @ alpha, (m, c), in z's dtype and on its device.

    float32 / float64, CPU or CUDA tensors (KeOps compiles the formula for (dtype, d, c) on first use).
    ``memory_budget`` is accepted for the common signature; the reduction needs no working memory beyond its
    output.
    """
    m, d, c = z.shape[0], z.shape[1], alpha.shape[1]
    if m == 0:
        return z.new_zeros(0, c)
    points = _keops.euclidean_points(z, x, M)
    p = _keops.kernel_params(kernel, bandwidth, z)
    return _keops.reduce(_keops.genred("mv", d, c, points.compensated), points, slice(None), alpha, p)
