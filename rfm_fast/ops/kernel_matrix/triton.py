"""Kernel matrix on the triton backend: one tiled kernel computes the distances by ``tl.dot`` and writes kernel
values straight into the (m, n) result; pairs within rounding of zero distance are then overwritten with the
value of their exactly recomputed distance (1 for equal points). See ``rfm_fast.ops.triton_kernels``."""

from __future__ import annotations

from typing import Optional

import torch

from ..triton_kernels import Operands, pairwise


def kernel_matrix(z: torch.Tensor, x: torch.Tensor, M: Optional[torch.Tensor], kernel: str, bandwidth: float,
                  memory_budget: int) -> torch.Tensor:
    """z (m, d), x (n, d) -> K (m, n) in z's dtype, K[j, i] = k_M(z_j, x_i). Extra memory: O((m + n) d)."""
    m, n = z.shape[0], x.shape[0]
    out = torch.empty(m, n, dtype=z.dtype, device=z.device)
    if m == 0:
        return out
    ops = Operands(z, x, M, kernel, bandwidth)
    rows, cols = pairwise(ops, slice(0, m), slice(0, n), out, gradient=False)
    if rows.numel():
        out[rows, cols] = ops.exact_values(ops.exact_scaled_sq(rows, cols)).to(z.dtype)
    return out
