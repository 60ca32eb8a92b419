"""Deep RFM (the seed paper's construction): layers of AGOP projection followed by a random feature map."""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.exceptions import NotFittedError
from sklearn.utils.multiclass import type_of_target

from ..core.geometry import reuse
from ..core.metric import psd_sqrt
from ..metrics import nc1, nc2
from ..ops.api import agop, kernel_mv
from ..solvers import krr_solve
from ._common import (as_features, as_labels, check_validation_pair, encode_classes, labels_out, normalize_metric,
                      one_hot, resolve_device, resolve_dtype, row_normalize, symmetrize, to_output)
from ._persist import Persist

FEATURE_MAPS = ("relu", "cosine")
PROJECTIONS = ("agop", "identity")
METRIC_KEYS = ("nc1_input", "nc1_projected", "nc1_features", "nc2_input", "nc2_projected", "nc2_features",
               "train_accuracy")
TIMING_KEYS = ("solve_s", "agop_s", "feature_map_s")
DEFAULT_RELU_WIDTH = 1024


def _clock(device: torch.device) -> float:
    """time.perf_counter() after the device's queued work has finished (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass
class Layer:
    """One learned layer: x -> phi(normalize(x) @ sqrt_M), phi(z) = relu(z W^T) or sqrt(2/D) cos(z W^T + b)."""

    sqrt_M: Optional[torch.Tensor]  # (d, d), None for the identity projection
    W: torch.Tensor  # (width, d)
    b: Optional[torch.Tensor]  # (width,) for the cosine map

    def project(self, X: torch.Tensor) -> torch.Tensor:
        return X if self.sqrt_M is None else X @ self.sqrt_M

    def features(self, Z: torch.Tensor) -> torch.Tensor:
        if self.b is None:
            return torch.relu(Z @ self.W.T)
        return math.sqrt(2.0 / self.W.shape[0]) * torch.cos(Z @ self.W.T + self.b)


def _measure(metric, T: torch.Tensor, codes: torch.Tensor) -> float:
    """A collapse metric of one layer, NaN where it is undefined (e.g. NC2 of features whose class means all
    coincide with the global mean): a degenerate layer is recorded, not fatal to the fit."""
    try:
        return metric(T, codes)
    except ValueError:
        return float("nan")


class DeepRFM(Persist, TransformerMixin, BaseEstimator):
    """Deep Recursive Feature Machine, following the code of arXiv 2402.13728.

    Layer l maps its input X_l (n, d_l) as follows (training data; new data reuse the learned M^{1/2}, W, b):

    1. rows scaled to unit Euclidean norm;
    2. kernel ridge regression with M = I on the targets 2 * onehot(y) - 1:
       alpha = (K(X_l, X_l) + reg I)^{-1} (2 Y - 1);
    3. M = AGOP of that predictor at the training points, divided by its largest entry (``projection="agop"``),
       or M = I (``projection="identity"``, the control experiment);
    4. the symmetric square root M^{1/2} (eigh, negative eigenvalues clipped to 0), projection Z = X_l M^{1/2};
    5. a random feature map drawn fresh for the layer, X_{l+1} = phi(Z):
       "relu": ReLU(Z W^T), W (width, d_l) with entries U(-1/sqrt(d_l), 1/sqrt(d_l)), no bias;
       "cosine": sqrt(2/D) cos(Z W^T + b), W i.i.d. Cauchy with scale ``gamma`` (default 1 / bandwidth),
       b ~ U[0, 2 pi], D = width. The paper's setting is width = the input dimension (the default for
       "cosine"), with gamma 0.05 on MNIST-like data and 0.1 on CIFAR-10 / SVHN-like data.

    After the last layer a kernel ridge readout (same kernel, M = I) is fitted on the row-normalised final
    features; ``predict`` uses it.

    Args:
        depth: number of layers (>= 1). kernel: "laplace" / "gaussian". bandwidth: L > 0. reg: ridge >= 0.
        feature_map: "relu" / "cosine". width: features per layer: an integer >= 1, "input" (each layer's input
            dimension, so every layer keeps the data's dimension), or None (default: 1024 for "relu", "input"
            for "cosine", the paper's setting). gamma: Cauchy scale of "cosine" (default 1 / bandwidth).
        projection: "agop" / "identity". random_state: seed of the feature maps (None: fresh entropy).
        device, dtype: where and in what the layers compute (default CPU / X's device, float32).
        backend: passed to the ops. solver: passed to :func:`rfm_fast.krr_solve`.
        verbose: show the iterative solvers' progress bars (``krr_solve(progress=True)``) and print one line per
            layer (its index, the seconds of the solve, the AGOP and the feature map, the accuracies).
        memory_budget: working-memory bound of the ops and the solves (bytes or "256MB"; None: the default).

    A classifier only: y must hold class labels (a continuous target raises). No ``predict_proba``: the readout's
    ridge outputs are least-squares scores, not calibrated probabilities (``decision_function`` gives them).

    After ``fit``: ``metrics_`` (one dict per layer with exactly the keys nc1_input, nc1_projected,
    nc1_features, nc2_input, nc2_projected, nc2_features, train_accuracy, plus test_accuracy when validation
    data were given, then solve_s, agop_s, feature_map_s), measured on the unit-norm layer input X_l, on
    X_l M^{1/2} and on the features. The accuracies are those of layer l's ridge predictor (step 2), on the
    training data and on the validation data carried through the earlier layers. The timings are wall-clock
    seconds (time.perf_counter, CUDA synchronised): solve_s the kernel ridge solve of step 2 (it also prepares
    the geometry of X_l that the predictions and the AGOP reuse); agop_s the AGOP, its rescaling and square root
    of steps 3-4 (0.0 for the identity projection); feature_map_s the row normalisation, drawing W and b, the
    projection and the feature map, on the training data and (when given) on the validation data. The accuracy
    predictions and the NC metrics are not in any of them. ``readout_solve_s_``: seconds of the readout's solve.
    ``layers_`` (the learned :class:`Layer` list), ``classes_``.
    """

    _saved_classes = {"Layer": Layer}

    def __init__(self, depth: int = 8, kernel: str = "laplace", bandwidth: float = 2.0, reg: float = 1e-3,
                 feature_map: str = "relu", width: Optional[int | str] = None, gamma: Optional[float] = None,
                 projection: str = "agop", random_state: Optional[int] = None, device: Any = None,
                 dtype: Any = None, backend: str = "auto", solver: str = "auto", verbose: bool = False,
                 memory_budget: Optional[int | str] = None):
        self.depth = depth
        self.kernel = kernel
        self.bandwidth = bandwidth
        self.reg = reg
        self.feature_map = feature_map
        self.width = width
        self.gamma = gamma
        self.projection = projection
        self.random_state = random_state
        self.device = device
        self.dtype = dtype
        self.backend = backend
        self.solver = solver
        self.verbose = verbose
        self.memory_budget = memory_budget

    def _check_params(self) -> None:
        depth = self.depth
        if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth < 1:
            raise ValueError(f"depth must be an integer >= 1, got {depth!r}")
        width = self.width
        if not (width is None or (isinstance(width, str) and width == "input")
                or (not isinstance(width, bool) and isinstance(width, (int, np.integer)) and width >= 1)):
            raise ValueError(f"width must be an integer >= 1, 'input' or None, got {width!r}")
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {self.feature_map!r}")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {self.projection!r}")
        if self.gamma is not None and not (isinstance(self.gamma, (int, float)) and self.gamma > 0):
            raise ValueError(f"gamma must be None or a number > 0, got {self.gamma!r}")

    def _ops(self) -> dict:
        return dict(kernel=self.kernel, bandwidth=self.bandwidth, backend=self.backend,
                    memory_budget=self.memory_budget)

    def layer_width(self, d: int) -> int:
        """The number of features of a layer whose input has d features, under ``width``."""
        width = self.width
        if width is None:
            width = DEFAULT_RELU_WIDTH if self.feature_map == "relu" else "input"
        return int(d) if width == "input" else int(width)

    def _draw_layer(self, d: int, generator: torch.Generator, sqrt_M: Optional[torch.Tensor]) -> Layer:
        # Drawn on the CPU so a seed gives the same network on every device.
        width = self.layer_width(d)
        if self.feature_map == "relu":
            bound = 1.0 / math.sqrt(d)
            W = torch.empty(width, d, dtype=torch.float64).uniform_(-bound, bound, generator=generator)
            b = None
        else:
            gamma = float(self.gamma) if self.gamma is not None else 1.0 / float(self.bandwidth)
            W = torch.empty(width, d, dtype=torch.float64).cauchy_(0.0, gamma, generator=generator)
            b = torch.empty(width, dtype=torch.float64).uniform_(0.0, 2 * math.pi, generator=generator)
            b = b.to(device=self.device_, dtype=self.dtype_)
        return Layer(sqrt_M, W.to(device=self.device_, dtype=self.dtype_), b)

    def _ridge(self, X: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return krr_solve(X, targets, reg=self.reg, solver=self.solver, progress=bool(self.verbose), **self._ops())

    def fit(self, X: Any, y: Any, X_val: Any = None, y_val: Any = None,
            callback: Optional[Callable[[int, dict, dict], None]] = None) -> "DeepRFM":
        """Fit ``depth`` layers on X (n, d) with integer class labels y (n,), K >= 2 classes.

        X_val, y_val: optional validation data (adds ``test_accuracy`` to each layer's metrics).
        callback(layer, metrics, tensors): called after each layer with the layer index (0-based), its metrics
        dict and the training tensors {"input": X_l, "projected": X_l M^{1/2}, "features": phi(.)} (for
        progress bars and plots; do not modify them).
        """
        self._check_params()
        self.dtype_ = resolve_dtype(self.dtype)
        self.device_ = resolve_device(self.device, X)
        Xl = as_features("X", X, self.dtype_, self.device_)
        n = Xl.shape[0]
        self.n_features_in_ = Xl.shape[1]
        labels = as_labels("y", y, n)
        kind = type_of_target(labels)
        if kind not in ("binary", "multiclass"):
            detail = "" if kind == "unknown" else f" ({len(np.unique(labels))} distinct values)"
            raise ValueError(f"Unknown label type: DeepRFM is a classifier and y looks like a {kind} target{detail}: "
                             "pass class labels")
        self.classes_, codes = encode_classes(labels)
        K = len(self.classes_)
        if K < 2:
            raise ValueError(f"y must hold at least 2 classes, got 1 class ({self.classes_[0]!r})")
        targets = 2 * one_hot(codes, K, self.dtype_, self.device_) - 1
        codes_t = torch.as_tensor(codes, device=self.device_)
        has_val = check_validation_pair(X_val, y_val)
        if has_val:
            V = as_features("X_val", X_val, self.dtype_, self.device_)
            if V.shape[1] != Xl.shape[1]:
                raise ValueError(f"X_val must have {Xl.shape[1]} features, got {V.shape[1]}")
            _, val_codes = encode_classes(as_labels("y_val", y_val, V.shape[0]), self.classes_, name="y_val")
            val_codes_t = torch.as_tensor(val_codes, device=self.device_)
        seed = (int(self.random_state) if self.random_state is not None
                else int(np.random.SeedSequence().entropy % 2**63))
        generator = torch.Generator().manual_seed(seed)

        self.layers_: list[Layer] = []
        self.metrics_: list[dict] = []
        device = self.device_

        def clock() -> float:
            return _clock(device)

        depth = int(self.depth)
        for index in range(depth):
            start = clock()
            Xl = row_normalize(Xl)
            if has_val:
                V = row_normalize(V)
            feature_map_s = clock() - start
            agop_s = 0.0
            with reuse():  # the solve, the predictions and the AGOP share one prepared geometry of X_l
                start = clock()
                alpha = self._ridge(Xl, targets)
                solve_s = clock() - start
                train_pred = kernel_mv(Xl, Xl, alpha, **self._ops()).argmax(1)
                record = {"train_accuracy": float((train_pred == codes_t).double().mean())}
                if has_val:
                    val_pred = kernel_mv(V, Xl, alpha, **self._ops()).argmax(1)
                    record["test_accuracy"] = float((val_pred == val_codes_t).double().mean())
                sqrt_M = None
                if self.projection == "agop":
                    start = clock()
                    G = symmetrize(agop(Xl, Xl, alpha, **self._ops()))
                    if float(G.abs().max()) > 0:
                        sqrt_M = psd_sqrt(normalize_metric(G, "max"))
                    else:  # a constant predictor (e.g. all inputs equal after the row scaling): no direction
                        warnings.warn(f"DeepRFM layer {index + 1}: the AGOP is zero (the predictor is constant), so "
                                      "this layer keeps its features without the AGOP projection", RuntimeWarning,
                                      stacklevel=2)
                    agop_s = clock() - start
            start = clock()
            layer = self._draw_layer(Xl.shape[1], generator, sqrt_M)
            Z = layer.project(Xl)
            F = layer.features(Z)
            if has_val:
                V_next = layer.features(layer.project(V))
            feature_map_s += clock() - start
            for tag, T in (("input", Xl), ("projected", Z), ("features", F)):
                record[f"nc1_{tag}"] = _measure(nc1, T, codes_t)
                record[f"nc2_{tag}"] = _measure(nc2, T, codes_t)
            record.update(solve_s=float(solve_s), agop_s=float(agop_s), feature_map_s=float(feature_map_s))
            self.metrics_.append({key: record[key] for key in (*METRIC_KEYS, "test_accuracy", *TIMING_KEYS)
                                  if key in record})
            self.layers_.append(layer)
            if self.verbose:
                print(self._layer_line(index, depth, self.metrics_[-1]), flush=True)
            if callback is not None:
                callback(index, self.metrics_[-1], {"input": Xl, "projected": Z, "features": F})
            if has_val:
                V = V_next
            Xl = F
        self.readout_centers_ = row_normalize(Xl)
        start = clock()
        self.readout_alpha_ = self._ridge(self.readout_centers_, targets)
        self.readout_solve_s_ = float(clock() - start)
        if self.verbose:
            print(f"DeepRFM readout: solve {self.readout_solve_s_:.3f} s", flush=True)
        return self

    @staticmethod
    def _layer_line(index: int, depth: int, record: dict) -> str:
        line = (f"DeepRFM layer {index + 1}/{depth}: solve {record['solve_s']:.3f} s, agop {record['agop_s']:.3f} s, "
                f"feature map {record['feature_map_s']:.3f} s")
        if "train_accuracy" in record:
            line += f", train acc {record['train_accuracy']:.4f}"
        if "test_accuracy" in record:
            line += f", test acc {record['test_accuracy']:.4f}"
        return line

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # transform returns the model's dtype (float32 unless dtype="float64").
        tags.transformer_tags.preserves_dtype = ["float64" if resolve_dtype(self.dtype) == torch.float64
                                                 else "float32"]
        return tags

    def _check_fitted(self) -> None:
        if not hasattr(self, "layers_"):
            raise NotFittedError("this DeepRFM is not fitted yet: call fit(X, y) first")

    def _forward(self, X: Any, layers: Optional[int] = None) -> torch.Tensor:
        self._check_fitted()
        Xl = as_features("X", X, self.dtype_, self.device_)
        if Xl.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {Xl.shape[1]} features, but {type(self).__name__} is expecting "
                             f"{self.n_features_in_} features as input")
        for layer in self.layers_[: layers if layers is not None else len(self.layers_)]:
            Xl = layer.features(layer.project(row_normalize(Xl)))
        return Xl

    def transform(self, X: Any, layers: Optional[int] = None) -> Any:
        """Features of X (m, d) after the first ``layers`` learned layers (default all): (m, width), or X itself
        for layers=0. numpy in gives numpy out."""
        return to_output(self._forward(X, layers), X)

    def decision_function(self, X: Any) -> Any:
        """Readout scores (m, K) on the row-normalised final features."""
        F = row_normalize(self._forward(X))
        return to_output(kernel_mv(F, self.readout_centers_, self.readout_alpha_, **self._ops()), X)

    def predict(self, X: Any) -> Any:
        """Class labels (m,) of X (m, d), in the label values seen by fit."""
        scores = torch.as_tensor(self.decision_function(X))
        labels = self.classes_[scores.argmax(1).cpu().numpy()]
        return labels_out(labels, X, self.device_)

    def score(self, X: Any, y: Any) -> float:
        """Accuracy of ``predict`` on (X, y)."""
        pred = self.predict(X)
        pred = pred.cpu().numpy() if isinstance(pred, torch.Tensor) else pred
        y = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
        return float(np.mean(pred == y))
