"""Kernel mat-vec f = K(z, x) alpha and the kernel matrix K itself, on finished value tiles (``tiles``).

Mat-vec: per tile one distance fill, the value pass, and one thin GEMM into the transposed output
(alpha^T K_tile^T into out^T: MKL runs those 2-3x faster than K_tile alpha, c = 10, 2 cores). When the evaluation
points are the centres (every kernel ridge solve) K is symmetric: each tile between two blocks is computed once,
a strip of rows at a time, and both of its products are taken while the strip is in cache (out_I += K_IJ alpha_J,
out_J += K_IJ^T alpha_I), halving the distance GEMMs and the value passes that dominate this op; a diagonal block's
strips take only their own square and the block's later rows (``_symmetric``). The output is the only accumulator,
so this needs no more memory than the one-sided schedule.

Kernel matrix: the (m, n) output is the result; it is filled in full-width row blocks, in place.

Normal-equations product K^T (K alpha) (the Nystrom solver's): full-width row blocks as contiguous column tiles,
each tile computed once and used for both products; float64 sums over the row blocks.
"""

from __future__ import annotations

import torch

from .geometry import Geometry
from .plan import PREFERRED, TilePlan, plan_symmetric, plan_tiles, strip_rows
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
    """Each pair of blocks once; within a diagonal block, each strip against its own rows and the block's rows
    after them (the columns past its own square mirrored), so a diagonal block costs B (B + strip) / 2 pairs
    instead of B^2 (25% fewer for a 1024-block in 512-row strips)."""
    blocks = geom.blocks(plan.block)
    B = plan.block
    buf = torch.empty(strip * B, dtype=out_t.dtype, device=out_t.device)
    direct_buf = [torch.empty_like(buf) for _ in range(min(1, geom.kdir))]
    for I, J, mirrored in plan.pairs(range(len(blocks)), len(blocks)):
        rows, cols = blocks[I], blocks[J]
        for s0 in range(rows.start, rows.stop, strip):
            part = slice(s0, min(rows.stop, s0 + strip))
            R = part.stop - part.start
            # a diagonal block: the strip's own square, then the block's later rows (mirrored from local column R)
            span = cols if I != J else slice(s0, cols.stop)
            size = R * (span.stop - span.start)
            view = buf[:size].view(R, -1)
            evaluator.evaluate(part, span, view, gradient=False,
                               direct=[b[:size].view(R, -1) for b in direct_buf])
            out_t[:, part].addmm_(alpha_t[:, span], view.T)
            if mirrored:
                out_t[:, span].addmm_(alpha_t[:, part], view)
            elif I == J and part.stop < span.stop:
                out_t[:, part.stop:span.stop].addmm_(alpha_t[:, part], view[:, R:])


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


def kernel_normal_mv(geom: Geometry, alpha: torch.Tensor, evaluator: TileEvaluator, budget: int) -> torch.Tensor:
    """(n, c) float64 = K^T (K alpha), K = K(z, x) (m, n), in the permuted order of the centres (alpha (n, c)
    permuted like them): the normal-equations product of a Nystrom solve (z the m data points, x the n centres).

    Each tile is computed once and used twice. A row block of z is held whole across the centres, as contiguous
    column tiles: u = K_rows alpha accumulates while each tile is in cache, then out += K_rows^T u once u is
    complete. The per-block products are summed over row blocks in float64."""
    m, n, c, k = geom.m, geom.n, alpha.shape[1], min(1, geom.kdir)
    item = alpha.element_size()
    dev, dt = alpha.device, alpha.dtype
    alpha_t = alpha.T.contiguous()
    out_t = torch.zeros(c, n, dtype=torch.float64, device=dev)
    part_t = torch.empty(c, n, dtype=dt, device=dev)
    width = min(n, PREFERRED["cpu"][1])  # column tiles of the CPU preferred width, in cache while u accumulates
    # alpha_t and part_t (c n each) and the float64 out_t (2 c n) are held throughout.
    plan = plan_tiles(m, n, budget, fixed=4 * n * c * item, per_row=(2 * c + k * width) * item, per_cell=item,
                      device=dev, preferred=(strip_rows(dev), n), minimum=(1, n),
                      what="a full-width row block of the normal-equations product")
    col_blocks = list(TilePlan(rows=plan.rows, cols=width).col_blocks(n))
    buf = torch.empty(plan.rows * n, dtype=dt, device=dev)
    direct_buf = [torch.empty(plan.rows * width, dtype=dt, device=dev) for _ in range(k)]
    u_t = torch.empty(c, plan.rows, dtype=dt, device=dev)
    for rows in plan.row_blocks(m):
        R = rows.stop - rows.start
        u = u_t[:, :R]
        tiles = []
        for j, cols in enumerate(col_blocks):
            size = R * (cols.stop - cols.start)
            tile = buf[cols.start * R:cols.start * R + size].view(R, -1)
            evaluator.evaluate(rows, cols, tile, gradient=False, direct=[b[:size].view(R, -1) for b in direct_buf])
            if j == 0:
                torch.mm(alpha_t[:, cols], tile.T, out=u)
            else:
                u.addmm_(alpha_t[:, cols], tile.T)
            tiles.append(tile)
        for cols, tile in zip(col_blocks, tiles):
            torch.mm(u, tile, out=part_t[:, cols])
        out_t += part_t
    return out_t.T.contiguous()
