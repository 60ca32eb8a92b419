"""Nystrom kernel ridge regression in the style of Falkon (Rudi, Carratino, Rosasco 2017): a predictor on m << n
centres C, f(z) = sum_i alpha_i k_M(z, c_i), with alpha from the normal equations

    H alpha = b,   H = K_nm^T K_nm + reg K_mm,   b = K_nm^T Y,

where K_nm = K(X, C). With C = X (m = n) this is K (K + reg I) alpha = K Y, i.e. exact KRR: the predictor
converges to the exact one as m grows to n. Every product with K_nm and K_nm^T is streamed (never the n x m
matrix whole; memory bounded by the budget), in the data's dtype, accumulated in float64; on the tile backends
(torch, cpp) K_nm^T (K_nm a) is one pass that computes each kernel tile once and uses it twice
(``rfm_fast.ops.api.kernel_normal_mv``: 1.7x faster than two mat-vecs at n = 1e5, m = 1e4, d = 64).

Preconditioner (Falkon's): with K_mm = L L^T (Cholesky, a small jitter added when needed) and the Nystrom
approximation K_nm^T K_nm ~ (n / m) K_mm^2 of uniformly sampled centres,

    H ~ L (n/m L^T L + reg I) L^T = L R R^T L^T,   R R^T = n/m L^T L + reg I (Cholesky),

so B = L^-T R^-T gives B^T H B ~ I, and conjugate gradients run on B^T H B beta = B^T b, alpha = B beta. L and R
are m x m float64 matrices, and all the solve holds of size m^2: on CPU K_mm is factored in place (LAPACK potrf)
and L^T L is formed by lauum in the buffer that becomes R (2 m^2 doubles: 1.6 GB at m = 10^4; the term
reg K_mm a is applied as reg L (L^T a)). Fixed cost at m = 10^4 on 2 cores: ~10 s per solve.
"""

from __future__ import annotations

import numbers
from typing import Any, Optional

import numpy as np
import torch

from .cg import ConvergenceError, LocalComm, default_tol, failure_message, float64_ops, iterate, progress_bar
from .preconditioned import sample_centres


def choose_centres(n: int, centres: Any, seed: int, device: torch.device) -> torch.Tensor:
    """Sorted indices of the centres: ``centres`` an int m (m of the n points, uniformly without replacement,
    seeded) or a sequence / tensor of distinct indices."""
    if isinstance(centres, bool):
        raise TypeError("centres must be an integer m or a sequence of indices, got a bool")
    if isinstance(centres, numbers.Integral) or (isinstance(centres, (torch.Tensor, np.ndarray)) and centres.ndim == 0):
        m = int(centres)
        if not 1 <= m <= n:
            raise ValueError(f"centres must be between 1 and n = {n}, got {m}")
        return sample_centres(n, m, seed).to(device)
    else:
        idx = torch.as_tensor(centres, dtype=torch.long).flatten().cpu()
        if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= n:
            raise ValueError(f"centre indices must be in [0, {n}), got {idx.numel()} indices")
        if torch.unique(idx).numel() != idx.numel():
            raise ValueError("centre indices must be distinct")
    return torch.sort(idx).values.to(device)


def default_nystrom_tol(dtype: torch.dtype) -> float:
    """The default relative residual of the normal equations: they square K's conditioning, so float32 products
    verify their residual to ~1e-4 only (1e-3); the ridge solvers' default otherwise."""
    return 1e-3 if dtype == torch.float32 else default_tol(dtype)


def _cholesky(A: torch.Tensor, what: str) -> torch.Tensor:
    """Lower Cholesky factor of the symmetric PSD matrix whose lower triangle A holds, adding jitter (from m eps
    times its mean diagonal up) when it is numerically singular (duplicated or nearly equal centres). A is
    consumed: on CPU the factor overwrites it (no second m x m buffer), elsewhere jitter is added to its
    diagonal."""
    m = A.shape[0]
    scale = float(torch.diagonal(A).mean()) if m else 1.0
    jitter, added = 0.0, 0.0
    for _ in range(8):
        if jitter != added:
            A.diagonal().add_(jitter - added)
            added = jitter
        L = _potrf(A)
        if L is not None:
            return L
        jitter = m * torch.finfo(A.dtype).eps * scale if jitter == 0 else jitter * 100
    raise RuntimeError(f"the Cholesky factorisation of {what} failed even with jitter {added:.3g}")


def _lapack():
    try:
        from scipy.linalg import lapack
    except ImportError:  # pragma: no cover - scipy comes with scikit-learn
        return None
    return lapack


def _in_place(A: torch.Tensor) -> bool:
    return A.device.type == "cpu" and A.dtype == torch.float64 and A.is_contiguous() and _lapack() is not None


def _potrf(A: torch.Tensor) -> Optional[torch.Tensor]:
    """Lower Cholesky factor of the matrix in A's lower triangle, or None when it is not numerically positive
    definite (A then holds what it held). CPU float64: LAPACK potrf in place through scipy, the factor in A with
    its strict upper triangle zeroed, since the m x m buffers are what bounds m (800 MB each at m = 10^4);
    otherwise torch's, into a new tensor."""
    if _in_place(A):
        # A C-ordered matrix read in Fortran order is its transpose: A's lower triangle is F's upper one.
        F = A.numpy().T
        diagonal = A.diagonal().clone()
        factor, info = _lapack().dpotrf(F, lower=0, overwrite_a=1, clean=0)
        if not np.shares_memory(factor, F):  # pragma: no cover - scipy copied after all
            A.copy_(torch.from_numpy(np.ascontiguousarray(factor.T)))
        if info == 0:
            return A.tril_()
        # potrf stopped part-way through the lower triangle; the strict upper one is untouched: mirror it back.
        upper = torch.triu(A, 1)
        A.copy_(upper.T).add_(upper).diagonal().copy_(diagonal)
        return None
    L, info = torch.linalg.cholesky_ex(A)
    return L if int(info) == 0 else None


def _lower_gram(L: torch.Tensor) -> torch.Tensor:
    """L^T L for a lower-triangular L (strict upper triangle zero), in the lower triangle of a new matrix (the
    strict upper one is not meant to be read): LAPACK lauum on CPU (m^3 / 3 flops, a sixth of the dense
    product's 2 m^3), the dense product elsewhere."""
    if _in_place(L):
        T = L.clone()
        F = T.numpy().T  # Fortran view: U = L^T, upper triangular; lauum writes U U^T = L^T L over it
        out, info = _lapack().dlauum(F, lower=0, overwrite_c=1)
        if info == 0 and np.shares_memory(out, F):
            return T
    return L.T @ L


EXACT_CHUNK = 65536  # rows of X converted to float64 at a time for the residual checks (33 MB at d = 64)


class FalkonPreconditioner:
    """P^-1 v = B B^T v, B = L^-T R^-T (the module docstring). A module-level class: one defined inside the solve
    would sit in a reference cycle and keep its two m x m factors alive until the garbage collector ran (1.6 GB
    per solve at m = 10^4, 6.9 GB peak over an RFM fit before this was found)."""

    def __init__(self, L: torch.Tensor, R: torch.Tensor):
        self.L, self.R, self.rank = L, R, L.shape[0]

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        L, R = self.L, self.R
        w = torch.linalg.solve_triangular(R, torch.linalg.solve_triangular(L, v, upper=False), upper=False)
        return torch.linalg.solve_triangular(L.T, torch.linalg.solve_triangular(R.T, w, upper=True), upper=True)


def nystrom_solve(X: torch.Tensor, Y: torch.Tensor, idx: torch.Tensor, *, kernel: str, bandwidth: float,
                  M: Optional[Any], reg: float, tol: float, max_iter: int, backend: str = "auto",
                  memory_budget: Optional[int | str] = None, progress: bool = False) -> tuple[torch.Tensor, dict]:
    """alpha (m, c) float64 for the centres X[idx] (see the module docstring). X (n, d), Y (n, c) of one dtype and
    device. The iteration is the solvers' preconditioned CG (``rfm_fast.solvers.cg.iterate``: float64 vectors,
    restarts from the residual of the normal equations recomputed with float64 products, X converted a row chunk
    at a time, as the ridge solvers do: iterative refinement) with P^-1 = B B^T.
    info: {"iterations", "residual" (relative residual ||b - H alpha|| / ||b||, max over columns), "converged",
    "restarts", "stalled", "centres": idx}. Raises ConvergenceError when ``tol`` is not reached within
    ``max_iter`` iterations."""
    alpha, info = solve_on_rows(X, Y, X[idx], X.shape[0], LocalComm(), kernel=kernel, bandwidth=bandwidth, M=M,
                                reg=reg, tol=tol, max_iter=max_iter, backend=backend, memory_budget=memory_budget,
                                progress=progress)
    info["centres"] = idx
    return alpha, info


def solve_on_rows(X: torch.Tensor, Y: torch.Tensor, C: torch.Tensor, n: int, comm: Any, *, kernel: str,
                  bandwidth: float, M: Optional[Any], reg: float, tol: float, max_iter: int, backend: str = "auto",
                  memory_budget: Optional[int | str] = None, progress: bool = False) -> tuple[torch.Tensor, dict]:
    """The Nystrom solve with the rows of K_nm split across ranks: X (n_r, d), Y (n_r, c) this rank's rows (the
    whole data in one process), C (m, d) the centres on every rank, n the total number of rows; ``comm.allsum``
    sums the m-sized products K_rm^T (K_rm a) and K_rm^T Y_r over ranks. K_mm, its factors and the CG iteration
    (on m-vectors) are computed on every rank alike, so every rank returns the same alpha."""
    from ..ops.api import fuses_normal_mv, kernel_matrix, kernel_mv, kernel_normal_mv

    m = C.shape[0]
    ops = dict(kernel=kernel, bandwidth=bandwidth, M=M, backend=backend, memory_budget=memory_budget)
    L = _cholesky(kernel_matrix(C.to(torch.float64), C.to(torch.float64), **float64_ops(ops, X.dtype)), "K_mm")
    T = _lower_gram(L)
    T.mul_(n / m).diagonal().add_(reg)
    R = _cholesky(T, "n/m L^T L + reg I")
    del T

    fused = X.shape[0] > 0 and fuses_normal_mv(X, C, **{k: v for k, v in ops.items() if k != "memory_budget"})
    C64, ops64 = C.to(torch.float64), float64_ops(ops, X.dtype)

    def normal(Xp: torch.Tensor, Cp: torch.Tensor, a: torch.Tensor, kw: dict) -> torch.Tensor:
        if fused:
            return kernel_normal_mv(Xp, Cp, a.to(Xp.dtype), **kw)
        return kernel_mv(Cp, Xp, kernel_mv(Xp, Cp, a.to(Xp.dtype), **kw), **kw).to(torch.float64)

    def chunks():
        """Row chunks of X for the float64 products (no float64 copy of X)."""
        return (slice(start, start + EXACT_CHUNK) for start in range(0, X.shape[0], EXACT_CHUNK))

    def finish(part: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """This rank's K_rm^T K_rm a summed over ranks, plus reg K_mm a as L (L^T a) (K_mm plus the factor's
        jitter, if it needed one)."""
        return comm.allsum(part) + reg * (L @ (L.T @ a))

    def apply_H(a: torch.Tensor) -> torch.Tensor:
        """a (m, c) float64 -> H a = K_nm^T K_nm a + reg K_mm a, the kernel products in X's dtype."""
        return finish(normal(X, C, a, ops) if X.shape[0] else torch.zeros_like(a), a)

    def apply_H64(a: torch.Tensor) -> torch.Tensor:
        """H a with float64 products, X converted a row chunk at a time (no float64 copy of X): the true
        residual of the restarts. In float32 products H a carries ~eps32 ||H|| ||a|| of error, which is above
        tol once H's conditioning passes ~1e4 (RFM at n = 1e6 stalled at 5e-3 that way)."""
        if X.dtype == torch.float64:
            return apply_H(a)
        part = torch.zeros_like(a)
        for rows in chunks():
            part += normal(X[rows].to(torch.float64), C64, a, ops64)
        return finish(part, a)

    b = torch.zeros(m, Y.shape[1], dtype=torch.float64, device=C.device)
    for rows in chunks():  # K_nm^T Y with float64 products, as the residuals
        b += kernel_mv(C64, X[rows].to(torch.float64), Y[rows].to(torch.float64), **ops64)
    b = comm.allsum(b)
    bar = progress_bar(progress and comm.rank == 0, max_iter, "Nystrom")
    try:
        alpha, info = iterate(apply_H, apply_H64, FalkonPreconditioner(L, R), b, LocalComm(), tol=tol,
                              max_iter=max_iter, bar=bar, what="Nystrom CG")
    finally:
        if bar is not None:
            bar.close()
    if not info["converged"]:
        raise ConvergenceError(failure_message("Nystrom CG", info, tol, max_iter, X.dtype) + " (or use more centres)",
                               iterations=info["iterations"], residual=info["residual"])
    return alpha, info
