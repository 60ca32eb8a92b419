"""Dataset preprocessing (rfm_fast.data.preprocess and train_test's ``preprocess``): the three methods and their
scale consistency, including features that are constant in the training set."""

import numpy as np
import pytest

from rfm_fast.data import PREPROCESSING, preprocess, train_test


def _images(seed=0, n=40, m=15, p=12):
    """0..1 'pixels' with a column constant in training (0) that varies in test, and one constant at 0.5."""
    rng = np.random.default_rng(seed)
    train = rng.integers(0, 256, size=(n, p)) / 255.0
    test = rng.integers(0, 256, size=(m, p)) / 255.0
    train[:, 0] = 0.0
    train[:, 5] = 0.5
    test[:, 0] = np.linspace(0.0, 1.0, m)  # varies in test
    return train, test


@pytest.mark.parametrize("method", ["standardize", "unit"])
@pytest.mark.parametrize("c", [255.0, 1e-3, 7.0])
def test_rescaled_data_give_the_same_outputs(method, c):
    train, test = _images()
    ref_train, ref_test = preprocess(train, test, method)
    out_train, out_test = preprocess(train * c, test * c, method)
    np.testing.assert_allclose(out_train, ref_train, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out_test, ref_test, rtol=1e-12, atol=1e-12)
    assert np.ptp(out_test[:, 0]) > 0  # the constant training column still varies in test


def test_standardize_on_constant_training_features():
    train, test = _images(1)
    out_train, out_test = preprocess(train, test)  # default: standardize
    assert np.array_equal(out_train[:, [0, 5]], np.zeros((len(train), 2)))  # exactly 0 on the training rows
    varying = np.ones(train.shape[1], bool)
    varying[[0, 5]] = False
    np.testing.assert_allclose(out_train[:, varying].mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(out_train[:, varying].std(0), 1, rtol=1e-12)
    # The constant features are divided by the RMS of the other features' standard deviations.
    rms = np.sqrt(np.mean(train[:, varying].std(0) ** 2))
    np.testing.assert_allclose(out_test[:, 0], test[:, 0] / rms, rtol=1e-12)
    np.testing.assert_allclose(out_test[:, 5], (test[:, 5] - 0.5) / rms, rtol=1e-12)
    # Without a test set.
    alone, none = preprocess(train)
    assert none is None and np.array_equal(alone, out_train)


def test_every_feature_constant_and_all_zero_training():
    train = np.tile([[2.0, -4.0]], (5, 1))
    test = np.array([[1.0, 0.0], [3.0, -8.0]])
    for c in (1.0, 255.0):
        out_train, out_test = preprocess(train * c, test * c)
        assert np.array_equal(out_train, np.zeros_like(train))
        np.testing.assert_allclose(out_test, [[-0.25, 1.0], [0.25, -1.0]])  # divided by max |train| = 4 c
    zeros_train, zeros_test = preprocess(np.zeros((3, 2)), test, "unit")  # cannot be rescaled: as is
    assert np.array_equal(zeros_train, np.zeros((3, 2))) and np.array_equal(zeros_test, test)


def test_unit_and_none():
    train, test = _images(2)
    out_train, out_test = preprocess(train * 255, test * 255, "unit")
    assert np.abs(out_train).max() == pytest.approx(1.0)
    np.testing.assert_allclose(out_test, test * 255 / np.abs(train * 255).max())
    raw_train, raw_test = preprocess(train * 255, test * 255, "none")
    assert np.array_equal(raw_train, train * 255) and np.array_equal(raw_test, test * 255)
    assert raw_train.dtype == np.float64
    with pytest.raises(ValueError, match="preprocess must be one of"):
        preprocess(train, test, "minmax")
    with pytest.raises(ValueError, match="X_test"):
        preprocess(train, test[:, :3])
    assert PREPROCESSING == ("standardize", "unit", "none")


def test_train_test_is_scale_consistent_on_an_npz(tmp_path):
    train, test = _images(3)
    y_train, y_test = np.arange(len(train)) % 3, np.arange(len(test)) % 3
    paths = []
    for c in (1.0, 255.0):
        path = tmp_path / f"scaled_{int(c)}.npz"
        np.savez(path, X_train=train * c, y_train=y_train, X_test=test * c, y_test=y_test)
        paths.append(path)
    for method in ("standardize", "unit"):
        a, b = (train_test(path, preprocess=method) for path in paths)
        assert a[0].dtype == np.float32
        np.testing.assert_allclose(a[0], b[0], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(a[2], b[2], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(a[1], b[1])
    none = train_test(paths[1], preprocess="none")
    np.testing.assert_allclose(none[2], (test * 255).astype(np.float32))
    with pytest.raises(ValueError, match="preprocess"):
        train_test(paths[0], preprocess="scale")
