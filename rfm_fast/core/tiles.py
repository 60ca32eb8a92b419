"""Tiles of kernel values and gradient weights: the distance fill, the near-pair test and the elementwise pass.

A tile (rows, cols) of evaluation points against centres is produced in three steps, the same for every backend:

1. **distances**: tile = tile_sign * s, from one GEMM per segment (frame) on augmented factors,
       [u_z, ||u_z||^2, 1] @ tile_sign * [-2 u_x, 1, ||u_x||^2]^T = tile_sign * (||u_z||^2 + ||u_x||^2 - 2 u_z.u_x),
   plus the directly formed coordinates, tile += tile_sign * (t_z - t_x)^2 for each of them (compensated
   differences, kept in ``direct`` buffers when the gradient needs them again);
2. **elementwise pass** (pluggable: :class:`TorchPass`, the compiled one-pass kernel of the cpp backend, or a
   Triton kernel that does all three steps): the near test s <= b_z[j] + b_x[i] (``Geometry`` bound terms) and
   the values k (or gradient weights w) written in place; near pairs are returned as local (row, col) indices,
   with weight 0 in a gradient tile;
3. **near pairs**, exactly: s from the original points (``Geometry.exact``); a value tile gets k(s) written
   back; a gradient tile's caller adds w(s) alpha_i (x) (u_z - u_x) from the exact difference (``NearPairs``).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Protocol

import torch

from .geometry import Geometry
from .kernels import KernelSpec


# Pairs evaluated by tiles and pairs recomputed exactly, since the last reset (benchmarks report the exact share).
_COUNTS = {"pairs": 0, "exact": 0}


def pair_counts(reset: bool = False) -> dict:
    """{"pairs": pairs evaluated in tiles, "exact": pairs recomputed exactly} since the last reset (a copy)."""
    out = dict(_COUNTS)
    if reset:
        _COUNTS.update(pairs=0, exact=0)
    return out


class NearPairs(NamedTuple):
    """Near pairs of one tile: local row and column indices, exact s (float64) and, for gradient tiles, the exact
    scaled differences u_z - u_x (float64, (k, r))."""

    rows: torch.Tensor
    cols: torch.Tensor
    s: torch.Tensor
    diff: Optional[torch.Tensor]


class ElementwisePass(Protocol):
    """In place on ``tile`` (tile_sign * s): the near test against bz[j] + bx[i] and the values (``gradient``
    False) or gradient weights (True, near entries set to 0). Returns the near pairs as a (k, 2) int64 tensor of
    local (row, col) indices."""

    def __call__(self, tile: torch.Tensor, bz: torch.Tensor, bx: torch.Tensor, spec: KernelSpec,
                 gradient: bool) -> torch.Tensor: ...


def near_indices(tile: torch.Tensor, bz: torch.Tensor, bx: torch.Tensor, sign: float) -> torch.Tensor:
    """Local (row, col) of the entries with sign * tile <= bz[row] + bx[col]: a cheap per-row test with the tile's
    largest column bound first, then every pair of the suspect rows."""
    extreme = tile.amin(1) if sign > 0 else tile.amax(1).neg_()
    suspect = torch.nonzero(extreme <= bz + bx.max()).flatten()
    if suspect.numel() == 0:
        return torch.empty(0, 2, dtype=torch.long, device=tile.device)
    sub = tile[suspect]
    if sign < 0:
        sub = sub.neg_()
    local = torch.nonzero(sub <= bz[suspect, None] + bx[None, :])
    return torch.stack([suspect[local[:, 0]], local[:, 1]], dim=1)


class TorchPass:
    """The elementwise pass in torch ops: the near test (a row reduction, then the suspect rows), then the value
    or weight formulas of the kernel description (2-4 in-place passes). ``scratch`` (at least the tile's size)
    serves the Laplace weights."""

    # The near test and the formulas are separate steps: a tile split into per-frame rectangles runs the test per
    # rectangle (each against its frame's bounds) and the formulas once on the whole tile (``TileEvaluator``).
    separable = True

    def __init__(self, scratch: Optional[torch.Tensor] = None):
        self.scratch = scratch

    def __call__(self, tile, bz, bx, spec, gradient):
        near = near_indices(tile, bz, bx, spec.tile_sign)
        self.formulas(tile, spec, gradient, near)
        return near

    def formulas(self, tile, spec, gradient, near):
        """Values or gradient weights in place; gradient weights of the ``near`` entries (local (k, 2)) set to 0."""
        if gradient:
            scratch = None
            if spec.laplace and self.scratch is not None:
                scratch = self.scratch[:tile.numel()].view(tile.shape)
            spec.weights_(tile, scratch)
            if near.numel():
                tile[near[:, 0], near[:, 1]] = 0
        else:
            spec.values_(tile)


class TileEvaluator:
    """Produces finished tiles (values or gradient weights) for a geometry with a given elementwise pass.

    Holds the augmented factors of every frame (built once per call, (m + n)(re + 2) elements each)."""

    def __init__(self, geom: Geometry, elementwise: Optional[ElementwisePass]):
        self.geom, self.elementwise = geom, elementwise
        self.spec = geom.spec
        self._augmented = {}
        # A pass that adds the directly formed coordinates itself (``fuses_direct``: the compiled one) also leaves
        # w * (hi_z - hi_x) in the gradient's difference buffers (``weighted_direct``).
        self.fused_direct = bool(getattr(elementwise, "fuses_direct", False)) and 0 < geom.kdir <= 4
        self.weighted_direct = self.fused_direct
        # ... and, for one output, can sum the direct part of the gradient itself (``evaluate``'s ``accumulate``).
        self.accumulates_direct = self.fused_direct and bool(getattr(elementwise, "accumulates_direct", False))
        self._columns = None  # per direct coordinate: hi_z as a column, hi_x as a row

    def _aug(self, cross: bool) -> list:
        """Per frame (z_aug, x_aug), both row-major (the GEMM takes x_aug's rows transposed, with no copy), built
        on first use. With ``cross``, the factors also carry the cross term 2 dhi dlo of the directly formed
        coordinates (see ``distances``)."""
        if cross not in self._augmented:
            geom, sign = self.geom, self.spec.tile_sign
            built = []
            for frame in geom.frames:
                if frame.xe64 is not None:  # a wide geometry: the distance GEMM in float64
                    ze, xe = frame.ze64, frame.xe64
                    zn, xn = (ze * ze).sum(1), (xe * xe).sum(1)
                else:
                    ze, xe, zn, xn = frame.ze, frame.xe, frame.zn, frame.xn
                zcols, xcols = [ze], [(xe, -2.0)]
                if cross and frame.direct:
                    (zh, zl), (xh, xl) = (tuple(t.to(ze.dtype) for t in pair) for pair in (geom.zt, geom.xt))
                    # 2 dhi dlo = 2 hi_z lo_z + 2 hi_x lo_x - 2 hi_z lo_x - 2 lo_z hi_x
                    zn = zn + 2.0 * (zh * zl).sum(1)
                    xn = xn + 2.0 * (xh * xl).sum(1)
                    zcols += [zh, zl]
                    xcols += [(xl, -2.0), (xh, -2.0)]
                width = sum(t.shape[1] for t in zcols)
                if width == 0 and len(zcols) == 1:
                    built.append(None)
                    continue
                z_aug = torch.empty(ze.shape[0], width + 2, dtype=ze.dtype, device=ze.device)
                x_aug = torch.empty(xe.shape[0], width + 2, dtype=xe.dtype, device=xe.device)
                start = 0
                for zt, (xt, scale) in zip(zcols, xcols):
                    stop = start + zt.shape[1]
                    z_aug[:, start:stop] = zt
                    torch.mul(xt, sign * scale, out=x_aug[:, start:stop])
                    start = stop
                z_aug[:, width] = zn
                z_aug[:, width + 1] = 1.0
                x_aug[:, width] = sign
                torch.mul(xn, sign, out=x_aug[:, width + 1])
                built.append((z_aug, x_aug))
            self._augmented[cross] = built
        return self._augmented[cross]

    def distances(self, rows: slice, cols: slice, out: torch.Tensor, direct: Optional[list] = None,
                  differences: bool = False) -> None:
        """tile_sign * s for the tile (rows, cols) into ``out`` (len rows, len cols). Directly formed coordinates
        add (t_z - t_x)^2 each: dhi = hi_z - hi_x is formed directly (one pass) and, for compensated coordinates,
        the cross term 2 dhi dlo rides in the GEMM (its rounding, ~eps^2 |t|^2, and the omitted dlo^2 are covered
        by the direct near threshold). ``direct`` holds buffers of the tile's shape for dhi: kdir of them with
        ``differences`` (gradient tiles use dhi again: ``rfm_fast.core.gradient``), else one, reused.

        With tile_sign +1 (Laplace) the squares are formed first and the GEMMs accumulate onto them (C += A B in
        the GEMM's own store), one pass fewer than adding them afterwards; with -1 that would need beta = -1,
        which BLAS applies as a pass of its own, so the squares are added after the GEMMs.

        A geometry with a band takes the whole tile from one GEMM in the band's frame (every coordinate in the
        expansion: one call, since a BLAS call costs about as much for a third of the columns), then overwrites the
        band's run of columns, if the tile has one, as above."""
        geom = self.geom
        if geom.band is not None:
            aug = self._aug(geom.zt[1] is not None)[geom.band.FRAME]
            torch.mm(aug[0][rows], aug[1][cols].T, out=out)
            for seg in geom.segments(rows, cols):
                if seg.frame != geom.band.FRAME:
                    c0, c1 = seg.cols.start - cols.start, seg.cols.stop - cols.start
                    self._direct_distances(rows, seg.cols, out[:, c0:c1], seg.frame,
                                           None if direct is None else [D[:, c0:c1] for D in direct], differences)
            return
        sign = self.spec.tile_sign
        aug_all = self._aug(geom.kdir > 0 and geom.zt[1] is not None)
        formed = geom.kdir > 0 and not self.fused_direct
        first = formed and sign > 0
        if first:
            self._direct_squares(rows, cols, out, direct, differences, first=True)
        for seg in geom.segments(rows, cols):
            view = out[seg.rows.start - rows.start:seg.rows.stop - rows.start,
                       seg.cols.start - cols.start:seg.cols.stop - cols.start]
            self._expanded(aug_all[seg.frame], seg.rows, seg.cols, view, first)
        if formed and not first:
            self._direct_squares(rows, cols, out, direct, differences, first=False)

    def _direct_distances(self, rows, cols, view, frame, direct, differences):
        """One rectangle in a frame with direct coordinates: their squares and the frame's GEMM into ``view``."""
        formed = not self.fused_direct
        first = formed and self.spec.tile_sign > 0
        if first:
            self._direct_squares(rows, cols, view, direct, differences, first=True)
        self._expanded(self._aug(self.geom.zt[1] is not None)[frame], rows, cols, view, first)
        if formed and not first:
            self._direct_squares(rows, cols, view, direct, differences, first=False)

    @staticmethod
    def _expanded(aug, rows, cols, view, accumulate):
        """The expansion GEMM of one rectangle into ``view``, added to it with ``accumulate``."""
        if aug is None:
            if not accumulate:
                view.zero_()
        elif aug[0].dtype != view.dtype:  # float64 GEMM of a wide geometry
            product = torch.mm(aug[0][rows], aug[1][cols].T)
            if accumulate:
                view.add_(product)
            else:
                view.copy_(product)
        elif accumulate:
            view.addmm_(aug[0][rows], aug[1][cols].T)
        else:
            torch.mm(aug[0][rows], aug[1][cols].T, out=view)

    def _direct_squares(self, rows, cols, out, direct, differences, first):
        """(hi_z - hi_x)^2 of every directly formed coordinate: written into ``out`` (``first``) or added with
        tile_sign; dhi of coordinate k kept in direct[k] with ``differences``."""
        if self._columns is None:
            (zh, _), (xh, _) = self.geom.zt, self.geom.xt
            # contiguous columns: a broadcast difference with a strided operand runs 3-5x slower (measured: 148
            # against 40 us for 512 x 1024)
            self._columns = [(zh[:, k].contiguous()[:, None], xh[:, k].contiguous()[None, :])
                             for k in range(self.geom.kdir)]
        value = 1.0 if first else self.spec.tile_sign
        for k, (zk, xk) in enumerate(self._columns):
            dz, dx = zk[rows], xk[:, cols]
            if first and k == 0 and not differences:
                torch.sub(dz, dx, out=out)
                out.mul_(out)
                continue
            D = direct[k if differences else 0] if direct is not None and len(direct) else torch.empty_like(out)
            torch.sub(dz, dx, out=D)
            if first and k == 0:
                torch.mul(D, D, out=out)
            else:
                out.addcmul_(D, D, value=value)

    def evaluate(self, rows: slice, cols: slice, out: torch.Tensor, *, gradient: bool,
                 direct: Optional[list] = None, accumulate: Optional[tuple] = None) -> Optional[NearPairs]:
        """The finished tile (values, or gradient weights with near pairs at 0) in ``out``, and its near pairs.

        ``accumulate`` (gradient tiles of an evaluator that ``accumulates_direct``, one output): (alpha (n,) in
        permuted order, the rows' direct sums (k, R), the columns' (k, C) or None) to which the pass adds
        ((W o D_k) alpha)_j and, mirrored, -((W o D_k)^T alpha)_i, instead of filling ``direct``.

        Self pairs (evaluation points that are the centres) are known: s = 0 exactly. They are set to a far
        distance before the pass, so that no near test flags them (with every row of a diagonal tile suspect, a
        row-wise test would otherwise scan the whole tile), and get their known result after it: value k(0) = 1;
        gradient weight 0 (the zero-distance rule), which the pass already gives at s = inf."""
        self.distances(rows, cols, out, direct, differences=gradient)
        geom = self.geom
        selfs = None
        if geom.same and rows.start < cols.stop and cols.start < rows.stop:
            selfs = out.diagonal(rows.start - cols.start)
            selfs.fill_(self.spec.tile_sign * float("inf"))
        found = []
        segments = geom.segments(rows, cols)
        if getattr(self.elementwise, "separable", False) and (len(segments) > 1 or geom.band is not None):
            for seg in segments:
                r0, c0 = seg.rows.start - rows.start, seg.cols.start - cols.start
                view = out[r0:seg.rows.stop - rows.start, c0:seg.cols.stop - cols.start]
                frame = geom.frames[seg.frame]
                if frame.certified:
                    continue
                idx = near_indices(view, frame.bz[seg.rows], frame.bx[seg.cols], self.spec.tile_sign)
                if idx.numel():
                    found.append(idx + torch.tensor([r0, c0], device=idx.device))
            near = torch.cat(found) if found else torch.empty(0, 2, dtype=torch.long, device=out.device)
            self.elementwise.formulas(out, self.spec, gradient, near)
            segments = []
        for seg in segments:
            r0, c0 = seg.rows.start - rows.start, seg.cols.start - cols.start
            view = out[r0:seg.rows.stop - rows.start, c0:seg.cols.stop - cols.start]
            frame = geom.frames[seg.frame]
            if self.fused_direct and frame.direct:
                dout, acc = None, None
                r1, c1 = seg.rows.stop - rows.start, seg.cols.stop - cols.start
                if gradient and accumulate is not None:
                    a, acc_rows, acc_cols = accumulate
                    mirrored = (None, None) if acc_cols is None else (a[seg.rows], acc_cols[:, c0:c1])
                    acc = (a[seg.cols], acc_rows[:, r0:r1], *mirrored)
                elif gradient:
                    dout = direct[:, r0:r1, c0:c1]
                extra = {} if acc is None else {"accumulate": acc}
                idx = self.elementwise(view, frame.bz[seg.rows], frame.bx[seg.cols], self.spec, gradient,
                                       direct=(geom.zt[0][seg.rows], geom.xt[0][seg.cols], dout), **extra)
            else:
                idx = self.elementwise(view, frame.bz[seg.rows], frame.bx[seg.cols], self.spec, gradient)
            if idx.numel():
                found.append(idx + torch.tensor([r0, c0], device=idx.device))
        if selfs is not None and not gradient:
            selfs.fill_(1.0)
        return self.finish_near(rows, cols, out, found, gradient)

    def finish_near(self, rows: slice, cols: slice, out: torch.Tensor, found: list,
                    gradient: bool) -> Optional[NearPairs]:
        """Exact recomputation of the near pairs ``found`` (lists of local (k, 2) indices) of a finished tile."""
        size = (rows.stop - rows.start) * (cols.stop - cols.start)
        _COUNTS["pairs"] += size
        self.geom.count_tile(size)
        if not found:
            return None
        idx = found[0] if len(found) == 1 else torch.cat(found)
        _COUNTS["exact"] += idx.shape[0]
        r_loc, c_loc = idx[:, 0], idx[:, 1]
        r_abs, c_abs = r_loc + rows.start, c_loc + cols.start
        if gradient:
            s, diff = self.geom.exact(r_abs, c_abs, with_diff=True)
            return NearPairs(r_loc, c_loc, s, diff)
        s = self.geom.exact(r_abs, c_abs)
        out[r_loc, c_loc] = self.spec.value_of(s).to(out.dtype)
        return NearPairs(r_loc, c_loc, s, None)


def add_near_field(acc: torch.Tensor, near: NearPairs, alpha: torch.Tensor, spec: KernelSpec,
                   sign: float = 1.0, weights: Optional[torch.Tensor] = None) -> None:
    """acc[rows] += sign * w(s) alpha[cols] (x) diff for the near pairs of one tile (acc (R, c, r), alpha the
    tile's columns (C, c); ``weights``: extra per-pair factors). Pairs at distance 0 add nothing."""
    keep = near.s > 0
    if not bool(keep.any()):
        return
    w = spec.weight_of(near.s[keep])
    if weights is not None:
        w = w * weights[keep].to(w.dtype)
    rows, cols, diff = near.rows[keep], near.cols[keep], near.diff[keep]
    c, r = alpha.shape[1], diff.shape[1]
    step = max(1, 2**20 // max(1, c * r))
    for start in range(0, rows.shape[0], step):
        part = slice(start, start + step)
        coef = (w[part, None] * alpha[cols[part]].to(torch.float64))
        contrib = coef[:, :, None] * diff[part][:, None, :]
        acc.index_add_(0, rows[part], contrib.to(acc.dtype), alpha=sign)
