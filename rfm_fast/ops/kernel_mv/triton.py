"""Kernel mat-vec on the triton backend: a flash-attention-style kernel (see ``rfm_fast.ops.triton_kernels``).
Each program owns a tile of evaluation points and streams the centres: distances by ``tl.dot`` against the
precomputed norms, kernel values in registers, ``tl.dot`` with the alpha tile into an fp32 (fp64) accumulator.
Pairs within rounding of zero distance are skipped in the kernel and added here from their exact distance."""

from __future__ import annotations

from typing import Optional

import torch

from ..triton_kernels import Operands, kernel_mv as _launch_kernel_mv

# Output columns per launch: a (64, 64) accumulator is the most one program holds next to its weight tile;
# wider alpha is processed in column groups (distances recomputed per group).
MAX_COLUMNS = 64


def kernel_mv(z: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, M: Optional[torch.Tensor], kernel: str,
              bandwidth: float, memory_budget: int) -> torch.Tensor:
    """z (m, d), x (n, d), alpha (n, c) -> K(z, x) @ alpha, (m, c) in z's dtype (fp16/bf16 computed in fp32)."""
    m, c = z.shape[0], alpha.shape[1]
    if m == 0:
        return torch.zeros(0, c, dtype=z.dtype, device=z.device)
    ops = Operands(z, x, M, kernel, bandwidth)
    alpha = alpha.to(ops.dtype).contiguous()
    out = torch.empty(m, c, dtype=ops.dtype, device=z.device)
    rows = cols = None
    for c0 in range(0, c, MAX_COLUMNS):
        group = slice(c0, min(c, c0 + MAX_COLUMNS))
        rows, cols = _launch_kernel_mv(ops, alpha[:, group], out[:, group])
    if rows.numel():
        values = ops.exact_values(ops.exact_scaled_sq(rows, cols))
        out.index_add_(0, rows, values[:, None] * alpha[cols])
    return out.to(z.dtype)
