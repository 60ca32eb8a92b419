"""Kernel ridge regression at large n: conjugate gradients preconditioned by a randomized Nystrom approximation.

Solves (K + reg I) alpha = Y, K = K_M(X, X) the Laplace or Gaussian kernel matrix of docs/maths.md, touching
the kernel only through the fused ops: :func:`rfm_fast.kernel_mv` for every product K p (never an n x n matrix)
and :func:`rfm_fast.kernel_matrix` on n x r blocks for the preconditioner.

The preconditioner (Nystrom, "Falkon-style", in the form of Frangella, Tropp and Udell's randomized Nystrom PCG)
-----------------------------------------------------------------------------------------------------------------
Draw r centres S uniformly at random (seeded). With C = K(X, X_S) (n x r) and K_SS = K(X_S, X_S) (r x r),
    K_nys = C K_SS^+ C^T = U diag(s) U^T       (U: n x k orthonormal, s_1 >= ... >= s_k > 0, k <= r)
is computed from r x r eigendecompositions only (C^T C and K_SS), and
    P^{-1} = (s_k + reg) U diag(1 / (s + reg)) U^T + (I - U U^T).
K - K_nys = E is positive semi-definite, so the preconditioned matrix has its spectrum in about
[1, (s_k + reg + ||E||) / reg]: the top of the spectrum, which makes plain CG on kernel matrices crawl (a Laplace
matrix on n points has a top eigenvalue of order n and then a slowly decaying tail), is flattened to s_k.

Why Nystrom-PCG rather than EigenPro: EigenPro's preconditioner is also built from a subsample's top
eigenvectors, but it drives a (stochastic) Richardson / gradient iteration whose step size must be tuned to the
damped spectrum and which targets interpolation (reg = 0) with mini-batches. Here the system is the ridge system
of docs/maths.md solved to a stated relative residual: a symmetric positive definite preconditioner inside CG
gives the sqrt(condition number) rate, no step size, a residual that can be checked exactly, and uses every
full product K p (which the fused op makes cheap). Falkon itself solves the Nystrom-restricted problem (alpha
supported on the r centres); we keep the full n-centre solution the models need and use the same kind of
Nystrom approximation only as the preconditioner.

Numerics. All r x r work, the basis U and the CG recurrence run in float64 (O(n r + n c) memory); only the
kernel products run in the data's dtype. The form above keeps ||P^{-1}|| = 1 with its smallest eigenvalue
(s_k + reg) / (s_1 + reg), and U is re-orthonormalised against the exact Gram matrix, so P^{-1} stays numerically
positive definite. Eigenvalues of K_SS and Nystrom eigenvalues below 2^-26 of their largest are dropped (they
carry rounding, not information).

Stopping. Each column of Y runs its own CG recurrence in lock step (one kernel product serves all c columns:
the product's cost is dominated by the n^2 distances, not by c). A column stops when its relative residual
||Y_j - (K + reg I) alpha_j|| / ||Y_j|| <= tol; the solve ends when all have stopped and the true residual,
recomputed with one more product in float64, confirms it; otherwise CG restarts from the true residual
(iterative refinement for float32 data; the iteration itself is :func:`rfm_fast.solvers.cg.iterate`).

Memory: X and the products' tiles (the ops' ``memory_budget``), Y / alpha / r / z / p / A p in float64 (6 n c),
C and U in float64 (n r), r x r matrices. Never n x n.

The same code runs sharded over torch.distributed ranks (``rfm_fast.distributed.nystrom_pcg``): every rank owns a
block of rows of every n-sized quantity; products gather the search direction, dot products are all-reduced.
"""

from __future__ import annotations

import math
import time
from typing import Any, Optional

import numpy as np
import torch

from .._validation import FLOAT_DTYPES, check_bandwidth, check_kernel, tensor_or_array
from ..core.geometry import reuse
from ..ops.api import kernel_matrix
from .cg import (ConvergenceError, LocalComm, default_max_iter, default_tol, float64_ops, iterate, progress_bar,
                 ridge_products)
from .cg import failure_message as _failure_message

__all__ = ["nystrom_pcg", "NystromPreconditioner", "default_rank", "ConvergenceError"]

# Relative cut-offs for the eigenvalues kept in the Nystrom factorisation (see the module docstring): below
# sqrt(eps64) = 2^-26 of the largest, 1 / sqrt(eigenvalue) amplifies the float64 rounding of C past 1e-8 and the
# basis is no longer orthonormal (the old cut-offs, 1e-12 and 1e-10, left U^T U with eigenvalues from -3.6 to
# 9.4 on a benign Gaussian problem). Should the Cholesky-QR step still fail, the cut-offs are raised by these
# factors in turn.
_KSS_RTOL = 2.0**-26
_NYSTROM_RTOL = 2.0**-26
_RETRY_FACTORS = (1.0, 2.0**6, 2.0**12)
# Default rank: at most this many centres, and U (n x r float64) at most ~2 GiB.
_MAX_DEFAULT_RANK = 1000
_DEFAULT_BASIS_ELEMS = 2**28
_BASIS_BLOCK_ROWS = 4096


def default_rank(n: int) -> int:
    """Nystrom rank used when none is given: min(n, 1000), lowered so the float64 basis (n x rank) stays under
    ~2 GiB (never below 100). At n = 2e4, d = 32 (Laplace, reg 1e-3) rank 1000 took 24 iterations where 500 took 33,
    for 1.2 s of setup."""
    return int(min(n, _MAX_DEFAULT_RANK, max(100, _DEFAULT_BASIS_ELEMS // max(n, 1))))


def sample_centres(n: int, r: int, seed: int) -> torch.Tensor:
    """r distinct indices in [0, n), sorted, drawn with a CPU generator (identical on every rank and device)."""
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=generator)[:r].sort().values


class NystromPreconditioner:
    """P^{-1} v = (s_k + reg) U diag(1/(s + reg)) U^T v + v - U U^T v, for this rank's rows of U.

    Build with :meth:`build`. ``U`` (rows, k) float64, ``s`` (k,) float64, ``reg``; ``comm`` sums over ranks.
    """

    def __init__(self, U: torch.Tensor, s: torch.Tensor, reg: float, comm: Any):
        self.U, self.s, self.reg, self.comm = U, s, reg, comm
        # P^{-1} = I + U diag(coef - 1) U^T, coef_i = (s_k + reg) / (s_i + reg) in (0, 1].
        self.shift = ((s[-1] + reg) / (s + reg) - 1.0) if s.numel() else s

    @property
    def rank(self) -> int:
        return int(self.s.numel())

    @classmethod
    def build(cls, X: torch.Tensor, rows: slice, centres: torch.Tensor, *, kernel: str, bandwidth: float,
              M: Optional[torch.Tensor], reg: float, backend: str, memory_budget: Any,
              comm: Any) -> "NystromPreconditioner":
        """X (n, d) whole on every rank; ``rows`` this rank's rows; ``centres`` (r,) indices into X."""
        X64 = X[centres].to(torch.float64)
        ops = float64_ops(dict(kernel=kernel, bandwidth=bandwidth, M=M, backend=backend, memory_budget=memory_budget),
                          X.dtype)
        # C in float64 (n x r: cheap, n r d flops) so the pseudo-inverse below amplifies rounding of 1e-16, not 1e-7.
        C = kernel_matrix(X[rows].to(torch.float64), X64, **ops)
        K_ss = kernel_matrix(X64, X64, **ops)
        lam, Q = torch.linalg.eigh(0.5 * (K_ss + K_ss.T))
        G = comm.allsum(C.T @ C)  # Gram of C over all rows, r x r
        for factor in _RETRY_FACTORS:
            W, s = cls._basis(lam, Q, G, _KSS_RTOL * factor, _NYSTROM_RTOL * factor)
            if W is not None:
                break
        else:
            raise ConvergenceError("the Nystrom preconditioner could not be factorised stably; raise reg or lower "
                                   "rank", iterations=0, residual=float("nan"))
        # U = C W written over C block by block (k <= r columns), so C and U never coexist: peak n r, not 2 n r.
        for start in range(0, C.shape[0], _BASIS_BLOCK_ROWS):
            block = C[start:start + _BASIS_BLOCK_ROWS]
            block[:, : W.shape[1]] = block @ W
        return cls(C[:, : W.shape[1]], s, float(reg), comm)

    @staticmethod
    def _basis(lam, Q, G, kss_rtol: float, nys_rtol: float):
        """(W, s) with U = C W orthonormal and K_nys = U diag(s) U^T, or (None, None) when the Cholesky-QR step
        finds U^T U not positive definite at these cut-offs."""
        keep = lam > kss_rtol * float(lam.max().clamp_min(0))
        B = Q[:, keep] / lam[keep].sqrt()  # K_nys = (C B)(C B)^T
        F_gram = B.T @ G @ B
        s, V = torch.linalg.eigh(0.5 * (F_gram + F_gram.T))
        s, V = s.flip(0), V.flip(1)
        top = float(s[0]) if s.numel() else 0.0
        keep = s > nys_rtol * top if top > 0 else torch.zeros_like(s, dtype=torch.bool)
        s, V = s[keep], V[:, keep]
        W = B @ (V / s.sqrt())  # U = C W has U^T U = W^T G W = I up to the eigensolver's rounding
        if s.numel():
            # One Cholesky-QR step against the exact Gram: U^T U = I to ~1e-16, which keeps P^{-1} positive
            # definite even when s_1 / s_k is large.
            H = W.T @ G @ W
            L, info = torch.linalg.cholesky_ex(0.5 * (H + H.T))
            if int(info) != 0:
                return None, None
            W = torch.linalg.solve_triangular(L.mH, W, upper=True, left=False)
        return W, s

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        """P^{-1} v for this rank's rows v (rows, c), float64."""
        if self.rank == 0:
            return v.clone()
        t = self.comm.allsum(self.U.T @ v)
        return torch.addmm(v, self.U, t * self.shift[:, None])


@reuse()
def pcg_rows(X: torch.Tensor, Y: torch.Tensor, rows: slice, comm: Any, *, kernel: str, bandwidth: float,
             M: Optional[torch.Tensor], reg: float, tol: float, max_iter: int, rank: int, backend: str, seed: int,
             progress: bool, memory_budget: Any) -> tuple[torch.Tensor, dict]:
    """The PCG iteration on this rank's rows (shared by the single-process and the sharded solver).

    X (n, d) whole; Y (rows, c) this rank's rows of the right-hand side. Returns this rank's rows of alpha
    (float64) and the info dict; raises nothing on non-convergence (``info["converged"]`` says it).
    """
    ops = dict(kernel=kernel, bandwidth=bandwidth, M=M, backend=backend, memory_budget=memory_budget)
    start = time.perf_counter()
    pre = NystromPreconditioner.build(X, rows, sample_centres(X.shape[0], rank, seed), reg=reg, comm=comm, **ops)
    setup_seconds = time.perf_counter() - start
    apply_A, apply_exact = ridge_products(X, rows, comm, reg, ops)
    bar = progress_bar(progress and comm.rank == 0, max_iter, "Nystrom-PCG")
    try:
        alpha, info = iterate(apply_A, apply_exact, pre, Y, comm, tol=tol, max_iter=max_iter, bar=bar,
                              what="PCG")
    finally:
        if bar is not None:
            bar.close()
    info.update(rank=pre.rank, setup_seconds=setup_seconds,
                solve_seconds=time.perf_counter() - start - setup_seconds)
    return alpha, info


def failure_message(info: dict, tol: float, max_iter: int, dtype: torch.dtype) -> str:
    return _failure_message("Nystrom-PCG", info, tol, max_iter, dtype)


def check_solver_args(X: Any, Y: Any, kernel: Any, bandwidth: Any, M: Any, reg: Any, tol: Any, max_iter: Any,
                      rank: Any) -> tuple:
    """Validate and canonicalise the solver's arguments: (X, Y 2-D, squeeze, kernel, bandwidth, M, reg, tol,
    max_iter, rank, numpy_out)."""
    kernel = check_kernel(kernel)
    bandwidth = check_bandwidth(bandwidth)
    numpy_out = not isinstance(X, torch.Tensor)
    X = tensor_or_array("X", X)  # lists and frames as float32; tensors and numpy arrays keep their dtype
    if X.dtype not in FLOAT_DTYPES:
        raise TypeError(f"X must be float32 or float64, got {X.dtype}")
    if X.ndim != 2 or X.shape[0] == 0:
        raise ValueError(f"X must be 2-D (n >= 1, d), got shape {tuple(X.shape)}")
    if not bool(torch.isfinite(X).all()):
        raise ValueError("X contains NaN or inf")
    Y = torch.as_tensor(Y).to(device=X.device)
    squeeze = Y.ndim == 1
    Y = Y[:, None] if squeeze else Y
    if Y.ndim != 2 or Y.shape[0] != X.shape[0]:
        raise ValueError(f"Y must have shape (n,) or (n, c) with n = {X.shape[0]}, got {tuple(Y.shape)}")
    if not Y.is_floating_point() or not bool(torch.isfinite(Y).all()):
        raise ValueError("Y must hold finite real numbers")
    if M is not None:
        M = torch.as_tensor(M).to(device=X.device, dtype=X.dtype)
    if isinstance(reg, bool) or not isinstance(reg, (int, float)) or not math.isfinite(reg) or reg < 0:
        raise ValueError(f"reg must be a finite number >= 0, got {reg!r}")
    tol = default_tol(X.dtype) if tol is None else tol
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
        raise ValueError(f"tol must be a number > 0, got {tol!r}")
    max_iter = default_max_iter(X.shape[0]) if max_iter is None else max_iter
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if rank is None:
        rank = default_rank(X.shape[0])
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"rank must be None or an integer >= 1, got {rank!r}")
    return (X, Y, squeeze, kernel, bandwidth, M, float(reg), float(tol), int(max_iter),
            int(min(rank, X.shape[0])), numpy_out)


def nystrom_pcg(X: Any, Y: Any, *, kernel: str = "laplace", bandwidth: float = 1.0, M: Any = None,
                reg: float = 1e-3, tol: Optional[float] = None, max_iter: Optional[int] = None,
                rank: Optional[int] = None, backend: str = "auto", seed: int = 0, progress: bool = False,
                memory_budget: Optional[int | str] = None,
                raise_on_failure: bool = True) -> tuple[Any, dict]:
    """Solve (K_M(X, X) + reg I) alpha = Y by Nystrom-preconditioned conjugate gradients (see the module doc).

    Args:
        X: (n, d) float32/float64 numpy array or torch tensor (any device the ops support); the kernel products
            run in its dtype. Y: (n, c) or (n,) targets. M: None, (d,) or (d, d) PSD, cast to X's dtype.
        kernel, bandwidth: the kernel of docs/maths.md. reg: ridge >= 0 (> 0 unless K is positive definite).
        tol: relative residual ||Y_j - (K + reg I) alpha_j|| / ||Y_j|| every column must reach (default 1e-4 for
            float32, 1e-8 for float64). max_iter: cap on CG iterations (default min(max(2 n, 100), 10000)).
        rank: Nystrom rank r (default :func:`default_rank`; clipped to n). seed: the centres' sampling seed.
        backend, memory_budget: passed to the ops. progress: a tqdm bar with the current residual.
        raise_on_failure: raise :class:`ConvergenceError` when the tolerance is not met (default); with False
            return the last iterate and ``info["converged"] = False``.

    Returns (alpha, info): alpha (n, c) (or (n,) for a 1-D Y) in float64 (the iterate's precision: see
    :mod:`rfm_fast.solvers.cg`), on X's device, numpy for numpy X;
    info = {"iterations", "residual" (largest true relative residual over the columns, float), "converged",
    "rank" (Nystrom rank kept), "restarts", "setup_seconds", "solve_seconds"}.

    Raises: TypeError / ValueError for malformed arguments; :class:`ConvergenceError` (a RuntimeError with
    ``iterations`` and ``residual``) when the cap is hit or CG breaks down (K + reg I not positive definite in
    this dtype).
    """
    (X, Y, squeeze, kernel, bandwidth, M, reg, tol, max_iter, rank, numpy_out) = check_solver_args(
        X, Y, kernel, bandwidth, M, reg, tol, max_iter, rank)
    alpha, info = pcg_rows(X, Y, slice(0, X.shape[0]), LocalComm(), kernel=kernel, bandwidth=bandwidth, M=M,
                           reg=reg, tol=tol, max_iter=max_iter, rank=rank, backend=backend, seed=seed,
                           progress=progress, memory_budget=memory_budget)
    if raise_on_failure and not info["converged"]:
        raise ConvergenceError(failure_message(info, tol, max_iter, X.dtype), iterations=info["iterations"],
                               residual=info["residual"])
    alpha = alpha[:, 0] if squeeze else alpha
    return (alpha.cpu().numpy() if numpy_out else alpha), info
