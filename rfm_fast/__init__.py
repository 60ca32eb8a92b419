"""rfm_fast: fused kernel ops for Recursive Feature Machines and Deep RFM.

The four ops (kernel matrix, kernel mat-vec, predictor gradient, AGOP) for Laplace and Gaussian kernels with a
Mahalanobis matrix M, behind one dispatcher over the torch, naive, KeOps, Triton and compiled backends. The maths
is stated in docs/maths.md and restated in ``rfm_fast.ops.api``; it is implemented once, in ``rfm_fast.core``.

Importing this package is cheap: no device probe, no compiler, no optional dependency is touched until a call
needs it.
"""

from __future__ import annotations

from ._dispatch import available_backends, backends_for
from .ops.api import agop, kernel_grad, kernel_matrix, kernel_mv

__version__ = "0.1.0"

# The model layer is imported on first use, so `import rfm_fast` stays as light as the ops.
_LAZY = {
    "krr_solve": "rfm_fast.solvers",
    "ConvergenceError": "rfm_fast.solvers",
    "RFM": "rfm_fast.models",
    "DeepRFM": "rfm_fast.models",
    "metrics": "rfm_fast.metrics",
    "nn": "rfm_fast.nn",
    "distributed": "rfm_fast.distributed",
    "integrations": "rfm_fast.integrations",
}

__all__ = ["agop", "kernel_grad", "kernel_matrix", "kernel_mv", "available_backends", "backends_for", "__version__",
           *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(_LAZY[name])
        value = module if module.__name__.endswith(name) else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rfm_fast' has no attribute {name!r}")
