"""Direct kernel ridge regression: alpha = (K(X, X) + reg I)^{-1} Y by a Cholesky factorisation, refined.

The n x n kernel matrix comes from :func:`rfm_fast.kernel_matrix` (so every backend serves it); the factor
overwrites a second n x n buffer, so the working memory is about 2 n^2 elements of the solve dtype.

The tolerance means what it means for CG: the true relative residual ||Y_j - (K + reg I) alpha_j|| / ||Y_j||,
recomputed with a float64 product. A float32 factorisation of a system with condition number kappa leaves a
residual of about kappa * 2^-24 (3e-4 at reg = 1e-3 on unit-norm digit images); each refinement step
alpha += (L L^T)^{-1} r, with r the float64 residual, divides it by about that much again, so a few steps reach
1e-4 (and far below) whenever kappa * 2^-24 < 1/2. The coefficients are accumulated and returned in float64.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..ops.api import kernel_matrix
from .cg import STAGNATION, ConvergenceError, LocalComm, default_tol, relative_residual, residual_scale, ridge_products

# Refinement steps at most; a step that does not halve the residual (cg.STAGNATION) ends the refinement.
_MAX_REFINE = 10


class SingularSystemError(RuntimeError):
    """K + reg I is singular or not positive definite in the solve dtype (Cholesky broke down)."""


def cholesky_solve(X: torch.Tensor, Y: torch.Tensor, *, kernel: str, bandwidth: float, M: Optional[Any],
                   reg: float, backend: str = "auto", memory_budget: Optional[int | str] = None,
                   tol: Optional[float] = None) -> tuple[torch.Tensor, dict]:
    """Solve (K(X, X) + reg I) alpha = Y by Cholesky in the dtype and on the device of ``X``, then refine.

    X: (n, d) float32/float64 tensor, Y: (n, c) tensor of the same dtype and device, M: None, (d,) or (d, d).
    tol: true relative residual to reach (default 1e-4 for float32, 1e-8 for float64). Returns (alpha (n, c)
    float64, info {"iterations": refinement steps, "residual", "converged": True}).

    Raises :class:`SingularSystemError` when the factorisation breaks down (the message gives the failing pivot
    and suggests a larger ``reg`` or float64) or produces non-finite coefficients; :class:`ConvergenceError`
    when refinement stops short of ``tol`` (the factor is too inaccurate for this system's conditioning).
    """
    tol = default_tol(X.dtype) if tol is None else float(tol)
    ops = dict(kernel=kernel, bandwidth=bandwidth, M=M, backend=backend, memory_budget=memory_budget)
    K = kernel_matrix(X, X, **ops)
    K.diagonal().add_(reg)
    L, info = torch.linalg.cholesky_ex(K)
    del K
    failed = int(info.item())
    if failed > 0:
        raise SingularSystemError(
            f"K + reg*I is not positive definite in {X.dtype} (Cholesky failed at pivot {failed} of {X.shape[0]}, "
            f"reg={reg:g}): increase reg, pass dtype=torch.float64, or check X for duplicate rows with reg=0")

    def solve(rhs: torch.Tensor) -> torch.Tensor:
        out = torch.cholesky_solve(rhs.to(X.dtype), L).to(torch.float64)
        if not bool(torch.isfinite(out).all()):
            raise SingularSystemError(
                f"the Cholesky solve produced non-finite coefficients in {X.dtype} (reg={reg:g}): the system is "
                "numerically singular; increase reg or pass dtype=torch.float64")
        return out

    comm = LocalComm()
    _, apply_exact = ridge_products(X, slice(0, X.shape[0]), comm, reg, ops)
    Y = Y.to(torch.float64)
    scale = residual_scale(Y, comm)
    alpha = solve(Y)
    r = Y - apply_exact(alpha)
    residual = float(relative_residual(r, scale, comm).max())
    steps = 0
    while residual > tol and steps < _MAX_REFINE:
        candidate = alpha + solve(r)
        r_new = Y - apply_exact(candidate)
        new = float(relative_residual(r_new, scale, comm).max())
        if not new < residual:
            break
        alpha, r, steps = candidate, r_new, steps + 1
        shrunk, residual = new <= STAGNATION * residual, new
        if not shrunk:
            break
    if residual > tol:
        raise ConvergenceError(
            f"Cholesky with {steps} refinement steps reached true relative residual {residual:.3g} > tol={tol:g}: "
            f"the {X.dtype} factor cannot resolve this system (reg={reg:g}); pass dtype=torch.float64, increase "
            "reg, or loosen tol", iterations=steps, residual=residual)
    return alpha, {"iterations": steps, "residual": residual, "converged": True}
