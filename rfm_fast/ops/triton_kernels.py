"""Triton kernels shared by the ``backend="triton"`` ops, and the host-side plumbing around them.

Every kernel works on operands prepared once per call (:class:`Operands`): the points mapped by S = M^{1/2}
(``||u||_M = ||S u||``), centred at the centres' mean, with their squared norms. A tile of squared distances is
``||z||^2 + ||x||^2 - 2 z.x`` with the cross term from ``tl.dot``; nothing of size m x n leaves the chip except in
the kernel-matrix op (the result itself) and in the GEMM regime of the gradient (one bounded weight tile).

Zero distance (CONVENTIONS.md): a pair whose expanded squared distance is within ``RECHECK_RTOL * (|z|^2 + |x|^2)``
of zero has lost its digits to cancellation. Kernels never use such a "near" pair: it contributes 0 in the kernel
and is appended to a short list (one atomic per tile that has any). The host then recomputes those pairs exactly
from the original coordinates (``z - x`` is exact for close points) and adds their true contribution; a pair at
distance exactly 0 gets kernel value 1 and gradient weight 0. The list is sorted before use, so results are
deterministic even though the kernels fill it in any order; if it overflows, the launch is repeated with room for
every pair.

Precision of ``tl.dot`` for float32 data (``$RFM_FAST_TRITON_PRECISION`` or :data:`PRECISION`, read per call):
    "tf32x3" (default)  three tf32 products, ~fp32 accuracy, ~3x the tf32 cost on tensor cores
    "ieee"              plain fp32 FMA (slowest, exact fp32)
    "tf32"              one tf32 product (fastest; ~1e-3 relative error in distances and products)
The cuBLAS GEMMs of the gradient's GEMM regime use tf32 only in "tf32" mode and plain fp32 otherwise.
float64 data always runs ``tl.dot`` in fp64 ("ieee"). float16/bfloat16 inputs are promoted to float32 when the
operands are prepared (an O((m + n) d) copy); every product and sum runs in fp32 and the result is cast back.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .common import RECHECK_CHUNK_ELEMS, RECHECK_RTOL, apply_metric, exact_sq_dist, metric_sqrt

# Near threshold (relative to |z|^2 + |x|^2) by compute dtype and dot precision. A pair just above it keeps a
# relative error of about eps_dot / rtol in its squared distance, which the Laplace weight 1/r passes straight on
# to the gradient of a point near a centre: fp64 uses 2^-16 (boundary error ~1e-11, where the foundation's 2^-26
# leaves ~1e-9), fp32 the foundation's 2^-8, and the tf32 mode (eps 2^-11) 2^-5.
NEAR_RTOL = {"float64": 2.0**-16, "float32": RECHECK_RTOL[torch.float32], "tf32": 2.0**-5}

PRECISION_ENV = "RFM_FAST_TRITON_PRECISION"
PRECISIONS = ("tf32x3", "ieee", "tf32")
# Module-level override of the precision mode (None: the environment variable, else "tf32x3").
PRECISION: Optional[str] = None


def precision_mode(dtype: torch.dtype) -> str:
    """The ``tl.dot`` input precision for operands of ``dtype`` (always "ieee" for float64)."""
    if dtype == torch.float64:
        return "ieee"
    mode = (PRECISION or os.environ.get(PRECISION_ENV, "") or "tf32x3").strip().lower()
    if mode not in PRECISIONS:
        raise ValueError(f"{PRECISION_ENV} must be one of {PRECISIONS}, got {mode!r}")
    return mode


def next_pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


@triton.jit
def _sq_dist_tile(z_ptr, zn_ptr, x_ptr, xn_ptr, offs_m, offs_n, m, n, d, stride_z, stride_x, rtol,
                  ACC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """Unscaled squared distances of a (BLOCK_M, BLOCK_N) tile by expansion, and the mask of valid pairs whose
    value is within rounding of zero (to be recomputed exactly on the host)."""
    mask_m = offs_m < m
    mask_n = offs_n < n
    rows_m = offs_m.to(tl.int64)
    rows_n = offs_n.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    cross = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, d, BLOCK_D):
        kd = k0 + offs_d
        zt = tl.load(z_ptr + rows_m[:, None] * stride_z + kd[None, :], mask=mask_m[:, None] & (kd[None, :] < d),
                     other=0.0)
        xt = tl.load(x_ptr + rows_n[:, None] * stride_x + kd[None, :], mask=mask_n[:, None] & (kd[None, :] < d),
                     other=0.0)
        cross = tl.dot(zt, tl.trans(xt), cross, input_precision=PRECISION)
    zn = tl.load(zn_ptr + offs_m, mask=mask_m, other=0.0)
    xn = tl.load(xn_ptr + offs_n, mask=mask_n, other=0.0)
    total = zn[:, None] + xn[None, :]
    sq = tl.maximum(total - 2.0 * cross, 0.0)
    near = (sq <= rtol * total) & mask_m[:, None] & mask_n[None, :]
    return sq, near


@triton.jit
def _pair_value(sq, scale, LAPLACE: tl.constexpr, GRADIENT: tl.constexpr):
    """Kernel value (GRADIENT=False) or gradient weight up to the common factor -1/L^2 (GRADIENT=True) from the
    unscaled squared distance; ``scale`` is 1/L^2 (Laplace) or 1/(2 L^2) (Gaussian)."""
    s = sq * scale
    if LAPLACE:
        r = tl.sqrt(s)
        v = tl.exp(-r)
        if GRADIENT:
            # r = 0 only for near pairs and padding, whose weight the callers replace by 0.
            v = v / tl.where(r > 0, r, 1.0)
    else:
        v = tl.exp(-s)
    return v


@triton.jit
def _record_near(near, offs_m, offs_n, pairs_ptr, count_ptr, capacity, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """Append the (row, col) of every near pair of the tile to the list: one atomic per tile that has any."""
    flags = near.to(tl.int32)
    count = tl.sum(tl.sum(flags, axis=1), axis=0)
    if count > 0:
        flat = tl.reshape(flags, [BLOCK_M * BLOCK_N])
        slot = tl.atomic_add(count_ptr, count) + tl.cumsum(flat, 0) - 1
        keep = (flat > 0) & (slot < capacity)
        zeros = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        rows = tl.reshape(offs_m[:, None] + zeros, [BLOCK_M * BLOCK_N])
        cols = tl.reshape(offs_n[None, :] + zeros, [BLOCK_M * BLOCK_N])
        tl.store(pairs_ptr + 2 * slot, rows, mask=keep)
        tl.store(pairs_ptr + 2 * slot + 1, cols, mask=keep)


@triton.jit
def _pairwise_kernel(z_ptr, zn_ptr, x_ptr, xn_ptr, params_ptr, out_ptr, pairs_ptr, count_ptr,
                     m, n, d, stride_z, stride_x, stride_out, capacity,
                     LAPLACE: tl.constexpr, GRADIENT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[j, i] = kernel value (or gradient weight, 0 for near pairs) of pair (j, i); grid (m tiles, n tiles).
    Near pairs of the value matrix keep their expanded value: the host overwrites them."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    scale = tl.load(params_ptr)
    rtol = tl.load(params_ptr + 1)
    sq, near = _sq_dist_tile(z_ptr, zn_ptr, x_ptr, xn_ptr, offs_m, offs_n, m, n, d, stride_z, stride_x, rtol,
                             ACC, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
    value = _pair_value(sq, scale, LAPLACE, GRADIENT)
    if GRADIENT:
        value = tl.where(near, 0.0, value)
    mask = (offs_m[:, None] < m) & (offs_n[None, :] < n)
    ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_out + offs_n[None, :]
    tl.store(ptrs, value.to(out_ptr.dtype.element_ty), mask=mask)
    _record_near(near, offs_m, offs_n, pairs_ptr, count_ptr, capacity, BLOCK_M, BLOCK_N)


@triton.jit
def _kernel_mv_kernel(z_ptr, zn_ptr, x_ptr, xn_ptr, params_ptr, alpha_ptr, out_ptr, pairs_ptr, count_ptr,
                      m, n, d, c, stride_z, stride_x, stride_a, stride_out, capacity,
                      LAPLACE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[j] = sum_i k(z_j, x_i) alpha_i over the non-near pairs, flash-attention style: one program per tile
    of evaluation points streams the centres, kernel values stay in registers, fp32 (fp64) accumulation."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_C)
    scale = tl.load(params_ptr)
    rtol = tl.load(params_ptr + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC)
    for n0 in range(0, n, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n
        sq, near = _sq_dist_tile(z_ptr, zn_ptr, x_ptr, xn_ptr, offs_m, offs_n, m, n, d, stride_z, stride_x, rtol,
                                 ACC, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        k = tl.where(near, 0.0, _pair_value(sq, scale, LAPLACE, False))
        a = tl.load(alpha_ptr + offs_n.to(tl.int64)[:, None] * stride_a + offs_c[None, :],
                    mask=mask_n[:, None] & (offs_c[None, :] < c), other=0.0)
        acc = tl.dot(k.to(ACC), a.to(ACC), acc, input_precision=PRECISION)
        _record_near(near, offs_m, offs_n, pairs_ptr, count_ptr, capacity, BLOCK_M, BLOCK_N)
    mask = (offs_m[:, None] < m) & (offs_c[None, :] < c)
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_out + offs_c[None, :], acc, mask=mask)


@triton.jit
def _gradient_kernel(z_ptr, zn_ptr, x_ptr, xn_ptr, params_ptr, alpha_ptr, v_ptr, j_ptr, agop_ptr, mean_ptr,
                     pairs_ptr, count_ptr, m, n, d, c, stride_z, stride_x, stride_a, capacity,
                     LAPLACE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, WRITE_J: tl.constexpr,
                     WRITE_AGOP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_A: tl.constexpr, C_PAD: tl.constexpr, D_PAD: tl.constexpr):
    """Fused gradient (the on-chip regime, C_PAD * D_PAD small): per tile of evaluation points,
        G = W @ [alpha | V]   (W: gradient weights of the tile against all centres, in registers;
                               V = alpha (x) x, n x C_PAD D_PAD, zero-padded)
        J' = (W alpha) (x) z - G_V        (BLOCK_M, C_PAD, D_PAD): raw gradient, without -1/L^2 and S
    then writes J' (WRITE_J) and/or the tile's partial AGOP J'^T J' (D_PAD, D_PAD) and partial sum of J' over
    the tile's rows (C_PAD, D_PAD) to slot ``program_id`` (WRITE_AGOP): reduced on the host in a fixed order."""
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < m
    rows_m = offs_m.to(tl.int64)
    scale = tl.load(params_ptr)
    rtol = tl.load(params_ptr + 1)
    offs_a = tl.arange(0, BLOCK_A)
    offs_v = tl.arange(0, C_PAD * D_PAD)
    acc_a = tl.zeros((BLOCK_M, BLOCK_A), dtype=ACC)
    acc_v = tl.zeros((BLOCK_M, C_PAD * D_PAD), dtype=ACC)
    for n0 in range(0, n, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n
        rows_n = offs_n.to(tl.int64)
        sq, near = _sq_dist_tile(z_ptr, zn_ptr, x_ptr, xn_ptr, offs_m, offs_n, m, n, d, stride_z, stride_x, rtol,
                                 ACC, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        w = _pair_value(sq, scale, LAPLACE, True)
        # Padding rows/columns can sit at distance 0 (w = inf): zero them with the near pairs.
        w = tl.where(mask_m[:, None] & mask_n[None, :] & (near == 0), w, 0.0).to(ACC)
        a = tl.load(alpha_ptr + rows_n[:, None] * stride_a + offs_a[None, :],
                    mask=mask_n[:, None] & (offs_a[None, :] < c), other=0.0)
        acc_a = tl.dot(w, a.to(ACC), acc_a, input_precision=PRECISION)
        v = tl.load(v_ptr + rows_n[:, None] * (C_PAD * D_PAD) + offs_v[None, :], mask=mask_n[:, None], other=0.0)
        acc_v = tl.dot(w, v.to(ACC), acc_v, input_precision=PRECISION)
        _record_near(near, offs_m, offs_n, pairs_ptr, count_ptr, capacity, BLOCK_M, BLOCK_N)
    # alpha's columns >= c are zero, so folding the BLOCK_A columns into groups of C_PAD is exact.
    coef = tl.sum(tl.reshape(acc_a, (BLOCK_M, BLOCK_A // C_PAD, C_PAD)), axis=1)
    offs_d = tl.arange(0, D_PAD)
    zt = tl.load(z_ptr + rows_m[:, None] * stride_z + offs_d[None, :], mask=mask_m[:, None] & (offs_d[None, :] < d),
                 other=0.0).to(ACC)
    J = coef[:, :, None] * zt[:, None, :] - tl.reshape(acc_v, (BLOCK_M, C_PAD, D_PAD))
    if WRITE_J:
        offs_c = tl.arange(0, C_PAD)
        ptrs = j_ptr + rows_m[:, None, None] * (c * d) + offs_c[None, :, None] * d + offs_d[None, None, :]
        mask = mask_m[:, None, None] & (offs_c[None, :, None] < c) & (offs_d[None, None, :] < d)
        tl.store(ptrs, J, mask=mask)
    if WRITE_AGOP:
        flat = tl.reshape(J, (BLOCK_M * C_PAD, D_PAD))
        part = tl.dot(tl.trans(flat), flat, input_precision=PRECISION)
        base = pid.to(tl.int64) * (D_PAD * D_PAD)
        tl.store(agop_ptr + base + offs_d[:, None] * D_PAD + offs_d[None, :], part)
        offs_c = tl.arange(0, C_PAD)
        mean_base = pid.to(tl.int64) * (C_PAD * D_PAD)
        tl.store(mean_ptr + mean_base + offs_c[:, None] * D_PAD + offs_d[None, :], tl.sum(J, axis=0))


class Operands:
    """Per-call prepared operands: compute dtype (fp64 for fp64 input, else fp32), S = M^{1/2}, centred
    transformed points and norms, the scale of the exponent and the near threshold (in a small tensor, so a
    float64 call keeps a float64 scale inside the kernel)."""

    def __init__(self, z: torch.Tensor, x: torch.Tensor, M: Optional[torch.Tensor], kernel: str,
                 bandwidth: float):
        self.out_dtype = z.dtype
        self.dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
        self.kernel, self.laplace, self.bandwidth = kernel, kernel == "laplace", bandwidth
        self.z = z.to(self.dtype)
        self.x = x.to(self.dtype)
        self.M = None if M is None else M.to(self.dtype)
        self.S = metric_sqrt(self.M, self.dtype)
        zt, xt = apply_metric(self.z, self.S), apply_metric(self.x, self.S)
        # Centring at the centres' mean keeps the expansion's cancellation proportional to the data's spread.
        shift = xt.mean(0, keepdim=True)
        self.zc = (zt - shift).contiguous()
        self.xc = (xt - shift).contiguous()
        self.zn = (self.zc * self.zc).sum(1)
        self.xn = (self.xc * self.xc).sum(1)
        self.scale = 1.0 / bandwidth**2 if self.laplace else 0.5 / bandwidth**2
        self.precision = precision_mode(self.dtype)
        rtol = NEAR_RTOL["tf32" if self.precision == "tf32" else str(self.dtype)[6:]]
        self.params = torch.tensor([self.scale, rtol], dtype=self.dtype, device=z.device)
        self.acc = tl.float64 if self.dtype == torch.float64 else tl.float32
        self.d = z.shape[1]
        self.block_d = min(64, max(16, next_pow2(self.d)))

    def exact_scaled_sq(self, rows: torch.Tensor, cols: torch.Tensor, z: Optional[torch.Tensor] = None
                        ) -> torch.Tensor:
        """scale * ||z_r - x_c||_M^2 from the original coordinates (rows of ``z``, default all evaluation
        points), chunked."""
        z = self.z if z is None else z
        out = torch.empty(rows.shape[0], dtype=self.dtype, device=self.z.device)
        step = max(1, RECHECK_CHUNK_ELEMS // self.d)
        for start in range(0, rows.shape[0], step):
            part = slice(start, start + step)
            out[part] = exact_sq_dist(z[rows[part]], self.x[cols[part]], self.M)
        return out.mul_(self.scale)

    def exact_values(self, scaled_sq: torch.Tensor) -> torch.Tensor:
        return torch.exp(-scaled_sq.sqrt()) if self.laplace else torch.exp(-scaled_sq)


class NearList:
    """Device buffers for the near-pair list of one launch: (capacity, 2) int32 pairs and an int32 counter."""

    def __init__(self, capacity: int, device):
        self.capacity = max(1024, int(capacity))
        self.pairs = torch.zeros(self.capacity, 2, dtype=torch.int32, device=device)
        self.count = torch.zeros(1, dtype=torch.int32, device=device)


def launch_with_near_list(launch, capacity: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``launch(near_list)``; repeat it with a larger list if the first overflowed. Returns the near pairs
    (rows, cols) as int64 tensors, sorted, in the launch's local indices."""
    while True:
        near = NearList(capacity, device)
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


def pairwise(ops: Operands, rows: slice, cols: slice, out: torch.Tensor, gradient: bool):
    """Fill ``out`` (len rows, len cols) with kernel values or gradient weights; returns the near pairs in
    global indices."""
    zc, zn = ops.zc[rows], ops.zn[rows]
    xc, xn = ops.xc[cols], ops.xn[cols]
    m, n = zc.shape[0], xc.shape[0]
    block_m, block_n = 64, 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))

    def launch(near):
        _pairwise_kernel[grid](zc, zn, xc, xn, ops.params, out, near.pairs, near.count, m, n, ops.d,
                               zc.stride(0), xc.stride(0), out.stride(0), near.capacity,
                               LAPLACE=ops.laplace, GRADIENT=gradient, ACC=ops.acc, PRECISION=ops.precision,
                               BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=ops.block_d, num_warps=4)

    r, c = launch_with_near_list(launch, m + n, zc.device)
    return r + rows.start, c + cols.start


def kernel_mv(ops: Operands, alpha: torch.Tensor, out: torch.Tensor):
    """out (m, c) = sum over non-near pairs of k alpha; returns the near pairs. c <= 64 per launch."""
    m, n, c = ops.zc.shape[0], ops.xc.shape[0], alpha.shape[1]
    block_m, block_n = 64, 64
    block_c = max(16, next_pow2(c))

    def launch(near):
        _kernel_mv_kernel[(triton.cdiv(m, block_m),)](
            ops.zc, ops.zn, ops.xc, ops.xn, ops.params, alpha, out, near.pairs, near.count, m, n, ops.d, c,
            ops.zc.stride(0), ops.xc.stride(0), alpha.stride(0), out.stride(0), near.capacity,
            LAPLACE=ops.laplace, ACC=ops.acc, PRECISION=ops.precision, BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_D=ops.block_d, BLOCK_C=block_c, num_warps=4)

    return launch_with_near_list(launch, m + n, ops.zc.device)


def fused_shapes(c: int, d: int) -> tuple[int, int, int]:
    """(C_PAD, D_PAD, BLOCK_A) of the fused gradient kernel."""
    c_pad, d_pad = next_pow2(c), max(16, next_pow2(d))
    return c_pad, d_pad, max(16, c_pad)


def padded_coefficients(ops: Operands, alpha: torch.Tensor) -> torch.Tensor:
    """V = alpha (x) x' as an (n, C_PAD * D_PAD) zero-padded matrix: the right-hand side of the fused kernel."""
    n, c = alpha.shape
    c_pad, d_pad, _ = fused_shapes(c, ops.d)
    V = torch.zeros(n, c_pad, d_pad, dtype=ops.dtype, device=alpha.device)
    torch.mul(alpha[:, :, None], ops.xc[:, None, :], out=V[:, :c, : ops.d])
    return V.view(n, c_pad * d_pad)


def fused_gradient(ops: Operands, alpha: torch.Tensor, V: torch.Tensor, zc: torch.Tensor, zn: torch.Tensor, *,
                   write_j: bool, write_agop: bool):
    """Run the fused gradient kernel on the prepared evaluation points ``zc`` (rows of ``ops.zc``) with norms
    ``zn``. Returns (J' or None, partial AGOPs or None, partial sums or None, near rows, near cols), near rows
    local to ``zc``."""
    m, n, c, d = zc.shape[0], ops.xc.shape[0], alpha.shape[1], ops.d
    c_pad, d_pad, block_a = fused_shapes(c, d)
    # Smaller tiles once the accumulators grow, to stay within the register file.
    block_m = 64
    block_n = 64 if c_pad * d_pad <= 128 else 32
    tiles = triton.cdiv(m, block_m)
    dev, dt = zc.device, ops.dtype
    J = torch.empty(m, c, d, dtype=dt, device=dev) if write_j else torch.empty(1, dtype=dt, device=dev)
    parts = torch.empty(tiles, d_pad, d_pad, dtype=dt, device=dev) if write_agop else J
    sums = torch.empty(tiles, c_pad, d_pad, dtype=dt, device=dev) if write_agop else J

    def launch(near):
        _gradient_kernel[(tiles,)](
            zc, zn, ops.xc, ops.xn, ops.params, alpha, V, J, parts, sums, near.pairs, near.count, m, n, d, c,
            zc.stride(0), ops.xc.stride(0), alpha.stride(0), near.capacity,
            LAPLACE=ops.laplace, ACC=ops.acc, PRECISION=ops.precision, WRITE_J=write_j, WRITE_AGOP=write_agop,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=ops.block_d, BLOCK_A=block_a, C_PAD=c_pad, D_PAD=d_pad,
            num_warps=8 if c_pad * d_pad >= 128 else 4)

    r, cc = launch_with_near_list(launch, m + n, dev)
    return J if write_j else None, parts if write_agop else None, sums if write_agop else None, r, cc
