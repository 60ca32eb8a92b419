"""Triton kernels of the ``backend="triton"`` ops, on the kernel core's arrays (rfm_fast/core/geometry.py).

Every kernel reads scaled expansion coordinates (a pair's kernel argument is s = ||u_z - u_x||^2), their squared
norms and the near bound terms bz, bx: a tile of s is ||u_z||^2 + ||u_x||^2 - 2 u_z.u_x with the cross term from
``tl.dot``, and a pair with s <= bz[j] + bx[i] is *near*: the kernels never use it, they append it to a short list
(one atomic per tile that has any) for the host to recompute exactly (``rfm_fast.core``). The list is sorted
before use, so results are deterministic although the kernels fill it in any order; if it overflows, the launch
is repeated with room for every pair.

Precision of ``tl.dot`` for float32 data (``$RFM_FAST_TRITON_PRECISION`` or :data:`PRECISION`, read per call):
    "tf32x3" (default)  three tf32 products, ~fp32 accuracy, ~3x the tf32 cost on tensor cores
    "ieee"              plain fp32 FMA (slowest, exact fp32)
    "tf32"              one tf32 product (fastest; ~1e-3 relative error in distances and products; the core's
                        near threshold for tf32 products applies)
float64 data always runs ``tl.dot`` in fp64 ("ieee").
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

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
def _sq_dist_tile(z_ptr, zn_ptr, bz_ptr, x_ptr, xn_ptr, bx_ptr, offs_m, offs_n, m, n, d, stride_z, stride_x,
                  ACC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """s of a (BLOCK_M, BLOCK_N) tile by expansion, and the mask of valid near pairs (s <= bz + bx)."""
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
    bz = tl.load(bz_ptr + offs_m, mask=mask_m, other=0.0)
    bx = tl.load(bx_ptr + offs_n, mask=mask_n, other=0.0)
    s = tl.maximum(zn[:, None] + xn[None, :] - 2.0 * cross, 0.0)
    near = (s <= bz[:, None] + bx[None, :]) & mask_m[:, None] & mask_n[None, :]
    return s, near


@triton.jit
def _pair_value(s, LAPLACE: tl.constexpr, GRADIENT: tl.constexpr):
    """Kernel value (GRADIENT=False) or gradient weight (True) of the kernel description from s."""
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
def _pairwise_kernel(z_ptr, zn_ptr, bz_ptr, x_ptr, xn_ptr, bx_ptr, out_ptr, pairs_ptr, count_ptr,
                     m, n, d, stride_z, stride_x, stride_out, capacity,
                     LAPLACE: tl.constexpr, GRADIENT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[j, i] = kernel value (or gradient weight, 0 for near pairs) of pair (j, i); grid (m tiles, n tiles).
    Near pairs of a value tile keep their expanded value: the host overwrites them."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    s, near = _sq_dist_tile(z_ptr, zn_ptr, bz_ptr, x_ptr, xn_ptr, bx_ptr, offs_m, offs_n, m, n, d, stride_z,
                            stride_x, ACC, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
    value = _pair_value(s, LAPLACE, GRADIENT)
    if GRADIENT:
        value = tl.where(near, 0.0, value)
    mask = (offs_m[:, None] < m) & (offs_n[None, :] < n)
    ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_out + offs_n[None, :]
    tl.store(ptrs, value.to(out_ptr.dtype.element_ty), mask=mask)
    _record_near(near, offs_m, offs_n, pairs_ptr, count_ptr, capacity, BLOCK_M, BLOCK_N)


@triton.jit
def _kernel_mv_kernel(z_ptr, zn_ptr, bz_ptr, x_ptr, xn_ptr, bx_ptr, alpha_ptr, out_ptr, pairs_ptr, count_ptr,
                      m, n, d, c, stride_z, stride_x, stride_a, stride_out, capacity,
                      LAPLACE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[j] = sum_i k(z_j, x_i) alpha_i over the non-near pairs, flash-attention style: one program per tile
    of evaluation points streams the centres, kernel values stay in registers, fp32 (fp64) accumulation."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_C)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC)
    for n0 in range(0, n, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n
        s, near = _sq_dist_tile(z_ptr, zn_ptr, bz_ptr, x_ptr, xn_ptr, bx_ptr, offs_m, offs_n, m, n, d, stride_z,
                                stride_x, ACC, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        k = tl.where(near, 0.0, _pair_value(s, LAPLACE, False))
        a = tl.load(alpha_ptr + offs_n.to(tl.int64)[:, None] * stride_a + offs_c[None, :],
                    mask=mask_n[:, None] & (offs_c[None, :] < c), other=0.0)
        acc = tl.dot(k.to(ACC), a.to(ACC), acc, input_precision=PRECISION)
        _record_near(near, offs_m, offs_n, pairs_ptr, count_ptr, capacity, BLOCK_M, BLOCK_N)
    mask = (offs_m[:, None] < m) & (offs_c[None, :] < c)
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_out + offs_c[None, :], acc, mask=mask)


@triton.jit
def _gradient_kernel(z_ptr, zn_ptr, bz_ptr, x_ptr, xn_ptr, bx_ptr, alpha_ptr, v_ptr, shift_ptr, j_ptr, agop_ptr,
                     mean_ptr, pairs_ptr, count_ptr, m, n, d, c, stride_z, stride_x, stride_a, capacity,
                     LAPLACE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, WRITE_J: tl.constexpr,
                     WRITE_AGOP: tl.constexpr, SHIFT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_A: tl.constexpr, C_PAD: tl.constexpr, D_PAD: tl.constexpr):
    """Fused raw gradient (C_PAD * D_PAD small): per tile of evaluation points,
        G = W @ [alpha | V]   (W: gradient weights of the tile against all centres, in registers;
                               V = alpha (x) u_x, n x C_PAD D_PAD, zero-padded)
        G~ = (W alpha) (x) u_z - G_V        (BLOCK_M, C_PAD, D_PAD)
    then writes G~ (WRITE_J) and/or, for the AGOP, the tile's partial sum of (G~ - s)^T (G~ - s) (D_PAD, D_PAD)
    and of (G~ - s) (C_PAD, D_PAD) to slot ``program_id`` (s: the centring shift when SHIFT, else 0), reduced on
    the host in a fixed order."""
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < m
    rows_m = offs_m.to(tl.int64)
    offs_a = tl.arange(0, BLOCK_A)
    offs_v = tl.arange(0, C_PAD * D_PAD)
    acc_a = tl.zeros((BLOCK_M, BLOCK_A), dtype=ACC)
    acc_v = tl.zeros((BLOCK_M, C_PAD * D_PAD), dtype=ACC)
    for n0 in range(0, n, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n
        rows_n = offs_n.to(tl.int64)
        s, near = _sq_dist_tile(z_ptr, zn_ptr, bz_ptr, x_ptr, xn_ptr, bx_ptr, offs_m, offs_n, m, n, d, stride_z,
                                stride_x, ACC, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        w = _pair_value(s, LAPLACE, True)
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
    offs_c = tl.arange(0, C_PAD)
    if WRITE_J:
        ptrs = j_ptr + rows_m[:, None, None] * (c * d) + offs_c[None, :, None] * d + offs_d[None, None, :]
        mask = mask_m[:, None, None] & (offs_c[None, :, None] < c) & (offs_d[None, None, :] < d)
        tl.store(ptrs, J, mask=mask)
    if WRITE_AGOP:
        if SHIFT:
            sh = tl.load(shift_ptr + offs_c[:, None] * D_PAD + offs_d[None, :]).to(ACC)
            J = tl.where(mask_m[:, None, None], J - sh[None, :, :], 0.0)
        flat = tl.reshape(J, (BLOCK_M * C_PAD, D_PAD))
        part = tl.dot(tl.trans(flat), flat, input_precision=PRECISION)
        base = pid.to(tl.int64) * (D_PAD * D_PAD)
        tl.store(agop_ptr + base + offs_d[:, None] * D_PAD + offs_d[None, :], part)
        mean_base = pid.to(tl.int64) * (C_PAD * D_PAD)
        tl.store(mean_ptr + mean_base + offs_c[:, None] * D_PAD + offs_d[None, :], tl.sum(J, axis=0))
