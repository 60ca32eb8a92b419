"""Helpers shared by the estimators: tensor conversion, dtype/device resolution, label encoding, M rescaling."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

_DTYPES = {"float32": torch.float32, "float64": torch.float64, None: None}


def resolve_dtype(dtype: Any) -> torch.dtype:
    """None -> float32; "float32"/"float64" or the torch dtypes themselves."""
    if isinstance(dtype, str) or dtype is None:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be 'float32', 'float64', a torch dtype or None, got {dtype!r}")
        dtype = _DTYPES[dtype]
    if dtype is None:
        return torch.float32
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
    return dtype


def resolve_device(device: Any, X: Any) -> torch.device:
    """The explicit device, else the device of a torch X, else CPU."""
    if device is not None:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device={device!r} was requested but CUDA is not available here")
        return dev
    if isinstance(X, torch.Tensor):
        return X.device
    return torch.device("cpu")


def as_features(name: str, X: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 2-D finite float tensor of the model's dtype on its device, from any array-like the ops take
    (``rfm_fast._validation``: lists, integer/bool/object arrays of numbers, pandas frames; scipy sparse refused)."""
    from .._validation import _to_tensor

    X = _to_tensor(name, X)
    if X.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, d), got shape {tuple(X.shape)}. Reshape your data with "
                         f"{name}.reshape(-1, 1) for one feature or {name}.reshape(1, -1) for one sample")
    if X.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one row, got 0 samples (shape={tuple(X.shape)})")
    if X.shape[1] == 0:
        raise ValueError(f"{name} has 0 feature(s) (shape={tuple(X.shape)}) while a minimum of 1 is required.")
    X = X.to(device=device, dtype=dtype)
    if not bool(torch.isfinite(X).all()):
        raise ValueError(f"{name} contains NaN or inf")
    return X


def as_labels(name: str, y: Any, n: int) -> np.ndarray:
    """A 1-D numpy array of n labels."""
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    y = np.asarray(y)
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"{name} must be 1-D with {n} entries, got shape {y.shape}")
    return y


def encode_classes(y: np.ndarray, classes: Optional[np.ndarray] = None,
                   name: str = "y") -> tuple[np.ndarray, np.ndarray]:
    """(classes, codes 0..K-1). With ``classes`` given, labels outside it raise ValueError naming ``name``."""
    if classes is None:
        classes = np.unique(y)
    codes = np.searchsorted(classes, y)
    codes = np.clip(codes, 0, len(classes) - 1)
    if not np.array_equal(classes[codes], y):
        unseen = sorted(set(np.asarray(y).tolist()) - set(np.asarray(classes).tolist()))[:5]
        raise ValueError(f"{name} holds labels the model was not trained on: {unseen} (trained on "
                         f"{np.asarray(classes).tolist()[:10]})")
    return classes, codes


def check_validation_pair(X_val: Any, y_val: Any) -> bool:
    """Whether validation data were given; X_val without y_val (or the reverse) raises."""
    if (X_val is None) != (y_val is None):
        given, missing = ("X_val", "y_val") if y_val is None else ("y_val", "X_val")
        raise ValueError(f"{given} was given without {missing}: pass both, or neither")
    return X_val is not None


def one_hot(codes: np.ndarray, K: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.zeros(len(codes), K, dtype=dtype, device=device)
    out[torch.arange(len(codes), device=device), torch.as_tensor(codes, device=device)] = 1
    return out


def normalize_metric(M: torch.Tensor, how: Optional[str]) -> torch.Tensor:
    """Rescale an AGOP before it becomes the next M: "max" divides by the largest entry (the published RFM code),
    "trace" by the trace, None leaves it. M is (d,) (diagonal) or (d, d). An all-zero AGOP (a constant
    predictor) cannot be rescaled and raises RuntimeError."""
    if how is None:
        return M
    scale = M.max() if how == "max" else (M.sum() if M.ndim == 1 else torch.diagonal(M).sum())
    if not float(scale) > 0:
        raise RuntimeError(f"the AGOP is zero (largest entry {float(scale):g}): the predictor is constant, so M "
                           "cannot be rescaled; check the targets and the bandwidth")
    return M / scale


def symmetrize(M: torch.Tensor) -> torch.Tensor:
    return M if M.ndim == 1 else 0.5 * (M + M.T)


def row_normalize(X: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit Euclidean norm; an all-zero row stays zero."""
    norms = X.norm(dim=1, keepdim=True)
    return X / torch.where(norms > 0, norms, torch.ones_like(norms))


def to_output(t: torch.Tensor, like: Any) -> Any:
    """numpy when ``like`` was not a torch tensor, else the tensor itself."""
    return t if isinstance(like, torch.Tensor) else t.detach().cpu().numpy()


def labels_out(labels: np.ndarray, like: Any, device: torch.device) -> Any:
    """Predicted labels as a tensor for tensor input when they are numeric, else as the numpy array."""
    if isinstance(like, torch.Tensor) and (np.issubdtype(labels.dtype, np.number) or labels.dtype == bool):
        return torch.as_tensor(labels, device=device)
    return labels
