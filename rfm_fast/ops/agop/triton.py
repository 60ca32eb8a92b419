"""AGOP on the triton backend: AGOP = (1/m) sum_j J_j^T J_j without the m x n weights or the m x c x d gradients.

Which regime runs (``kernel_grad.triton.choose_regime``; both measured by ``benchmarks/gpu_check.py``):

* "fused", for small c * d (C_PAD * D_PAD <= 256 and d <= 128 by default): one kernel pass. Each program forms
  the raw gradients J' of its 64 evaluation points in registers (``triton_kernels._gradient_kernel``) and writes
  only its partial AGOP J'^T J' (D_PAD x D_PAD) and partial sum of J' (for the centred option) to its own slot;
  the slots are summed here in float64 in a fixed order (deterministic, no atomics). Rows are processed in
  chunks so the slots stay within a quarter of the memory budget.
* "gemm", for large c * d (e.g. d = 784, c = 10): the weights kernel writes bounded tiles of W and cuBLAS forms
  G = W @ [alpha | V] and then J'^T J' per block of rows (``kernel_grad.triton.gradient_blocks``).

Near pairs (distance within rounding of zero) are left out by the kernels. In the gemm regime their exact
contribution is added to J' before J'^T J'. In the fused regime J' never leaves the chip, so for the few rows that
have a near pair at nonzero distance, J' is recomputed (same kernel, J' written), corrected to J' + N, and the
AGOP is patched by (J' + N)^T (J' + N) - J'^T J'. Pairs at distance exactly 0 (self pairs) contribute nothing
and need no patch. Finally AGOP = S A' S / L^4 with S = M^{1/2}, as on the torch path.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..common import agop_from_euclidean
from ..kernel_grad.triton import add_near_field, choose_regime, gemm_precision, gradient_blocks
from ..triton_kernels import Operands, fused_gradient, fused_shapes, padded_coefficients


def _fused_sums(ops: Operands, alpha: torch.Tensor, memory_budget: int, total: torch.Tensor,
                mean: torch.Tensor) -> None:
    m, c, d = ops.zc.shape[0], alpha.shape[1], ops.d
    c_pad, d_pad, _ = fused_shapes(c, d)
    V = padded_coefficients(ops, alpha)
    slot_bytes = (d_pad * d_pad + c_pad * d_pad) * ops.zc.element_size()
    chunk = max(64, (memory_budget // 4) // slot_bytes * 64)
    near_rows, near_cols = [], []
    for start in range(0, m, chunk):
        rows = slice(start, min(m, start + chunk))
        _, parts, sums, r, cc = fused_gradient(ops, alpha, V, ops.zc[rows], ops.zn[rows], write_j=False,
                                               write_agop=True)
        total += parts.sum(0, dtype=torch.float64)[:d, :d]
        mean += sums.sum(0, dtype=torch.float64)[:c, :d]
        near_rows.append(r + start)
        near_cols.append(cc)
    rows, cols = torch.cat(near_rows), torch.cat(near_cols)
    if rows.numel() == 0:
        return
    nonzero = ops.exact_scaled_sq(rows, cols) > 0
    rows, cols = rows[nonzero], cols[nonzero]
    if rows.numel() == 0:
        return
    patched, local = torch.unique(rows, return_inverse=True)
    J, _, _, _, _ = fused_gradient(ops, alpha, V, ops.zc[patched].contiguous(), ops.zn[patched].contiguous(),
                                   write_j=True, write_agop=False)
    Jc = J.clone()
    add_near_field(ops, Jc, local, cols, ops.z[patched], alpha)
    J64, Jc64 = J.reshape(-1, d).double(), Jc.reshape(-1, d).double()
    total += Jc64.T @ Jc64 - J64.T @ J64
    mean += (Jc.double() - J.double()).sum(0)


def agop(z: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, M: Optional[torch.Tensor], kernel: str,
         bandwidth: float, centered: bool, diag: bool, memory_budget: int) -> torch.Tensor:
    """z (m >= 1, d), x (n, d), alpha (n, c) -> AGOP (d, d), or its diagonal (d,), in z's dtype."""
    m, n, d, c = z.shape[0], x.shape[0], z.shape[1], alpha.shape[1]
    ops = Operands(z, x, M, kernel, bandwidth)
    alpha = alpha.to(ops.dtype).contiguous()
    total = torch.zeros(d, d, dtype=torch.float64, device=z.device)
    mean = torch.zeros(c, d, dtype=torch.float64, device=z.device)
    regime = choose_regime(n, c, d, ops.zc.element_size(), memory_budget)
    if regime == "fused":
        _fused_sums(ops, alpha, memory_budget, total, mean)
    else:
        for _, J in gradient_blocks(ops, alpha, memory_budget, regime):
            flat = J.reshape(-1, d)
            with gemm_precision(ops):
                total += (flat.T @ flat).double()
            mean += J.sum(0, dtype=torch.float64)
    scale = 1.0 / bandwidth**2
    total *= scale * scale / m
    if centered:
        mean *= -scale / m
        total -= mean.T @ mean
    A = agop_from_euclidean(total, None if ops.S is None else ops.S.double())
    A = 0.5 * (A + A.T)
    return (torch.diagonal(A).clone() if diag else A).to(z.dtype)
