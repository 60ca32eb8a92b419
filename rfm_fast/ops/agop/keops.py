"""AGOP from KeOps gradient reductions: blocks of evaluation points get their Euclidean gradients G (rows, c, d)
from one reduction each (rfm_fast/ops/kernel_grad/keops.py), folded into a float64 d x d accumulator by a GEMM,
    A' = (1/m) sum_j G_j^T G_j,   AGOP = S A' S   (J = -G S; the sign cancels),
centred: A' -= mu^T mu with mu = (1/m) sum_j G_j.

Why one reduction with a c*d output rather than smaller ones: KeOps re-evaluates the distance and the exponential
in every reduction, so splitting the output multiplies that work by the number of pieces, and on CPU that costs
more than the large per-point accumulator. Same-process medians on a shared 2-core CPU, float32, Laplace:
    m = n = 2000, d = 64, c = 10: one c*d reduction 1.06 s (before the ~25% gain of scaling alpha first, see
        rfm_fast/backends/keops.py); [W alpha | W V] ("weights once", finished with a
        rank-1 correction) in blocks of 128 output columns 3.3 s; one reduction per class (output d) 5.1 s;
    m = n = 4000, same d, c: blocks of 8 / 16 / 32 columns of d: 12.9 / 22.6 / 14.6 s against 11.7 s whole.
The whole [W alpha | W V] form in one reduction ran as fast as the chosen one but cancels catastrophically for
near pairs; the chosen formula works on direct differences. On a GPU (registers instead of a stack array, where
large outputs spill) this was not measured.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..common import agop_from_euclidean
from ..kernel_grad.keops import raw_gradient_blocks

# A block of gradients (rows x c x d, plus the float64 copy of the GEMM's operand) takes at most this share of the
# memory budget; KeOps parallelises over rows, so blocks stay as large as the budget allows.
_BLOCK_SHARE = 0.5


def agop(z: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, M: Optional[torch.Tensor], kernel: str,
         bandwidth: float, centered: bool, diag: bool, memory_budget: int) -> torch.Tensor:
    """z (m, d), x (n, d), alpha (n, c) -> AGOP (d, d), or its diagonal (d,), in z's dtype and device.

    Working memory: blocks of at most ``memory_budget / 2`` bytes of gradients, and d x d accumulators.
    """
    m, d, c = z.shape[0], z.shape[1], alpha.shape[1]
    row_bytes = c * d * z.element_size()
    max_rows = max(1, int(memory_budget * _BLOCK_SHARE) // row_bytes)
    total = torch.zeros(d, d, dtype=torch.float64, device=z.device)
    mean = torch.zeros(c, d, dtype=torch.float64, device=z.device) if centered else None
    S = None
    for rows, G, S in raw_gradient_blocks(z, x, alpha, M, kernel, bandwidth, max_rows):
        flat = G.reshape(-1, d)
        total += (flat.T @ flat).double()
        if centered:
            mean += G.sum(0).double()
    total /= m
    if centered:
        mean /= m
        total -= mean.T @ mean
    A = agop_from_euclidean(total, S)
    A = 0.5 * (A + A.T)
    return (torch.diagonal(A).clone() if diag else A).to(z.dtype)
