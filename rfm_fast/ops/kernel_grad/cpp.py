"""Predictor gradient through the compiled op ``torch.ops.rfm_fast.kernel_grad`` (csrc/cpu/gradient.cpp,
csrc/cuda/gradient.cu). The op returns G (m, c, d) in Euclidean coordinates,
G_j = sum_i w_ji alpha_i (x) (zc_j - xc_i); here J = -(1/L^2) G S with S = M^{1/2} (CONVENTIONS.md).

When the evaluation points are the centres (CPU), the torch path's symmetric schedule runs with the compiled
one-pass weights (as for the AGOP, rfm_fast/ops/agop/cpp.py)."""

from __future__ import annotations

from typing import Optional

import torch

from ... import _ext
from ..common import apply_metric
from .torch import kernel_grad as torch_kernel_grad
from .torch import symmetric_plan_for


def kernel_grad(z: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, M: Optional[torch.Tensor], kernel: str,
                bandwidth: float, memory_budget: int) -> torch.Tensor:
    """z (m, d), x (n, d), alpha (n, c) -> J (m, c, d), J[j] = d f / d z at z_j."""
    _ext.load()
    if z.device.type == "cpu" and symmetric_plan_for(z, x, alpha, memory_budget, kernel) is not None:
        return torch_kernel_grad(z, x, alpha, M, kernel, bandwidth, memory_budget, fused=True)
    p = _ext.euclidean_problem(z, x, alpha, M, kernel, bandwidth)
    threads = torch.get_num_threads() if z.device.type == "cpu" else 1
    rows, cols, whole = _ext.plan(p, memory_budget, threads=threads, gradient=True)
    coeffs = _ext.stacked_coefficients(p) if whole else None
    G = torch.ops.rfm_fast.kernel_grad(p.zc, p.xc, p.alpha, coeffs, p.z, p.x, p.S, kernel, p.scale, p.rtol,
                                       p.direct, rows, cols)
    G = apply_metric(G, p.S)
    return G.mul_(-1.0 / bandwidth**2)
