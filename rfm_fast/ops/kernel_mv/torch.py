"""Fast kernel mat-vec on the torch path: for each tile of evaluation points and centres, one GEMM for the
distances, kernel values in place, one GEMM into the (rows, c) accumulator. Extra memory: one tile."""

from __future__ import annotations

from typing import Optional

import torch

from ..common import plan_tiles
from ..kernel_matrix.torch import distance_tiles_for_values, kernel_values_


def kernel_mv(z: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, M: Optional[torch.Tensor], kernel: str,
              bandwidth: float, memory_budget: int) -> torch.Tensor:
    """z (m, d), x (n, d), alpha (n, c) -> K(z, x) @ alpha, (m, c)."""
    m, n, c = z.shape[0], x.shape[0], alpha.shape[1]
    tiles = distance_tiles_for_values(z, x, M, kernel, bandwidth)
    alpha = alpha.contiguous()
    out = torch.zeros(m, c, dtype=z.dtype, device=z.device)
    plan = plan_tiles(m, n, z.element_size(), memory_budget, tile_buffers=1, row_bytes=0, device=z.device)
    buf = torch.empty(plan.rows * plan.cols, dtype=z.dtype, device=z.device)
    for rows in plan.row_blocks(m):
        acc = out[rows]
        for cols in plan.col_blocks(n):
            tile = buf[: (rows.stop - rows.start) * (cols.stop - cols.start)].view(rows.stop - rows.start, -1)
            tiles.fill(rows, cols, tile)
            kernel_values_(tile, kernel)
            acc.addmm_(tile, alpha[cols])
    return out
