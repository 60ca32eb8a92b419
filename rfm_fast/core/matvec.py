"""Kernel mat-vec f = K(z, x) alpha and the kernel matrix K itself, on finished value tiles (``tiles``).

Mat-vec: per tile one distance fill, the value pass, and one thin GEMM into the transposed output
(alpha^T K_tile^T into out^T: MKL runs those 2-3x faster than K_tile alpha, c = 10, 2 cores). When the evaluation
points are the centres (every kernel ridge solve) K is symmetric: each tile between two blocks is computed once,
a strip of rows at a time, and both of its products are taken while the strip is in cache (out_I += K_IJ alpha_J,
out_J += K_IJ^T alpha_I), halving the distance GEMMs and the value passes that dominate this op. The output is the
only accumulator, so this needs no more memory than the one-sided schedule.

Kernel matrix: the (m, n) output is the result; it is filled in full-width row blocks, in place.
"""

from __future__ import annotations

import torch

from .geometry import Geometry
from .plan import plan_symmetric, plan_tiles, strip_rows
from .tiles import TileEvaluator


def kernel_mv(geom: Geometry, alpha: torch.Tensor, evaluator: TileEvaluator, budget: int) -> torch.Tensor:
    """(m, c) = K alpha in the permuted order of the evaluation points (alpha (n, c) permuted like the centres)."""
    m, n, c, k = geom.m, geom.n, alpha.shape[1], min(1, geom.kdir)  # one difference buffer
    item = alpha.element_size()
    dev, dt = alpha.device, alpha.dtype
    alpha_t = alpha.T.contiguous()
    out_t = torch.zeros(c, m, dtype=dt, device=dev)
    vectors = 2 * (m + n) * c * item
    if geom.same:
        strip = strip_rows(dev)
        plan = plan_symmetric(n, budget - vectors, per_block_row=item * min(n, strip) * (1 + k), device=dev)
        if plan is not None:
            _symmetric(evaluator, geom, plan, alpha_t, out_t, min(plan.block, strip))
            return out_t.T.contiguous()
    plan = plan_tiles(m, n, budget - vectors, per_cell=item * (1 + k), device=dev, what="a mat-vec tile")
    buf = torch.empty(plan.rows * plan.cols, dtype=dt, device=dev)
    direct_buf = [torch.empty_like(buf) for _ in range(k)]
    for rows in plan.row_blocks(m):
        R = rows.stop - rows.start
        for cols in plan.col_blocks(n):
            size = R * (cols.stop - cols.start)
            tile = buf[:size].view(R, -1)
            evaluator.evaluate(rows, cols, tile, gradient=False, direct=[b[:size].view(R, -1) for b in direct_buf])
            out_t[:, rows].addmm_(alpha_t[:, cols], tile.T)
    return out_t.T.contiguous()


def _symmetric(evaluator, geom, plan, alpha_t, out_t, strip):
    blocks = geom.blocks(plan.block)
    B = plan.block
    buf = torch.empty(strip * B, dtype=out_t.dtype, device=out_t.device)
    direct_buf = [torch.empty_like(buf) for _ in range(min(1, geom.kdir))]
    for I, J, mirrored in plan.pairs(range(len(blocks)), len(blocks)):
        rows, cols = blocks[I], blocks[J]
        for s0 in range(rows.start, rows.stop, strip):
            part = slice(s0, min(rows.stop, s0 + strip))
            R = part.stop - part.start
            size = R * (cols.stop - cols.start)
            view = buf[:size].view(R, -1)
            evaluator.evaluate(part, cols, view, gradient=False,
                               direct=[b[:size].view(R, -1) for b in direct_buf])
            out_t[:, part].addmm_(alpha_t[:, cols], view.T)
            if mirrored:
                out_t[:, cols].addmm_(alpha_t[:, part], view)


def kernel_matrix(geom: Geometry, evaluator: TileEvaluator, budget: int) -> torch.Tensor:
    """(m, n) kernel matrix in the permuted order of both point sets. Extra memory: the direct-coordinate
    differences of one row block (none without direct coordinates)."""
    m, n, k = geom.m, geom.n, min(1, geom.kdir)  # one difference buffer: value tiles reuse it
    item = torch.finfo(geom.dtype).bits // 8
    out = torch.empty(m, n, dtype=geom.dtype, device=geom.device)
    plan = plan_tiles(m, n, budget, per_cell=item * k, device=geom.device, preferred=(strip_rows(geom.device), n),
                      minimum=(1, n), what="a kernel-matrix row block")
    direct_buf = [torch.empty(plan.rows * n, dtype=geom.dtype, device=geom.device) for _ in range(k)]
    cols = slice(0, n)
    for rows in plan.row_blocks(m):
        R = rows.stop - rows.start
        evaluator.evaluate(rows, cols, out[rows], gradient=False,
                           direct=[b[:R * n].view(R, n) for b in direct_buf])
    return out
