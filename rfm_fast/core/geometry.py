"""One preparation of the points for every schedule and backend: metric factor, centring, scaled coordinates.

For evaluation points z (m, d) and centres x (n, d), ``Geometry`` holds, once per call:

* the metric factor F (M = F F^T, rank r; ``rfm_fast.core.metric``), with the bandwidth folded into the scaled
  coordinates u = (t - c) F sigma (``KernelSpec.coord_scale``), so a pair's kernel argument is s = ||u_z - u_x||^2;
* the centring point c (the centres' mean), subtracted *before* the transform, so that the rounding of the
  transform and of the expanded distances scales with the data's spread, not with its offset from the origin;
* the coordinates split in two parts (docs/maths.md, "Near pairs"):
  - ``direct`` coordinates, formed in compensated precision (float32 hi + lo, or float64) and used as exact
    differences: all r of them when r <= DIRECT_MAX_R, else the data's leading 1-2 principal directions when they
    hold all but a sliver of its spread (a near-rank-1 learned M);
  - ``expansion`` coordinates (the rest), whose distances come from one GEMM per tile as
    ||u_z||^2 + ||u_x||^2 - 2 u_z.u_x;
* per frame, the expansion coordinates, their squared norms, and the near bound terms b = near_rtol * ||u_e||^2
  + direct_rtol * ||u_t||^2, so that a pair (j, i) is *near* when its computed s <= b_z[j] + b_x[i]: its distance is
  then recomputed exactly from the original points (``exact``), which gives exactly 0 for equal points;
* the order of the points (``perm_z``, ``perm_x``) and the frames of the pairs (``segments``);
* with direct coordinates and no centring frames, the *band* (``Band``): the points sorted by the leading direct
  coordinate t, and for a strip of rows the run of columns whose pairs can be near in the plain expansion (t within
  a margin of the strip's range). Pairs outside it are evaluated with every coordinate in the expansion (frame
  ``Band.FRAME``: no direct passes, and no near test, which a certificate shows none of them could pass), pairs
  inside it with the direct coordinates. Only time depends on the band, never a result's rule.

Everything else (tiles, schedules, backends) reads these arrays; none of them re-derives a rule.
"""

from __future__ import annotations

import math
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np
import torch

from .frames import MIN_FRAMED, Components, Layout, framed_components, ranges, worth_searching
from .kernels import KernelSpec
from .metric import MetricFactor

# At or below this rank every coordinate is formed directly: as cheap as the GEMM and free of its cancellation.
DIRECT_MAX_R = 4
# Leading directions taken direct for r > DIRECT_MAX_R when the rest holds at most this share of the spread:
# the near bound of the expanded part then shrinks by that factor (near radius by its square root).
HYBRID_MAX_K = 2
HYBRID_REST_SHARE = 2.0**-8
# The decision and the rotation come from the spread of a sample of the centres (spaced evenly in their order):
# up to HYBRID_GRAM_R coordinates, the r x r Gram matrix of HYBRID_PROBE of them; beyond, a cheap first look at
# HYBRID_PROBE (``_may_be_flat``) turns most data away, and power steps on HYBRID_SAMPLE decide the rest. The
# decision only moves work between the expansion and the direct coordinates: every pair is still tested against
# the near bound of its own norms, so a sample that misjudges the spread costs time, never accuracy.
HYBRID_SAMPLE = 1024
HYBRID_GRAM_R = 128
HYBRID_PROBE = 256
# Beyond HYBRID_GRAM_R coordinates the distance GEMM dwarfs a direct coordinate's passes, so the leading direction is
# taken direct as soon as it holds all but HYBRID_WIDE_REST of the spread (a learned M at d = 784: 0.1% of all pairs
# near without it, each recomputed exactly; none with it). When the rest holds at least HYBRID_FLOAT32_REST of the
# spread, its coordinates are formed in float32 and only the direct ones in float64 (O(n d k) instead of O(n d r)).
# float32 coordinates carry a rounding of ~eps |u| (|u| the whole norm), which moves s by up to 2 eps |u| / sqrt(s)
# of itself; one more bound term, HYBRID_FLOAT32_RTOL (||u_e||^2 + ||t||^2), makes every pair that passes the near
# test have s >= 2^-14 (N_z + N_x), so that stays within 2^-16 (as without direct coordinates). With a rest of at
# least 2^-6 the usual term rtol_e ||u_e||^2 (2^-8) is about as large, so few pairs more are flagged; below it the
# extra term would dominate, and the rest is formed in float64 instead.
HYBRID_WIDE_REST = 0.5
HYBRID_FLOAT32_REST = 2.0**-6
HYBRID_FLOAT32_RTOL = 2.0**-14
# float32 data whose expanded distances would carry a relative error above WIDE_ERROR in the kernel values get
# their distance GEMMs in float64 (``Geometry.wide``): the expansion's absolute error in s is ~8 eps (||u_z||^2 +
# ||u_x||^2) / 2 (measured: 1.3e-5 AGOP error at a mean ||u||^2 of 24, Gaussian), and a Gaussian value takes it
# whole (a Laplace value divided by 2 sqrt(s)), however far apart the pair is.
WIDE_ERROR = 2.0**-20
WIDE_SAMPLE = 1024
# The band (``Band``) is used from this many centres on. Below, its preparation and the extra GEMM call of each strip
# that meets the band cost about what it saves (measured, learned M, torch mat-vec: 1.06 with it against 1.03
# without at n = 4000, d = 64; 0.99 against 1.06 at n = 6000; 0.89 against 1.06 at n = 16000).
BAND_MIN_N = 4096
# Gradient tiles: from BAND_GRADIENT_MIN_N centres when the factor has at most BAND_GRADIENT_SMALL_R coordinates (the
# direct passes are then much of a tile's work), else from BAND_GRADIENT_MIN_N_WIDE. Measured, torch AGOP, learned M
# over M = I, without and with the band: d = 10 (r = 6): 1.32 / 1.37 at n = 2000, 1.32 / 1.21 at 3000, 1.36 / 1.21
# at 4000, 1.34 / 1.03 at 8000; d = 64 (r = 35): 0.77 / 0.82 at 4000, 0.75 / 0.77 at 6000, 0.76 / 0.73 at 8000.
BAND_GRADIENT_MIN_N = 3072
BAND_GRADIENT_SMALL_R = 16
BAND_GRADIENT_MIN_N_WIDE = 8192
# Exact recomputations are formed this many elements at a time (bounded working memory).
EXACT_CHUNK_ELEMS = 2**20
# float32 work with a dense factor: once an op's near pairs are projected to number at least half its points, their
# exact s comes from float64 coordinates (t - c) F of every point, formed once (``Geometry.exact``: r products a
# pair instead of d r), as long as those take at most EXACT_COORDS_MAX_BYTES.
EXACT_COORDS_MAX_BYTES = 2**28


_REUSE: Optional[dict] = None


@contextmanager
def reuse():
    """Within this context ``Geometry.build`` hands back the geometry of an earlier call on the same tensors
    (the same objects, unmodified since: equal version counters) with the same metric, kernel and options, instead
    of preparing it again: for iterative solvers, whose every product has the same points. The geometries are
    dropped when the outermost context exits."""
    global _REUSE
    outer = _REUSE is not None
    if not outer:
        _REUSE = {}
    try:
        yield
    finally:
        if not outer:
            _REUSE = None


def _reuse_key(z, x, M, spec, options) -> tuple:
    def tag(t):
        if isinstance(t, MetricFactor):
            return ("factor", tag(t.source)) if t.source is not None else ("factor", id(t))
        return None if t is None else (id(t), t._version, tuple(t.shape), tuple(t.stride()), t.dtype, t.device)

    return (tag(z), tag(x), tag(M), spec, options)


def same_points(z: torch.Tensor, x: torch.Tensor) -> bool:
    """z and x hold the same rows, bit for bit (the same tensor, or an equal copy: O(n d), once per call)."""
    if z.shape != x.shape or z.dtype != x.dtype or z.device != x.device:
        return False
    if z.data_ptr() == x.data_ptr() and z.stride() == x.stride():
        return True
    return bool(torch.equal(z, x))


@dataclass
class Frame:
    """Expansion coordinates of all rows and columns in one centring frame, with squared norms and near bounds."""

    ze: torch.Tensor  # (m, re)
    xe: torch.Tensor  # (n, re)
    zn: torch.Tensor  # (m,)  ||ze||^2
    xn: torch.Tensor  # (n,)
    bz: torch.Tensor  # (m,)  near bound terms
    bx: torch.Tensor  # (n,)
    ze64: Optional[torch.Tensor] = None  # float64 copies for the distance GEMM of a wide geometry
    xe64: Optional[torch.Tensor] = None
    direct: bool = True  # pairs evaluated in this frame also add the directly formed coordinates
    certified: bool = False  # no pair evaluated in this frame can pass the near test (the band's): none is run


class Segment(NamedTuple):
    """A rectangle of a tile whose pairs are all evaluated in one frame (absolute slices, permuted order)."""

    rows: slice
    cols: slice
    frame: int


class Band:
    """Centres and evaluation points sorted by the leading direct coordinate t; for a run of rows, the columns
    [a, b) whose pairs the plain expansion could leave near. Every other pair is evaluated in frame ``FRAME`` (all
    coordinates in the expansion, no direct passes), and no near test is run on it (``Frame.certified``).

    Why that is safe: in frame FRAME a pair is near when its computed s <= rtol (N_z + N_x), N = ||u||^2 = t^2 + e
    (e the rest of the norm, at most E over the points). The computed s is within 4 K eps (N_z + N_x) of the s of
    the float32 coordinates (a K-term dot product, K = r + 2, of entries whose sizes sum to at most 2 (N_z + N_x),
    and the norms' own rounding), and that s is at least (t_z - t_x)^2. So a near pair has, with rho = rtol + 4 K
    eps (and a sliver for the bound's rounding), (t_z - t_x)^2 <= rho (t_z^2 + t_x^2 + E_z + E_x): for a row at t,
    t_x lies between the roots x-(t) <= x+(t) of (1 - rho) t_x^2 - 2 t t_x + (1 - rho) t^2 - rho E,
        x+-(t) = (t +- sqrt(rho (2 - rho) t^2 + rho (1 - rho) E)) / (1 - rho),
    both increasing in t. Rows sorted by t with t in [lo, hi] can thus only be near centres with t_x in
    [x-(lo), x+(hi)]: a run of the sorted centres, found by bisection."""

    FRAME = 1

    def __init__(self, tz: np.ndarray, tx: np.ndarray, rho: float, rest: float):
        self.tz, self.tx = tz, tx  # ascending (float32 values)
        self.rho, self.rest = rho, rest
        self._cache = {}

    def _root(self, t: float, sign: float) -> float:
        rho = self.rho
        half = math.sqrt(rho * (2.0 - rho) * t * t + rho * (1.0 - rho) * self.rest)
        root = (t + sign * half) / (1.0 - rho)
        return root + sign * 2.0**-20 * (abs(t) + half)  # room for the rounding of this float64 arithmetic

    def columns(self, rows: slice) -> tuple:
        """(a, b): the centres that rows[start:stop] may be near to in the expansion (permuted order)."""
        key = (rows.start, rows.stop)
        hit = self._cache.get(key)
        if hit is None:
            low, high = float(self.tz[rows.start]), float(self.tz[rows.stop - 1])
            hit = (int(np.searchsorted(self.tx, self._root(low, -1.0), "left")),
                   int(np.searchsorted(self.tx, self._root(high, 1.0), "right")))
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[key] = hit
        return hit

    def rows_subset(self, idx: torch.Tensor) -> "Band":
        """The band of the evaluation points idx (sorted permuted indices: still in ascending t)."""
        return Band(self.tz[idx.cpu().numpy()], self.tx, self.rho, self.rest)

    def segments(self, rows: slice, cols: slice) -> list:
        if rows.stop <= rows.start or cols.stop <= cols.start:
            return [Segment(rows, cols, 0)]
        a, b = self.columns(rows)
        a, b = max(a, cols.start), min(b, cols.stop)
        if a >= b:
            return [Segment(rows, cols, self.FRAME)]
        out = [Segment(rows, slice(cols.start, a), self.FRAME)] if a > cols.start else []
        out.append(Segment(rows, slice(a, b), 0))
        if b < cols.stop:
            out.append(Segment(rows, slice(b, cols.stop), self.FRAME))
        return out


class Geometry:
    """Prepared points of one op call; see the module docstring. Built by :meth:`build`."""

    def __init__(self, spec: KernelSpec, factor: MetricFactor, z: torch.Tensor, x: torch.Tensor, same: bool,
                 frames: list, zt: Optional[tuple], xt: Optional[tuple], kdir: int,
                 perm_z: Optional[torch.Tensor], perm_x: Optional[torch.Tensor], layout=None,
                 labels_z: Optional[torch.Tensor] = None):
        self.spec, self.factor = spec, factor
        self.z, self.x = z, x  # original points, permuted, contiguous (exact recomputation)
        # With a band the points stay in the caller's order: row i of the permuted order is z[rows_z[i]].
        self.rows_z: Optional[torch.Tensor] = None
        self.rows_x: Optional[torch.Tensor] = None
        self.same = same
        self.frames = frames
        self.zt, self.xt = zt, xt  # direct coordinates (hi, lo or None), each (m, kdir) / (n, kdir)
        self.kdir = kdir
        self.perm_z, self.perm_x = perm_z, perm_x  # permuted position -> caller's index (None: identity)
        self.layout, self.labels_z = layout, labels_z  # components (frames.Layout) and z's sorted labels
        self.wide = False  # distance GEMMs in float64 (``WIDE_ERROR``)
        self.bucket_of, self.frame_offsets = None, None  # with frames: component -> bucket, (buckets, re)
        self.band: Optional[Band] = None
        self._x_runs = None
        self.centre64: Optional[torch.Tensor] = None  # (1, d) float64: the centring point
        self._tiled, self._exact_seen = 0, 0  # pairs of finished tiles, pairs recomputed exactly (``exact``)
        self._coords64 = None  # (u64_z, n_z, u64_x, n_x) in the order of self.z / self.x, once built
        self.dtype, self.device = z.dtype, z.device
        self.m, self.n, self.d = z.shape[0], x.shape[0], z.shape[1]
        self.r = factor.r
        self.re = self.r - kdir

    @classmethod
    def build(cls, z: torch.Tensor, x: torch.Tensor, M: Optional[torch.Tensor], spec: KernelSpec, *,
              precision: Optional[str] = None, allow_direct: bool = True, allow_frames: bool = True,
              allow_wide: bool = True, allow_band=False) -> "Geometry":
        """Prepare z (m, d), x (n, d) (one float dtype and device) for ``spec``. ``precision="tf32"`` selects the
        near threshold of tf32 products (Triton); ``allow_direct=False`` keeps every coordinate in the expansion
        and ``allow_frames=False`` one centring frame, ``allow_wide=False`` no float64 distance GEMMs (for kernels
        that have none of these); ``allow_band`` "value" (or True) or "gradient" lets tiles of that kind use a band
        (``Band``; from ``band_min_n`` centres on)."""
        options = (precision, allow_direct, allow_frames, allow_wide, allow_band)
        if _REUSE is not None:
            key = _reuse_key(z, x, M, spec, options)
            hit = _REUSE.get(key)
            if hit is None:
                hit = (cls._prepare(z, x, M, spec, *options), (z, x, M))
                _REUSE[key] = hit
            return hit[0]
        return cls._prepare(z, x, M, spec, *options)

    @classmethod
    def _prepare(cls, z, x, M, spec, precision, allow_direct, allow_frames, allow_wide, allow_band) -> "Geometry":
        same = same_points(z, x)
        dtype, device = z.dtype, z.device
        factor = MetricFactor.from_matrix(M, z.shape[1], dtype, device)
        x = x.contiguous()
        z = x if same else z.contiguous()
        # Any point near the data serves as the centre, as long as z and x use the same one: the mean in the
        # working dtype (pairwise sums), kept as that rounded value in float64 too.
        centre_w = x.mean(0, keepdim=True) if x.shape[0] else x.new_zeros(1, x.shape[1])
        centre = centre_w.to(torch.float64)
        xs = x - centre_w
        zs = xs if same else z - centre_w
        sigma = spec.coord_scale
        kdir, rest = 0, 1.0
        if allow_direct:
            if factor.r <= DIRECT_MAX_R:
                kdir = factor.r
            else:
                factor, kdir, rest = _hybrid_of(factor, x, xs, sigma)
        ue64_x = ue64_z = None
        t64_x = t64_z = None
        # float64 only for the direct coordinates when the rest holds enough of the spread for float32's (see
        # HYBRID_FLOAT32_REST)
        rest32 = bool(kdir) and rest >= HYBRID_FLOAT32_REST and dtype == torch.float32
        if kdir and not rest32:
            # float64 coordinates, rounded once: the direct ones are their first kdir columns (as hi + lo pairs),
            # and the expansion part of a hybrid split has norms far below the data's offset from the centre,
            # which a float32 transform of (t - c) would leave as its error.
            ue64_x, ue64_z, ue_x, ue_z = _coords64(z, x, same, centre, factor, sigma, dtype)
        else:
            ue_x = factor.transform(xs, sigma)
            ue_z = ue_x if same else factor.transform(zs, sigma)
        if rest32:
            t64_x = _leading64(x, centre, factor, kdir, sigma)
            t64_z = t64_x if same else _leading64(z, centre, factor, kdir, sigma)
            ue_x[:, :kdir] = t64_x
            if not same:
                ue_z[:, :kdir] = t64_z
        _check_range(ue_x, "centers")
        if not same:
            _check_range(ue_z, "x")
        wide = allow_wide and dtype == torch.float32 and _wide_needed(ue_x, spec)
        if wide and ue64_x is None:  # float64 coordinates for the float64 distance GEMMs
            ue64_x, ue64_z, ue_x, ue_z = _coords64(z, x, same, centre, factor, sigma, dtype)
            rest32 = False
        if ue64_x is not None and kdir:
            t64_x, t64_z = ue64_x[:, :kdir], ue64_z[:, :kdir]
        zt = xt = None
        rtol_e = spec.near_rtol(dtype, precision)
        rtol_d = spec.direct_rtol(dtype)
        tn_x = tn_z = None
        if kdir:
            xt = _hi_lo(t64_x, dtype, ue_x[:, :kdir])
            zt = xt if same else _hi_lo(t64_z, dtype, ue_z[:, :kdir])
            tn_x = (xt[0] * xt[0]).sum(1)
            tn_z = tn_x if same else (zt[0] * zt[0]).sum(1)
        xe = ue_x[:, kdir:].contiguous()
        ze = xe if same else ue_z[:, kdir:].contiguous()
        if wide:
            rtol_e = spec.near_rtol(torch.float64)
        frame = _frame(ze, xe, same, rtol_e, rtol_d, tn_z, tn_x,
                       *((None, None) if not wide else (ue64_z[:, kdir:].contiguous(), ue64_x[:, kdir:].contiguous())),
                       rtol_full=HYBRID_FLOAT32_RTOL if rest32 else 0.0)
        geom = cls(spec, factor, z, x, same, [frame], zt, xt, kdir, None, None)
        geom.wide = wide
        geom.centre64 = centre
        if allow_frames and x.shape[0] >= 2 * MIN_FRAMED and factor.r > DIRECT_MAX_R and ue_x.numel():
            geom._add_frames(ue_x, ue_z, spec.near_rtol(dtype, precision), rtol_d, kdir > 0 or wide, rtol_e,
                             centre)
        if (allow_band and kdir and geom.layout is None and not wide and z.shape[0]
                and x.shape[0] >= band_min_n(allow_band, factor.r)):
            geom._add_band(rtol_e, ue_x, ue_z)
        return geom

    def _add_band(self, rtol_e: float, u_x: torch.Tensor, u_z: torch.Tensor) -> None:
        """Sort the points by the leading direct coordinate and add the frame of all coordinates in the expansion
        (``Band``). ``u_x``, ``u_z``: the float32 coordinates (direct ones first), in the current order."""
        k = self.kdir
        perm_x = _order(self.xt[0][:, 0].contiguous())
        perm_z = perm_x if self.same else _order(self.zt[0][:, 0].contiguous())
        pick = (lambda t, p: None if t is None else t.index_select(0, p))
        f = self.frames[0]
        self.rows_x, self.rows_z = perm_x, perm_z  # the points themselves are not copied
        full_x = u_x.index_select(0, perm_x)  # [t | u_e]: the band's frame, the hybrid one a view of it
        full_z = full_x if self.same else u_z.index_select(0, perm_z)
        self.xt = (full_x[:, :k], pick(self.xt[1], perm_x))
        self.zt = self.xt if self.same else (full_z[:, :k], pick(self.zt[1], perm_z))

        def frames_of(full, hybrid_n, hybrid_b):
            # the full norms as the hybrid ones plus the direct squares (one rounding more, within rho's room)
            n_full = hybrid_n + (full[:, :k] * full[:, :k]).sum(1)
            return (full[:, k:], hybrid_n, hybrid_b), (full, n_full, rtol_e * n_full)

        (xe, xn, bx), (xf, xfn, xfb) = frames_of(full_x, pick(f.xn, perm_x), pick(f.bx, perm_x))
        if self.same:
            hybrid, full = Frame(xe, xe, xn, xn, bx, bx), Frame(xf, xf, xfn, xfn, xfb, xfb)
        else:
            (ze, zn, bz), (zf, zfn, zfb) = frames_of(full_z, pick(f.zn, perm_z), pick(f.bz, perm_z))
            hybrid, full = Frame(ze, xe, zn, xn, bz, bx), Frame(zf, xf, zfn, xfn, zfb, xfb)
        full.direct, full.certified = False, True
        self.frames = [hybrid, full]
        self.perm_x, self.perm_z = perm_x, perm_z

        def largest_rest(norms, t):
            # E of one side: the largest rest of a full norm beyond t^2 (the hybrid norm, any second direct one)
            return float((norms + (t[:, 1:] * t[:, 1:]).sum(1)).max())

        rest_x = largest_rest(hybrid.xn, self.xt[0])
        rest = 2.0 * rest_x if self.same else rest_x + largest_rest(hybrid.zn, self.zt[0])
        rho = rtol_e * (1.0 + 2.0**-10) + 4.0 * (self.r + 2) * torch.finfo(self.dtype).eps
        lead = (lambda t: t[:, 0].contiguous().cpu().numpy())
        self.band = Band(lead(self.zt[0]), lead(self.xt[0]), rho, rest)

    def _add_frames(self, ue_x: torch.Tensor, ue_z: torch.Tensor, rtol_e: float, rtol_d: float, exact64: bool,
                    frame_rtol: float, centre: torch.Tensor) -> None:
        """Find the gap-certified components of the centres (``rfm_fast.core.frames``); when some get a frame,
        order the points by component and add the frame of coordinates about each component's centre.
        ``rtol_e`` is the near threshold of the working dtype (which decides whether frames help); ``frame_rtol``
        the one the frames' bounds use (float64's for a wide geometry); ``exact64``: form the local coordinates in
        float64 too; ``centre`` (1, d, float64): the global frame's centre."""
        # The near test sees only the expansion's coordinates (the directly formed ones do not cancel), so only
        # they can make frames worth their cost.
        if not worth_searching(ue_x[:, self.kdir:], rtol_e):
            return
        comps = Components(ue_x, rtol_e)
        if comps.count < 2:
            return
        labels_x = comps.labels
        K = comps.count
        counts = torch.bincount(labels_x, minlength=K)
        framed = framed_components(ue_x, labels_x, K, rtol_e, comps.tight)
        if not bool(framed.any()):
            return
        labels_z = labels_x if self.same else comps.assign(ue_z)
        perm_x = torch.sort(labels_x, stable=True).indices
        perm_z = perm_x if self.same else torch.sort(labels_z, stable=True).indices
        lx, lz = labels_x[perm_x], labels_z[perm_z]
        runs_x = ranges(lx)
        runs_z = runs_x if self.same else ranges(lz)
        # Component centres in the original coordinates, so local coordinates are formed from small differences.
        x64 = self.x.to(torch.float64)
        origin = torch.zeros(K, self.d, dtype=torch.float64, device=ue_x.device).index_add_(0, labels_x, x64)
        origin = (origin / counts.clamp_min(1)[:, None]).to(self.dtype)
        x = self.x[perm_x]
        z = x if self.same else self.z[perm_z]
        sigma = self.spec.coord_scale
        work = torch.float64 if exact64 else self.dtype
        glob = self.frames[0]
        k = self.kdir
        framed_list = framed.tolist()

        def local(points, runs, glob_e, glob_e64):
            """Expansion coordinates about each framed component's centre (rows of the other components keep
            the global ones), component by component: the points are sorted by component."""
            chosen = torch.empty_like(glob_e)
            wide = None if glob_e64 is None else torch.empty_like(glob_e64)
            for start, stop, comp in runs:
                if framed_list[comp]:
                    own = self.factor.transform(points[start:stop].to(work) - origin[comp].to(work), sigma)[:, k:]
                    chosen[start:stop] = own
                    if wide is not None:
                        wide[start:stop] = own
                else:
                    chosen[start:stop] = glob_e[start:stop]
                    if wide is not None:
                        wide[start:stop] = glob_e64[start:stop]
            return chosen, wide

        def permuted(frame, pz, px):
            """The global frame in the permuted orders."""
            pick = (lambda t, p: None if t is None else t.index_select(0, p))
            xe, xn, bx, xe64 = (pick(t, px) for t in (frame.xe, frame.xn, frame.bx, frame.xe64))
            if self.same:
                return Frame(xe, xe, xn, xn, bx, bx, xe64, xe64)
            return Frame(pick(frame.ze, pz), xe, pick(frame.zn, pz), xn, pick(frame.bz, pz), bx,
                         pick(frame.ze64, pz), xe64)

        ordered = permuted(glob, perm_z, perm_x)
        le_x, le64_x = local(x, runs_x, ordered.xe, ordered.xe64)
        if self.same:
            le_z, le64_z = le_x, le64_x
        else:
            le_z, le64_z = local(z, runs_z, ordered.ze, ordered.ze64)
        tn_x = tn_z = None
        if k:
            self.xt = tuple(None if t is None else t[perm_x].contiguous() for t in self.xt)
            self.zt = self.xt if self.same else tuple(None if t is None else t[perm_z].contiguous() for t in self.zt)
            tn_x = (self.xt[0] * self.xt[0]).sum(1)
            tn_z = tn_x if self.same else (self.zt[0] * self.zt[0]).sum(1)
        self.frames = [ordered, _frame(le_z, le_x, self.same, frame_rtol, rtol_d, tn_z, tn_x, le64_z, le64_x)]
        self.x, self.z = x.contiguous(), x.contiguous() if self.same else z.contiguous()
        if self.same:
            self.z = self.x
        self.perm_x, self.perm_z = perm_x, perm_z
        self.labels_z = lz
        framed_ids = frozenset(torch.nonzero(framed).flatten().tolist())
        self.layout = Layout(runs_z, {c: (a, b) for a, b, c in runs_x}, framed_ids)
        # Offsets of the mixed frame (frame 1) from the global one, per bucket (each framed component its own,
        # the other components together, offset 0): u_global = u_mixed + offset (``rfm_fast.core.gradient``).
        ids = sorted(framed_ids)
        self.bucket_of = [len(ids)] * K
        for b, comp in enumerate(ids):
            self.bucket_of[comp] = b
        buckets = len(ids) + (1 if len(ids) < K else 0)
        offsets = torch.zeros(buckets, self.re, dtype=self.dtype, device=ue_x.device)
        if ids:
            chosen = torch.tensor(ids, device=ue_x.device)
            offsets[:len(ids)] = self.factor.transform(origin[chosen].to(torch.float64) - centre, sigma)[:, k:]
        self.frame_offsets = offsets

    # ---- pairs and frames -------------------------------------------------------------------------------
    @property
    def degenerate(self) -> bool:
        """M = 0 (rank 0): every distance is 0."""
        return self.r == 0

    def segments(self, rows: slice, cols: slice) -> list:
        """The rectangles of tile (rows, cols) with the frame each is evaluated in: frame 1 (about the
        component's centre) for pairs of one framed component, frame 0 (about the centres' mean) for the rest."""
        if self.band is not None:
            return self.band.segments(rows, cols)
        if self.layout is None:
            return [Segment(rows, cols, 0)]
        return self.layout.segments(rows, cols, Segment)

    def bucket_runs(self, span: slice, of_z: bool) -> list:
        """(start, stop, bucket) runs of the rows (``of_z``) or columns ``span`` (absolute, permuted order), with
        consecutive runs of one bucket merged; [] without frames."""
        if self.layout is None:
            return []
        if of_z:
            runs = self.layout.z_ranges
        else:
            if self._x_runs is None:
                self._x_runs = sorted((a, b, comp) for comp, (a, b) in self.layout.x_ranges.items())
            runs = self._x_runs
        out = []
        for a, b, comp in runs:
            a, b = max(a, span.start), min(b, span.stop)
            if a >= b:
                continue
            bucket = self.bucket_of[comp]
            if out and out[-1][2] == bucket and out[-1][1] == a:
                out[-1] = (out[-1][0], b, bucket)
            else:
                out.append((a, b, bucket))
        return out

    def blocks(self, block: int) -> list:
        """Square blocks of at most ``block`` points for the symmetric schedule, cut evenly. (Cutting them at
        component boundaries, so that fewer tiles split into per-frame rectangles, made more and smaller blocks
        and measured 2-3% slower on Deep RFM's digits features once the gradient products stopped splitting.)"""
        return [slice(s, min(self.n, s + block)) for s in range(0, self.n, block)]

    def count_tile(self, pairs: int) -> None:
        """Book the pairs of a finished tile (``exact`` projects its near pairs' share from them)."""
        self._tiled += pairs

    def exact(self, r_idx: torch.Tensor, c_idx: torch.Tensor, with_diff: bool = False):
        """Exact s (and, with ``with_diff``, u_z - u_x in the factor's coordinates, (k, r)) of the pairs
        (z[r_idx], x[c_idx]) (permuted indices), from the original points in float64: exactly 0 for equal
        points, whatever the magnitude of the data.

        float32 work with a dense factor, once many pairs come here (EXACT_COORDS_MAX_BYTES): from float64
        coordinates of the points instead, u_z - u_x, whose rounding (~d eps64 |u|) is below 2^-26 of s for every
        pair with s > tau (||u_z||^2 + ||u_x||^2), tau = d^2 2^-50; the pairs at or below that (duplicates,
        near-duplicates) are still formed from the points."""
        k = r_idx.shape[0]
        self._exact_seen += k
        rz_all = r_idx if self.rows_z is None else self.rows_z[r_idx]
        cx_all = c_idx if self.rows_x is None else self.rows_x[c_idx]
        coords = self._exact_coords()
        if coords is None:
            return self._exact_raw(rz_all, cx_all, with_diff)
        uz, nz, ux, nx = coords
        s = torch.empty(k, dtype=torch.float64, device=self.device)
        diff = torch.empty(k, self.r, dtype=torch.float64, device=self.device) if with_diff else None
        tau = min(2.0**-8, self.d * self.d * 2.0**-50)
        step = max(1, EXACT_CHUNK_ELEMS // max(1, self.r))
        for start in range(0, k, step):
            part = slice(start, start + step)
            rz, cx = rz_all[part], cx_all[part]
            u = uz[rz] - ux[cx]
            s_part = (u * u).sum(1)
            low = torch.nonzero(s_part <= tau * (nz[rz] + nx[cx])).flatten()
            if low.numel():
                again = self._exact_raw(rz[low], cx[low], with_diff)
                if with_diff:
                    s_part[low], u[low] = again
                else:
                    s_part[low] = again
            s[part] = s_part
            if with_diff:
                diff[part] = u
        return (s, diff) if with_diff else s

    def _exact_coords(self):
        """float64 coordinates for ``exact`` when they pay (see there and EXACT_COORDS_MAX_BYTES), else None."""
        if self._coords64 is not None:
            return self._coords64
        if self.dtype != torch.float32 or self.factor.kind != "dense" or self.centre64 is None:
            return None
        projected = self._exact_seen * (self.m * self.n) / self._tiled if self._tiled else self._exact_seen
        points = self.n + (0 if self.same else self.m)
        if projected < points / 2 or points * self.r * 8 > EXACT_COORDS_MAX_BYTES:
            return None
        sigma = self.spec.coord_scale
        ux = _scaled64(self.x, self.centre64, self.factor, sigma)
        nx = (ux * ux).sum(1)
        if self.same:
            self._coords64 = (ux, nx, ux, nx)
        else:
            uz = _scaled64(self.z, self.centre64, self.factor, sigma)
            self._coords64 = (uz, (uz * uz).sum(1), ux, nx)
        return self._coords64

    def _exact_raw(self, rz_all: torch.Tensor, cx_all: torch.Tensor, with_diff: bool):
        """``exact`` from the points, for indices already in the order of self.z / self.x."""
        k = rz_all.shape[0]
        s = torch.empty(k, dtype=torch.float64, device=self.device)
        diff = torch.empty(k, self.r, dtype=torch.float64, device=self.device) if with_diff else None
        step = max(1, EXACT_CHUNK_ELEMS // max(1, self.d))
        for start in range(0, k, step):
            part = slice(start, start + step)
            raw = self.z[rz_all[part]].to(torch.float64) - self.x[cx_all[part]].to(torch.float64)
            u = self.factor.transform(raw, self.spec.coord_scale)
            s[part] = (u * u).sum(1)
            if with_diff:
                diff[part] = u
        return (s, diff) if with_diff else s

    def rows_subset(self, idx: torch.Tensor) -> "Geometry":
        """The geometry of the evaluation points z[idx] (sorted permuted indices) against the same centres: shares
        every centre-side array (the sample of the shifted centring, ``rfm_fast.core.agop``); its rows stay in
        permuted order, so ``perm_z`` is None."""
        frames = [Frame(f.ze[idx], f.xe, f.zn[idx], f.xn, f.bz[idx], f.bx,
                        None if f.ze64 is None else f.ze64[idx], f.xe64, f.direct, f.certified)
                  for f in self.frames]
        zt = None if self.zt is None else tuple(None if t is None else t[idx] for t in self.zt)
        layout, labels = None, None
        if self.layout is not None:
            labels = self.labels_z[idx]
            layout = Layout(ranges(labels), self.layout.x_ranges, self.layout.framed)
        z_rows = self.z[idx if self.rows_z is None else self.rows_z[idx]]
        sub = Geometry(self.spec, self.factor, z_rows, self.x, False, frames, zt, self.xt, self.kdir, None,
                       self.perm_x, layout, labels)
        sub.wide = self.wide
        sub.bucket_of, sub.frame_offsets = self.bucket_of, self.frame_offsets
        sub.rows_x = self.rows_x
        sub.centre64 = self.centre64
        if self.band is not None:
            sub.band = self.band.rows_subset(idx)
        return sub

    # ---- back to the input coordinates ------------------------------------------------------------------
    def gradient_to_input(self, G: torch.Tensor) -> torch.Tensor:
        """Raw gradients G~ (..., r) -> J (..., d) = gamma G~ F^T."""
        return self.factor.to_input(G) * self.spec.grad_scale

    def agop_to_input(self, A: torch.Tensor) -> torch.Tensor:
        """Raw AGOP A~ = (1/m) sum G~^T G~ (r, r, float64) -> gamma^2 F A~ F^T (d, d)."""
        return self.factor.agop_to_input(A) * self.spec.grad_scale**2

    def unpermute_rows(self, out: torch.Tensor) -> torch.Tensor:
        """Rows of an output computed in the permuted order of z, put back in the caller's order."""
        if self.perm_z is None:
            return out
        result = torch.empty_like(out)
        result[self.perm_z] = out
        return result

    def permute_alpha(self, alpha: torch.Tensor) -> torch.Tensor:
        """alpha (n, c) in the permuted order of the centres."""
        return alpha if self.perm_x is None else alpha[self.perm_x]


def band_min_n(tiles, r: int) -> int:
    """Centres from which tiles of kind ``tiles`` ("value" or True, "gradient") take a band, for a factor of rank r."""
    if tiles == "gradient":
        return BAND_GRADIENT_MIN_N if r <= BAND_GRADIENT_SMALL_R else BAND_GRADIENT_MIN_N_WIDE
    return BAND_MIN_N


def _order(t: torch.Tensor) -> torch.Tensor:
    """Indices that sort the vector t (ties in any order): numpy's on the CPU, 4-5x faster there than torch.sort
    (measured at 4000 and 16000 float32 entries on 2 cores)."""
    if t.device.type == "cpu":
        return torch.from_numpy(np.argsort(t.numpy())).to(torch.long)
    return torch.sort(t).indices


def _frame(ze, xe, same, rtol_e, rtol_d, tn_z, tn_x, ze64=None, xe64=None, rtol_full: float = 0.0) -> Frame:
    """The frame of expansion coordinates ze, xe, with bounds rtol_e ||u_e||^2 + rtol_d ||t||^2 (t: the direct
    coordinates, norms tn) + rtol_full (||u_e||^2 + ||t||^2)."""
    xn = (xe * xe).sum(1)
    zn = xn if same else (ze * ze).sum(1)
    bx = (rtol_e + rtol_full) * xn
    bz = bx if same else (rtol_e + rtol_full) * zn
    if tn_x is not None:
        bx = bx + (rtol_d + rtol_full) * tn_x
        bz = bx if same else bz + (rtol_d + rtol_full) * tn_z
    return Frame(ze, xe, zn, xn, bz.contiguous(), bx.contiguous(), ze64, xe64)


def _wide_needed(u: torch.Tensor, spec: KernelSpec) -> bool:
    """Whether float32 expanded distances would cost the kernel values more than WIDE_ERROR (see there),
    judged from the mean squared norm of a sample of the scaled coordinates (every point up to 2 WIDE_SAMPLE)."""
    if u.numel() == 0:
        return False
    sample = u[::max(1, u.shape[0] // WIDE_SAMPLE)]  # evenly spaced rows, a view
    mean = float(torch.linalg.vector_norm(sample).square()) / sample.shape[0]
    error = 8.0 * torch.finfo(torch.float32).eps * mean
    if spec.laplace:
        error /= 2.0 * math.sqrt(max(1.0, 2.0 * mean))
    return error > WIDE_ERROR


def _check_range(u: torch.Tensor, name: str) -> None:
    """Squared norms of the scaled coordinates must stay finite in the working dtype."""
    if u.numel() == 0:
        return
    low, high = torch.aminmax(u)
    biggest = float(torch.maximum(-low, high))  # NaN stays NaN
    limit = torch.finfo(u.dtype).max ** 0.5 / 8
    if not biggest <= limit:
        raise ValueError(f"{name} spans {biggest:.3g} bandwidths from its mean, more than {u.dtype} can square "
                         f"(at most {limit:.3g}): use float64 inputs or a larger bandwidth")


def compensated_pair(z: torch.Tensor, x: torch.Tensor, same: bool, centre: torch.Tensor, factor: MetricFactor,
                     sigma: float, dtype: torch.dtype) -> tuple:
    """Scaled coordinates (t - c) F sigma of z and x in float64, returned as (hi, lo) pairs in ``dtype`` (lo None
    for float64) whose sum carries the float64 value to ~2^-48: their differences (hi_z - hi_x) + (lo_z - lo_x)
    keep near pairs' digits. For KeOps, which forms every distance this way and has no near-pair recheck.

    Equal rows of z and x map to bit-equal coordinates: a GEMM does not promise one summation order for all its
    rows (measured: MKL on an AMD EPYC gave equal float64 rows of one product different last bits, at d = 17),
    so the distinct rows are transformed once (torch.unique) and gathered back. The core's own direct coordinates
    (``Geometry``) skip that sort, which costs more than the rest of a mat-vec's preparation: two equal rows whose
    coordinates differ in the last float64 bits give a direct s of at most ~2^-48 |t|^2 or below zero, inside the
    direct near threshold, and are recomputed exactly."""
    both = x if same else torch.cat([z, x])
    if factor.kind == "dense":
        distinct, inverse = torch.unique(both, dim=0, return_inverse=True)
        wide = factor.transform(distinct.to(torch.float64) - centre, sigma)[inverse]
    else:
        wide = factor.transform(both.to(torch.float64) - centre, sigma)
    hi, lo = _hi_lo(wide, dtype)
    if same:
        return (hi, lo), (hi, lo)
    m = z.shape[0]
    split = (lambda t: (None, None) if t is None else (t[:m].contiguous(), t[m:].contiguous()))
    (zh, xh), (zl, xl) = split(hi), split(lo)
    return (zh, zl), (xh, xl)


def _minus64(t: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """t - centre in float64 (exact for float32 t and a float32-valued centre). Converted first: a mixed-dtype
    subtraction casts element by element, 1.1 ms against 0.06 ms for 4000 x 64 float32 points; then in place on the
    converted copy (one fresh buffer instead of two: 0.05 ms less there)."""
    return t.to(torch.float64, copy=True).sub_(centre)


def _scaled64(t: torch.Tensor, centre: torch.Tensor, factor: MetricFactor, sigma: float) -> torch.Tensor:
    """The scaled coordinates (t - c) F sigma in float64 (one rounding)."""
    return factor.transform(_minus64(t, centre), sigma)


def _leading64(t: torch.Tensor, centre: torch.Tensor, factor: MetricFactor, k: int, sigma: float) -> torch.Tensor:
    """The first k scaled coordinates (t - c) F[:, :k] sigma in float64 (one rounding): O(n d k)."""
    return _minus64(t, centre) @ (factor.as_dense(t.device)[:, :k] * sigma)


def _coords64(z, x, same, centre, factor: MetricFactor, sigma: float, dtype: torch.dtype) -> tuple:
    """(ue64_x, ue64_z, ue_x, ue_z): the scaled coordinates (t - c) F sigma of x and z in float64 (one rounding),
    and those rounded to ``dtype``."""
    ue64_x = _scaled64(x, centre, factor, sigma)
    ue64_z = ue64_x if same else _scaled64(z, centre, factor, sigma)
    ue_x = ue64_x.to(dtype)
    return ue64_x, ue64_z, ue_x, (ue_x if same else ue64_z.to(dtype))


def _hi_lo(wide: torch.Tensor, dtype: torch.dtype, hi: Optional[torch.Tensor] = None) -> tuple:
    """float64 values -> (hi, lo) in ``dtype`` with hi + lo = the value to ~2^-48 (lo None for float64); ``hi``:
    the values already rounded to ``dtype``, when the caller has them."""
    hi = (wide.to(dtype) if hi is None else hi).contiguous()
    lo = (wide - hi.to(torch.float64)).to(dtype) if dtype != torch.float64 else None
    return hi, lo


def _may_be_flat(factor: MetricFactor, xs: torch.Tensor, sigma: float) -> bool:
    """A cheap first look for ``_hybrid``: whether HYBRID_PROBE evenly spaced centres leave at most half of their
    spread outside their HYBRID_MAX_K leading directions. Data that qualify (all but 2^-8 of the spread in <= 2
    directions) show that in any fair sample; data that do not are turned away here at a small fraction of the full
    test's cost (a sample that misses a few dominating outliers only leaves the direct coordinates unused)."""
    u = factor.transform(xs[torch.linspace(0, xs.shape[0] - 1, HYBRID_PROBE, device=xs.device).long()], sigma)
    u = (u - u.mean(0, keepdim=True)).to(torch.float64)
    small = u @ u.T if u.shape[1] > u.shape[0] else u.T @ u  # the same nonzero spectrum, the smaller side
    evals = torch.linalg.eigvalsh(small).flip(0).clamp_min(0)
    total = float(evals.sum())
    return total > 0 and float(evals[:HYBRID_MAX_K].sum()) >= 0.5 * total


# The decision of ``_hybrid`` for the last few centre tensors, kept on the factor (which is itself kept per M tensor,
# ``rfm_fast.core.metric``): an RFM iteration's solve, AGOP and predictions share one M and one set of centres, and
# the decision (a sampled Gram matrix and its eigendecomposition, 60-80 us at n = 1280, d = 10; ~0.15 ms at d = 64)
# depends on nothing else. The entries hold a (d, r) rotated factor, not the points.
HYBRID_CACHE = 4
_HYBRID_LOCK = threading.Lock()


def _hybrid_of(factor: MetricFactor, x: torch.Tensor, xs: torch.Tensor, sigma: float) -> tuple:
    """``_hybrid(factor, xs, sigma)`` for the centres x (xs: x less its mean), remembered on ``factor`` for the same
    unchanged x (the same tensor object, its version counter unchanged)."""
    if factor.kind != "dense":  # identity and diagonal factors are made afresh by every call: nothing to keep
        return _hybrid(factor, xs, sigma)
    memo = factor.memo
    key = (x._version, sigma, x.dtype, x.device)
    hit = memo.get(id(x))
    if hit is not None and hit[0]() is x and hit[1] == key:
        return hit[2]
    out = _hybrid(factor, xs, sigma)
    with _HYBRID_LOCK:
        memo.pop(id(x), None)
        while len(memo) >= HYBRID_CACHE:
            memo.pop(next(iter(memo)))
        memo[id(x)] = (weakref.ref(x), key, out)  # a dead reference never matches (``is x`` fails); it ages out
    return out


def _hybrid(factor: MetricFactor, xs: torch.Tensor, sigma: float) -> tuple:
    """(factor, k, rest): the factor rotated so the data's k leading principal directions come first, when k <= 2
    of them hold all but HYBRID_REST_SHARE of the centres' spread, or, for more than HYBRID_GRAM_R coordinates,
    k = 1 when the leading one holds all but HYBRID_WIDE_REST; else (factor, 0, 1). ``rest``: the share of the
    spread the other directions hold (in the sample). The test costs a few products with the coordinates of a
    sample of centres (block power iteration, stopped as soon as the leading directions are seen to hold too
    little); the rotation is computed only when it pays."""
    n = xs.shape[0]
    if n < 8:
        return factor, 0, 1.0

    def sample(size):
        return xs if n <= size else xs[torch.linspace(0, n - 1, size, device=xs.device).long()]

    if factor.r <= HYBRID_GRAM_R:
        # Few coordinates: the exact spectrum of the r x r Gram matrix of HYBRID_PROBE centres decides, and gives
        # the rotation, at the cost of the first look alone.
        u64 = factor.transform(sample(HYBRID_PROBE), sigma).to(torch.float64)
        u64 = u64 - u64.mean(0, keepdim=True)
        gram = u64.T @ u64
        # lambda_1 + lambda_2 <= sqrt(2) ||G||_F: when even that stays below the share asked for, no k <= 2
        # qualifies, and the eigendecomposition (0.5 ms at r = 64, most of this test) is skipped.
        if math.sqrt(2.0) * float(torch.linalg.matrix_norm(gram)) < (1.0 - HYBRID_REST_SHARE) * float(gram.trace()):
            return factor, 0, 1.0
        evals, evecs = torch.linalg.eigh(gram)
        lead64 = evals.flip(0).clamp_min(0)
        total64 = float(lead64.sum())
        for j in range(1, HYBRID_MAX_K + 1):
            if total64 > 0 and 1.0 - float(lead64[:j].sum()) / total64 <= HYBRID_REST_SHARE:
                return factor.rotated(evecs.flip(1)), j, 1.0 - float(lead64[:j].sum()) / total64
        return factor, 0, 1.0
    if n > 4 * HYBRID_PROBE and not _may_be_flat(factor, xs, sigma):
        return factor, 0, 1.0
    u = factor.transform(sample(HYBRID_SAMPLE), sigma)
    u = u - u.mean(0, keepdim=True)
    total = float((u * u).sum())
    if not total > 0:
        return factor, 0, 1.0
    gen = torch.Generator(device="cpu").manual_seed(0)
    V = torch.randn(u.shape[1], HYBRID_MAX_K + 2, generator=gen, dtype=u.dtype).to(u.device)
    lead = None
    for step in range(5):
        V, _ = torch.linalg.qr(u.T @ (u @ V))
        lead = torch.sort(((u @ V) ** 2).sum(0), descending=True).values
        # Rayleigh quotients only grow towards the eigenvalues: once even the top HYBRID_MAX_K of them would
        # need to grow past the total spread, no k qualifies.
        if float(lead[:HYBRID_MAX_K].sum()) < 0.5 * total:
            return factor, 0, 1.0
    # Ritz pairs of the block: the leading directions and the exact spread each holds in the sample.
    P = (u @ V).to(torch.float64)
    ritz, W = torch.linalg.eigh(P.T @ P)
    ritz, W = ritz.flip(0).clamp_min(0), W.flip(1)
    rests = (1.0 - torch.cumsum(ritz[:HYBRID_MAX_K], 0) / total).tolist()  # spread left beyond j directions
    k = next((j for j in range(1, len(rests) + 1) if rests[j - 1] <= HYBRID_REST_SHARE), 0)
    if k == 0 and rests[0] <= HYBRID_WIDE_REST:
        k = 1
    rest = rests[k - 1] if k else 1.0
    if k == 0:
        return factor, 0, 1.0
    return _lead_first(factor, V.to(torch.float64) @ W[:, :k]), k, rest


def _lead_first(factor: MetricFactor, Y: torch.Tensor) -> MetricFactor:
    """The factor F Q for an orthogonal Q (r x r) whose first columns span the orthonormal columns of Y (r, k),
    Q[:, 0] = +-Y[:, 0]: Q is the product of the k Householder reflections of Y's QR (LAPACK geqrf), applied to F
    one by one, O(d r k) instead of forming Q."""
    a, tau = torch.geqrf(Y)
    F = factor.as_dense(Y.device).clone()
    for i in range(Y.shape[1]):
        v = torch.zeros(Y.shape[0], dtype=F.dtype, device=F.device)
        v[i] = 1.0
        v[i + 1:] = a[i + 1:, i]
        F -= float(tau[i]) * (F @ v)[:, None] * v[None, :]
    return MetricFactor("dense", factor.d, factor.r, dense=F)
