"""Fast kernel matrix on the torch path: GEMM-expanded distances (exact near zero), kernel values in place.

The (m, n) output is the result itself; the only extra memory is O((m + n) d) for the transformed points.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..common import DistanceTiles, metric_sqrt, plan_tiles


def distance_tiles_for_values(z, x, M, kernel: str, bandwidth: float) -> DistanceTiles:
    """Tiles holding what the kernel-value pass needs: (r/L)^2 for Laplace, -r^2/(2 L^2) for Gaussian."""
    S = metric_sqrt(M, z.dtype)
    if kernel == "laplace":
        return DistanceTiles(z, x, M, S, scale=1.0 / bandwidth**2, sign=1.0)
    return DistanceTiles(z, x, M, S, scale=0.5 / bandwidth**2, sign=-1.0)


def kernel_values_(tile: torch.Tensor, kernel: str) -> torch.Tensor:
    """In place: (r/L)^2 -> exp(-r/L) (Laplace), or -r^2/(2L^2) -> exp(-r^2/(2L^2)) (Gaussian)."""
    if kernel == "laplace":
        tile.sqrt_().neg_()
    return tile.exp_()


def kernel_matrix(z: torch.Tensor, x: torch.Tensor, M: Optional[torch.Tensor], kernel: str, bandwidth: float,
                  memory_budget: int) -> torch.Tensor:
    """z (m, d), x (n, d) -> K (m, n), K[j, i] = k_M(z_j, x_i)."""
    m, n = z.shape[0], x.shape[0]
    tiles = distance_tiles_for_values(z, x, M, kernel, bandwidth)
    out = torch.empty(m, n, dtype=z.dtype, device=z.device)
    # Full-width row blocks: each block of the output is contiguous and is computed in place.
    plan = plan_tiles(m, n, z.element_size(), memory_budget, tile_buffers=0, row_bytes=0)
    for rows in plan.row_blocks(m):
        block = out[rows]
        tiles.fill(rows, slice(0, n), block)
        kernel_values_(block, kernel)
    return out
