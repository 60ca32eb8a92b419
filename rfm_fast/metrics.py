"""Deep neural collapse metrics, as defined in docs/maths.md (the normalisation of the seed paper's code).

With K classes, N samples, class means mu_c and global mean mu_G = (1/K) sum_c mu_c (the mean of the class
means, not of the samples):

    Sigma_B = (1/K) sum_c (mu_c - mu_G)(mu_c - mu_G)^T
    Sigma_W = (1/(K N)) sum_i (x_i - mu_{y_i})(x_i - mu_{y_i})^T
    NC1 = tr(Sigma_W) / tr(Sigma_B)
    NC2 = mean over the K x K entries of (U U^T - E)^2,  U rows = (mu_c - mu_G) / ||mu_c - mu_G||,
          E = K/(K-1) I - 1/(K-1) 1 1^T  (the simplex equiangular tight frame's Gram matrix)

Inputs: X (N, p) numpy array or torch tensor, y (N,) integer labels (any K >= 2 distinct values; they need not be
contiguous). Computed in float64; returns a Python float.
"""

from __future__ import annotations

from typing import Any

import torch


def _as_tensors(X: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
    X = torch.as_tensor(X).to(torch.float64)
    y = torch.as_tensor(y).to(X.device)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (N, p), got shape {tuple(X.shape)}")
    if y.ndim != 1 or y.shape[0] != X.shape[0]:
        raise ValueError(f"y must be 1-D with N = {X.shape[0]} labels, got shape {tuple(y.shape)}")
    if y.is_floating_point() and not bool((y == y.round()).all()):
        raise ValueError("y must hold integer class labels")
    if not bool(torch.isfinite(X).all()):
        raise ValueError("X contains NaN or inf")
    return X, y.long()


def class_means(X: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, p) class means in float64 and the inverse label map (N,) with values 0..K-1."""
    X, y = _as_tensors(X, y)
    classes, inverse = torch.unique(y, return_inverse=True)
    K = classes.shape[0]
    if K < 2:
        raise ValueError(f"y must hold at least 2 classes, got {K}")
    sums = torch.zeros(K, X.shape[1], dtype=torch.float64, device=X.device).index_add_(0, inverse, X)
    counts = torch.bincount(inverse, minlength=K).to(torch.float64)
    return sums / counts[:, None], inverse


def nc1(X: Any, y: Any) -> float:
    """Within-class variability collapse: tr(Sigma_W) / tr(Sigma_B) (see module docstring)."""
    Xt, _ = _as_tensors(X, y)
    means, inverse = class_means(Xt, y)
    K, N = means.shape[0], Xt.shape[0]
    centred_means = means - means.mean(0, keepdim=True)
    tr_between = float((centred_means**2).sum()) / K
    tr_within = float(((Xt - means[inverse]) ** 2).sum()) / (K * N)
    if tr_between == 0.0:
        return float("inf") if tr_within > 0 else float("nan")
    return tr_within / tr_between


def nc2(X: Any, y: Any) -> float:
    """Distance of the normalised, centred class means from a simplex ETF (see module docstring)."""
    means, _ = class_means(X, y)
    K = means.shape[0]
    centred = means - means.mean(0, keepdim=True)
    norms = centred.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        raise ValueError("a class mean coincides with the global mean: NC2 is undefined")
    U = centred / norms
    E = (K / (K - 1)) * torch.eye(K, dtype=torch.float64, device=U.device) - 1.0 / (K - 1)
    return float(((U @ U.T - E) ** 2).mean())
