"""Datasets for the examples and the ``rfm-fast`` command, with the seed paper's preprocessing.

``train_test(name_or_path, n=None, n_test=None, seed=0) -> (X_train, y_train, X_test, y_test)``:
the first ``n`` training and first ``n_test`` test examples (all when None), flattened to (N, p) float32,
standardised per feature with the mean and standard deviation of the selected training rows (a constant feature
is only centred), labels mapped to contiguous int64 codes 0..K-1 (over train and test together).

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
    with np.load(path, allow_pickle=False) as data:
        missing = [key for key in ("X_train", "y_train") if key not in data.files]
        if missing:
            raise ValueError(f"{path} must hold X_train and y_train (and optionally X_test, y_test); "
                             f"missing {missing}, found {data.files}")
        if ("X_test" in data.files) != ("y_test" in data.files):
            raise ValueError(f"{path} must hold both X_test and y_test, or neither")
        Xtr, ytr = data["X_train"], data["y_train"]
        if "X_test" in data.files:
            Xte, yte = data["X_test"], data["y_test"]
        else:
            Xte, yte = np.zeros((0,) + Xtr.shape[1:], Xtr.dtype), np.zeros(0, ytr.dtype)
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
               seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(X_train (n, p) float32, y_train (n,) int64, X_test (n_test, p) float32, y_test (n_test,) int64).

    See the module docstring for the sources and the preprocessing. Raises ValueError for an unknown name or a
    malformed file, FileNotFoundError for a missing file, ImportError (saying how to install it) when a
    torchvision dataset is asked for without torchvision.
    """
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
    mean = Xtr.mean(0)
    std = Xtr.std(0)
    std[std == 0] = 1.0
    classes = np.unique(np.concatenate([ytr, yte]))
    return (((Xtr - mean) / std).astype(np.float32), np.searchsorted(classes, ytr).astype(np.int64),
            ((Xte - mean) / std).astype(np.float32), np.searchsorted(classes, yte).astype(np.int64))


def load_dataset(name_or_path: str | os.PathLike, n: Optional[int] = None, *, split: str = "train",
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(X, y) of one split: the first ``n`` rows of "train" or "test", preprocessed as in :func:`train_test`
    (a test split is standardised with the statistics of the whole training split)."""
    if split == "train":
        X, y, _, _ = train_test(name_or_path, n, 0, seed)
    elif split == "test":
        _, _, X, y = train_test(name_or_path, None, n, seed)
    else:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return X, y
