"""Fast kernel mat-vec on the torch path: for each tile of evaluation points and centres, one GEMM for the
distances, kernel values in place, one GEMM into the (rows, c) accumulator. Extra memory: one tile, and transposed
(c, n) and (c, m) copies of alpha and of the output.

When the evaluation points are the centres (every kernel ridge solve), K is symmetric: each tile between two
blocks is computed once and applied twice (out_I += K_IJ alpha_J, out_J += K_IJ^T alpha_I; see SymmetricPlan in
rfm_fast/ops/common.py), which halves the distance GEMMs and the kernel-value passes that dominate this op.
The output is the only accumulator, so this needs no more memory than the one-sided schedule (one strip of a
block instead of one tile)."""

from __future__ import annotations

from typing import Optional

import torch

from ..common import DIRECT_DISTANCE_MAX_D, plan_symmetric, plan_tiles, same_points, strip_rows
from ..kernel_matrix.torch import distance_tiles_for_values, kernel_values_


def kernel_mv(z: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, M: Optional[torch.Tensor], kernel: str,
              bandwidth: float, memory_budget: int) -> torch.Tensor:
    """z (m, d), x (n, d), alpha (n, c) -> K(z, x) @ alpha, (m, c)."""
    out = symmetric_kernel_mv(z, x, alpha, M, kernel, bandwidth, memory_budget)
    if out is not None:
        return out
    m, n, c = z.shape[0], x.shape[0], alpha.shape[1]
    tiles = distance_tiles_for_values(z, x, M, kernel, bandwidth)
    out = torch.empty(m, c, dtype=z.dtype, device=z.device)
    plan = plan_tiles(m, n, z.element_size(), memory_budget, tile_buffers=1, row_bytes=0, device=z.device)
    buf = torch.empty(plan.rows * plan.cols, dtype=z.dtype, device=z.device)
    # Transposed accumulation, alpha^T K_tile^T into out^T: see _symmetric_mv for why.
    alpha_t = alpha.T.contiguous()
    out_t = torch.zeros(c, m, dtype=z.dtype, device=z.device)
    for rows in plan.row_blocks(m):
        acc = out_t[:, rows]
        for cols in plan.col_blocks(n):
            tile = buf[: (rows.stop - rows.start) * (cols.stop - cols.start)].view(rows.stop - rows.start, -1)
            tiles.fill(rows, cols, tile)
            kernel_values_(tile, kernel)
            acc.addmm_(alpha_t[:, cols], tile.T)
    out.copy_(out_t.T)
    return out


def symmetric_kernel_mv(z: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, M: Optional[torch.Tensor],
                        kernel: str, bandwidth: float, memory_budget: int, values=None) -> Optional[torch.Tensor]:
    """K(x, x) alpha on the symmetric schedule, with ``values(tile, sign)`` as the kernel-value pass on a tile
    holding sign * scaled squared distances (default the torch passes; the cpp backend passes its compiled one), or None when the inputs do not take that schedule (z not
    equal to x, small d where distances are formed directly): decided before any per-call work is done."""
    if z.shape[1] <= DIRECT_DISTANCE_MAX_D or not same_points(z, x):
        return None
    # Only strips of a block are held, well within any budget plan_symmetric accepts.
    sym = plan_symmetric(x.shape[0], z.element_size(), memory_budget, row_bytes=0, block_bytes=0, device=z.device)
    if sym is None:
        return None
    tiles = distance_tiles_for_values(z, x, M, kernel, bandwidth)
    out = torch.zeros(z.shape[0], alpha.shape[1], dtype=z.dtype, device=z.device)
    _symmetric_mv(tiles, alpha.contiguous(), kernel, sym, out, values)
    return out


def _symmetric_mv(tiles, alpha: torch.Tensor, kernel: str, plan, out: torch.Tensor, values=None) -> None:
    """out += K alpha for z equal to x, one tile per unordered pair of blocks (the whole output is one group).

    Each block tile is produced a strip of rows at a time and both of its products are taken while the strip is
    in cache: the mat-vec GEMMs are thin (c columns) and memory-bound, so reading a whole block tile back from
    memory for them cost more than the halved elementwise work saved. They accumulate into the transposed output
    (c, n) from the transposed coefficients, alpha^T K_strip^T and alpha^T K_strip: MKL runs those 2-3x faster
    than K_strip alpha and K_strip^T alpha (measured: 73 + 106 us against 137 + 318 us per 256 x 1024 strip,
    c = 10, 2 cores)."""
    n = alpha.shape[0]
    blocks = plan.blocks(n)
    B = plan.block
    strip = min(B, strip_rows(out.device))
    buf = torch.empty(strip * B, dtype=out.dtype, device=out.device)
    alpha_t = alpha.T.contiguous()
    out_t = torch.zeros_like(alpha_t)
    for I, J, mirrored in plan.pairs(range(len(blocks)), len(blocks)):
        rows, cols = blocks[I], blocks[J]
        for start in range(rows.start, rows.stop, strip):
            part = slice(start, min(rows.stop, start + strip))
            view = buf[:(part.stop - part.start) * (cols.stop - cols.start)].view(part.stop - part.start, -1)
            tiles.fill(part, cols, view)
            if values is None:
                kernel_values_(view, kernel)
            else:
                values(view, tiles.sign)
            out_t[:, part].addmm_(alpha_t[:, cols], view.T)
            if mirrored:
                out_t[:, cols].addmm_(alpha_t[:, part], view)
    out.add_(out_t.T)
