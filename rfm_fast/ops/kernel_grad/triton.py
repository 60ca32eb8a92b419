"""Predictor gradient on the triton backend, and the gradient machinery the triton AGOP shares.

With w_ji the gradient weight of pair (j, i) up to the factor -1/L^2 and V = alpha (x) x' (CONVENTIONS.md), in
Euclidean coordinates (x' = x S, S = M^{1/2}, centred): J'_j = (W alpha)_j z'_j^T - reshape((W V)_j), and
J = -(1/L^2) J' S. Two regimes:

* "fused" (C_PAD * D_PAD <= ``fused_max_cd()``, D_PAD <= FUSED_MAX_D, V fits the memory budget; C_PAD, D_PAD the
  powers of two >= c, max(16, d)): one Triton kernel per call, flash-attention style. Each program holds a
  (64, C_PAD D_PAD) accumulator in registers and streams every centre tile: distances by ``tl.dot``, weights in
  registers, then ``tl.dot(W, [alpha | V])``. Nothing of size m x n touches memory. With c * d this large the
  accumulator would spill out of the register file, so past the threshold:
* "gemm": a fused weights kernel writes a bounded (rows x cols) tile of W (distances, weights and the near-pair
  test in one pass), and cuBLAS multiplies it into G = W @ [alpha | V] on tensor cores. This is the regime of
  large c * d (d = 784, c = 10): its flops are in a GEMM with a long inner dimension.
The threshold is a measured trade-off: ``benchmarks/gpu_check.py`` times both regimes on the same cases. Override
with ``$RFM_FAST_TRITON_REGIME`` ("auto", "fused", "gemm") and ``$RFM_FAST_TRITON_FUSED_MAX_CD`` (default 256).

Near pairs (see ``triton_kernels``) get weight 0 in the kernels; their true contribution w alpha (x) (z - x) S is
added here from the exact difference, and pairs at distance exactly 0 contribute nothing.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, Optional

import torch

from ..common import NearPairs, apply_metric, coefficients_fit
from ..triton_kernels import Operands, fused_gradient, fused_shapes, padded_coefficients, pairwise
from .torch import _add_near_field, _stacked_coefficients

REGIME_ENV = "RFM_FAST_TRITON_REGIME"
FUSED_MAX_CD_ENV = "RFM_FAST_TRITON_FUSED_MAX_CD"
DEFAULT_FUSED_MAX_CD = 256
# The fused AGOP also holds a D_PAD x D_PAD partial AGOP per program: 128 x 128 fp32 is 64 KiB of registers.
FUSED_MAX_D = 128
# Preferred tile of the GEMM regime: 4096 x 16384 fp32 weights (256 MiB) feed GEMMs long enough to run at
# tensor-core speed; shrunk to the memory budget, never below 128 x 1024.
GEMM_ROWS, GEMM_COLS = 4096, 16384


def fused_max_cd() -> int:
    value = os.environ.get(FUSED_MAX_CD_ENV, "").strip()
    if not value:
        return DEFAULT_FUSED_MAX_CD
    if not value.isdigit():
        raise ValueError(f"{FUSED_MAX_CD_ENV} must be a positive integer, got {value!r}")
    return int(value)


def choose_regime(n: int, c: int, d: int, itemsize: int, memory_budget: int) -> str:
    """"fused" or "gemm" (see the module docstring); ``$RFM_FAST_TRITON_REGIME`` forces one."""
    forced = os.environ.get(REGIME_ENV, "auto").strip().lower() or "auto"
    if forced not in ("auto", "fused", "gemm"):
        raise ValueError(f"{REGIME_ENV} must be 'auto', 'fused' or 'gemm', got {forced!r}")
    if forced != "auto":
        return forced
    c_pad, d_pad, _ = fused_shapes(c, d)
    small = c_pad * d_pad <= fused_max_cd() and d_pad <= FUSED_MAX_D
    return "fused" if small and n * c_pad * d_pad * itemsize <= memory_budget else "gemm"


@contextmanager
def gemm_precision(ops: Operands):
    """cuBLAS in tf32 only in the "tf32" mode (torch has no 3xTF32 GEMM); plain fp32 otherwise."""
    if ops.z.device.type != "cuda":
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = ops.precision == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def add_near_field(ops: Operands, J: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, z_rows: torch.Tensor,
                   alpha: torch.Tensor) -> None:
    """J[r] += w alpha_c (x) ((z_r - x_c) S) for the near pairs (rows local to ``z_rows`` and J, cols global);
    pairs at distance exactly 0 add nothing."""
    if rows.numel() == 0:
        return
    sq = ops.exact_scaled_sq(rows, cols, z_rows)
    _add_near_field(J, NearPairs(rows, cols, sq), z_rows, ops.x, alpha, ops.S, ops.kernel)


def gradient_blocks(ops: Operands, alpha: torch.Tensor, memory_budget: int, regime: str
                    ) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield (rows, J') per block of evaluation points: the raw gradient in Euclidean coordinates,
    J = -(1/L^2) J' S, near field included. J' (rows, c, d) may be a reused buffer."""
    if regime == "fused":
        V = padded_coefficients(ops, alpha)
        J, _, _, r, cc = fused_gradient(ops, alpha, V, ops.zc, ops.zn, write_j=True, write_agop=False)
        add_near_field(ops, J, r, cc, ops.z, alpha)
        yield slice(0, J.shape[0]), J
        return
    yield from _gemm_gradient_blocks(ops, alpha, memory_budget)


def _gemm_gradient_blocks(ops: Operands, alpha: torch.Tensor, memory_budget: int):
    m, n, c, d = ops.zc.shape[0], ops.xc.shape[0], alpha.shape[1], ops.d
    item = ops.zc.element_size()
    width = c + c * d
    whole = coefficients_fit(n, width, item, memory_budget)
    coeffs = _stacked_coefficients(alpha, ops.xc) if whole else None
    budget = memory_budget - (n * width * item if whole else 0)
    rows_n, cols_n = max(1, min(m, GEMM_ROWS)), max(1, min(n, GEMM_COLS))

    def cost(r, k):
        return r * k * item + 2 * r * width * item + (0 if whole else k * width * item)

    while cost(rows_n, cols_n) > budget and rows_n > 128:
        rows_n //= 2
    while cost(rows_n, cols_n) > budget and cols_n > 1024:
        cols_n //= 2
    w_buf = torch.empty(rows_n * cols_n, dtype=ops.dtype, device=ops.zc.device)
    g_buf = torch.empty(rows_n, width, dtype=ops.dtype, device=ops.zc.device)
    j_buf = torch.empty(rows_n, c, d, dtype=ops.dtype, device=ops.zc.device)
    for start in range(0, m, rows_n):
        rows = slice(start, min(m, start + rows_n))
        nr = rows.stop - rows.start
        G = g_buf[:nr].zero_()
        near_rows, near_cols = [], []
        for cstart in range(0, n, cols_n):
            cols = slice(cstart, min(n, cstart + cols_n))
            W = w_buf[: nr * (cols.stop - cols.start)].view(nr, -1)
            r, cc = pairwise(ops, rows, cols, W, gradient=True)
            near_rows.append(r - start)
            near_cols.append(cc)
            rhs = coeffs[cols] if whole else _stacked_coefficients(alpha[cols], ops.xc[cols])
            with gemm_precision(ops):
                G.addmm_(W, rhs)
        J = torch.mul(G[:, :c, None], ops.zc[rows, None, :], out=j_buf[:nr])
        J.sub_(G[:, c:].view(nr, c, d))
        add_near_field(ops, J, torch.cat(near_rows), torch.cat(near_cols), ops.z[rows], alpha)
        yield rows, J


def kernel_grad(z: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, M: Optional[torch.Tensor], kernel: str,
                bandwidth: float, memory_budget: int) -> torch.Tensor:
    """z (m, d), x (n, d), alpha (n, c) -> J (m, c, d) in z's dtype (fp16/bf16 computed in fp32)."""
    m, d, c = z.shape[0], z.shape[1], alpha.shape[1]
    if m == 0:
        return torch.zeros(0, c, d, dtype=z.dtype, device=z.device)
    ops = Operands(z, x, M, kernel, bandwidth)
    alpha = alpha.to(ops.dtype).contiguous()
    regime = choose_regime(x.shape[0], c, d, ops.zc.element_size(), memory_budget)
    out = torch.empty(m, c, d, dtype=z.dtype, device=z.device)
    for rows, J in gradient_blocks(ops, alpha, memory_budget, regime):
        out[rows] = (apply_metric(J, ops.S) * (-1.0 / bandwidth**2)).to(z.dtype)
    return out
