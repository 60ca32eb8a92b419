"""Fast AGOP on the torch path: gradient tiles (kernel_grad/torch.py) folded into a d x d accumulator as they are
produced, so neither the m x n weights nor the m x c x d gradients are ever held whole.

Per tile the d x d update J^T J is a GEMM over rows * c; tile results are summed in float64 (cheap: d x d per
tile) so the accumulation error does not grow with m. The common factor -1/L^2 and the metric factor P of the
gradient tiles (J = -(1/L^2) J_raw P) are applied once at the end: AGOP = P A' P / L^4.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..common import agop_from_euclidean
from ..kernel_grad.torch import gradient_tiles


def agop(z: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, M: Optional[torch.Tensor], kernel: str,
         bandwidth: float, centered: bool, diag: bool, memory_budget: int, fused: bool = False) -> torch.Tensor:
    """z (m, d), x (n, d), alpha (n, c) -> AGOP (d, d), or its diagonal (d,). ``fused``: see gradient_tiles."""
    m, d, c = z.shape[0], z.shape[1], alpha.shape[1]
    total = torch.zeros(d, d, dtype=torch.float64, device=z.device)
    mean = torch.zeros(c, d, dtype=torch.float64, device=z.device) if centered else None
    P = None
    for rows, J, P in gradient_tiles(z, x, alpha, M, kernel, bandwidth, memory_budget, fused):
        flat = J.reshape(-1, d)
        total += (flat.T @ flat).double()
        if centered:
            mean += J.sum(0).double()
    scale = 1.0 / bandwidth**2
    total *= scale * scale / m
    if centered:
        mean *= -scale / m
        total -= mean.T @ mean
    A = agop_from_euclidean(total, None if P is None else P.double())
    A = 0.5 * (A + A.T)
    return (torch.diagonal(A).clone() if diag else A).to(z.dtype)
