"""Raw predictor gradients G~ block by block (docs/maths.md, "Computing it without n x m x d"), written once for
every backend that works on tiles (torch passes, the compiled cpp pass, Triton's weight tiles).

In scaled coordinates, with W the tile of gradient weights w_ji and, per frame, V = alpha (x) u_e (n x c r_e):
    G~_j = [ (W alpha)_j (x) u_e,j - (W V)_j ]          (expansion coordinates: one GEMM per tile)
         + [ ((W o D_k) alpha)_j ]_k                     (direct coordinates, D_k = t_jk - t_ik: c columns each)
         + near field sum_i w(s_ji) alpha_i (x) (u_j - u_i)   (near pairs: weight 0 in W, added from the exact
                                                               differences; pairs at distance 0 add nothing)
and J = gamma G~ F^T (``Geometry.gradient_to_input``). Nothing of size m x n outlives a tile; V is built once when
it fits in half the budget, else per tile.

Schedules: ``one-sided`` (row blocks against column blocks) and ``symmetric`` (evaluation points equal to the
centres: each tile between two blocks is computed once and applied to both, halving the distance GEMMs and the
elementwise passes; ``rfm_fast.core.plan.SymmetricPlan``).
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from .geometry import Geometry
from .plan import BudgetError, coefficients_whole, plan_symmetric, plan_tiles, strip_rows
from .tiles import NearPairs, TileEvaluator, add_near_field


def stacked_coefficients(alpha: torch.Tensor, ue: torch.Tensor) -> torch.Tensor:
    """[alpha | alpha (x) u_e] as an (n, c + c r_e) matrix: the right-hand side of the weight GEMM."""
    n, c = alpha.shape
    re = ue.shape[1]
    out = torch.empty(n, c + c * re, dtype=alpha.dtype, device=alpha.device)
    out[:, :c] = alpha
    if re:
        torch.mul(alpha[:, :, None], ue[:, None, :], out=out[:, c:].view(n, c, re))
    return out


class _Coords:
    """Per frame, the coordinates the weight GEMM's V = alpha (x) coords carries: the expansion coordinates, and
    for compensated direct coordinates their low parts too, so the direct part of G~ is
        ((W o dhi) alpha)_j + (W alpha)_j (x) lo_z,j - (W (alpha (x) lo_x))_j
    with dhi = hi_z - hi_x formed directly (one pass) and the lo terms, ~eps |t| small, in the GEMM (their
    expansion's cancellation is ~eps^2 |t|)."""

    def __init__(self, geom: Geometry):
        self.geom = geom
        self.lo = geom.kdir > 0 and geom.zt[1] is not None
        self.k = geom.kdir if self.lo else 0
        self.width = geom.re + self.k
        self._z, self._x = {}, {}

    def z(self, frame: int) -> torch.Tensor:
        if frame not in self._z:
            f = self.geom.frames[frame]
            self._z[frame] = torch.cat([f.ze, self.geom.zt[1]], 1) if self.lo else f.ze
        return self._z[frame]

    def x(self, frame: int) -> torch.Tensor:
        if frame not in self._x:
            f = self.geom.frames[frame]
            self._x[frame] = torch.cat([f.xe, self.geom.xt[1]], 1) if self.lo else f.xe
        return self._x[frame]


class _Coefficients:
    """Right-hand sides [alpha | alpha (x) u_e] of the weight GEMMs: the global frame's whole when it fits half
    the budget (else built per slice); the other frames' always per slice (only the rectangles of one framed
    component use them, a block's worth at most)."""

    def __init__(self, geom: Geometry, alpha: torch.Tensor, budget: int):
        self.geom, self.alpha = geom, alpha
        self.coords = _Coords(geom)
        c = alpha.shape[1]
        self.width = c + c * self.coords.width
        item = alpha.element_size()
        self.whole = self.coords.width > 0 and coefficients_whole(geom.n, self.width, item, budget)
        self.full = stacked_coefficients(alpha, self.coords.x(0)) if self.whole else None
        self.bytes = geom.n * self.width * item if self.whole else 0

    def __call__(self, frame: int, cols: slice) -> torch.Tensor:
        if frame == 0 and self.whole:
            return self.full[cols]
        return stacked_coefficients(self.alpha[cols], self.coords.x(frame)[cols])


def _product(geom: Geometry, acc: torch.Tensor, weights: torch.Tensor, coeffs: _Coefficients, frame: int,
             cols: slice, rows: slice, tmp: torch.Tensor, c: int) -> None:
    """acc (rows' accumulator) += the weights' contribution W [alpha | V]_cols in ``frame``. Frame 0 accumulates
    (W alpha, W V) about the global centre; another frame's product P is finished at once, as the local gradient
    P_alpha (x) u_local - P_V, and folded into the V part (G~ = acc_alpha (x) u - acc_V)."""
    if frame == 0:
        acc.addmm_(weights, coeffs(0, cols))
        return
    # In chunks of the rows of ``tmp`` (the planner's share for a framed rectangle): first the columns, whose
    # local coefficients are built per chunk, then the rows of the product.
    step, re = tmp.shape[0], coeffs.coords.width
    for c0 in range(0, cols.stop - cols.start, step):
        part = slice(cols.start + c0, min(cols.stop, cols.start + c0 + step))
        rhs = coeffs(frame, part)
        for r0 in range(0, weights.shape[0], step):
            r1 = min(weights.shape[0], r0 + step)
            R = r1 - r0
            W = weights[r0:r1, c0:c0 + rhs.shape[0]]
            # P_V straight into the V part (no product buffer), P_alpha (R, c) apart: it is multiplied out at once.
            acc[r0:r1, c:].addmm_(W, rhs[:, c:])
            p_alpha = torch.mm(W, rhs[:, :c], out=tmp[:R])
            local = coeffs.coords.z(frame)[rows.start + r0:rows.start + r1]
            acc[r0:r1, c:].view(R, c, re).addcmul_(p_alpha[:, :, None], local[:, None, :], value=-1.0)


def _tile_products(geom: Geometry, acc: torch.Tensor, tile: torch.Tensor, coeffs: _Coefficients, rows: slice,
                   cols: slice, tmp: torch.Tensor, c: int, acc_cols: Optional[torch.Tensor] = None) -> None:
    """acc (the rows' accumulator) += the tile's contribution W [alpha | V]_cols, and with ``acc_cols`` (the mirrored
    side of the symmetric schedule) acc_cols += W^T [alpha | V]_rows, rectangle by rectangle, each in its frame."""
    for seg in geom.segments(rows, cols):
        sr = slice(seg.rows.start - rows.start, seg.rows.stop - rows.start)
        sc = slice(seg.cols.start - cols.start, seg.cols.stop - cols.start)
        sub = tile[sr, sc]
        _product(geom, acc[sr], sub, coeffs, seg.frame, seg.cols, seg.rows, tmp, c)
        if acc_cols is not None:
            _product(geom, acc_cols[sc], sub.T, coeffs, seg.frame, seg.rows, seg.cols, tmp, c)


def _framed_chunk(geom: Geometry, width: int, item: int, budget: int) -> int:
    """Rows (and columns) of a framed rectangle handled at once: the largest framed component, at most what an
    eighth of the budget holds for its local coefficients (rows, width) and the alpha part of its product
    (rows, c)."""
    if geom.framed_span == 0:
        return 0
    return max(1, min(geom.framed_span, budget // (16 * width * item)))


def _finish(geom: Geometry, rows: slice, acc: torch.Tensor, direct_acc: Optional[torch.Tensor], c: int,
            out: torch.Tensor, coords: "_Coords") -> torch.Tensor:
    """G~ (R, c, r) of ``rows`` from the accumulator (R, width) and the direct one (kdir, c, R)."""
    R, re, k, kl = rows.stop - rows.start, geom.re, geom.kdir, coords.k
    G = out[:R]
    width = coords.width
    if re:
        part = G[:, :, k:]
        torch.mul(acc[:, :c, None], geom.frames[0].ze[rows, None, :], out=part)
        part.sub_(acc[:, c:].view(R, c, width)[:, :, :re])
    if k:
        G[:, :, :k] = direct_acc.permute(2, 1, 0)
    if kl:
        lo = G[:, :, :k]
        lo.addcmul_(acc[:, :c, None], geom.zt[1][rows, None, :])
        lo.sub_(acc[:, c:].view(R, c, width)[:, :, re:])
    return G


def _add_near(geom, acc_rows, direct_rows, near: NearPairs, alpha_cols, sign=1.0, weights=None, width=None):
    """Near-field contributions of one tile: expansion part subtracted from the V part of the accumulator
    (G~ = (W alpha) u - W V + near), direct part added to the direct accumulator. Only the rows that have a near
    pair at nonzero distance are touched."""
    keep = near.s > 0
    if not bool(keep.any()):
        return
    k, c = geom.kdir, alpha_cols.shape[1]
    rows, local = torch.unique(near.rows[keep], return_inverse=True)
    kept = NearPairs(local, near.cols[keep], near.s[keep], near.diff[keep])
    tmp = torch.zeros(rows.shape[0], c, geom.r, dtype=acc_rows.dtype, device=acc_rows.device)
    add_near_field(tmp, kept, alpha_cols, geom.spec, sign=sign, weights=None if weights is None else weights[keep])
    if geom.re:
        part = acc_rows[:, c:].view(-1, c, width or geom.re)[:, :, :geom.re]
        part.index_add_(0, rows, tmp[:, :, k:], alpha=-1.0)
    if k:
        direct_rows.index_add_(2, rows, tmp[:, :, :k].permute(2, 1, 0))


def gradient_blocks(geom: Geometry, alpha: torch.Tensor, evaluator: TileEvaluator, budget: int, *,
                    scratch_cells: int = 0, pair_weights: Optional[torch.Tensor] = None
                    ) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield (rows, G~) per block of evaluation points (permuted order): G~ (R, c, r) raw gradients, a reused
    buffer. ``alpha`` (n, c) in the permuted order of the centres. ``scratch_cells``: tile-sized scratch buffers
    the evaluator needs (counted in the budget). ``pair_weights`` (m, n): multiply every w_ji by it (the
    backward of kernel_matrix); one-sided schedule only."""
    if geom.same and pair_weights is None:
        plan = _symmetric_plan(geom, alpha.shape[1], alpha.element_size(), budget, scratch_cells)
        if plan is not None:
            yield from _symmetric(geom, alpha, evaluator, budget, plan, scratch_cells)
            return
    yield from _one_sided(geom, alpha, evaluator, budget, scratch_cells, pair_weights)


def _one_sided(geom, alpha, evaluator, budget, scratch_cells, pair_weights):
    m, n, c, r, k = geom.m, geom.n, alpha.shape[1], geom.r, geom.kdir
    item = alpha.element_size()
    coeffs = _Coefficients(geom, alpha, budget)
    width = coeffs.width
    span = _framed_chunk(geom, width, item, budget)
    plan = plan_tiles(m, n, budget - coeffs.bytes, fixed=span * (width + c) * item,
                      per_row=item * (width + 2 * c * r + k * c),
                      per_col=0 if coeffs.whole or coeffs.coords.width == 0 else width * item,
                      per_cell=item * (1 + scratch_cells + k), device=alpha.device, what="a gradient tile")
    dev, dt = alpha.device, alpha.dtype
    tile_buf = torch.empty(plan.rows * plan.cols, dtype=dt, device=dev)
    direct_buf = torch.empty(k, plan.rows * plan.cols, dtype=dt, device=dev)
    acc_buf = torch.empty(plan.rows, width, dtype=dt, device=dev)
    tmp_buf = torch.empty(span, c, dtype=dt, device=dev)
    # Transposed (k, c, rows): MKL runs the thin products alpha^T D^T 2-3x faster than D alpha.
    direct_acc_buf = torch.empty(k, c, plan.rows, dtype=dt, device=dev)
    out_buf = torch.empty(plan.rows, c, r, dtype=dt, device=dev)
    for rows in plan.row_blocks(m):
        R = rows.stop - rows.start
        acc = acc_buf[:R].zero_()
        direct_acc = direct_acc_buf[:, :, :R].zero_()
        for cols in plan.col_blocks(n):
            size = R * (cols.stop - cols.start)
            tile = tile_buf[:size].view(R, -1)
            direct = direct_buf[:, :size].view(k, R, cols.stop - cols.start)
            near = evaluator.evaluate(rows, cols, tile, gradient=True, direct=direct)
            pw = None
            if pair_weights is not None:
                block = pair_weights[rows, cols]
                tile.mul_(block)
                pw = None if near is None else block[near.rows, near.cols]
            if near is not None:
                _add_near(geom, acc, direct_acc, near, alpha[cols], weights=pw, width=coeffs.coords.width)
            for q in range(k):
                if not evaluator.weighted_direct:
                    direct[q].mul_(tile)
                direct_acc[q].addmm_(alpha[cols].T, direct[q].T)
            if coeffs.coords.width:
                _tile_products(geom, acc, tile, coeffs, rows, cols, tmp_buf, c)
        yield rows, _finish(geom, rows, acc, direct_acc, c, out_buf, coeffs.coords)


def _symmetric_plan(geom, c, item, budget, scratch_cells):
    """Budget split of the symmetric schedule: the coefficients (whole if they fit half the budget, else two
    block slices per frame), one block x block tile, per block row the strip buffers (scratch, direct
    differences) and the output rows; the rest holds the group's accumulators."""
    r, k = geom.r, geom.kdir
    cw = _Coords(geom).width
    width = c + c * cw
    whole = cw > 0 and coefficients_whole(geom.n, width, item, budget)
    # A framed rectangle's local coefficients and product: at most the largest framed component's rows.
    fixed = (geom.n * width * item if whole else 0) + _framed_chunk(geom, width, item, budget) * (width + c) * item
    strip = strip_rows(geom.device)
    slices = 0 if whole or cw == 0 else 2 * width
    per_block_row = item * (strip * (scratch_cells + k) + c * r + slices)
    return plan_symmetric(geom.n, budget, fixed=fixed, per_block_cell=item, per_block_row=per_block_row,
                          per_acc_row=item * (width + k * c), device=geom.device)


def _symmetric(geom, alpha, evaluator, budget, plan, scratch_cells):
    """gradient_blocks for z equal to x: the accumulators of a group of blocks are held at once, so a tile between
    two blocks of the group is computed once and applied twice,
        acc_I += W_IJ [alpha | V]_J   and   acc_J += W_IJ^T [alpha | V]_I,
    near pairs and direct coordinates likewise from both sides. A group's gradients are yielded block by block
    once all its column blocks are done."""
    n, c, r, k = geom.n, alpha.shape[1], geom.r, geom.kdir
    dev, dt = alpha.device, alpha.dtype
    coeffs = _Coefficients(geom, alpha, budget)
    blocks = geom.blocks(plan.block)
    B = plan.block
    strip = min(B, strip_rows(dev))
    tile_buf = torch.empty(B * B, dtype=dt, device=dev)
    direct_buf = torch.empty(k, strip * B, dtype=dt, device=dev)
    rows_total = min(n, plan.group * B)
    acc_buf = torch.empty(rows_total, coeffs.width, dtype=dt, device=dev)
    direct_acc_buf = torch.empty(k, c, rows_total, dtype=dt, device=dev)
    out_buf = torch.empty(B, c, r, dtype=dt, device=dev)
    tmp_buf = torch.empty(_framed_chunk(geom, coeffs.width, alpha.element_size(), budget), c, dtype=dt,
                          device=dev)

    for group in plan.groups(len(blocks)):
        g0 = blocks[group[0]].start
        span = blocks[group[-1]].stop - g0
        acc = acc_buf[:span].zero_()
        direct_acc = direct_acc_buf[:, :, :span].zero_()
        for I, J, mirrored in plan.pairs(group, len(blocks)):
            rows, cols = blocks[I], blocks[J]
            lc = slice(cols.start - g0, cols.stop - g0) if mirrored else None
            nr, nc = rows.stop - rows.start, cols.stop - cols.start
            tile = tile_buf[:nr * nc].view(nr, nc)
            for s0 in range(rows.start, rows.stop, strip):
                part = slice(s0, min(rows.stop, s0 + strip))
                view = tile[s0 - rows.start:part.stop - rows.start]
                size = view.numel()
                direct = direct_buf[:, :size].view(k, *view.shape)
                near = evaluator.evaluate(part, cols, view, gradient=True, direct=direct)
                lp = slice(part.start - g0, part.stop - g0)
                if near is not None:
                    _add_near(geom, acc[lp], direct_acc[:, :, lp], near, alpha[cols], width=coeffs.coords.width)
                    if mirrored:
                        flipped = NearPairs(near.cols, near.rows, near.s, near.diff)
                        _add_near(geom, acc[lc], direct_acc[:, :, lc], flipped, alpha[part], sign=-1.0,
                                  width=coeffs.coords.width)
                for q in range(k):
                    if not evaluator.weighted_direct:
                        direct[q].mul_(view)
                    direct_acc[q, :, lp].addmm_(alpha[cols].T, direct[q].T)
                    if mirrored:
                        direct_acc[q, :, lc].addmm_(alpha[part].T, direct[q], alpha=-1.0)
            if coeffs.coords.width:
                _tile_products(geom, acc[rows.start - g0:rows.stop - g0], tile, coeffs, rows, cols, tmp_buf, c,
                               acc_cols=acc[lc] if mirrored else None)
        for I in group:
            rows = blocks[I]
            lr = slice(rows.start - g0, rows.stop - g0)
            yield rows, _finish(geom, rows, acc[lr], direct_acc[:, :, lr], c, out_buf, coeffs.coords)


__all__ = ["gradient_blocks", "stacked_coefficients", "BudgetError"]
