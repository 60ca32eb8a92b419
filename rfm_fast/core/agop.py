"""The AGOP accumulation and finish, once for every backend that produces raw gradient blocks.

    A~ = (1/m) sum_j G~_j^T G~_j   (r x r, float64),   AGOP = gamma^2 F A~ F^T   (``Geometry.agop_to_input``)

Centred (the gradients' covariance): a one-pass E[G^T G] - mu^T mu cancels when the gradients vary little across
points (relative error 5e-3 in float32 at large bandwidths). So every block is accumulated *shifted* by an estimate
s of the mean gradient, the mean raw gradient of a sample of the evaluation points (``centering_sample``):
    (1/m) sum_j (G~_j - s)^T (G~_j - s) - (mu - s)^T (mu - s),   mu = (1/m) sum_j G~_j,
where the subtracted term is small (|mu - s|^2 ~ tr(cov) / sample size), so nothing cancels.

Each block's Gram matrix is formed in the working dtype (a GEMM over rows * c) and added in float64, so the
accumulation error does not grow with m; a block whose entries would square out of the float range (or into
subnormals) is scaled by a power of two first.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

# Evaluation points whose raw gradients estimate the mean for the shifted centring.
CENTERING_SAMPLE = 256
# Entries of a gradient block within [2^-LIMIT, 2^LIMIT] are squared as they are; others are scaled first.
_SAFE_LOG2 = {torch.float32: 40, torch.float64: 400, torch.float16: 6, torch.bfloat16: 40}


def centering_sample(m: int, device: torch.device) -> torch.Tensor:
    """Indices of up to CENTERING_SAMPLE evaluation points spread evenly over 0 .. m-1."""
    count = min(m, CENTERING_SAMPLE)
    return torch.linspace(0, m - 1, count, device=device).round().long().unique()


class AgopAccumulator:
    """Sums of G~^T G~ (and of G~, for the centred AGOP) over raw gradient blocks (R, c, r)."""

    def __init__(self, r: int, c: int, *, centered: bool, shift: Optional[torch.Tensor], device: torch.device):
        self.r, self.c, self.centered = r, c, centered
        self.shift = shift if centered else None
        self.total = torch.zeros(r, r, dtype=torch.float64, device=device)
        self.sum = torch.zeros(c, r, dtype=torch.float64, device=device) if centered else None

    def add(self, G: torch.Tensor) -> None:
        X = G if self.shift is None else G - self.shift.to(G.dtype)
        flat = X.reshape(-1, self.r)
        if flat.numel() == 0:
            return
        peak = float(flat.abs().max())
        limit = _SAFE_LOG2.get(flat.dtype, 40)
        scale = 1.0
        if peak > 0 and not (2.0**-limit <= peak <= 2.0**limit):
            scale = 2.0 ** (-math.ceil(math.log2(peak)))
            flat = flat * scale
        self.total += (flat.T @ flat).double() / (scale * scale)
        if self.centered:
            self.sum += X.sum(0).double()

    def add_gram(self, gram: torch.Tensor, sums: Optional[torch.Tensor]) -> None:
        """Add precomputed float64 sums (kernels that fold the Gram on chip): sum (G~ - s)^T (G~ - s) and
        sum (G~ - s)."""
        self.total += gram.double()
        if self.centered:
            self.sum += sums.double()

    def raw(self, m: int) -> torch.Tensor:
        """A~ (r, r, float64): the mean of G~^T G~, centred if asked."""
        A = self.total / m
        if self.centered:
            mu = self.sum / m
            A = A - mu.T @ mu
        return A


def finish(A: torch.Tensor, factor, spec, diag: bool, dtype: torch.dtype) -> torch.Tensor:
    """AGOP (d, d) (or its diagonal (d,)) in ``dtype`` from the raw A~ (float64): gamma^2 F A~ F^T (the metric
    factor and the kernel description's gradient scale), symmetrised."""
    full = factor.agop_to_input(A) * spec.grad_scale**2
    full = 0.5 * (full + full.T)
    return (torch.diagonal(full).clone() if diag else full).to(dtype)


def agop_from_blocks(raw_blocks, m: int, c: int, factor, spec, *, centered: bool, diag: bool, dtype: torch.dtype,
                     device: torch.device) -> torch.Tensor:
    """The AGOP from a source of raw gradient blocks: ``raw_blocks(index)`` yields (rows, G~ (R, c, r)) for the
    evaluation points ``index`` (an index tensor, or None for all of them). Centred: shifted by the mean raw
    gradient of ``centering_sample``."""
    shift = None
    if centered:
        shift = torch.cat([G.clone() for _, G in raw_blocks(centering_sample(m, device))]).mean(0)
    acc = AgopAccumulator(factor.r, c, centered=centered, shift=shift, device=device)
    for _, G in raw_blocks(None):
        acc.add(G)
    return finish(acc.raw(m), factor, spec, diag, dtype)
