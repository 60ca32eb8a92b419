"""Predictor gradient through the compiled op ``torch.ops.rfm_fast.kernel_grad`` (csrc/cpu/gradient.cpp,
csrc/cuda/gradient.cu). The op returns G (m, c, d) in Euclidean coordinates,
G_j = sum_i w_ji alpha_i (x) (zc_j - xc_i); here J = -(1/L^2) G S with S = M^{1/2} (CONVENTIONS.md)."""

from __future__ import annotations

from typing import Optional

import torch

from ... import _ext
from ..common import apply_metric


def kernel_grad(z: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, M: Optional[torch.Tensor], kernel: str,
                bandwidth: float, memory_budget: int) -> torch.Tensor:
    """z (m, d), x (n, d), alpha (n, c) -> J (m, c, d), J[j] = d f / d z at z_j."""
    _ext.load()
    p = _ext.euclidean_problem(z, x, alpha, M, kernel, bandwidth)
    threads = torch.get_num_threads() if z.device.type == "cpu" else 1
    rows, cols, whole = _ext.plan(p, memory_budget, threads=threads, gradient=True)
    coeffs = _ext.stacked_coefficients(p) if whole else None
    G = torch.ops.rfm_fast.kernel_grad(p.zc, p.xc, p.alpha, coeffs, p.z, p.x, p.S, kernel, p.scale, p.rtol,
                                       p.direct, rows, cols)
    G = apply_metric(G, p.S)
    return G.mul_(-1.0 / bandwidth**2)
