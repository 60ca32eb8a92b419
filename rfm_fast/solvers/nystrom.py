"""Nystrom kernel ridge regression in the style of Falkon (Rudi, Carratino, Rosasco 2017): a predictor on m << n
centres C, f(z) = sum_i alpha_i k_M(z, c_i), with alpha from the normal equations

    H alpha = b,   H = K_nm^T K_nm + reg K_mm,   b = K_nm^T Y,

where K_nm = K(X, C). With C = X (m = n) this is K (K + reg I) alpha = K Y, i.e. exact KRR: the predictor
converges to the exact one as m grows to n. Every product with K_nm and K_nm^T is a streamed ``kernel_mv``
(never the n x m matrix whole; memory bounded by the budget), in the data's dtype, accumulated in float64.

Preconditioner (Falkon's): with K_mm = L L^T (Cholesky, a small jitter added when needed) and the Nystrom
approximation K_nm^T K_nm ~ (n / m) K_mm^2 of uniformly sampled centres,

    H ~ L (n/m L^T L + reg I) L^T = L R R^T L^T,   R R^T = n/m L^T L + reg I (Cholesky),

so B = L^-T R^-T gives B^T H B ~ I, and conjugate gradients run on B^T H B beta = B^T b, alpha = B beta. K_mm,
L and R are m x m float64 matrices (3 m^2 doubles: 2.4 GB at m = 10^4).
"""

from __future__ import annotations

import numbers
from typing import Any, Optional

import numpy as np
import torch

from .cg import ConvergenceError


def choose_centres(n: int, centres: Any, seed: int, device: torch.device) -> torch.Tensor:
    """Sorted indices of the centres: ``centres`` an int m (m of the n points, uniformly without replacement,
    seeded) or a sequence / tensor of distinct indices."""
    if isinstance(centres, bool):
        raise TypeError("centres must be an integer m or a sequence of indices, got a bool")
    if isinstance(centres, numbers.Integral) or (isinstance(centres, (torch.Tensor, np.ndarray)) and centres.ndim == 0):
        m = int(centres)
        if not 1 <= m <= n:
            raise ValueError(f"centres must be between 1 and n = {n}, got {m}")
        gen = torch.Generator().manual_seed(int(seed))
        idx = torch.randperm(n, generator=gen)[:m]
    else:
        idx = torch.as_tensor(centres, dtype=torch.long).flatten().cpu()
        if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= n:
            raise ValueError(f"centre indices must be in [0, {n}), got {idx.numel()} indices")
        if torch.unique(idx).numel() != idx.numel():
            raise ValueError("centre indices must be distinct")
    return torch.sort(idx).values.to(device)


def _cholesky(A: torch.Tensor, what: str) -> torch.Tensor:
    """Lower Cholesky factor of a symmetric PSD A, adding jitter (from m * eps * trace / m up) when A is
    numerically singular (duplicated or nearly equal centres)."""
    m = A.shape[0]
    scale = float(torch.diagonal(A).mean()) if m else 1.0
    jitter = 0.0
    eye = torch.eye(m, dtype=A.dtype, device=A.device)
    for _ in range(8):
        L, info = torch.linalg.cholesky_ex(A + jitter * eye if jitter else A)
        if int(info) == 0:
            return L
        jitter = m * torch.finfo(A.dtype).eps * scale if jitter == 0 else jitter * 100
    raise RuntimeError(f"the Cholesky factorisation of {what} failed even with jitter {jitter:.3g}")


def nystrom_solve(X: torch.Tensor, Y: torch.Tensor, idx: torch.Tensor, *, kernel: str, bandwidth: float,
                  M: Optional[Any], reg: float, tol: float, max_iter: int, backend: str = "auto",
                  memory_budget: Optional[int | str] = None) -> tuple[torch.Tensor, dict]:
    """alpha (m, c) float64 for the centres X[idx] (see the module docstring). X (n, d), Y (n, c) of one dtype and
    device. info: {"iterations", "residual" (relative residual ||b - H alpha|| / ||b|| of the normal equations,
    max over columns, recomputed at the end), "converged", "centres": idx, "jitter"}. Raises ConvergenceError
    when ``tol`` is not reached within ``max_iter`` iterations."""
    from ..ops.api import kernel_matrix, kernel_mv

    n, m = X.shape[0], idx.numel()
    C = X[idx]
    ops = dict(kernel=kernel, bandwidth=bandwidth, M=M, backend=backend, memory_budget=memory_budget)
    dt = X.dtype

    def knm(v: torch.Tensor) -> torch.Tensor:  # (m, c) -> (n, c): K_nm v
        return kernel_mv(X, C, v.to(dt), **ops).double()

    def kmn(u: torch.Tensor) -> torch.Tensor:  # (n, c) -> (m, c): K_nm^T u
        return kernel_mv(C, X, u.to(dt), **ops).double()

    M64 = None if M is None else (M.double() if isinstance(M, torch.Tensor) else M)
    Kmm = kernel_matrix(C.double(), C.double(), kernel=kernel, bandwidth=bandwidth, M=M64, backend=backend,
                        memory_budget=memory_budget)
    Kmm = 0.5 * (Kmm + Kmm.T)
    L = _cholesky(Kmm, "K_mm")
    eye = torch.eye(m, dtype=torch.float64, device=X.device)
    R = _cholesky((n / m) * (L.T @ L) + reg * eye, "n/m L^T L + reg I")

    def B(v):  # L^-T R^-T v
        w = torch.linalg.solve_triangular(R.T, v, upper=True)
        return torch.linalg.solve_triangular(L.T, w, upper=True)

    def Bt(v):  # R^-1 L^-1 v
        w = torch.linalg.solve_triangular(L, v, upper=False)
        return torch.linalg.solve_triangular(R, w, upper=False)

    def H(a):
        return kmn(knm(a)) + reg * (Kmm @ a)

    def pcg(rhs: torch.Tensor, budget: int, inner_tol: float) -> tuple[torch.Tensor, int]:
        """CG on B^T H B beta = rhs to a relative residual inner_tol (or ``budget`` iterations)."""
        beta = torch.zeros_like(rhs)
        r = rhs.clone()
        p = r.clone()
        rr = (r * r).sum(0)
        rhs_norm = rhs.norm(dim=0).clamp_min(1e-300)
        done = 0
        for done in range(1, budget + 1):
            Ap = Bt(H(B(p)))
            pAp = (p * Ap).sum(0)
            step = torch.where(pAp > 0, rr / pAp.clamp_min(1e-300), torch.zeros_like(rr))
            beta += step * p
            r -= step * Ap
            rr_new = (r * r).sum(0)
            if float((rr_new.sqrt() / rhs_norm).max()) <= inner_tol:
                break
            p = r + (rr_new / rr.clamp_min(1e-300)) * p
            rr = rr_new
        return beta, done

    # Iterative refinement: each round solves for the correction of the float64 residual b - H alpha, so the
    # float32 products' rounding does not cap the accuracy of alpha.
    b = kmn(Y.double())
    bnorm = b.norm(dim=0).clamp_min(1e-300)
    alpha = torch.zeros(m, Y.shape[1], dtype=torch.float64, device=X.device)
    iterations, residual, previous = 0, float("inf"), float("inf")
    while True:
        resid = b - H(alpha)
        residual = float((resid.norm(dim=0) / bnorm).max())
        if residual <= tol or iterations >= max_iter or residual > 0.5 * previous:
            break
        previous = residual
        delta, done = pcg(Bt(resid), max_iter - iterations, max(1e-3, tol / residual))
        alpha = alpha + B(delta)
        iterations += done
    info = {"iterations": iterations, "residual": residual, "converged": residual <= tol, "centres": idx}
    if not info["converged"]:
        raise ConvergenceError(f"Nystrom CG reached a relative residual {residual:.3g} of the normal equations "
                               f"after {iterations} iterations, above tol = {tol:g}: raise max_iter or tol, or use "
                               "more centres", iterations=iterations, residual=residual)
    return alpha, info
