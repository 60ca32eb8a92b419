"""rfm_fast: fused kernel ops for Recursive Feature Machines and Deep RFM.

The four ops (kernel matrix, kernel mat-vec, predictor gradient, AGOP) for Laplace and Gaussian kernels with a
Mahalanobis matrix M, behind one dispatcher over the torch, naive, KeOps, Triton and compiled backends. The maths
is fixed in CONVENTIONS.md and restated in ``rfm_fast.ops.api``.

Importing this package is cheap: no device probe, no compiler, no optional dependency is touched until a call
needs it.
"""

from __future__ import annotations

from ._dispatch import available_backends
from .ops.api import agop, kernel_grad, kernel_matrix, kernel_mv

__version__ = "0.1.0"

__all__ = ["agop", "kernel_grad", "kernel_matrix", "kernel_mv", "available_backends", "__version__"]
