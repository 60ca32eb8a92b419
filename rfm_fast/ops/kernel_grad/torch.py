"""Fast gradient of the kernel predictor on the torch path.

With w_ji the gradient weight of pair (j, i) and V the rows alpha_i (x) x_i (CONVENTIONS.md),
    J_j = (W alpha)_j z_j^T - reshape_{c x d}((W V)_j)
so a tile of evaluation points needs, per tile of centres, one distance GEMM, a few in-place elementwise passes
for the weights, and one GEMM W_tile @ [alpha | V]_tile into a (rows, c + c d) accumulator. This runs in
Euclidean coordinates (z S, x S with S = M^{1/2}), centred at the centres' mean, and J = J' S at the end.

Near field: for a pair at tiny distance the two expanded terms w alpha z and w alpha x nearly cancel (and the
Laplace weight ~ 1/r is huge), so the expansion loses every digit of their difference. Pairs the distance tiles
flag as near (see ``DistanceTiles``) get weight 0 in the tile and their contribution w alpha (z - x) is added
from the exact difference instead; a pair at distance exactly 0 contributes 0 (CONVENTIONS.md).

For d <= DIRECT_DISTANCE_MAX_D the gradient is formed directly, J' = sum_k ((W * D_k) @ alpha) e_k with D_k the
coordinate differences, in the original coordinates (then J = J' M): no expansion, no cancellation.

Nothing of size m x n outlives a tile; V is kept whole when it fits in half the budget, else built per tile.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from ..common import (DIRECT_DISTANCE_MAX_D, RECHECK_CHUNK_ELEMS, DistanceTiles, NearPairs, apply_metric,
                      coefficients_fit, metric_sqrt, plan_symmetric, plan_tiles, same_points, strip_rows)


def _laplace_weights_(tile: torch.Tensor, scratch: torch.Tensor) -> None:
    """(r/L)^2 -> exp(-r/L) / (r/L) in place, as 1 / (r' e^{r'}): four passes; overflow of e^{r'} gives 0."""
    tile.sqrt_()
    torch.exp(tile, out=scratch)
    tile.mul_(scratch).reciprocal_()


def _weights_(tile: torch.Tensor, kernel: str, scratch: torch.Tensor) -> None:
    """Scaled distances -> gradient weights up to the common factor -1/L^2 (Laplace: e^{-r'}/r' with r' = r/L;
    Gaussian: the tile holds -r^2/(2L^2) and becomes the kernel value)."""
    if kernel == "laplace":
        _laplace_weights_(tile, scratch)
    else:
        tile.exp_()


def _near_weights(scaled_sq: torch.Tensor, kernel: str) -> torch.Tensor:
    """The same weights for the exactly recomputed pairs; 0 at distance 0."""
    if kernel == "laplace":
        r = scaled_sq.sqrt()
        w = torch.exp(-r) / r
        return torch.where(r > 0, w, torch.zeros_like(w))
    return torch.where(scaled_sq > 0, torch.exp(-scaled_sq), torch.zeros_like(scaled_sq))


def _stacked_coefficients(alpha: torch.Tensor, xc: torch.Tensor) -> torch.Tensor:
    """[alpha | alpha (x) x] as an (n, c + c d) matrix: the right-hand side of the W GEMM."""
    n, c = alpha.shape
    d = xc.shape[1]
    out = torch.empty(n, c + c * d, dtype=alpha.dtype, device=alpha.device)
    out[:, :c] = alpha
    torch.mul(alpha[:, :, None], xc[:, None, :], out=out[:, c:].view(n, c, d))
    return out


def _add_near_field(J: torch.Tensor, near: NearPairs, z: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor,
                    S: Optional[torch.Tensor], kernel: str, sign: float = 1.0) -> None:
    """J[j] += sign * w_ji alpha_i (x) ((z_j - x_i) S) for the near pairs of one tile (z, x, alpha already
    sliced)."""
    keep = near.scaled_sq > 0
    if not bool(keep.any()):
        return
    r_idx, c_idx = near.rows[keep], near.cols[keep]
    w = _near_weights(near.scaled_sq[keep], kernel)
    c, d = alpha.shape[1], z.shape[1]
    step = max(1, RECHECK_CHUNK_ELEMS // (c * d))
    for start in range(0, r_idx.shape[0], step):
        part = slice(start, start + step)
        diff = apply_metric(z[r_idx[part]] - x[c_idx[part]], S)
        contrib = (w[part, None] * alpha[c_idx[part]])[:, :, None] * diff[:, None, :]
        J.index_add_(0, r_idx[part], contrib, alpha=sign)


def gradient_tiles(z: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, M: Optional[torch.Tensor],
                   kernel: str, bandwidth: float, memory_budget: int, fused: bool = False
                   ) -> Iterator[tuple[slice, torch.Tensor, Optional[torch.Tensor]]]:
    """Yield (rows, J_raw, P) per block of evaluation points, with J = -(1/L^2) J_raw P: P = S = M^{1/2} in GEMM
    mode, P = M in direct mode (None for the identity). J_raw (rows, c, d) is a reused buffer.

    ``fused``: on the symmetric schedule, weigh each strip with the compiled one-pass op
    ``torch.ops.rfm_fast.gradient_weights_`` (the cpp backend) instead of the torch passes."""
    m, n, d, c = z.shape[0], x.shape[0], z.shape[1], alpha.shape[1]
    S = metric_sqrt(M, z.dtype)
    if kernel == "laplace":
        tiles = DistanceTiles(z, x, M, S, scale=1.0 / bandwidth**2, sign=1.0)
    else:
        tiles = DistanceTiles(z, x, M, S, scale=0.5 / bandwidth**2, sign=-1.0)
    if tiles.direct:
        yield from _direct_gradient_tiles(z, x, alpha, M, kernel, tiles, memory_budget)
        return
    item = z.element_size()
    width = c + c * d
    if tiles.symmetric:
        plan = _symmetric_plan(n, c, d, item, memory_budget, kernel, z.device)
        if plan is not None:
            yield from _symmetric_gradient_tiles(z, alpha, S, kernel, tiles, plan, memory_budget, fused)
            return
    whole_v = coefficients_fit(n, width, item, memory_budget)
    coeffs = _stacked_coefficients(alpha, tiles.xc) if whole_v else None
    budget = memory_budget - (n * width * item if whole_v else 0)
    plan = plan_tiles(m, n, item, budget, tile_buffers=2, row_bytes=(width + 2 * c * d) * item,
                      col_bytes=0 if whole_v else width * item, device=z.device)
    tile_buf = torch.empty(plan.rows * plan.cols, dtype=z.dtype, device=z.device)
    scratch_buf = torch.empty_like(tile_buf) if kernel == "laplace" else None
    acc_buf = torch.empty(plan.rows, width, dtype=z.dtype, device=z.device)
    grad_buf = torch.empty(plan.rows, c, d, dtype=z.dtype, device=z.device)
    near_buf = None
    for rows in plan.row_blocks(m):
        nr = rows.stop - rows.start
        acc = acc_buf[:nr].zero_()
        near_acc = None
        for cols in plan.col_blocks(n):
            size = nr * (cols.stop - cols.start)
            tile = tile_buf[:size].view(nr, -1)
            near = tiles.fill(rows, cols, tile)
            _weights_(tile, kernel, None if scratch_buf is None else scratch_buf[:size].view(nr, -1))
            if near is not None:
                tile[near.rows, near.cols] = 0
                if near_acc is None:
                    if near_buf is None:
                        near_buf = torch.empty_like(grad_buf)
                    near_acc = near_buf[:nr].zero_()
                _add_near_field(near_acc, near, z[rows], x[cols], alpha[cols], S, kernel)
            rhs = coeffs[cols] if whole_v else _stacked_coefficients(alpha[cols], tiles.xc[cols])
            acc.addmm_(tile, rhs)
        J = torch.mul(acc[:, :c, None], tiles.zc[rows, None, :], out=grad_buf[:nr])
        J.sub_(acc[:, c:].view(nr, c, d))
        if near_acc is not None:
            J.add_(near_acc)
        yield rows, J, S


def _symmetric_plan(n, c, d, item, memory_budget, kernel, device):
    """Budget split for the symmetric schedule: [alpha | V] whole when it fits in half the budget (else two
    block-sized slices of it), per block one tile, a Laplace scratch strip and the gradient output buffer; the
    rest holds the group's (rows, c + c d) accumulator."""
    width = c + c * d
    whole_v = coefficients_fit(n, width, item, memory_budget)
    budget = memory_budget - (n * width * item if whole_v else 0)
    block_bytes = (strip_rows(device) * item if kernel == "laplace" else 0) + c * d * item \
        + (0 if whole_v else 2 * width * item)
    return plan_symmetric(n, item, budget, row_bytes=width * item, block_bytes=block_bytes, device=device)


def symmetric_plan_for(z: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, memory_budget: int, kernel: str):
    """The symmetric schedule gradient_tiles would take for these inputs, or None (z not equal to x, small d
    where distances are formed directly, or a budget too small)."""
    d, c = z.shape[1], alpha.shape[1]
    if d <= DIRECT_DISTANCE_MAX_D or not same_points(z, x):
        return None
    return _symmetric_plan(x.shape[0], c, d, z.element_size(), memory_budget, kernel, z.device)


def _symmetric_gradient_tiles(z, alpha, S, kernel, tiles, plan, memory_budget, fused=False):
    """gradient_tiles for z equal to x (see SymmetricPlan): the accumulator [W alpha | W V] of a group of blocks
    is held at once, so a tile between two blocks of the group is computed once and applied twice,
        acc_I += W_IJ [alpha | V]_J   and   acc_J += W_IJ^T [alpha | V]_I,
    halving the distance GEMMs and the elementwise passes. Near pairs are zeroed in the tile and their exact
    contributions subtracted from the V part of the accumulator (G = (W alpha) z^T - W V + near field), for both
    uses of the tile. A group's gradients are yielded block by block once all its column blocks are done."""
    n, d, c = z.shape[0], z.shape[1], alpha.shape[1]
    item = z.element_size()
    width = c + c * d
    blocks = plan.blocks(n)
    whole_v = coefficients_fit(n, width, item, memory_budget)
    coeffs = _stacked_coefficients(alpha, tiles.xc) if whole_v else None

    def rhs(block: slice) -> torch.Tensor:
        return coeffs[block] if whole_v else _stacked_coefficients(alpha[block], tiles.xc[block])

    B = plan.block
    strip = min(B, strip_rows(z.device))
    tile_buf = torch.empty(B * B, dtype=z.dtype, device=z.device)
    scratch_buf = torch.empty(strip * B, dtype=z.dtype, device=z.device) if kernel == "laplace" and not fused \
        else None
    acc_buf = torch.empty(min(n, plan.group * B), width, dtype=z.dtype, device=z.device)
    grad_buf = torch.empty(B, c, d, dtype=z.dtype, device=z.device)

    def fill_strip(part: slice, cols: slice, view: torch.Tensor) -> Optional[NearPairs]:
        if fused:
            tiles.raw_fill(part, cols, view)
            idx = torch.ops.rfm_fast.gradient_weights_(view, tiles.zn[part], tiles.xn[cols], kernel, tiles.sign,
                                                       tiles.scale, tiles.rtol)
            return None if idx.shape[0] == 0 else tiles.exact_pairs(part, cols, idx[:, 0], idx[:, 1])
        near = tiles.fill(part, cols, view)
        _weights_(view, kernel, None if scratch_buf is None else scratch_buf[:view.numel()].view_as(view))
        return near

    for group in plan.groups(len(blocks)):
        g0 = blocks[group[0]].start
        acc = acc_buf[:blocks[group[-1]].stop - g0].zero_()
        near_v = acc[:, c:].view(-1, c, d)  # near-field contributions are subtracted here
        for I, J, mirrored in plan.pairs(group, len(blocks)):
            rows, cols = blocks[I], blocks[J]
            local_r = slice(rows.start - g0, rows.stop - g0)
            tile = tile_buf[:(rows.stop - rows.start) * (cols.stop - cols.start)].view(rows.stop - rows.start, -1)
            near = tiles.fill_block(rows, cols, tile, strip, fill_strip)
            if near is not None:
                tile[near.rows, near.cols] = 0
                _add_near_field(near_v[local_r], near, z[rows], z[cols], alpha[cols], S, kernel, sign=-1.0)
            acc[local_r].addmm_(tile, rhs(cols))
            if mirrored:
                local_c = slice(cols.start - g0, cols.stop - g0)
                if near is not None:
                    flipped = NearPairs(near.cols, near.rows, near.scaled_sq)
                    _add_near_field(near_v[local_c], flipped, z[cols], z[rows], alpha[rows], S, kernel, sign=-1.0)
                acc[local_c].addmm_(tile.T, rhs(rows))
        for I in group:
            rows = blocks[I]
            nr = rows.stop - rows.start
            part = acc[rows.start - g0:rows.stop - g0]
            J = torch.mul(part[:, :c, None], tiles.zc[rows, None, :], out=grad_buf[:nr])
            J.sub_(part[:, c:].view(nr, c, d))
            yield rows, J, S


def _direct_gradient_tiles(z, x, alpha, M, kernel, tiles, memory_budget):
    m, n, d, c = z.shape[0], x.shape[0], z.shape[1], alpha.shape[1]
    item = z.element_size()
    plan = plan_tiles(m, n, item, memory_budget, tile_buffers=3, row_bytes=c * d * item, device=z.device)
    tile_buf = torch.empty(plan.rows * plan.cols, dtype=z.dtype, device=z.device)
    scratch_buf = torch.empty_like(tile_buf)
    diff_buf = torch.empty_like(tile_buf)
    grad_buf = torch.empty(plan.rows, d, c, dtype=z.dtype, device=z.device)
    for rows in plan.row_blocks(m):
        nr = rows.stop - rows.start
        acc = grad_buf[:nr].zero_()  # (rows, d, c): each acc[:, k] is a BLAS-friendly strided matrix
        for cols in plan.col_blocks(n):
            size = nr * (cols.stop - cols.start)
            tile = tile_buf[:size].view(nr, -1)
            diff = diff_buf[:size].view(nr, -1)
            near = tiles.fill(rows, cols, tile)
            _weights_(tile, kernel, scratch_buf[:size].view(nr, -1))
            if near is not None:
                tile[near.rows, near.cols] = 0  # exactly-zero pairs only, in direct mode
            for k in range(d):
                torch.sub(z[rows, k, None], x[None, cols, k], out=diff)
                diff.mul_(tile)
                acc[:, k].addmm_(diff, alpha[cols])
        yield rows, acc.transpose(1, 2), M


def kernel_grad(z: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, M: Optional[torch.Tensor], kernel: str,
                bandwidth: float, memory_budget: int, fused: bool = False) -> torch.Tensor:
    """z (m, d), x (n, d), alpha (n, c) -> J (m, c, d), J[j] = d f / d z at z_j. ``fused``: see gradient_tiles."""
    m, d, c = z.shape[0], z.shape[1], alpha.shape[1]
    out = torch.empty(m, c, d, dtype=z.dtype, device=z.device)
    for rows, J, P in gradient_tiles(z, x, alpha, M, kernel, bandwidth, memory_budget, fused):
        out[rows] = apply_metric(J, P) * (-1.0 / bandwidth**2)
    return out
