"""kernel_matrix under backend="keops": the torch path.

KeOps reduces over the kernel matrix without forming it; an op whose result *is* the m x n matrix gains nothing
from it (the output alone is the O(m n) cost), so backend="keops" runs the torch implementation, with the same
maths, dtypes and memory budget. ``backend="auto"`` never routes kernel_matrix here (see
rfm_fast/backends/keops.py: ``prefers``).
"""

from __future__ import annotations

from typing import Optional

import torch

from .torch import kernel_matrix as _torch_kernel_matrix


def kernel_matrix(z: torch.Tensor, x: torch.Tensor, M: Optional[torch.Tensor], kernel: str, bandwidth: float,
                  memory_budget: int) -> torch.Tensor:
    """z (m, d), x (n, d) -> K (m, n): the torch path's kernel_matrix (see the module docstring)."""
    return _torch_kernel_matrix(z, x, M, kernel, bandwidth, memory_budget=memory_budget)
