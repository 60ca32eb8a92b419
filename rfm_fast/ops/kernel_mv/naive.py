"""Reference kernel mat-vec from the formula: f(z_j) = sum_i alpha_i k_M(z_j, x_i), i.e. K(z, x) @ alpha."""

from __future__ import annotations

from typing import Optional

import torch

from ..kernel_matrix.naive import kernel_matrix


def kernel_mv(z: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, M: Optional[torch.Tensor], kernel: str,
              bandwidth: float) -> torch.Tensor:
    """z (m, d), x (n, d), alpha (n, c) -> (m, c)."""
    return kernel_matrix(z, x, M, kernel, bandwidth) @ alpha
