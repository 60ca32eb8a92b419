"""Matrix-free kernel ridge regression by conjugate gradients.

Solves (K(X, X) + reg I) alpha = Y, one independent CG recurrence per column of Y run in lock step, where every
product with K is one call of the fused :func:`rfm_fast.kernel_mv`: no n x n matrix is ever formed, so the
memory is O(n (d + c)) plus the op's tile budget.

Convergence is declared on the relative residual of every column, ||Y_j - A alpha_j|| / ||Y_j|| <= tol, and
confirmed on the true residual (recomputed with one more product) before returning, because the recurrence's
residual drifts from the true one in finite precision. A drifted solve restarts from the true residual.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..core.geometry import reuse
from ..ops.api import kernel_mv

# Replace the recurrence residual by the true one this often: bounds the drift at the cost of one product.
_RESIDUAL_REFRESH = 50


class ConvergenceError(RuntimeError):
    """An iterative solver stopped before reaching its tolerance (or broke down).

    Attributes: ``iterations`` done, ``residual`` (largest relative residual over the columns when it stopped).
    """

    def __init__(self, message: str, *, iterations: int, residual: float):
        super().__init__(message)
        self.iterations = iterations
        self.residual = residual


def default_tol(dtype: torch.dtype) -> float:
    """Relative-residual tolerance used when none is given: what the dtype's products can resolve."""
    return 1e-8 if dtype == torch.float64 else 1e-4


def default_max_iter(n: int) -> int:
    return int(min(max(2 * n, 100), 10_000))


@reuse()
def cg_solve(X: torch.Tensor, Y: torch.Tensor, *, kernel: str, bandwidth: float, M: Optional[Any], reg: float,
             tol: Optional[float] = None, max_iter: Optional[int] = None, backend: str = "auto",
             memory_budget: Optional[int | str] = None) -> tuple[torch.Tensor, dict]:
    """Conjugate gradients for (K(X, X) + reg I) alpha = Y using only ``kernel_mv``.

    X: (n, d), Y: (n, c), same float dtype and device; M: None, (d,) or (d, d). reg must be > 0 unless K is known
    to be positive definite. Returns (alpha (n, c), info) with info = {"iterations", "residual" (largest relative
    true residual over the columns), "converged": True}.

    Raises :class:`ConvergenceError` when the tolerance is not met within ``max_iter`` products (default
    ``min(max(2 n, 100), 10000)``), or when a search direction has p^T A p <= 0 (the system is not positive
    definite in this dtype).
    """
    tol = default_tol(X.dtype) if tol is None else float(tol)
    max_iter = default_max_iter(X.shape[0]) if max_iter is None else int(max_iter)
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")

    def apply(v: torch.Tensor) -> torch.Tensor:
        return kernel_mv(X, X, v, kernel=kernel, bandwidth=bandwidth, M=M, backend=backend,
                         memory_budget=memory_budget).add_(v, alpha=reg)

    y_norm = Y.norm(dim=0)
    # A zero right-hand side has the zero solution; scale by 1 so its residual (always 0) never divides by 0.
    scale = torch.where(y_norm > 0, y_norm, torch.ones_like(y_norm))
    alpha = torch.zeros_like(Y)
    r = Y.clone()
    p = r.clone()
    rs = (r * r).sum(0)
    iterations = 0
    worst = float(((rs.sqrt() / scale).max()))
    while iterations < max_iter:
        active = rs.sqrt() / scale > tol
        if not bool(active.any()):
            true_r = Y - apply(alpha)
            worst = float((true_r.norm(dim=0) / scale).max())
            if worst <= tol:
                return alpha, {"iterations": iterations, "residual": worst, "converged": True}
            r, p = true_r, true_r.clone()
            rs = (r * r).sum(0)
            continue
        Ap = apply(p)
        iterations += 1
        pAp = (p * Ap).sum(0)
        if bool(((pAp <= 0) & active).any()):
            raise ConvergenceError(
                f"CG broke down at iteration {iterations}: p^T (K + reg I) p <= 0, so the system is not positive "
                f"definite in {X.dtype} (reg={reg:g}); increase reg or use float64",
                iterations=iterations, residual=worst)
        step = torch.where(active, rs / torch.where(active, pAp, torch.ones_like(pAp)), torch.zeros_like(rs))
        alpha.add_(p * step)
        if iterations % _RESIDUAL_REFRESH == 0:
            r = Y - apply(alpha)
        else:
            r.sub_(Ap * step)
        rs_new = (r * r).sum(0)
        beta = torch.where(active, rs_new / torch.where(rs > 0, rs, torch.ones_like(rs)), torch.zeros_like(rs))
        p = r + p * beta
        rs = rs_new
        worst = float((rs.sqrt() / scale).max())
    raise ConvergenceError(
        f"CG did not reach tol={tol:g} within max_iter={max_iter} iterations (largest relative residual "
        f"{worst:.3g}); raise max_iter, increase reg (better conditioning), use float64, or use solver='pcg'",
        iterations=iterations, residual=worst)
