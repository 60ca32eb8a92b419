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

from .cg import ConvergenceError, LocalComm, failure_message, float64_ops, iterate, progress_bar
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


def _cholesky(A: torch.Tensor, what: str) -> torch.Tensor:
    """Lower Cholesky factor of a symmetric PSD A, adding jitter (from m eps times its mean diagonal up) when A is
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
                  memory_budget: Optional[int | str] = None, progress: bool = False) -> tuple[torch.Tensor, dict]:
    """alpha (m, c) float64 for the centres X[idx] (see the module docstring). X (n, d), Y (n, c) of one dtype and
    device. The iteration is the solvers' preconditioned CG (``rfm_fast.solvers.cg.iterate``: float64 vectors,
    restarts from the residual of the normal equations recomputed with the same products) with P^-1 = B B^T.
    (The ridge solvers recompute theirs with float64 products; here that would hold a float64 copy of X.)
    info: {"iterations", "residual" (relative residual ||b - H alpha|| / ||b||, max over columns), "converged",
    "restarts", "stalled", "centres": idx}. Raises ConvergenceError when ``tol`` is not reached within
    ``max_iter`` iterations."""
    from ..ops.api import kernel_matrix, kernel_mv

    n, m = X.shape[0], idx.numel()
    ops = dict(kernel=kernel, bandwidth=bandwidth, M=M, backend=backend, memory_budget=memory_budget)
    C = X[idx]
    C64 = C.to(torch.float64)
    Kmm = kernel_matrix(C64, C64, **float64_ops(ops, X.dtype))
    Kmm = 0.5 * (Kmm + Kmm.T)
    L = _cholesky(Kmm, "K_mm")
    eye = torch.eye(m, dtype=torch.float64, device=X.device)
    R = _cholesky((n / m) * (L.T @ L) + reg * eye, "n/m L^T L + reg I")

    class FalkonPreconditioner:
        """P^-1 v = B B^T v, B = L^-T R^-T (the module docstring)."""

        rank = m

        @staticmethod
        def apply(v: torch.Tensor) -> torch.Tensor:
            w = torch.linalg.solve_triangular(R, torch.linalg.solve_triangular(L, v, upper=False), upper=False)
            return torch.linalg.solve_triangular(L.T, torch.linalg.solve_triangular(R.T, w, upper=True), upper=True)

    def apply_H(a: torch.Tensor) -> torch.Tensor:
        """a (m, c) float64 -> H a = K_nm^T K_nm a + reg K_mm a, the kernel products in X's dtype."""
        inner = kernel_mv(X, C, a.to(X.dtype), **ops)
        return kernel_mv(C, X, inner, **ops).to(torch.float64) + reg * (Kmm @ a)

    b = kernel_mv(C, X, Y.to(X.dtype), **ops).to(torch.float64)  # K_nm^T Y
    bar = progress_bar(progress, max_iter, "Nystrom")
    try:
        alpha, info = iterate(apply_H, apply_H, FalkonPreconditioner(), b, LocalComm(), tol=tol,
                              max_iter=max_iter, bar=bar, what="Nystrom CG")
    finally:
        if bar is not None:
            bar.close()
    info["centres"] = idx
    if not info["converged"]:
        raise ConvergenceError(failure_message("Nystrom CG", info, tol, max_iter, X.dtype) + " (or use more centres)",
                               iterations=info["iterations"], residual=info["residual"])
    return alpha, info
