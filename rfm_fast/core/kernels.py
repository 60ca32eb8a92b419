"""Kernel descriptions: every constant and elementwise formula of the Laplace and Gaussian kernels, written once.

Every backend works on *scaled* coordinates u = (t - c) F sigma, where F is the metric factor (M = F F^T,
``rfm_fast.core.metric``), c a centring point and sigma = ``coord_scale`` folds the bandwidth in, so that a pair's
kernel exponent is a plain squared distance s = ||u_z - u_x||^2:

    laplace:  sigma = 1/L,            s = (r/L)^2,         k = exp(-sqrt(s)),  w = exp(-sqrt(s)) / sqrt(s)
    gaussian: sigma = 1/(sqrt(2) L),  s = r^2 / (2 L^2),   k = exp(-s),        w = exp(-s)

with r = ||z - x||_M. The gradient of the predictor is then (docs/maths.md, "Scaled coordinates")

    J(z) = gamma * G~(z) F^T,   G~(z) = sum_i w_i alpha_i (x) (u_z - u_i),   gamma = ``grad_scale``
         = -1/L (laplace), -sqrt(2)/L (gaussian),

and a pair at distance 0 contributes w = 0 (the Laplace zero-distance rule). Tiles store ``tile_sign * s``:
+s for the Laplace kernel, -s for the Gaussian one (its exponent directly, saving a pass).

The near-pair rule: a squared distance computed by expansion (||u_z||^2 + ||u_x||^2 - 2 u_z.u_x) carries an
absolute rounding error of about eps * (||u_z||^2 + ||u_x||^2); a pair whose computed s is at most
``near_rtol(dtype) * (||u_z||^2 + ||u_x||^2)`` has lost too many digits and is recomputed exactly from the original
points. Coordinates formed directly from differences (``direct_rtol``) are far more accurate and need a much smaller
threshold. Compiled and Triton code receive these numbers as arguments (``tile_sign``, the per-point bound terms
built from ``near_rtol``), never their own copies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

KERNELS = ("laplace", "gaussian")

# Near threshold of expanded squared distances, by the precision of the products that formed them. A pair just
# above it keeps a relative error of about eps / rtol in s: 2^-16 for float32 (eps 2^-24) and 2^-37 for float64,
# which the Laplace weight 1/r passes straight on to a gradient. "tf32": Triton's one-pass tf32 dot (eps 2^-11).
_NEAR_RTOL = {"float16": 2.0**-4, "bfloat16": 2.0**-4, "float32": 2.0**-8, "float64": 2.0**-16, "tf32": 2.0**-5}
# Threshold of directly formed coordinates (compensated float32 hi + lo pairs, or float64). float32: value tiles
# form (t_z - t_x)^2 as dhi^2 + 2 dhi dlo and leave out dlo^2 <= 2^-48 ||t||^2, so pairs with s below 2^-32 ||t||^2
# (|dt| < 2^-16 |t|: a vanishing share) are recomputed to keep a relative error below 2^-16; float64 differences
# are accurate to ~2^-52 of the coordinates.
_DIRECT_RTOL = {"float16": 2.0**-24, "bfloat16": 2.0**-24, "float32": 2.0**-32, "float64": 2.0**-38}


def _dtype_key(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class KernelSpec:
    """One kernel with its bandwidth: constants and the elementwise maths of its values and gradient weights."""

    name: str
    bandwidth: float

    def __post_init__(self):
        if self.name not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.name!r}")
        if not (math.isfinite(self.bandwidth) and self.bandwidth > 0):
            raise ValueError(f"bandwidth must be finite and > 0, got {self.bandwidth}")

    @property
    def laplace(self) -> bool:
        return self.name == "laplace"

    @property
    def coord_scale(self) -> float:
        """sigma: scaled coordinates u = (t - c) F sigma make s = ||u_z - u_x||^2 the kernel's exponent argument."""
        return 1.0 / self.bandwidth if self.laplace else 1.0 / (math.sqrt(2.0) * self.bandwidth)

    @property
    def grad_scale(self) -> float:
        """gamma: J = gamma G~ F^T with G~ = sum_i w_i alpha_i (x) (u_z - u_i) in scaled coordinates."""
        return -1.0 / self.bandwidth if self.laplace else -math.sqrt(2.0) / self.bandwidth

    @property
    def tile_sign(self) -> float:
        """Tiles hold tile_sign * s: +s (Laplace), -s (Gaussian: the exponent itself)."""
        return 1.0 if self.laplace else -1.0

    def near_rtol(self, dtype: torch.dtype, precision: str | None = None) -> float:
        """Near threshold of expanded distances formed in ``dtype`` (``precision="tf32"`` for tf32 products)."""
        return _NEAR_RTOL["tf32" if precision == "tf32" else _dtype_key(dtype)]

    def direct_rtol(self, dtype: torch.dtype) -> float:
        """Near threshold of distances formed from directly computed (compensated) coordinate differences."""
        return _DIRECT_RTOL[_dtype_key(dtype)]

    def keops_params(self) -> tuple[float, float, float]:
        """(a, b, c) of the KeOps formulas: value exp(-(a sqrt(s) + b s)), weight (a / sqrt(s) + c) * value."""
        return (1.0, 0.0, 0.0) if self.laplace else (0.0, 1.0, 1.0)

    # Elementwise passes on tiles holding tile_sign * s (in place). Entries flagged near are overwritten by the
    # caller, so whatever these passes leave there (NaN for a slightly negative Laplace s) never escapes.
    def values_(self, tile: torch.Tensor) -> torch.Tensor:
        """tile_sign * s -> k, in place."""
        if self.laplace:
            tile.sqrt_().neg_()
        return tile.exp_()

    def weights_(self, tile: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """tile_sign * s -> w, in place. Laplace: 1 / (sqrt(s) e^{sqrt(s)}), four passes with ``scratch`` (same
        shape) holding the exponential; an overflowing e^{sqrt(s)} gives w = 0, as it should."""
        if not self.laplace:
            return tile.exp_()
        tile.sqrt_()
        if scratch is None:
            scratch = torch.empty_like(tile)
        torch.exp(tile, out=scratch)
        return tile.mul_(scratch).reciprocal_()

    def value_of(self, s: torch.Tensor) -> torch.Tensor:
        """k from exact s >= 0."""
        return torch.exp(-s.sqrt()) if self.laplace else torch.exp(-s)

    def weight_of(self, s: torch.Tensor) -> torch.Tensor:
        """w from exact s >= 0, and 0 where s = 0 (the zero-distance rule)."""
        if self.laplace:
            r = s.sqrt()
            w = torch.exp(-r) / torch.where(r > 0, r, torch.ones_like(r))
        else:
            w = torch.exp(-s)
        return torch.where(s > 0, w, torch.zeros_like(w))
