"""AGOP through the compiled op ``torch.ops.rfm_fast.agop`` (csrc/cpu/gradient.cpp on CPU tensors,
csrc/cuda/gradient.cu on CUDA tensors; build: RFM_FAST_BUILD_EXT=1 pip install --no-build-isolation -e .).

The op returns, in Euclidean coordinates (zc = z S - mu, xc = x S - mu, S = M^{1/2}), the float64 sums
    A' = sum_j G_j^T G_j  (d, d)   and   s = sum_j G_j  (c, d),   G_j = sum_i w_ji alpha_i (x) (zc_j - xc_i),
with J_j = -(1/L^2) G_j S (CONVENTIONS.md). Here: AGOP = S (A' / (m L^4) - mu^T mu) S with mu = -s / (m L^2)
when centred, symmetrised, then the diagonal if asked.

When the evaluation points are the centres (the AGOP of a fitted RFM), the symmetric schedule of the torch path
(each tile between two blocks used for both; rfm_fast/ops/kernel_grad/torch.py) halves the distance and weight
work, and its GEMMs run on the BLAS's own threads; there the compiled part is the one-pass weight kernel
``torch.ops.rfm_fast.gradient_weights_`` (csrc/cpu/weights.cpp) on each strip, in place of the torch path's five
elementwise passes. CUDA tensors and other inputs take the fused op above.
"""

from __future__ import annotations

from typing import Optional

import torch

from ... import _ext
from ..common import agop_from_euclidean
from ..kernel_grad.torch import symmetric_plan_for
from .torch import agop as torch_agop


def agop(z: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, M: Optional[torch.Tensor], kernel: str,
         bandwidth: float, centered: bool, diag: bool, memory_budget: int) -> torch.Tensor:
    """z (m, d), x (n, d), alpha (n, c) -> AGOP (d, d), or its diagonal (d,)."""
    _ext.load()
    if z.device.type == "cpu" and symmetric_plan_for(z, x, alpha, memory_budget, kernel) is not None:
        return torch_agop(z, x, alpha, M, kernel, bandwidth, centered, diag, memory_budget, fused=True)
    p = _ext.euclidean_problem(z, x, alpha, M, kernel, bandwidth)
    rows, cols, whole = _ext.plan(p, memory_budget, threads=_threads(z), gradient=True)
    coeffs = _ext.stacked_coefficients(p) if whole else None
    outer, sums = torch.ops.rfm_fast.agop(p.zc, p.xc, p.alpha, coeffs, p.z, p.x, p.S, kernel, p.scale, p.rtol,
                                          p.direct, rows, cols)
    m = z.shape[0]
    scale = 1.0 / bandwidth**2
    total = outer * (scale * scale / m)
    if centered:
        mean = sums * (-scale / m)
        total -= mean.T @ mean
    A = agop_from_euclidean(total, None if p.S is None else p.S.double())
    A = 0.5 * (A + A.T)
    return (torch.diagonal(A).clone() if diag else A).to(z.dtype)


def _threads(t: torch.Tensor) -> int:
    return torch.get_num_threads() if t.device.type == "cpu" else 1
