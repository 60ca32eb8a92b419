"""Kernel mat-vec through the compiled op ``torch.ops.rfm_fast.kernel_mv`` (csrc/cpu/kernel_mv.cpp,
csrc/cuda/kernel_mv.cu): f_j = sum_i alpha_i k_M(z_j, x_i), fused distance / kernel value / GEMM per tile."""

from __future__ import annotations

from typing import Optional

import torch

from ... import _ext


def kernel_mv(z: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, M: Optional[torch.Tensor], kernel: str,
              bandwidth: float, memory_budget: int) -> torch.Tensor:
    """z (m, d), x (n, d), alpha (n, c) -> K(z, x) @ alpha, (m, c)."""
    _ext.load()
    p = _ext.euclidean_problem(z, x, alpha, M, kernel, bandwidth)
    threads = torch.get_num_threads() if z.device.type == "cpu" else 1
    rows, cols, _ = _ext.plan(p, memory_budget, threads=threads, gradient=False)
    return torch.ops.rfm_fast.kernel_mv(p.zc, p.xc, p.alpha, p.z, p.x, p.S, kernel, p.scale, p.rtol, p.direct,
                                        rows, cols)
