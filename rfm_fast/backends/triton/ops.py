"""The four ops on the triton backend: Triton kernels (backends/triton/kernels.py) on the kernel core's arrays.

* kernel_matrix: the core's row-block schedule, each tile filled by ``_pairwise_kernel`` (distances, values and
  the near test in one pass; near pairs then exact, by the core).
* kernel_mv: one flash-style launch (``_kernel_mv_kernel``) per group of at most 64 output columns: each program
  streams every centre tile, kernel values in registers; near pairs added from their exact values.
* kernel_grad, agop, two regimes (``choose_regime``):
  - "fused", for small c * r (C_PAD * D_PAD <= ``fused_max_cd()``, D_PAD <= FUSED_MAX_D, V within the budget):
    ``_gradient_kernel`` forms the raw gradients of 64 evaluation points in registers and writes them (grad) or
    only the tile's partial (shifted) Gram matrix and sum (agop), summed here in float64 in a fixed order. Rows
    that have a near pair at nonzero distance are recomputed with their gradients written, corrected by the exact
    near field, and the Gram patched by (G~c - s)^T (G~c - s) - (G~ - s)^T (G~ - s).
  - "gemm": the core's gradient schedule with weight tiles from ``_pairwise_kernel`` and the GEMMs by cuBLAS
    (large c * r, e.g. d = 784, c = 10: the flops sit in a GEMM with a long inner dimension).
  Override with ``$RFM_FAST_TRITON_REGIME`` ("auto", "fused", "gemm") and ``$RFM_FAST_TRITON_FUSED_MAX_CD``.

Every coordinate is an expansion coordinate here (the kernels have no directly formed part; near pairs of small-r
data are recomputed by the core instead). Geometries with several centring frames run the core's schedules with
the weight tiles of ``_pairwise_kernel``, one launch per frame segment. float16/bfloat16 inputs are
promoted to float32 (an O((m + n) d) copy) and the results cast back.
"""

from __future__ import annotations

import dataclasses
import os
from contextlib import contextmanager

import torch
import triton

from ...core import ops as core
from ...core.agop import AgopAccumulator, centering_sample, finish
from ...core.geometry import Geometry
from ...core.kernels import KernelSpec
from ...core.tiles import NearPairs, TileEvaluator, add_near_field
from .kernels import (_gradient_kernel, _kernel_mv_kernel, _pairwise_kernel, next_pow2, precision_mode)

REGIME_ENV = "RFM_FAST_TRITON_REGIME"
FUSED_MAX_CD_ENV = "RFM_FAST_TRITON_FUSED_MAX_CD"
DEFAULT_FUSED_MAX_CD = 256
# The fused AGOP also holds a D_PAD x D_PAD partial Gram matrix per program: 128 x 128 fp32 is 64 KiB of registers.
FUSED_MAX_D = 128
# Output columns per mat-vec launch: a (64, 64) accumulator is the most one program holds next to its tile.
MAX_COLUMNS = 64
BLOCK = 64


def fused_max_cd() -> int:
    value = os.environ.get(FUSED_MAX_CD_ENV, "").strip()
    if not value:
        return DEFAULT_FUSED_MAX_CD
    if not value.isdigit():
        raise ValueError(f"{FUSED_MAX_CD_ENV} must be a positive integer, got {value!r}")
    return int(value)


def fused_shapes(c: int, r: int) -> tuple[int, int, int]:
    """(C_PAD, D_PAD, BLOCK_A) of the fused gradient kernel."""
    c_pad, d_pad = next_pow2(c), max(16, next_pow2(r))
    return c_pad, d_pad, max(16, c_pad)


def choose_regime(n: int, c: int, r: int, itemsize: int, budget: int) -> str:
    """"fused" or "gemm" (see the module docstring); ``$RFM_FAST_TRITON_REGIME`` forces one."""
    forced = os.environ.get(REGIME_ENV, "auto").strip().lower() or "auto"
    if forced not in ("auto", "fused", "gemm"):
        raise ValueError(f"{REGIME_ENV} must be 'auto', 'fused' or 'gemm', got {forced!r}")
    if forced != "auto":
        return forced
    c_pad, d_pad, _ = fused_shapes(c, r)
    small = c_pad * d_pad <= fused_max_cd() and d_pad <= FUSED_MAX_D
    return "fused" if small and n * c_pad * d_pad * itemsize <= budget else "gemm"


class _Call:
    """One op call: the problem promoted to a compute dtype (float64 stays, everything else float32), its
    geometry, the dot precision, and whether the fused kernels cover the geometry."""

    def __init__(self, problem):
        self.out_dtype = problem.x.dtype
        dtype = torch.float64 if problem.x.dtype == torch.float64 else torch.float32
        cast = (lambda t: None if t is None else t.to(dtype))
        self.problem = dataclasses.replace(problem, x=cast(problem.x), centers=cast(problem.centers),
                                           alpha=cast(problem.alpha),
                                           M=problem.M if not isinstance(problem.M, torch.Tensor) else
                                           problem.M.to(torch.float64 if problem.M.dtype == torch.float64
                                                        else dtype))
        self.spec = KernelSpec(problem.kernel, problem.bandwidth)
        self.precision = precision_mode(dtype)
        p = self.problem
        self.geom = Geometry.build(p.x, p.centers, p.M, self.spec, precision=self.precision, allow_direct=False,
                                   allow_wide=False)
        g = self.geom
        self.fused = g.kdir == 0 and len(g.frames) == 1 and g.perm_z is None and g.perm_x is None
        self.acc = "fp64" if dtype == torch.float64 else "fp32"

    def evaluator(self, geom: Geometry, gradient: bool):
        if geom.kdir:
            return core.torch_evaluator(geom, gradient)
        return _TritonEvaluator(geom, self.precision), 0

    @contextmanager
    def gemm_precision(self):
        """cuBLAS in tf32 only in the "tf32" mode (torch has no 3xTF32 GEMM); plain fp32 otherwise."""
        if self.problem.x.device.type != "cuda":
            yield
            return
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.precision == "tf32"
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous


def _acc_type(dtype: torch.dtype):
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


class _NearList:
    """Device buffers for the near-pair list of one launch: (capacity, 2) int32 pairs and an int32 counter."""

    def __init__(self, capacity: int, device):
        self.capacity = max(1024, int(capacity))
        self.pairs = torch.zeros(self.capacity, 2, dtype=torch.int32, device=device)
        self.count = torch.zeros(1, dtype=torch.int32, device=device)


def _launch_with_near_list(launch, capacity: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``launch(near_list)``; repeat it with a larger list if the first overflowed. Returns the near pairs
    (rows, cols) as sorted int64 tensors, in the launch's local indices."""
    while True:
        near = _NearList(capacity, device)
        launch(near)
        count = int(near.count.item())
        if count <= near.capacity:
            break
        capacity = count
    pairs = near.pairs[:count].to(torch.int64)
    rows, cols = pairs[:, 0], pairs[:, 1]
    if count:
        order = torch.argsort(rows * (int(cols.max()) + 1) + cols)
        rows, cols = rows[order], cols[order]
    return rows, cols


def _block_d(re: int) -> int:
    return min(64, max(16, next_pow2(max(1, re))))


def _pairwise(geom: Geometry, frame_index: int, rows: slice, cols: slice, out: torch.Tensor, gradient: bool,
              precision: str):
    """Fill ``out`` (len rows, len cols; unit column stride) with values or weights; local near pairs."""
    f = geom.frames[frame_index]
    ze, zn, bz = f.ze[rows], f.zn[rows], f.bz[rows]
    xe, xn, bx = f.xe[cols], f.xn[cols], f.bx[cols]
    m, n = ze.shape[0], xe.shape[0]
    grid = (triton.cdiv(m, BLOCK), triton.cdiv(n, BLOCK))

    def launch(near):
        _pairwise_kernel[grid](ze, zn, bz, xe, xn, bx, out, near.pairs, near.count, m, n, geom.re, ze.stride(0),
                               xe.stride(0), out.stride(0), near.capacity, LAPLACE=geom.spec.laplace,
                               GRADIENT=gradient, ACC=_acc_type(ze.dtype), PRECISION=precision, BLOCK_M=BLOCK,
                               BLOCK_N=BLOCK, BLOCK_D=_block_d(geom.re), num_warps=4)

    return _launch_with_near_list(launch, m + n, ze.device)


class _TritonEvaluator(TileEvaluator):
    """Finished tiles from ``_pairwise_kernel`` (one launch per segment); near pairs by the core."""

    def __init__(self, geom: Geometry, precision: str):
        super().__init__(geom, None)
        self.precision = precision

    def evaluate(self, rows, cols, out, *, gradient, direct=None):
        found = []
        for seg in self.geom.segments(rows, cols):
            r0, c0 = seg.rows.start - rows.start, seg.cols.start - cols.start
            view = out[r0:seg.rows.stop - rows.start, c0:seg.cols.stop - cols.start]
            r, c = _pairwise(self.geom, seg.frame, seg.rows, seg.cols, view, gradient, self.precision)
            if r.numel():
                found.append(torch.stack([r + r0, c + c0], dim=1))
        return self.finish_near(rows, cols, out, found, gradient)


def _finish(call: _Call, out: torch.Tensor) -> torch.Tensor:
    return out.to(call.out_dtype)


def kernel_matrix(problem, budget: int):
    call = _Call(problem)
    p = call.problem
    with call.gemm_precision():
        K = core.kernel_matrix(p.x, p.centers, p.M, call.spec, budget, call.evaluator, geom=call.geom)
    return _finish(call, K)


def _fused_mv(call: _Call) -> torch.Tensor:
    geom, p = call.geom, call.problem
    f = geom.frames[0]
    alpha = p.alpha.contiguous()
    m, n, c = geom.m, geom.n, alpha.shape[1]
    out = torch.empty(m, c, dtype=alpha.dtype, device=alpha.device)
    rows = cols = None
    for c0 in range(0, c, MAX_COLUMNS):
        group = slice(c0, min(c, c0 + MAX_COLUMNS))
        a, o = alpha[:, group], out[:, group]
        width = group.stop - group.start

        def launch(near, a=a, o=o, width=width):
            _kernel_mv_kernel[(triton.cdiv(m, BLOCK),)](
                f.ze, f.zn, f.bz, f.xe, f.xn, f.bx, a, o, near.pairs, near.count, m, n, geom.re, width,
                f.ze.stride(0), f.xe.stride(0), a.stride(0), o.stride(0), near.capacity,
                LAPLACE=geom.spec.laplace, ACC=_acc_type(alpha.dtype), PRECISION=call.precision, BLOCK_M=BLOCK,
                BLOCK_N=BLOCK, BLOCK_D=_block_d(geom.re), BLOCK_C=max(16, next_pow2(width)), num_warps=4)

        rows, cols = _launch_with_near_list(launch, m + n, alpha.device)
    if rows.numel():
        values = geom.spec.value_of(geom.exact(rows, cols)).to(alpha.dtype)
        out.index_add_(0, rows, values[:, None] * alpha[cols])
    return out


def kernel_mv(problem, budget: int):
    call = _Call(problem)
    p = call.problem
    if call.geom.degenerate or not call.fused or call.geom.m == 0:
        with call.gemm_precision():
            return _finish(call, core.kernel_mv(p.x, p.centers, p.alpha, p.M, call.spec, budget, call.evaluator,
                                                geom=call.geom))
    return _finish(call, _fused_mv(call))


def _padded_coefficients(geom: Geometry, alpha: torch.Tensor) -> torch.Tensor:
    """V = alpha (x) u_x as an (n, C_PAD * D_PAD) zero-padded matrix: the right-hand side of the fused kernel."""
    n, c = alpha.shape
    c_pad, d_pad, _ = fused_shapes(c, geom.re)
    V = torch.zeros(n, c_pad, d_pad, dtype=alpha.dtype, device=alpha.device)
    torch.mul(alpha[:, :, None], geom.frames[0].xe[:, None, :], out=V[:, :c, :geom.re])
    return V.view(n, c_pad * d_pad)


def _fused_gradient(call: _Call, alpha, V, rows, *, write_j: bool, shift=None):
    """The fused kernel on evaluation points ``rows`` (a slice or an index tensor). Returns (G~ or None, partial
    Grams or None, partial sums or None, near rows local to ``rows``, near cols)."""
    geom = call.geom
    f = geom.frames[0]
    ze, zn, bz = f.ze[rows].contiguous(), f.zn[rows].contiguous(), f.bz[rows].contiguous()
    m, n, c, r = ze.shape[0], geom.n, alpha.shape[1], geom.re
    c_pad, d_pad, block_a = fused_shapes(c, r)
    block_n = 64 if c_pad * d_pad <= 128 else 32
    tiles = triton.cdiv(m, BLOCK)
    dev, dt = ze.device, ze.dtype
    write_agop = not write_j
    J = torch.empty(m, c, r, dtype=dt, device=dev) if write_j else torch.empty(1, dtype=dt, device=dev)
    parts = torch.empty(tiles, d_pad, d_pad, dtype=dt, device=dev) if write_agop else J
    sums = torch.empty(tiles, c_pad, d_pad, dtype=dt, device=dev) if write_agop else J
    sh = J
    if shift is not None:
        sh = torch.zeros(c_pad, d_pad, dtype=dt, device=dev)
        sh[:c, :r] = shift

    def launch(near):
        _gradient_kernel[(tiles,)](
            ze, zn, bz, f.xe, f.xn, f.bx, alpha, V, sh, J, parts, sums, near.pairs, near.count, m, n, r, c,
            ze.stride(0), f.xe.stride(0), alpha.stride(0), near.capacity, LAPLACE=geom.spec.laplace,
            ACC=_acc_type(dt), PRECISION=call.precision, WRITE_J=write_j, WRITE_AGOP=write_agop,
            SHIFT=shift is not None, BLOCK_M=BLOCK, BLOCK_N=block_n, BLOCK_D=_block_d(r), BLOCK_A=block_a,
            C_PAD=c_pad, D_PAD=d_pad, num_warps=8 if c_pad * d_pad >= 128 else 4)

    nr, nc = _launch_with_near_list(launch, m + n, dev)
    return (J if write_j else None), (parts if write_agop else None), (sums if write_agop else None), nr, nc


def _near_field(call: _Call, J, local_rows, cols, global_rows, alpha) -> None:
    """J[local_rows] += the exact near-field terms of the pairs (global_rows, cols); 0 at distance 0."""
    if local_rows.numel() == 0:
        return
    s, diff = call.geom.exact(global_rows, cols, with_diff=True)
    add_near_field(J, NearPairs(local_rows, cols, s, diff), alpha, call.geom.spec)


def _fused_raw_gradients(call: _Call, alpha) -> torch.Tensor:
    V = _padded_coefficients(call.geom, alpha)
    J, _, _, r, c = _fused_gradient(call, alpha, V, slice(None), write_j=True)
    _near_field(call, J, r, c, r, alpha)
    return J


def kernel_grad(problem, budget: int):
    call = _Call(problem)
    p, geom = call.problem, call.geom
    m, c = p.x.shape[0], p.alpha.shape[1]
    if geom.degenerate or m == 0 or not call.fused or \
            choose_regime(geom.n, c, geom.re, p.x.element_size(), budget) == "gemm":
        with call.gemm_precision():
            return _finish(call, core.kernel_grad(p.x, p.centers, p.alpha, p.M, call.spec, budget, call.evaluator,
                                                  geom=geom))
    alpha = p.alpha.contiguous()
    return _finish(call, geom.gradient_to_input(_fused_raw_gradients(call, alpha)))


def _fused_agop_sums(call: _Call, alpha, budget: int, acc: AgopAccumulator) -> None:
    geom = call.geom
    m, c, r = geom.m, alpha.shape[1], geom.re
    c_pad, d_pad, _ = fused_shapes(c, r)
    V = _padded_coefficients(geom, alpha)
    slot_bytes = (d_pad * d_pad + c_pad * d_pad) * alpha.element_size()
    chunk = max(BLOCK, (budget // 4) // slot_bytes * BLOCK)
    near_rows, near_cols = [], []
    for start in range(0, m, chunk):
        rows = slice(start, min(m, start + chunk))
        _, parts, sums, nr, nc = _fused_gradient(call, alpha, V, rows, write_j=False, shift=acc.shift)
        acc.add_gram(parts.sum(0, dtype=torch.float64)[:r, :r], sums.sum(0, dtype=torch.float64)[:c, :r])
        near_rows.append(nr + start)
        near_cols.append(nc)
    rows, cols = torch.cat(near_rows), torch.cat(near_cols)
    if rows.numel() == 0:
        return
    keep = geom.exact(rows, cols) > 0
    rows, cols = rows[keep], cols[keep]
    if rows.numel() == 0:
        return
    patched, local = torch.unique(rows, return_inverse=True)
    J, _, _, _, _ = _fused_gradient(call, alpha, V, patched, write_j=True)
    Jc = J.clone()
    _near_field(call, Jc, local, cols, rows, alpha)
    shift = 0.0 if acc.shift is None else acc.shift.to(torch.float64)
    J64 = J.double() - shift
    Jc64 = Jc.double() - shift
    flat, flat_c = J64.reshape(-1, r), Jc64.reshape(-1, r)
    acc.add_gram(flat_c.T @ flat_c - flat.T @ flat, (Jc64 - J64).sum(0))


def agop(problem, budget: int, *, centered: bool, diag: bool):
    call = _Call(problem)
    p, geom = call.problem, call.geom
    c = p.alpha.shape[1]
    if geom.degenerate or not call.fused or \
            choose_regime(geom.n, c, geom.re, p.x.element_size(), budget) == "gemm":
        with call.gemm_precision():
            return _finish(call, core.agop(p.x, p.centers, p.alpha, p.M, call.spec, budget, call.evaluator,
                                           centered=centered, diag=diag, geom=geom))
    alpha = p.alpha.contiguous()
    shift = None
    if centered:
        shift = _sample_shift(call, geom.rows_subset(centering_sample(geom.m, p.x.device)), alpha)
    acc = AgopAccumulator(geom.r, c, centered=centered, shift=shift, device=p.x.device)
    _fused_agop_sums(call, alpha, budget, acc)
    return _finish(call, finish(acc.raw(geom.m), geom.factor, geom.spec, diag, p.x.dtype))


def _sample_shift(call: _Call, sample: Geometry, alpha) -> torch.Tensor:
    """Mean raw gradient of the centring sample, by the fused kernel on those rows."""
    saved = call.geom
    call.geom = sample
    try:
        return _fused_raw_gradients(call, alpha).mean(0)
    finally:
        call.geom = saved
