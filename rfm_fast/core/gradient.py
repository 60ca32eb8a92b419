"""Raw predictor gradients G~ block by block (docs/maths.md, "Computing it without n x m x d"), written once for
every backend that works on tiles (torch passes, the compiled cpp pass, Triton's weight tiles).

In scaled coordinates, with W the tile of gradient weights w_ji and, per frame, V = alpha (x) u_e (n x c r_e):
    G~_j = [ (W alpha)_j (x) u_e,j - (W V)_j ]          (expansion coordinates: one GEMM per tile)
         + [ ((W o D_k) alpha)_j ]_k                     (direct coordinates, D_k = t_jk - t_ik: c columns each)
         + near field sum_i w(s_ji) alpha_i (x) (u_j - u_i)   (near pairs: weight 0 in W, added from the exact
                                                               differences; pairs at distance 0 add nothing)
and J = gamma G~ F^T (``Geometry.gradient_to_input``). Nothing of size m x n outlives a tile; V is built once when
it fits in half the budget, else per tile.

Centring frames (``rfm_fast.core.frames``): the weights of a tile come from distances evaluated per rectangle in
its frame, but the products run once per tile, in the *mixed* coordinates u' (each framed component's points about
its own centre, the other points about the global one; u = u' + delta_b, b the point's bucket). Within a bucket the
offsets cancel exactly, so pairs of one tight component keep their small local differences; across buckets the
missing offsets are added from per-bucket sums P_j[b] = sum_{i in b} w_ji alpha_i,
    G~_j += sum_b P_j[b] (x) (delta_b(j) - delta_b)          (the own bucket's term is exactly 0),
one batched product per run of rows at the finish (``_finish``).

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
    """The coordinates the weight GEMM's V = alpha (x) coords carries: the expansion coordinates of the product
    frame (the mixed frame 1 when the geometry has frames, else the global frame 0), and for compensated direct
    coordinates their low parts too, so the direct part of G~ is
        ((W o dhi) alpha)_j + (W alpha)_j (x) lo_z,j - (W (alpha (x) lo_x))_j
    with dhi = hi_z - hi_x formed directly (one pass) and the lo terms, ~eps |t| small, in the GEMM (their
    expansion's cancellation is ~eps^2 |t|)."""

    def __init__(self, geom: Geometry):
        self.geom = geom
        self.frame = geom.frames[1 if geom.layout is not None else 0]
        self.lo = geom.kdir > 0 and geom.zt[1] is not None
        self.k = geom.kdir if self.lo else 0
        self.width = geom.re + self.k
        self._z = self._x = None

    def z(self) -> torch.Tensor:
        if self._z is None:
            self._z = torch.cat([self.frame.ze, self.geom.zt[1]], 1) if self.lo else self.frame.ze
        return self._z

    def x(self) -> torch.Tensor:
        if self._x is None:
            self._x = torch.cat([self.frame.xe, self.geom.xt[1]], 1) if self.lo else self.frame.xe
        return self._x


class _Coefficients:
    """Right-hand sides [alpha | alpha (x) u_e] of the weight GEMMs: whole when they fit half the budget, else built
    per slice.

    With a band (``Geometry.band``) they carry ``extra`` columns [alpha | alpha (x) hi_t] after the ``prefix``:
    the whole-tile product, from weights with the band's entries zeroed, gives sum_out w alpha and sum_out w alpha
    t_i over the pairs outside the band, whose direct part is then (W_out alpha)_j t_j - (W_out (alpha t))_j (no
    pair there is near in the expansion: its cancellation is that of the identity metric's); the band's entries
    go through the ``prefix`` columns and the direct differences."""

    def __init__(self, geom: Geometry, alpha: torch.Tensor, budget: int):
        self.geom, self.alpha = geom, alpha
        self.coords = _Coords(geom)
        c = alpha.shape[1]
        self.prefix, self.extra = self.widths(geom, c)
        self.width = self.prefix + self.extra
        item = alpha.element_size()
        self.whole = self.needed and coefficients_whole(geom.n, self.width, item, budget)
        self.full = self._build(slice(0, geom.n)) if self.whole else None
        self.bytes = geom.n * self.width * item if self.whole else 0

    @staticmethod
    def widths(geom: Geometry, c: int) -> tuple:
        """(prefix, extra) column counts for c outputs."""
        return c + c * _Coords(geom).width, (c + c * geom.kdir if geom.band is not None else 0)

    @property
    def needed(self) -> bool:
        """Whether the weight GEMMs have anything to add (not when every coordinate is direct and uncompensated)."""
        return self.width > self.alpha.shape[1]

    def _build(self, cols: slice) -> torch.Tensor:
        base = stacked_coefficients(self.alpha[cols], self.coords.x()[cols])
        if not self.extra:
            return base
        return torch.cat([base, stacked_coefficients(self.alpha[cols], self.geom.xt[0][cols])], 1)

    def __call__(self, cols: slice) -> torch.Tensor:
        if self.whole:
            return self.full[cols]
        return self._build(cols)


def _buckets(geom: Geometry) -> int:
    """Buckets of the mixed frame (0 without frames): per-bucket sums of the weights' alpha products are kept."""
    return 0 if geom.frame_offsets is None or geom.re == 0 else geom.frame_offsets.shape[0]


def _tile_products(geom: Geometry, acc: torch.Tensor, tile: torch.Tensor, coeffs: _Coefficients, rows: slice,
                   cols: slice, alpha: torch.Tensor, P: Optional[torch.Tensor], acc_cols: Optional[torch.Tensor] = None,
                   P_cols: Optional[torch.Tensor] = None) -> None:
    """acc (the rows' accumulator) += W [alpha | V]_cols, and with ``acc_cols`` (the mirrored side of the symmetric
    schedule) acc_cols += W^T [alpha | V]_rows; with frames, the per-bucket sums P (buckets, rows, c) += W_b alpha_b
    for each bucket's run of columns (and P_cols likewise from the rows)."""
    acc.addmm_(tile, coeffs(cols))
    if P is not None:
        for a, b, bucket in geom.bucket_runs(cols, of_z=False):
            P[bucket].addmm_(tile[:, a - cols.start:b - cols.start], alpha[a:b])
    if acc_cols is not None:
        acc_cols.addmm_(tile.T, coeffs(rows))
        if P_cols is not None:
            for a, b, bucket in geom.bucket_runs(rows, of_z=True):
                P_cols[bucket].addmm_(tile[a - rows.start:b - rows.start].T, alpha[a:b])


def _finish(geom: Geometry, rows: slice, acc: torch.Tensor, direct_acc: Optional[torch.Tensor], c: int,
            out: torch.Tensor, coeffs: _Coefficients, P: Optional[torch.Tensor] = None) -> torch.Tensor:
    """G~ (R, c, r) of ``rows`` from the accumulator (R, coeffs.width), the direct one (kdir, c, R) and, with
    frames, the per-bucket sums P (buckets, R, c)."""
    coords = coeffs.coords
    R, re, k, kl = rows.stop - rows.start, geom.re, geom.kdir, coords.k
    G = out[:R]
    width = coords.width
    acc_all_v = acc[:, c:coeffs.prefix].view(R, c, width)
    if re:
        part = G[:, :, k:]
        acc_v = acc_all_v[:, :, :re]
        ze = coords.frame.ze
        if P is None:
            torch.mul(acc[:, :c, None], ze[rows, None, :], out=part)
            part.sub_(acc_v)
        else:
            offsets = geom.frame_offsets
            for a, b, bucket in geom.bucket_runs(rows, of_z=True):
                lr = slice(a - rows.start, b - rows.start)
                # sum_b P[b] (x) (delta_own - delta_b) - acc_V, then + (W alpha) (x) u'_z
                D = (offsets[bucket][None, :] - offsets).expand(b - a, -1, -1)
                torch.baddbmm(acc_v[lr], P[:, lr].permute(1, 2, 0), D, beta=-1.0, out=part[lr])
                part[lr].addcmul_(acc[lr, :c, None], ze[a:b, None, :])
    if k:
        G[:, :, :k] = direct_acc.permute(2, 1, 0)
    if kl:
        lo = G[:, :, :k]
        lo.addcmul_(acc[:, :c, None], geom.zt[1][rows, None, :])
        lo.sub_(acc_all_v[:, :, re:])
    if coeffs.extra:  # the direct part of the pairs outside the band, by expansion
        out_alpha = acc[:, coeffs.prefix:coeffs.prefix + c]
        out_t = acc[:, coeffs.prefix + c:].view(R, c, k)
        direct = G[:, :, :k]
        direct.addcmul_(out_alpha[:, :, None], geom.zt[0][rows, None, :])
        direct.sub_(out_t)
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
        part = acc_rows[:, c:c + c * (width or geom.re)].view(-1, c, width or geom.re)[:, :, :geom.re]
        part.index_add_(0, rows, tmp[:, :, k:], alpha=-1.0)
    if k:
        direct_rows.index_add_(2, rows, tmp[:, :, :k].permute(2, 1, 0))


def _band_span(geom: Geometry, rows: slice, cols: slice) -> tuple:
    """Local (a, b): the columns of tile (rows, cols) whose pairs are evaluated with the direct coordinates (all of
    them without a band; (0, 0) when the tile misses the band)."""
    if geom.band is None:
        return 0, cols.stop - cols.start
    a, b = geom.band.columns(rows)
    a, b = max(a, cols.start), min(b, cols.stop)
    return (a - cols.start, b - cols.start) if a < b else (0, 0)


def _accumulating(geom: Geometry, evaluator: TileEvaluator, c: int, pair_weights=None) -> bool:
    """Whether the evaluator's pass sums the direct part itself (one output, no band, no pair weights)."""
    return evaluator.accumulates_direct and c == 1 and geom.kdir > 0 and geom.band is None and pair_weights is None


def _direct_and_band(geom, evaluator, coeffs, W, direct, rows, cols, alpha, acc, direct_acc, acc_cols=None,
                     direct_acc_cols=None) -> None:
    """For the finished weights W of tile (rows, cols): the direct coordinates' part ((W o D_k) alpha) of the
    pairs evaluated with them (direct_acc (k, c, R); with ``direct_acc_cols`` (k, c, C) also the mirrored side's,
    -(W o D_k)^T alpha). With a band, those pairs' products with the ``prefix`` coefficients are added here (acc,
    and acc_cols mirrored) and their weights zeroed, so that the tile's whole product sees only the pairs outside
    the band (``_Coefficients``)."""
    a, b = _band_span(geom, rows, cols)
    if b <= a:
        return
    Wb = W[:, a:b]
    band = slice(cols.start + a, cols.start + b)
    for q in range(geom.kdir):
        D = direct[q][:, a:b]
        if not evaluator.weighted_direct:
            D.mul_(Wb)
        direct_acc[q].addmm_(alpha[band].T, D.T)
        if direct_acc_cols is not None:
            direct_acc_cols[q][:, a:b].addmm_(alpha[rows].T, D, alpha=-1.0)
    if geom.band is None:
        return
    pre = coeffs.prefix
    if coeffs.coords.width:
        acc[:, :pre].addmm_(Wb, coeffs(band)[:, :pre])
        if acc_cols is not None:
            acc_cols[a:b, :pre].addmm_(Wb.T, coeffs(rows)[:, :pre])
    Wb.zero_()


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
    nb = _buckets(geom)
    plan = plan_tiles(m, n, budget - coeffs.bytes,
                      per_row=item * (width + 2 * c * r + k * c + nb * c),
                      per_col=0 if coeffs.whole or not coeffs.needed else width * item,
                      per_cell=item * (1 + scratch_cells + k), device=alpha.device, what="a gradient tile")
    dev, dt = alpha.device, alpha.dtype
    tile_buf = torch.empty(plan.rows * plan.cols, dtype=dt, device=dev)
    direct_buf = torch.empty(k, plan.rows * plan.cols, dtype=dt, device=dev)
    acc_buf = torch.empty(plan.rows, width, dtype=dt, device=dev)
    P_buf = torch.empty(nb, plan.rows, c, dtype=dt, device=dev) if nb else None
    # Transposed (k, c, rows): MKL runs the thin products alpha^T D^T 2-3x faster than D alpha.
    direct_acc_buf = torch.empty(k, c, plan.rows, dtype=dt, device=dev)
    out_buf = torch.empty(plan.rows, c, r, dtype=dt, device=dev)
    summed = _accumulating(geom, evaluator, c, pair_weights)
    alpha_vec = alpha[:, 0].contiguous() if summed else None
    for rows in plan.row_blocks(m):
        R = rows.stop - rows.start
        acc = acc_buf[:R].zero_()
        direct_acc = direct_acc_buf[:, :, :R].zero_()
        P = P_buf[:, :R].zero_() if nb else None
        for cols in plan.col_blocks(n):
            size = R * (cols.stop - cols.start)
            tile = tile_buf[:size].view(R, -1)
            direct = direct_buf[:, :size].view(k, R, cols.stop - cols.start)
            sums = {"accumulate": (alpha_vec, direct_acc[:, 0], None)} if summed else {}
            near = evaluator.evaluate(rows, cols, tile, gradient=True, direct=direct, **sums)
            pw = None
            if pair_weights is not None:
                block = pair_weights[rows, cols]
                tile.mul_(block)
                pw = None if near is None else block[near.rows, near.cols]
            if near is not None:
                _add_near(geom, acc, direct_acc, near, alpha[cols], weights=pw, width=coeffs.coords.width)
            if not summed:
                _direct_and_band(geom, evaluator, coeffs, tile, direct, rows, cols, alpha, acc, direct_acc)
            if coeffs.needed:
                _tile_products(geom, acc, tile, coeffs, rows, cols, alpha, P)
        yield rows, _finish(geom, rows, acc, direct_acc, c, out_buf, coeffs, P)


def _symmetric_plan(geom, c, item, budget, scratch_cells):
    """Budget split of the symmetric schedule: the coefficients (whole if they fit half the budget, else two
    block slices), one block x block tile, per block row the strip buffers (scratch, direct differences) and the
    output rows; the rest holds the group's accumulators (with frames, the per-bucket sums too)."""
    r, k = geom.r, geom.kdir
    width = sum(_Coefficients.widths(geom, c))
    needed = width > c
    whole = needed and coefficients_whole(geom.n, width, item, budget)
    fixed = geom.n * width * item if whole else 0
    strip = strip_rows(geom.device, gradient=True)
    slices = 0 if whole or not needed else 2 * width
    per_block_row = item * (strip * (scratch_cells + k) + c * r + slices)
    return plan_symmetric(geom.n, budget, fixed=fixed, per_block_cell=item, per_block_row=per_block_row,
                          per_acc_row=item * (width + k * c + _buckets(geom) * c), device=geom.device)


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
    strip = min(B, strip_rows(dev, gradient=True))
    tile_buf = torch.empty(B * B, dtype=dt, device=dev)
    direct_buf = torch.empty(k, strip * B, dtype=dt, device=dev)
    rows_total = min(n, plan.group * B)
    acc_buf = torch.empty(rows_total, coeffs.width, dtype=dt, device=dev)
    direct_acc_buf = torch.empty(k, c, rows_total, dtype=dt, device=dev)
    out_buf = torch.empty(B, c, r, dtype=dt, device=dev)
    nb = _buckets(geom)
    P_buf = torch.empty(nb, rows_total, c, dtype=dt, device=dev) if nb else None
    summed = _accumulating(geom, evaluator, c)
    alpha_vec = alpha[:, 0].contiguous() if summed else None

    for group in plan.groups(len(blocks)):
        g0 = blocks[group[0]].start
        span = blocks[group[-1]].stop - g0
        acc = acc_buf[:span].zero_()
        direct_acc = direct_acc_buf[:, :, :span].zero_()
        P = P_buf[:, :span].zero_() if nb else None
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
                lp = slice(part.start - g0, part.stop - g0)
                sums = {}
                if summed:  # only evaluators that accumulate take the argument
                    sums["accumulate"] = (alpha_vec, direct_acc[:, 0, lp], direct_acc[:, 0, lc] if mirrored else None)
                near = evaluator.evaluate(part, cols, view, gradient=True, direct=direct, **sums)
                if near is not None:
                    _add_near(geom, acc[lp], direct_acc[:, :, lp], near, alpha[cols], width=coeffs.coords.width)
                    if mirrored:
                        flipped = NearPairs(near.cols, near.rows, near.s, near.diff)
                        _add_near(geom, acc[lc], direct_acc[:, :, lc], flipped, alpha[part], sign=-1.0,
                                  width=coeffs.coords.width)
                if not summed:
                    _direct_and_band(geom, evaluator, coeffs, view, direct, part, cols, alpha, acc[lp],
                                     direct_acc[:, :, lp], acc[lc] if mirrored else None,
                                     direct_acc[:, :, lc] if mirrored else None)
            if coeffs.needed:
                lr = slice(rows.start - g0, rows.stop - g0)
                _tile_products(geom, acc[lr], tile, coeffs, rows, cols, alpha, None if P is None else P[:, lr],
                               acc_cols=acc[lc] if mirrored else None,
                               P_cols=None if P is None or not mirrored else P[:, lc])
        for I in group:
            rows = blocks[I]
            lr = slice(rows.start - g0, rows.stop - g0)
            yield rows, _finish(geom, rows, acc[lr], direct_acc[:, :, lr], c, out_buf, coeffs,
                                None if P is None else P[:, lr])


__all__ = ["gradient_blocks", "stacked_coefficients", "BudgetError"]
