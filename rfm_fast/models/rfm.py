"""Recursive Feature Machine: kernel ridge regression whose Mahalanobis metric is learned from its own AGOP."""

from __future__ import annotations

import time
from typing import Any, Optional

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError
from sklearn.utils.multiclass import type_of_target

from ..ops.api import agop, kernel_mv
from ..solvers import check_centres, krr_solve
from ._common import (as_features, as_labels, check_validation_pair, encode_classes, labels_out, normalize_metric,
                      one_hot, resolve_device, resolve_dtype, symmetrize, to_output)
from ._persist import Persist

TASKS = ("auto", "classification", "regression")
NORMALIZATIONS = ("max", "trace", None)


class RFM(Persist, BaseEstimator):
    """Recursive Feature Machine (scikit-learn style; regression and classification).

    Each of ``iters`` rounds: solve alpha = (K_M(X, X) + reg I)^{-1} Y; take the AGOP of the predictor
    f(z) = sum_i alpha_i k_M(z, x_i) at the training points (or ``agop_samples`` of them); set M to that AGOP,
    rescaled by ``normalize`` ("max": divided by its largest entry, as the published RFM code does; "trace":
    divided by its trace; None: as is). A last solve with the final M gives the predictor. Kernels and M follow
    docs/maths.md: laplace exp(-||z - x||_M / L), gaussian exp(-||z - x||_M^2 / (2 L^2)).

    Args:
        kernel: "laplace" or "gaussian". bandwidth: L > 0. reg: ridge >= 0. iters: number of M updates (>= 0).
        diag: learn a diagonal M (d,) from the AGOP's diagonal instead of a full (d, d) M.
        centered: use the centred AGOP (the gradients' covariance).
        normalize: "max", "trace" or None (see above).
        task: "classification" (one-hot targets, argmax prediction, accuracy score), "regression" (real targets,
            R^2 score), or "auto" (scikit-learn's ``type_of_target``: binary / multiclass -> classification).
        agop_samples: evaluate the AGOP at this many random training points (None: all).
        solver: passed to :func:`rfm_fast.krr_solve` ("auto", "cholesky", "cg", "pcg", "nystrom").
        centres: with solver="nystrom", the predictor's centres: an integer m (m training points drawn once with
            ``random_state``, kept for every iteration) or their indices; the AGOP is then that of the Nystrom
            predictor, and ``X_fit_`` holds the m centres.
        dtype: "float32" / "float64" / torch dtype (default float32). device: torch device (default: X's device
            for a torch X, else CPU). backend: passed to the ops. random_state: seed of the AGOP subsample.
        verbose: show the iterative solvers' progress bars (``krr_solve(progress=True)``, CG / PCG only).
        memory_budget: working-memory bound of the ops and the solver (bytes or "256MB"; None: the default,
            ``$RFM_FAST_MEMORY_BUDGET`` or 128 MiB).

    No ``predict_proba``: the kernel ridge outputs are least-squares scores for one-hot targets, not calibrated
    probabilities; use ``decision_function``, or wrap the model in ``sklearn.calibration.CalibratedClassifierCV``.

    After fit: ``M_`` ((d,) or (d, d) tensor), ``alpha_`` (n, c), ``X_fit_`` (the centres), ``classes_``
    (classification), ``history_`` (one dict per solve: iteration, solve_seconds, solver, solver_iterations,
    residual, train_score, val_score when validation data were given, agop_seconds after each AGOP),
    ``n_features_in_``. When validation data are given, the M with the best validation score is kept (the
    published code's model selection).

    ``predict`` returns labels (classification) or values (n,) / (n, t) (regression) as numpy for numpy input
    and as a tensor for tensor input.
    """

    def __init__(self, kernel: str = "laplace", bandwidth: float = 10.0, reg: float = 1e-3, iters: int = 5,
                 diag: bool = False, centered: bool = False, normalize: Optional[str] = "max", task: str = "auto",
                 agop_samples: Optional[int] = None, solver: str = "auto", dtype: Any = None, device: Any = None,
                 backend: str = "auto", random_state: Optional[int] = None, verbose: bool = False,
                 memory_budget: Optional[int | str] = None, centres: Any = None):
        self.kernel = kernel
        self.bandwidth = bandwidth
        self.reg = reg
        self.iters = iters
        self.diag = diag
        self.centered = centered
        self.normalize = normalize
        self.task = task
        self.agop_samples = agop_samples
        self.solver = solver
        self.dtype = dtype
        self.device = device
        self.backend = backend
        self.random_state = random_state
        self.verbose = verbose
        self.memory_budget = memory_budget
        self.centres = centres

    def _check_params(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {self.normalize!r}")
        if isinstance(self.iters, bool) or not isinstance(self.iters, (int, np.integer)) or self.iters < 0:
            raise ValueError(f"iters must be an integer >= 0, got {self.iters!r}")
        if self.agop_samples is not None and (not isinstance(self.agop_samples, (int, np.integer))
                                              or self.agop_samples < 1):
            raise ValueError(f"agop_samples must be None or an integer >= 1, got {self.agop_samples!r}")
        check_centres(self.solver, self.centres)

    def _targets(self, y: Any, n: int) -> torch.Tensor:
        if self.task_ == "classification":
            y = as_labels("y", y, n)
            self.classes_, codes = encode_classes(y)
            if len(self.classes_) < 2:
                raise ValueError(f"classification needs at least 2 classes in y, got 1 class "
                                 f"({self.classes_[0]!r})")
            return one_hot(codes, len(self.classes_), self.dtype_, self.device_)
        Y = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
        if Y.shape[0] != n or Y.ndim not in (1, 2):
            raise ValueError(f"y must have shape (n,) or (n, t) with n = {n}, got {Y.shape}")
        self.output_ndim_ = Y.ndim
        return as_features("y", Y.reshape(n, -1), self.dtype_, self.device_)

    def _kwargs(self) -> dict:
        return dict(kernel=self.kernel, bandwidth=self.bandwidth, backend=self.backend,
                    memory_budget=self.memory_budget)

    def fit(self, X: Any, y: Any, X_val: Any = None, y_val: Any = None) -> "RFM":
        """Fit on X (n, d) and y: labels (n,) for classification, values (n,) or (n, t) for regression."""
        self._check_params()
        self.dtype_ = resolve_dtype(self.dtype)
        self.device_ = resolve_device(self.device, X)
        Xt = as_features("X", X, self.dtype_, self.device_)
        n, d = Xt.shape
        self.n_features_in_ = d
        y_np = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
        self.task_ = self.task if self.task != "auto" else (
            "classification" if type_of_target(y_np) in ("binary", "multiclass") else "regression")
        Y = self._targets(y, n)
        has_val = check_validation_pair(X_val, y_val)
        generator = torch.Generator().manual_seed(
            int(self.random_state) if self.random_state is not None else int(np.random.SeedSequence().entropy % 2**63))

        centre_idx = None
        if self.solver == "nystrom":
            from ..solvers.nystrom import choose_centres

            centre_idx = choose_centres(n, self.centres, int(generator.initial_seed()) % 2**31, self.device_)
        self.X_fit_ = Xt if centre_idx is None else Xt[centre_idx]
        solve_kw = {} if centre_idx is None else {"centres": centre_idx}
        M: Optional[torch.Tensor] = None
        self.history_ = []
        best = None
        for iteration in range(self.iters + 1):
            started = time.perf_counter()
            alpha, info = krr_solve(Xt, Y, M=M, reg=self.reg, solver=self.solver, progress=bool(self.verbose),
                                    return_info=True, **solve_kw, **self._kwargs())
            self.M_, self.alpha_ = M, alpha
            record = {"iteration": iteration, "solve_seconds": time.perf_counter() - started,
                      "solver": info["solver"], "solver_iterations": info["iterations"],
                      "residual": info["residual"], "train_score": self.score(Xt, y)}
            if has_val:
                record["val_score"] = self.score(X_val, y_val)
                if best is None or record["val_score"] > best[0]:
                    best = (record["val_score"], M, alpha)
            self.history_.append(record)
            if iteration == self.iters:
                break
            points = Xt
            if self.agop_samples is not None and self.agop_samples < n:
                idx = torch.randperm(n, generator=generator)[: self.agop_samples].to(self.device_)
                points = Xt[idx]
            started = time.perf_counter()
            G = agop(points, self.X_fit_, alpha, M=M, centered=bool(self.centered), diag=bool(self.diag),
                     **self._kwargs())
            record["agop_seconds"] = time.perf_counter() - started
            M = normalize_metric(symmetrize(G), self.normalize)
        if best is not None:
            _, self.M_, self.alpha_ = best
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "alpha_"):
            raise NotFittedError("this RFM is not fitted yet: call fit(X, y) first")

    def decision_function(self, X: Any) -> Any:
        """Raw predictor outputs f(X) = K_M(X, X_fit) alpha: (m, c) (classes or targets)."""
        self._check_fitted()
        Xt = as_features("X", X, self.dtype_, self.device_)
        if Xt.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {Xt.shape[1]} features, but {type(self).__name__} is expecting "
                             f"{self.n_features_in_} features as input")
        out = kernel_mv(Xt, self.X_fit_, self.alpha_, M=self.M_, **self._kwargs())
        return to_output(out, X)

    def predict(self, X: Any) -> Any:
        """Class labels (classification) or predicted values (regression) for X (m, d)."""
        scores = torch.as_tensor(self.decision_function(X))
        if self.task_ == "classification":
            labels = self.classes_[scores.argmax(1).cpu().numpy()]
            return labels_out(labels, X, self.device_)
        if self.output_ndim_ == 1:
            scores = scores[:, 0]
        return scores if isinstance(X, torch.Tensor) else scores.cpu().numpy()

    def score(self, X: Any, y: Any) -> float:
        """Accuracy (classification) or the coefficient of determination R^2 (regression)."""
        pred = self.predict(X)
        pred = pred.detach().cpu().numpy() if isinstance(pred, torch.Tensor) else pred
        y = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
        if self.task_ == "classification":
            return float(np.mean(pred == y))
        from sklearn.metrics import r2_score

        return float(r2_score(y, pred))
