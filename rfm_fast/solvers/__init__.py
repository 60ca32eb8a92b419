"""Kernel ridge regression solvers: ``krr_solve`` picks a direct, matrix-free or preconditioned method.

alpha = (K(X, X) + reg I)^{-1} Y, with K the Laplace or Gaussian kernel of docs/maths.md (Mahalanobis M).
"""

from __future__ import annotations

import importlib
from typing import Any, Optional

import numpy as np
import torch

from .._config import memory_budget as resolve_budget
from .._validation import FLOAT_DTYPES, check_bandwidth, check_kernel
from .._validation import tensor_or_array as _as_tensor
from .cg import ConvergenceError, cg_solve, default_max_iter, default_tol
from .direct import SingularSystemError, cholesky_solve

__all__ = ["krr_solve", "ConvergenceError", "SingularSystemError", "SOLVERS"]

SOLVERS = ("auto", "cholesky", "cg", "pcg", "nystrom")


def _resolve_dtype(dtype: Any, default: torch.dtype) -> torch.dtype:
    if dtype is None:
        return default if default in FLOAT_DTYPES else torch.float32
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "float64": torch.float64}.get(dtype, dtype)
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be torch.float32 or torch.float64 (or their names), got {dtype!r}")
    return dtype


def _preconditioned():
    """The Nystrom-PCG module, or None when this installation does not have it."""
    try:
        return importlib.import_module("rfm_fast.solvers.preconditioned")
    except ModuleNotFoundError as exc:
        if exc.name in ("rfm_fast.solvers.preconditioned",):
            return None
        raise


def check_centres(solver: str, centres: Any) -> None:
    """centres= goes with solver="nystrom" and only with it (krr_solve and RFM both ask)."""
    if (solver == "nystrom") != (centres is not None):
        raise ValueError("centres= goes with solver='nystrom' (an integer m or the centres' indices), and "
                         "solver='nystrom' needs centres=")


def choose_solver(n: int, dtype: torch.dtype, memory_budget: Optional[int | str] = None) -> str:
    """What ``solver="auto"`` runs for n points: "cholesky" when the n x n matrix and its factor
    (2 n^2 elements of ``dtype``) fit the memory budget, else "pcg", or "cg" where PCG is not installed."""
    itemsize = torch.finfo(dtype).bits // 8
    if 2 * n * n * itemsize <= resolve_budget(memory_budget):
        return "cholesky"
    return "pcg" if _preconditioned() is not None else "cg"


def krr_solve(X: Any, Y: Any, *, kernel: str = "laplace", bandwidth: float = 1.0, M: Any = None, reg: float = 1e-3,
              solver: str = "auto", tol: Optional[float] = None, max_iter: Optional[int] = None,
              backend: str = "auto", dtype: Any = None, memory_budget: Optional[int | str] = None,
              rank: Optional[int] = None, seed: int = 0, return_info: bool = False, progress: bool = False,
              centres: Any = None) -> Any:
    """Kernel ridge regression coefficients alpha = (K(X, X) + reg I)^{-1} Y.

    Args:
        X: (n, d) centres, numpy array or torch tensor (float32/float64; other dtypes need ``dtype``).
        Y: (n,) or (n, c) targets; cast to the solve dtype and X's device. A 1-D Y gives a 1-D alpha.
        kernel, bandwidth, M: the kernel k_M of docs/maths.md (M None, (d,) diagonal or (d, d) PSD).
        reg: ridge, >= 0 (0 only makes sense when K is positive definite).
        solver: "cholesky" (direct, builds K with ``kernel_matrix``: ~2 n^2 elements of memory), "cg"
            (matrix-free conjugate gradients, only ``kernel_mv``), "pcg" (Nystrom-preconditioned CG,
            ``rfm_fast.solvers.preconditioned.nystrom_pcg``), or "auto": Cholesky when 2 n^2 elements fit
            ``memory_budget``, else "pcg" ("cg" where PCG is not installed).
        tol: the true relative residual max_j ||Y_j - (K + reg I) alpha_j|| / ||Y_j|| every solver must reach,
            checked with a float64 product (default 1e-8 in float64, 1e-4 in float32). Cholesky refines its
            solution with the factor until it does; CG and PCG restart from the true residual (iterative
            refinement). max_iter: iteration cap of CG / PCG (default min(max(2 n, 100), 10000)).
        backend: passed to the ops. dtype: the solve dtype (torch.float32/float64 or their names; default X's
            dtype): float64 makes Cholesky robust for ill-conditioned K. memory_budget: bytes or "256MB".
        rank, seed: Nystrom rank and sampling seed of "pcg" (seed also samples the centres of "nystrom").
        centres: for solver="nystrom" (a predictor on m << n centres, Falkon-style: ``rfm_fast.solvers.nystrom``),
            an integer m (m of the points, sampled uniformly with ``seed``) or the indices of the centres. The
            result is then alpha (m, c) for the centres X[info["centres"]] (sorted indices; ``return_info=True``
            gives them), and ``tol`` bounds the relative residual of the normal equations
            (K_nm^T K_nm + reg K_mm) alpha = K_nm^T Y (default 1e-3 with float32 products, whose rounding the
            squared conditioning makes visible near 1e-4; 1e-8 in float64). With every point a centre it is
            exact KRR.
        return_info: also return a dict {"solver", "iterations" (CG / PCG iterations, Cholesky refinement
            steps), "residual" (the true relative residual reached), "converged", ...}.
        progress: a tqdm bar with the residual for CG / PCG.

    Returns alpha (n, c) or (n,) in float64 on X's device (numpy when X is numpy, torch otherwise), whatever the
    solve dtype: the kernel products run in the solve dtype, the coefficients are accumulated in float64, since
    rounding them to float32 would cost up to cond(K + reg I) * 2^-24 of residual (more than 1e-4 at reg 1e-3).

    Raises:
        ValueError / TypeError for malformed arguments; SingularSystemError (a RuntimeError) when the Cholesky
        factorisation of K + reg I breaks down; ConvergenceError (a RuntimeError, with ``iterations`` and
        ``residual``) when a solver stops short of ``tol`` (the message says what was reached and what to
        change); RuntimeError when "pcg" is asked for and not installed.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    kernel = check_kernel(kernel)
    bandwidth = check_bandwidth(bandwidth)
    if isinstance(reg, bool) or not isinstance(reg, (int, float)) or not np.isfinite(reg) or reg < 0:
        raise ValueError(f"reg must be a finite number >= 0, got {reg!r}")
    reg = float(reg)
    numpy_out = not isinstance(X, torch.Tensor)  # numpy (and lists, frames) in, numpy out
    Xt = _as_tensor("X", X)
    solve_dtype = _resolve_dtype(dtype, Xt.dtype)
    Xt = Xt.to(solve_dtype)
    if Xt.ndim != 2 or Xt.shape[0] == 0:
        raise ValueError(f"X must be 2-D (n >= 1, d), got shape {tuple(Xt.shape)}")
    Yt = _as_tensor("Y", Y).to(device=Xt.device, dtype=solve_dtype)
    squeeze = Yt.ndim == 1
    if squeeze:
        Yt = Yt[:, None]
    if Yt.ndim != 2 or Yt.shape[0] != Xt.shape[0]:
        raise ValueError(f"Y must have shape (n,) or (n, c) with n = {Xt.shape[0]}, got {tuple(Yt.shape)}")
    if not bool(torch.isfinite(Yt).all()):
        raise ValueError("Y contains NaN or inf")
    if M is not None:
        M = _as_tensor("M", M).to(device=Xt.device, dtype=solve_dtype)

    check_centres(solver, centres)
    chosen = choose_solver(Xt.shape[0], solve_dtype, memory_budget) if solver == "auto" else solver
    common = dict(kernel=kernel, bandwidth=bandwidth, M=M, reg=reg, backend=backend)
    if chosen == "cholesky":
        alpha, info = cholesky_solve(Xt, Yt, tol=tol, memory_budget=memory_budget, **common)
    elif chosen == "cg":
        alpha, info = cg_solve(Xt, Yt, tol=tol, max_iter=max_iter, memory_budget=memory_budget,
                               progress=progress, **common)
    elif chosen == "nystrom":
        from .nystrom import choose_centres, default_nystrom_tol, nystrom_solve

        idx = choose_centres(Xt.shape[0], centres, seed, Xt.device)
        alpha, info = nystrom_solve(Xt, Yt, idx, tol=tol if tol is not None else default_nystrom_tol(solve_dtype),
                                    max_iter=max_iter if max_iter is not None else default_max_iter(idx.numel()),
                                    memory_budget=memory_budget, progress=progress, **common)
    else:
        module = _preconditioned()
        if module is None:
            raise RuntimeError("solver='pcg' needs rfm_fast.solvers.preconditioned, which this installation lacks; "
                               "use solver='cg' or 'cholesky'")
        alpha, info = module.nystrom_pcg(Xt, Yt, tol=tol if tol is not None else default_tol(solve_dtype),
                                         max_iter=(max_iter if max_iter is not None
                                                   else default_max_iter(Xt.shape[0])),
                                         rank=rank, seed=seed, progress=progress, memory_budget=memory_budget,
                                         **common)
    info = {"solver": chosen, **info}
    if squeeze:
        alpha = alpha[:, 0]
    out = alpha.cpu().numpy() if numpy_out else alpha
    return (out, info) if return_info else out

