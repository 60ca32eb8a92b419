"""Predictor gradient as one KeOps reduction per block of evaluation points.

In Euclidean coordinates (z' = z S, x' = x S, S = M^{1/2}) the reduction computes, per evaluation point,
    G_j = sum_i (w_ji alpha_i) (x) (z'_j - x'_i)                    (c x d, from direct differences)
with w the unsigned gradient weight (laplace k / (L r), 0 at r = 0; gaussian k / L^2); then
    J(z_j) = -G_j S          since M (z - x) = S (S (z - x)) (CONVENTIONS.md).
See rfm_fast/backends/keops.py for the formula and why it takes this form.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from ...backends import keops as _keops


def raw_gradient_blocks(z: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, M: Optional[torch.Tensor],
                        kernel: str, bandwidth: float, max_rows: int
                        ) -> Iterator[tuple[slice, torch.Tensor, Optional[torch.Tensor]]]:
    """Yield (rows, G, S) per block of at most ``max_rows`` evaluation points: G (rows, c, d) in Euclidean
    coordinates, S = M^{1/2} in float64 (None for the identity), and J = -G S."""
    m, d, c = z.shape[0], z.shape[1], alpha.shape[1]
    points = _keops.euclidean_points(z, x, M)
    p = _keops.kernel_params(kernel, bandwidth, z)
    routine = _keops.genred("grad", d, c, points.compensated)
    alpha = alpha.contiguous()
    step = max(1, int(max_rows))
    for start in range(0, m, step):
        rows = slice(start, min(m, start + step))
        G = _keops.reduce(routine, points, rows, alpha, p)
        yield rows, G.view(-1, c, d), points.S


def kernel_grad(z: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, M: Optional[torch.Tensor], kernel: str,
                bandwidth: float, memory_budget: Optional[int] = None) -> torch.Tensor:
    """z (m, d), x (n, d), alpha (n, c) -> J (m, c, d), J[j] = d f / d z at z_j, in z's dtype and device.

    The whole output is one reduction (the output is the only large allocation); ``memory_budget`` is accepted
    for the common signature.
    """
    m, d, c = z.shape[0], z.shape[1], alpha.shape[1]
    out = torch.zeros(m, c, d, dtype=z.dtype, device=z.device)
    if m == 0:
        return out
    for rows, G, S in raw_gradient_blocks(z, x, alpha, M, kernel, bandwidth, max_rows=m):
        if S is None:
            torch.neg(G, out=out[rows])
        elif S.ndim == 1:
            torch.mul(G, -S.to(z.dtype), out=out[rows])
        else:
            torch.matmul(G, S.to(z.dtype), out=out[rows]).neg_()
    return out
