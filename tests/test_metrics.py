"""NC1 / NC2 against a direct, loop-by-class transcription of the seed paper's formulas (docs/maths.md)."""

import numpy as np
import pytest
import torch

from rfm_fast.metrics import nc1, nc2


def paper_nc1(X: np.ndarray, y: np.ndarray) -> float:
    classes = np.unique(y)
    K, N = len(classes), len(X)
    means = np.stack([X[y == c].mean(0) for c in classes])
    mu_G = means.mean(0)
    sigma_B = sum(np.outer(m - mu_G, m - mu_G) for m in means) / K
    sigma_W = np.zeros((X.shape[1], X.shape[1]))
    for c, m in zip(classes, means):
        centred = X[y == c] - m
        sigma_W += centred.T @ centred
    sigma_W /= K * N
    return float(np.trace(sigma_W) / np.trace(sigma_B))


def paper_nc2(X: np.ndarray, y: np.ndarray) -> float:
    classes = np.unique(y)
    K = len(classes)
    means = np.stack([X[y == c].mean(0) for c in classes])
    U = means - means.mean(0)
    U = U / np.linalg.norm(U, axis=1, keepdims=True)
    E = np.eye(K) * (1 + 1 / (K - 1)) - np.ones((K, K)) / (K - 1)
    return float(((U @ U.T - E) ** 2).mean())


def _data(seed: int, n: int, p: int, K: int, unbalanced: bool = False):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, K, size=n)
    y[:K] = np.arange(K)
    if unbalanced:
        y[K: n // 2] = 0
    centres = rng.normal(size=(K, p)) * 3
    return centres[y] + rng.normal(size=(n, p)), y


@pytest.mark.parametrize("seed,n,p,K,unbalanced", [(0, 50, 3, 2, False), (1, 97, 17, 5, True),
                                                   (2, 200, 64, 10, False), (3, 31, 1, 3, True)])
def test_nc_metrics_match_the_paper_formulas(seed, n, p, K, unbalanced):
    X, y = _data(seed, n, p, K, unbalanced)
    assert nc1(X, y) == pytest.approx(paper_nc1(X, y), rel=1e-12)
    assert nc2(X, y) == pytest.approx(paper_nc2(X, y), rel=1e-12, abs=1e-15)
    Xt = torch.tensor(X, dtype=torch.float32)
    assert nc1(Xt, torch.tensor(y)) == pytest.approx(paper_nc1(Xt.double().numpy(), y), rel=1e-10)


def test_labels_need_not_be_contiguous_and_scale_does_not_matter():
    X, y = _data(4, 120, 6, 4)
    relabelled = np.array([7, -3, 100, 12])[y]
    assert nc1(X, relabelled) == pytest.approx(nc1(X, y), rel=1e-12)
    assert nc2(X, relabelled) == pytest.approx(nc2(X, y), rel=1e-12)
    assert nc1(5.0 * X + 2.0, y) == pytest.approx(nc1(X, y), rel=1e-10)


def test_collapsed_features_give_zero():
    K = 4
    etf = np.eye(K) - 1.0 / K  # rows: a simplex ETF (centred standard basis)
    y = np.repeat(np.arange(K), 5)
    X = etf[y]
    assert nc1(X, y) == 0.0
    assert nc2(X, y) == pytest.approx(0.0, abs=1e-24)


def test_errors():
    X, y = _data(5, 30, 3, 3)
    with pytest.raises(ValueError, match="at least 2 classes"):
        nc1(X, np.zeros(30, dtype=int))
    with pytest.raises(ValueError, match="y must be 1-D"):
        nc1(X, y[:-1])
    with pytest.raises(ValueError, match="2-D"):
        nc2(X[:, 0], y)
    bad = X.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        nc1(bad, y)
