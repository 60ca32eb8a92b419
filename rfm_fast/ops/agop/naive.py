"""Reference AGOP from the formula (docs/maths.md):

    AGOP = (1/m) sum_j J(z_j)^T J(z_j)          (d, d)
    centred: (1/m) sum_j (J_j - mu)^T (J_j - mu),   mu = (1/m) sum_j J_j   (two passes: nothing cancels)
    diagonal: the diagonal of the above, (d,)

J comes from the reference gradient, materialised whole: (m, c, d). Slow, obviously right, float64-capable.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..kernel_grad.naive import kernel_grad


def agop(z: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, M: Optional[torch.Tensor], kernel: str,
         bandwidth: float, centered: bool = False, diag: bool = False) -> torch.Tensor:
    J = kernel_grad(z, x, alpha, M, kernel, bandwidth)
    m = J.shape[0]
    if centered:
        J = J - J.mean(0)
    A = torch.einsum("mcd,mce->de", J, J) / m
    return torch.diagonal(A).clone() if diag else A
