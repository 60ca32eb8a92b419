"""The RFM estimator: digits accuracy, regression, options, scikit-learn compatibility."""

import numpy as np
import pytest
from sklearn.exceptions import NotFittedError
import torch
from sklearn.base import clone

from rfm_fast.data import train_test
from rfm_fast.models import RFM


@pytest.fixture(scope="module")
def digits():
    return train_test("digits", seed=0)


def test_digits_accuracy(digits):
    X_train, y_train, X_test, y_test = digits
    model = RFM(bandwidth=10.0, iters=3, reg=1e-3, random_state=0).fit(X_train, y_train)
    assert model.task_ == "classification"
    assert model.M_.shape == (64, 64)
    assert float(model.M_.max()) == pytest.approx(1.0)
    assert model.score(X_train, y_train) == 1.0
    assert model.score(X_test, y_test) >= 0.975
    assert len(model.history_) == 4


def test_digits_diagonal_and_validation_selection(digits):
    X_train, y_train, X_test, y_test = digits
    model = RFM(bandwidth=10.0, iters=2, diag=True, centered=True, normalize="trace", dtype="float64")
    model.fit(X_train[:600], y_train[:600], X_test, y_test)
    assert model.M_ is None or model.M_.shape == (64,)
    assert model.alpha_.dtype == torch.float64
    best = max(h["val_score"] for h in model.history_)
    assert model.score(X_test, y_test) == pytest.approx(best)
    assert best >= 0.95


def _regression(seed, n, d=8):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)).astype(np.float32)
    y = np.sin(2 * X[:, 0]) + 0.5 * X[:, 1] ** 2
    return X, y.astype(np.float32)


@pytest.mark.parametrize("diag", [False, True])
def test_regression_learns_the_relevant_coordinates(diag):
    X, y = _regression(0, 600)
    X_test, y_test = _regression(1, 300)
    baseline = RFM(bandwidth=3.0, iters=0, reg=1e-2).fit(X, y).score(X_test, y_test)
    model = RFM(bandwidth=3.0, iters=3, reg=1e-2, diag=diag).fit(X, y)
    assert model.task_ == "regression"
    diagonal = model.M_ if diag else torch.diagonal(model.M_)
    assert diagonal[:2].min() > 5 * diagonal[2:].max()
    score = model.score(X_test, y_test)
    assert score > 0.9 and score > baseline + 0.1
    pred = model.predict(X_test)
    assert isinstance(pred, np.ndarray) and pred.shape == (300,)
    pred_t = model.predict(torch.from_numpy(X_test))
    assert isinstance(pred_t, torch.Tensor) and torch.allclose(pred_t, torch.from_numpy(pred))


def test_multi_output_regression_and_gaussian_kernel():
    X, y = _regression(2, 300)
    Y = np.stack([y, -y], axis=1)
    model = RFM(kernel="gaussian", bandwidth=2.0, iters=1, normalize=None, reg=1e-2).fit(X, Y)
    assert model.predict(X).shape == (300, 2)
    assert model.score(X, Y) > 0.9


def test_sklearn_params_and_clone():
    model = RFM(bandwidth=4.0, iters=2, diag=True)
    params = model.get_params()
    assert params["bandwidth"] == 4.0 and params["diag"] is True and params["backend"] == "auto"
    model.set_params(iters=1, solver="cg")
    assert model.iters == 1 and model.solver == "cg"
    copy = clone(model)
    assert copy.get_params() == model.get_params() and copy is not model


def test_string_labels_and_binary(digits):
    X_train, y_train, X_test, y_test = digits
    keep = np.isin(y_train, [3, 8])
    names = np.where(y_train[keep] == 3, "three", "eight")
    model = RFM(bandwidth=10.0, iters=1).fit(X_train[keep], names)
    assert set(model.classes_) == {"eight", "three"}
    assert set(model.predict(X_test[:20])) <= {"eight", "three"}


def test_errors():
    with pytest.raises(NotFittedError, match="not fitted"):
        RFM().predict(np.zeros((2, 3), dtype=np.float32))
    X, y = _regression(3, 20)
    with pytest.raises(ValueError, match="normalize"):
        RFM(normalize="l2").fit(X, y)
    with pytest.raises(ValueError, match="task"):
        RFM(task="ranking").fit(X, y)
    model = RFM(iters=0).fit(X, y)
    with pytest.raises(ValueError, match="features"):
        model.predict(X[:, :3])


def test_verbose_passes_progress_to_every_solve(capsys, progress_calls):
    from rfm_fast.models import rfm as rfm_module

    calls = progress_calls(rfm_module)
    X, y = _regression(4, 120)
    RFM(bandwidth=3.0, iters=2, reg=1e-2).fit(X, y)
    assert calls == [False] * 3
    calls.clear()
    model = RFM(bandwidth=3.0, iters=2, reg=1e-2, solver="cg", verbose=True)
    assert model.get_params()["verbose"] is True and clone(model).verbose is True
    model.fit(X, y)
    assert calls == [True] * 3
    assert "CG" in capsys.readouterr().err  # the conjugate-gradient progress bar
    assert model.score(X, y) > 0.9


@pytest.mark.parametrize("make", [lambda: __import__("rfm_fast").RFM(iters=1, dtype="float64"),
                                  lambda: __import__("rfm_fast").RFM(iters=1),
                                  lambda: __import__("rfm_fast").DeepRFM(depth=1, width=32)],
                         ids=["RFM-float64", "RFM-float32", "DeepRFM"])
def test_scikit_learn_estimator_checks(make):
    """scikit-learn's own estimator checks. The one deliberate exception: a float32 RFM (the default dtype)
    predicts to float32 rounding, so outputs near zero differ between a batch and its subsets by more than the
    check's rtol = 1e-4 (by ~1e-6 absolute on outputs of size 1); in float64 it passes."""
    import inspect
    import warnings

    from sklearn.utils.estimator_checks import check_estimator

    if "on_fail" not in inspect.signature(check_estimator).parameters:
        pytest.skip("needs scikit-learn >= 1.6 (check_estimator(on_fail=None))")
    est = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = check_estimator(est, on_fail=None)
    failed = sorted(r["check_name"] for r in results if r["status"] == "failed")
    expected = ["check_methods_subset_invariance"] if type(est).__name__ == "RFM" and est.dtype is None else []
    assert failed == expected, [(r["check_name"], str(r["exception"])[:300]) for r in results
                                if r["status"] == "failed"]


def test_validation_pairs_and_memory_budget():
    gen = np.random.default_rng(4)
    X = gen.normal(size=(80, 5)).astype(np.float32)
    y = (X[:, 0] > 0).astype(int)
    from rfm_fast import RFM

    with pytest.raises(ValueError, match="y_val was given without X_val"):
        RFM(iters=1).fit(X, y, y_val=y[:10])
    small = RFM(iters=1, memory_budget="4MB").fit(X, y)
    big = RFM(iters=1).fit(X, y)
    assert np.allclose(small.decision_function(X), big.decision_function(X), atol=1e-5)


def test_save_and_load_as_plain_data(tmp_path):
    """Fitted models round-trip through save/load exactly, and the file loads with torch.load's default
    weights_only=True (no pickled code)."""
    from rfm_fast import RFM, DeepRFM

    gen = np.random.default_rng(5)
    X = gen.normal(size=(90, 6)).astype(np.float32)
    labels = np.array(["a", "b", "c"])[(X[:, 0] > 0).astype(int) + (X[:, 1] > 1).astype(int)]
    cases = [(RFM(iters=1), labels), (RFM(iters=1, task="regression", dtype="float64"), X[:, :2] @ [1.0, -2.0]),
             (DeepRFM(depth=2, width=16, random_state=0), labels)]
    for model, target in cases:
        model.fit(X, target)
        path = tmp_path / f"{type(model).__name__}.pt"
        model.save(path)
        assert torch.load(path)["class"] == type(model).__name__  # weights_only=True is torch's default
        back = type(model).load(path)
        assert back.get_params() == model.get_params()
        assert np.array_equal(np.asarray(back.predict(X)), np.asarray(model.predict(X)))
    with pytest.raises(ValueError, match="holds a DeepRFM, not a RFM"):
        RFM.load(tmp_path / "DeepRFM.pt")
    with pytest.raises(ValueError, match="not fitted"):
        RFM().save(tmp_path / "empty.pt")


def test_rfm_on_nystrom_centres():
    """RFM(solver="nystrom"): with every point a centre it is the exact RFM (float64); with m < n centres it still
    learns the direction the target depends on, and predicts from its m centres."""
    from rfm_fast import RFM

    gen = np.random.default_rng(9)
    X = gen.normal(size=(500, 8))
    w = np.zeros(8)
    w[2] = 1.0
    y = np.tanh(2 * X @ w)
    kw = dict(task="regression", iters=2, bandwidth=5.0, dtype="float64", random_state=0)
    exact = RFM(solver="cholesky", **kw).fit(X, y)
    full = RFM(solver="nystrom", centres=500, **kw).fit(X, y)
    assert np.allclose(full.predict(X[:50]), exact.predict(X[:50]), rtol=1e-8, atol=1e-9)
    small = RFM(solver="nystrom", centres=120, **kw).fit(X, y)
    assert small.X_fit_.shape == (120, 8) and small.alpha_.shape[0] == 120
    M = small.M_.numpy()
    top = np.linalg.eigh(M)[1][:, -1]
    assert abs(top @ w) > 0.95
    assert small.score(X, y) > 0.9
    with pytest.raises(ValueError, match="needs centres"):
        RFM(solver="nystrom").fit(X, y)
