"""Matrix-free kernel ridge regression by conjugate gradients, and the (preconditioned) CG iteration that the
Nystrom solver and the sharded solver share.

Solves (K(X, X) + reg I) alpha = Y, one independent CG recurrence per column of Y run in lock step, where every
product with K is one call of the fused :func:`rfm_fast.kernel_mv`: no n x n matrix is ever formed, so the
memory is O(n (d + c)) plus the op's tile budget.

Precision. The kernel products run in the data's dtype; the iterate, the residual and every dot product are
float64. Convergence is declared on the relative residual of every column, ||Y_j - A alpha_j|| / ||Y_j|| <= tol,
and confirmed on the true residual, recomputed with a float64 product (the data upcast exactly), because the
recurrence's residual drifts from the true one. A drifted solve restarts from the true residual: for float32
data the float32 CG between two checks is a correction solve, i.e. iterative refinement, which reaches residuals
far below float32's own resolution of the product (at reg = 1e-3 and condition numbers of 1e6..1e7, float32
products alone stall near 1e-4, because alpha is ~||Y|| / reg large). The coefficients are returned in float64
for the same reason: rounding them to float32 would cost up to cond * 2^-24 of relative residual.
A restart whose true residual does not halve the previous one means the products' rounding is the floor: the
solve stops there ("stalled") instead of spinning to ``max_iter``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch

from ..core.geometry import reuse
from ..core.metric import MetricFactor
from ..ops.api import kernel_mv

# A restart (or a refinement step) from the true residual must shrink it at least this much, else the solve has
# stalled: the products' rounding is the floor.
STAGNATION = 0.5


class ConvergenceError(RuntimeError):
    """An iterative solver stopped before reaching its tolerance (or broke down).

    Attributes: ``iterations`` done, ``residual`` (largest relative residual over the columns when it stopped).
    """

    def __init__(self, message: str, *, iterations: int, residual: float):
        super().__init__(message)
        self.iterations = iterations
        self.residual = residual


def default_tol(dtype: torch.dtype) -> float:
    """Relative-residual tolerance used when none is given (the true residual, float64-accurate)."""
    return 1e-8 if dtype == torch.float64 else 1e-4


def default_max_iter(n: int) -> int:
    return int(min(max(2 * n, 100), 10_000))


class LocalComm:
    """The single-process communicator: every rank-reduction is the identity."""

    world_size = 1
    rank = 0

    def allsum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def gather_rows(self, local: torch.Tensor) -> torch.Tensor:
        return local


class Unpreconditioned:
    """P^{-1} = I (plain CG)."""

    rank = 0

    @staticmethod
    def apply(v: torch.Tensor) -> torch.Tensor:
        return v.clone()


def float64_ops(ops: dict, work: torch.dtype) -> dict:
    """The op arguments for float64 products with the metric of ``ops`` (given for data in ``work``): a dense M
    goes through its factor, taken at M's own precision (a float32 PSD matrix has eigenvalues of -eps32 |M| that
    float64's PSD check would refuse); a diagonal M is upcast."""
    M = ops.get("M")
    if M is None or work == torch.float64:
        return ops
    if M.ndim == 1:
        return dict(ops, M=M.to(torch.float64))
    factor = MetricFactor.from_matrix(M, M.shape[0], M.dtype, M.device)
    return dict(ops, M=None, M_factor=factor.as_dense())


def ridge_products(X: torch.Tensor, rows: slice, comm: Any, reg: float, ops: dict) -> tuple[Callable, Callable]:
    """(apply_A, apply_exact) for this rank's rows of (K + reg I) p, p float64 rows -> float64 rows.

    apply_A runs the kernel product in X's dtype; apply_exact in float64 on the same points (upcast exactly), the
    product that decides convergence. For float64 data they are the same function.
    """
    work = X.dtype
    X_local = X[rows]

    def apply_A(p: torch.Tensor) -> torch.Tensor:
        full = comm.gather_rows(p.to(work))
        return kernel_mv(X_local, X, full, **ops).to(torch.float64).add_(p, alpha=reg)

    if work == torch.float64:
        return apply_A, apply_A
    X64 = X.to(torch.float64)
    ops64 = float64_ops(ops, work)

    def apply_exact(p: torch.Tensor) -> torch.Tensor:
        full = comm.gather_rows(p)
        return kernel_mv(X64[rows], X64, full, **ops64).add_(p, alpha=reg)

    return apply_A, apply_exact


def _column_norms(t: torch.Tensor, comm: Any) -> torch.Tensor:
    return comm.allsum((t * t).sum(0)).sqrt()


def residual_scale(Y: torch.Tensor, comm: Any) -> torch.Tensor:
    """Per column ||Y_j||, the denominator of the relative residual; 1 for a zero column (its solution is zero and
    its residual, always 0, must not divide by 0)."""
    y_norm = _column_norms(Y, comm)
    return torch.where(y_norm > 0, y_norm, torch.ones_like(y_norm))


def relative_residual(r: torch.Tensor, scale: torch.Tensor, comm: Any) -> torch.Tensor:
    """Per column ||r_j|| / scale_j."""
    return _column_norms(r, comm) / scale


def iterate(apply_A: Callable, apply_exact: Callable, pre: Any, Y: torch.Tensor, comm: Any, *, tol: float,
            max_iter: int, bar: Any = None, what: str = "CG") -> tuple[torch.Tensor, dict]:
    """Preconditioned CG with float64 vectors and true-residual restarts (the module docstring).

    Y (rows, c) this rank's rows of the right-hand side; ``pre.apply`` gives P^{-1} v. Returns (alpha (rows, c)
    float64, info {"iterations", "residual", "converged", "restarts", "stalled"}); raises ConvergenceError only on
    a breakdown (p^T A p <= 0: not positive definite in the products' dtype), never for non-convergence.
    """
    Y = Y.to(torch.float64)
    scale = residual_scale(Y, comm)
    alpha = torch.zeros_like(Y)
    r = Y.clone()
    z = pre.apply(r)
    p = z.clone()
    rz = comm.allsum((r * z).sum(0))
    res = relative_residual(r, scale, comm)
    iterations, restarts, worst = 0, 0, float(res.max())
    checked = math.inf
    converged = stalled = False
    while True:
        active = res > tol
        if not bool(active.any()) or iterations >= max_iter:
            true_r = Y - apply_exact(alpha)
            res = relative_residual(true_r, scale, comm)
            previous, worst = checked, float(res.max())
            checked = worst
            if worst <= tol:
                converged = True
                break
            stalled = worst > STAGNATION * previous
            if stalled or iterations >= max_iter:
                break
            restarts += 1
            r = true_r
            z = pre.apply(r)
            p = z.clone()
            rz = comm.allsum((r * z).sum(0))
            continue
        Ap = apply_A(p)
        iterations += 1
        pAp = comm.allsum((p * Ap).sum(0))
        if bool(((pAp <= 0) & active).any()) or bool(((rz <= 0) & active).any()):
            raise ConvergenceError(
                f"{what} broke down at iteration {iterations}: K + reg I is not positive definite in the "
                "products' dtype; increase reg or use float64", iterations=iterations, residual=worst)
        step = torch.where(active, rz / torch.where(active, pAp, torch.ones_like(pAp)), torch.zeros_like(rz))
        alpha.add_(p * step)
        r.sub_(Ap * step)
        res = torch.where(active, relative_residual(r, scale, comm), res)
        worst = float(res.max())
        z = pre.apply(r)
        rz_new = comm.allsum((r * z).sum(0))
        beta = torch.where(active, rz_new / torch.where(rz > 0, rz, torch.ones_like(rz)), torch.zeros_like(rz))
        p = torch.where(active, z + p * beta, p)
        rz = torch.where(active, rz_new, rz)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(residual=f"{worst:.2e}")
    return alpha, {"iterations": iterations, "residual": worst, "converged": converged, "restarts": restarts,
                   "stalled": stalled}


def failure_message(what: str, info: dict, tol: float, max_iter: int, dtype: torch.dtype) -> str:
    """What was reached and what to change, for a solve that did not converge."""
    if info.get("stalled"):
        return (f"{what} stalled at true relative residual {info['residual']:.3g} > tol={tol:g} after "
                f"{info['iterations']} iterations ({info.get('restarts', 0)} restarts): the {dtype} kernel "
                "products cannot resolve this system more finely; increase reg, loosen tol, or solve in float64")
    return (f"{what} did not reach tol={tol:g} within max_iter={max_iter} iterations (largest true relative "
            f"residual {info['residual']:.3g}); raise max_iter, increase reg (better conditioning)"
            + (", or use solver='pcg'" if what == "CG" else f" or the Nystrom rank (now {info.get('rank')})"))


def progress_bar(enabled: bool, total: int, what: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=what, unit="it", leave=False)


@reuse()
def cg_solve(X: torch.Tensor, Y: torch.Tensor, *, kernel: str, bandwidth: float, M: Optional[Any], reg: float,
             tol: Optional[float] = None, max_iter: Optional[int] = None, backend: str = "auto",
             memory_budget: Optional[int | str] = None, progress: bool = False) -> tuple[torch.Tensor, dict]:
    """Conjugate gradients for (K(X, X) + reg I) alpha = Y using only ``kernel_mv``.

    X: (n, d), Y: (n, c), same float dtype and device; M: None, (d,) or (d, d). reg must be > 0 unless K is known
    to be positive definite. Returns (alpha (n, c) float64, info) with info = {"iterations", "residual" (largest
    true relative residual over the columns), "converged": True, "restarts", "stalled"}. progress: a tqdm bar.

    Raises :class:`ConvergenceError` when the tolerance is not met within ``max_iter`` products (default
    ``min(max(2 n, 100), 10000)``), when restarts stop shrinking the true residual, or when a search direction has
    p^T A p <= 0 (the system is not positive definite in this dtype).
    """
    tol = default_tol(X.dtype) if tol is None else float(tol)
    max_iter = default_max_iter(X.shape[0]) if max_iter is None else int(max_iter)
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    comm = LocalComm()
    ops = dict(kernel=kernel, bandwidth=bandwidth, M=M, backend=backend, memory_budget=memory_budget)
    apply_A, apply_exact = ridge_products(X, slice(0, X.shape[0]), comm, reg, ops)
    bar = progress_bar(progress, max_iter, "CG")
    try:
        alpha, info = iterate(apply_A, apply_exact, Unpreconditioned(), Y, comm, tol=tol, max_iter=max_iter,
                              bar=bar, what="CG")
    finally:
        if bar is not None:
            bar.close()
    if not info["converged"]:
        raise ConvergenceError(failure_message("CG", info, tol, max_iter, X.dtype), iterations=info["iterations"],
                               residual=info["residual"])
    return alpha, info
