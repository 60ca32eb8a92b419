"""Direct kernel ridge regression: alpha = (K(X, X) + reg I)^{-1} Y by a Cholesky factorisation.

The n x n kernel matrix comes from :func:`rfm_fast.kernel_matrix` (so every backend serves it); the factor
overwrites a second n x n buffer, so the working memory is about 2 n^2 elements of the solve dtype.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..ops.api import kernel_matrix


class SingularSystemError(RuntimeError):
    """K + reg I is singular or not positive definite in the solve dtype (Cholesky broke down)."""


def cholesky_solve(X: torch.Tensor, Y: torch.Tensor, *, kernel: str, bandwidth: float, M: Optional[Any],
                   reg: float, backend: str = "auto", memory_budget: Optional[int | str] = None) -> torch.Tensor:
    """Solve (K(X, X) + reg I) alpha = Y by Cholesky, in the dtype and on the device of ``X``.

    X: (n, d) float32/float64 tensor, Y: (n, c) tensor of the same dtype and device, M: None, (d,) or (d, d).
    Returns alpha (n, c). Raises :class:`SingularSystemError` when the factorisation breaks down (the message
    gives the failing pivot and suggests a larger ``reg`` or float64) or produces non-finite coefficients.
    """
    K = kernel_matrix(X, X, kernel=kernel, bandwidth=bandwidth, M=M, backend=backend, memory_budget=memory_budget)
    K.diagonal().add_(reg)
    L, info = torch.linalg.cholesky_ex(K)
    del K
    failed = int(info.item())
    if failed > 0:
        raise SingularSystemError(
            f"K + reg*I is not positive definite in {X.dtype} (Cholesky failed at pivot {failed} of {X.shape[0]}, "
            f"reg={reg:g}): increase reg, pass dtype=torch.float64, or check X for duplicate rows with reg=0")
    alpha = torch.cholesky_solve(Y, L)
    if not bool(torch.isfinite(alpha).all()):
        raise SingularSystemError(
            f"the Cholesky solve produced non-finite coefficients in {X.dtype} (reg={reg:g}): the system is "
            "numerically singular; increase reg or pass dtype=torch.float64")
    return alpha
