"""Datasets for the examples and the ``rfm-fast`` command, with the seed paper's preprocessing.

``train_test(name_or_path, n=None, n_test=None, seed=0, preprocess="standardize")
-> (X_train, y_train, X_test, y_test)``: the first ``n`` training and first ``n_test`` test examples (all when
None), flattened to (N, p) float32, transformed by :func:`preprocess` with statistics of the selected training
rows only (default: per-feature standardisation), labels mapped to contiguous int64 codes 0..K-1 (over train and
test together).

Sources:
- "digits": scikit-learn's 8 x 8 digits (ships with scikit-learn), split 80/20 stratified with ``seed``.
- "mnist", "cifar10", "svhn": torchvision's datasets (downloaded on first use into ``$RFM_FAST_DATA`` or
  ``~/.cache/rfm_fast``); images flattened in (channel, row, column) order, pixels scaled to [0, 1] first.
- a path to a ``.npz`` holding ``X_train``, ``y_train`` and optionally ``X_test``, ``y_test`` (an absent test
  set gives empty (0, p) test arrays). Arrays of images are flattened.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np

TORCHVISION_DATASETS = ("mnist", "cifar10", "svhn")
DATASETS = ("digits", *TORCHVISION_DATASETS)
PREPROCESSING = ("standardize", "unit", "none")


def preprocess(X_train: np.ndarray, X_test: Optional[np.ndarray] = None, method: str = "standardize"
               ) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Transform a training set and (optionally) a test set with statistics of the training set only.

    method:
        "standardize": per feature, subtract the training mean and divide by the training standard deviation.
            A feature that is constant in the training set (its training values all equal) is centred on that
            value (so it is exactly 0 on the training rows) and divided by a common scale derived from the training
            data: the root mean square of the standard deviations of the non-constant features (if every feature
            is constant: the largest absolute training value; if the training set is all zeros: 1). Test values
            of such a feature thus come out in the same units as the other features.
        "unit": divide everything by the largest absolute value of the training set (e.g. 255 for 8-bit images;
            1 if the training set is all zeros).
        "none": the data as they are.

    Both transforms are scale consistent: multiplying the raw training and test data by a constant c > 0 gives
    the same outputs (up to rounding), with the single exception of an all-zero training set. Returns float64
    arrays (X_train', X_test'), X_test' None when X_test is None. Inputs are 2-D (n, p) and (m, p).
    """
    if method not in PREPROCESSING:
        raise ValueError(f"preprocess must be one of {PREPROCESSING}, got {method!r}")
    Xtr = np.asarray(X_train, dtype=np.float64)
    Xte = None if X_test is None else np.asarray(X_test, dtype=np.float64)
    if Xtr.ndim != 2 or Xtr.shape[0] == 0 or (Xte is not None and (Xte.ndim != 2 or Xte.shape[1] != Xtr.shape[1])):
        raise ValueError(f"X_train must be (n >= 1, p) and X_test (m, p); got {Xtr.shape} and "
                         f"{None if Xte is None else Xte.shape}")
    largest = float(np.abs(Xtr).max())
    if method == "none":
        return Xtr.copy(), None if Xte is None else Xte.copy()
    if method == "unit":
        scale = largest if largest > 0 else 1.0
        return Xtr / scale, None if Xte is None else Xte / scale
    constant = Xtr.max(0) == Xtr.min(0)  # exact test: a rounded std of a constant column need not be 0
    mean = Xtr.mean(0)
    mean[constant] = Xtr[0, constant]
    std = Xtr.std(0)
    if not constant.all():
        fallback = float(np.sqrt(np.mean(std[~constant] ** 2)))
    else:
        fallback = largest if largest > 0 else 1.0
    std[constant] = fallback
    return (Xtr - mean) / std, None if Xte is None else (Xte - mean) / std


_preprocess = preprocess  # train_test's argument of the same name hides the function


def _digits(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    return train_test_split(X, y, test_size=0.2, random_state=seed, stratify=y)


def _torchvision(name: str):
    try:
        import torchvision  # noqa: F401
        from torchvision import datasets
    except ImportError as exc:
        raise ImportError(
            f"dataset {name!r} is loaded through torchvision, which is not installed: install the torchvision "
            "build that matches your torch (pip install torchvision==<the version paired with your torch>), or "
            "pass a .npz file with X_train, y_train[, X_test, y_test]") from exc
    root = os.environ.get("RFM_FAST_DATA", str(Path.home() / ".cache" / "rfm_fast"))
    if name == "mnist":
        parts = [datasets.MNIST(root, train=train, download=True) for train in (True, False)]
        arrays = [(p.data.numpy(), p.targets.numpy()) for p in parts]
    elif name == "cifar10":
        parts = [datasets.CIFAR10(root, train=train, download=True) for train in (True, False)]
        # CIFAR-10 stores (N, H, W, C); flatten channel-first like ToTensor does.
        arrays = [(p.data.transpose(0, 3, 1, 2), np.asarray(p.targets)) for p in parts]
    else:
        parts = [datasets.SVHN(root, split=split, download=True) for split in ("train", "test")]
        arrays = [(p.data, np.asarray(p.labels)) for p in parts]
    (Xtr, ytr), (Xte, yte) = arrays
    return Xtr / 255.0, Xte / 255.0, ytr, yte


def _npz(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"no dataset file at {path}")
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ValueError(f"{path} is not a .npz archive of arrays ({exc})") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} holds a single array, not a .npz archive with X_train and y_train")
    with archive as data:
        missing = [key for key in ("X_train", "y_train") if key not in data.files]
        if missing:
            raise ValueError(f"{path} must hold X_train and y_train (and optionally X_test, y_test); "
                             f"missing {missing}, found {data.files}")
        if ("X_test" in data.files) != ("y_test" in data.files):
            raise ValueError(f"{path} must hold both X_test and y_test, or neither")
        try:
            Xtr, ytr = data["X_train"], data["y_train"]
            if "X_test" in data.files:
                Xte, yte = data["X_test"], data["y_test"]
            else:
                Xte, yte = np.zeros((0,) + Xtr.shape[1:], Xtr.dtype), np.zeros(0, ytr.dtype)
        except ValueError as exc:  # object (pickled) arrays, which are not loaded
            raise ValueError(f"{path}: X_train, y_train, X_test and y_test must be plain numeric arrays, not "
                             f"pickled objects ({exc})") from exc
    return Xtr, Xte, ytr, yte


def _raw(name_or_path: str | os.PathLike, seed: int):
    key = str(name_or_path)
    if key.lower() == "digits":
        return _digits(seed)
    if key.lower() in TORCHVISION_DATASETS:
        return _torchvision(key.lower())
    if key.endswith(".npz") or Path(key).is_file():
        return _npz(Path(key))
    raise ValueError(f"dataset must be one of {DATASETS} or a path to a .npz file, got {key!r}")


def _count(name: str, value: Optional[int], available: int) -> int:
    if value is None:
        return available
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be None or an integer >= 0, got {value!r}")
    return min(int(value), available)


def train_test(name_or_path: str | os.PathLike, n: Optional[int] = None, n_test: Optional[int] = None,
               seed: int = 0, preprocess: str = "standardize"
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(X_train (n, p) float32, y_train (n,) int64, X_test (n_test, p) float32, y_test (n_test,) int64).

    preprocess: "standardize" (default), "unit" or "none", see :func:`preprocess`; the statistics come from the
    selected training rows. See the module docstring for the sources. Raises ValueError for an unknown name, a
    malformed file or an unknown ``preprocess``, FileNotFoundError for a missing file, ImportError (saying how to
    install it) when a torchvision dataset is asked for without torchvision.
    """
    if preprocess not in PREPROCESSING:
        raise ValueError(f"preprocess must be one of {PREPROCESSING}, got {preprocess!r}")
    Xtr, Xte, ytr, yte = _raw(name_or_path, seed)
    n = _count("n", n, len(Xtr))
    if n < 1:
        raise ValueError("n must be >= 1: the training set cannot be empty")
    n_test = _count("n_test", n_test, len(Xte))
    Xtr = np.asarray(Xtr[:n], dtype=np.float64).reshape(n, -1)
    Xte = np.asarray(Xte[:n_test], dtype=np.float64).reshape(n_test, Xtr.shape[1])
    ytr, yte = np.asarray(ytr[:n]).reshape(-1), np.asarray(yte[:n_test]).reshape(-1)
    if len(ytr) != n or len(yte) != n_test:
        raise ValueError("each X must have one label per row")
    if not (np.isfinite(Xtr).all() and np.isfinite(Xte).all()):
        raise ValueError("the dataset contains NaN or inf")
    Xtr, Xte = _preprocess(Xtr, Xte, preprocess)
    classes = np.unique(np.concatenate([ytr, yte]))
    return (Xtr.astype(np.float32), np.searchsorted(classes, ytr).astype(np.int64),
            Xte.astype(np.float32), np.searchsorted(classes, yte).astype(np.int64))


def load_dataset(name_or_path: str | os.PathLike, n: Optional[int] = None, *, split: str = "train",
                 seed: int = 0, preprocess: str = "standardize") -> tuple[np.ndarray, np.ndarray]:
    """(X, y) of one split: the first ``n`` rows of "train" or "test", preprocessed as in :func:`train_test`
    (a test split is transformed with the statistics of the whole training split)."""
    if split == "train":
        X, y, _, _ = train_test(name_or_path, n, 0, seed, preprocess=preprocess)
    elif split == "test":
        _, _, X, y = train_test(name_or_path, None, n, seed, preprocess=preprocess)
    else:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return X, y
