"""Deep RFM: layer construction, metrics, transform / predict, and the deep-neural-collapse check."""

import math

import numpy as np
import pytest
from sklearn.exceptions import NotFittedError
import torch

from rfm_fast.data import train_test
from rfm_fast.metrics import nc1
from rfm_fast.models import DeepRFM
from rfm_fast.models import deep_rfm as deep_rfm_module
from rfm_fast.models.deep_rfm import METRIC_KEYS, TIMING_KEYS


def _measures(metrics):
    """The metrics without the timings (which differ between runs)."""
    return [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in metrics]


@pytest.fixture(scope="module")
def digits():
    return train_test("digits", seed=0)


@pytest.fixture(scope="module")
def small_fit(digits):
    X_train, y_train, X_test, y_test = digits
    model = DeepRFM(depth=3, width=256, random_state=0)
    return model.fit(X_train[:400], y_train[:400], X_test[:100], y_test[:100])


def test_metric_keys_and_values(small_fit):
    assert len(small_fit.metrics_) == 3
    for record in small_fit.metrics_:
        assert set(record) == set(METRIC_KEYS) | {"test_accuracy"} | set(TIMING_KEYS)
        assert all(isinstance(v, float) and math.isfinite(v) for v in record.values())
        assert all(record[key] >= 0 for key in TIMING_KEYS)
        assert record["solve_s"] > 0 and record["agop_s"] > 0 and record["feature_map_s"] > 0
        assert record["train_accuracy"] >= 0.99
    # The next layer's input is this layer's features, row-normalised (NC1 is not scale invariant per row, so
    # only check it is in the same range).
    assert small_fit.metrics_[1]["nc1_input"] == pytest.approx(small_fit.metrics_[0]["nc1_features"], rel=0.5)


def test_metric_keys_without_validation(digits):
    X_train, y_train, _, _ = digits
    model = DeepRFM(depth=1, width=64, random_state=1).fit(X_train[:200], y_train[:200])
    assert set(model.metrics_[0]) == set(METRIC_KEYS) | set(TIMING_KEYS)
    assert isinstance(model.readout_solve_s_, float) and model.readout_solve_s_ >= 0


def test_timings_of_the_identity_projection(digits):
    X_train, y_train, _, _ = digits
    model = DeepRFM(depth=2, width=32, projection="identity", random_state=0).fit(X_train[:120], y_train[:120])
    for record in model.metrics_:
        assert list(record)[-3:] == list(TIMING_KEYS)
        assert record["agop_s"] == 0.0  # no AGOP is computed
        assert isinstance(record["solve_s"], float) and record["solve_s"] > 0
        assert isinstance(record["feature_map_s"], float) and record["feature_map_s"] >= 0


def test_layers_follow_the_construction(small_fit, digits):
    X_train, y_train, _, _ = digits
    first = small_fit.layers_[0]
    assert first.W.shape == (256, 64) and first.b is None
    assert float(first.W.abs().max()) <= 1 / math.sqrt(64)
    M = first.sqrt_M.double() @ first.sqrt_M.double()
    assert float(M.max()) == pytest.approx(1.0, rel=1e-4)  # AGOP divided by its largest entry
    assert torch.allclose(first.sqrt_M, first.sqrt_M.T)
    assert small_fit.layers_[1].W.shape == (256, 256)
    # nc1_projected is measured on the unit-norm input times M^{1/2}.
    X0 = torch.from_numpy(X_train[:400])
    X0 = X0 / X0.norm(dim=1, keepdim=True)
    assert nc1(X0 @ first.sqrt_M, y_train[:400]) == pytest.approx(small_fit.metrics_[0]["nc1_projected"], rel=1e-5)


def test_transform_and_predict(small_fit, digits):
    _, _, X_test, y_test = digits
    F = small_fit.transform(X_test[:50])
    assert isinstance(F, np.ndarray) and F.shape == (50, 256) and (F >= 0).all()
    assert small_fit.transform(X_test[:5], layers=1).shape == (5, 256)
    Ft = small_fit.transform(torch.from_numpy(X_test[:50]))
    assert isinstance(Ft, torch.Tensor) and np.allclose(Ft.numpy(), F)
    pred = small_fit.predict(X_test)
    assert pred.shape == (len(X_test),)
    assert small_fit.score(X_test, y_test) >= 0.9
    # The learned layers are deterministic: predicting twice gives the same labels.
    np.testing.assert_array_equal(pred, small_fit.predict(X_test))


def test_seeded_runs_repeat(digits):
    X_train, y_train, _, _ = digits
    a = DeepRFM(depth=2, width=64, random_state=3).fit(X_train[:150], y_train[:150])
    b = DeepRFM(depth=2, width=64, random_state=3).fit(X_train[:150], y_train[:150])
    assert _measures(a.metrics_) == _measures(b.metrics_)


def test_cosine_feature_map(digits):
    X_train, y_train, X_test, _ = digits
    model = DeepRFM(depth=2, width=128, feature_map="cosine", random_state=0).fit(X_train[:200], y_train[:200])
    layer = model.layers_[0]
    assert layer.b.shape == (128,) and float(layer.b.min()) >= 0 and float(layer.b.max()) <= 2 * math.pi
    F = model.transform(X_test[:10])
    assert F.shape == (10, 128) and np.abs(F).max() <= math.sqrt(2 / 128) + 1e-6
    # Cauchy with scale 1/bandwidth: the median of |W| is the scale.
    assert float(layer.W.abs().median()) == pytest.approx(0.5, rel=0.1)


def test_cosine_width_defaults_to_the_input_dimension(digits):
    X_train, y_train, _, _ = digits
    X, y = X_train[:120], y_train[:120]
    cosine = DeepRFM(depth=2, feature_map="cosine", gamma=0.05, random_state=0).fit(X, y)
    assert [layer.W.shape for layer in cosine.layers_] == [(64, 64), (64, 64)]
    assert cosine.transform(X[:3]).shape == (3, 64)
    relu_input = DeepRFM(depth=1, width="input", random_state=0).fit(X, y)
    assert relu_input.layers_[0].W.shape == (64, 64)
    assert DeepRFM().layer_width(64) == 1024  # the relu default is unchanged
    assert DeepRFM(feature_map="cosine", width=100).layer_width(64) == 100
    for bad in (0, "output", 2.5, True):
        with pytest.raises(ValueError, match="width"):
            DeepRFM(depth=1, width=bad).fit(X[:20], y[:20])


def test_verbose_prints_a_line_per_layer_and_asks_for_progress(digits, capsys, progress_calls):
    X_train, y_train, X_test, y_test = digits
    calls = progress_calls(deep_rfm_module)
    quiet = DeepRFM(depth=2, width=32, random_state=0).fit(X_train[:100], y_train[:100])
    assert calls == [False] * 3 and capsys.readouterr().out == ""
    calls.clear()
    model = DeepRFM(depth=2, width=32, random_state=0, verbose=True)
    assert model.get_params()["verbose"] is True
    model.fit(X_train[:100], y_train[:100], X_test[:30], y_test[:30])
    assert calls == [True] * 3  # two layers and the readout
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["DeepRFM layer 1/2", "DeepRFM layer 2/2", "DeepRFM readout"]
    for line in lines[:2]:
        assert "solve " in line and "agop " in line and "feature map " in line
        assert "train acc" in line and "test acc" in line
    assert _measures(model.metrics_) != [] and _measures(model.metrics_)[0]["train_accuracy"] == pytest.approx(
        _measures(quiet.metrics_)[0]["train_accuracy"])


def test_deep_collapse_fast(digits):
    """A smaller, seeded version of the issue's check (the full one is test_deep_collapse_digits_full)."""
    X_train, y_train, _, _ = digits
    X, y = X_train[:500], y_train[:500]
    agop = DeepRFM(depth=5, width=512, random_state=0).fit(X, y).metrics_
    control = DeepRFM(depth=5, width=512, projection="identity", random_state=0).fit(X, y).metrics_
    assert agop[0]["nc1_input"] / agop[-1]["nc1_features"] >= 20
    assert all(m["nc1_projected"] < m["nc1_input"] for m in agop)
    assert all(m["train_accuracy"] >= 0.99 for m in agop)
    assert control[-1]["nc1_features"] >= control[0]["nc1_input"]
    assert all(m["nc1_projected"] == m["nc1_input"] for m in control)


@pytest.mark.slow
def test_deep_collapse_digits_full(digits):
    """The issue's acceptance check on all of digits' training split."""
    X_train, y_train, _, _ = digits
    params = dict(depth=8, kernel="laplace", bandwidth=2.0, reg=1e-3, feature_map="relu", width=1024,
                  random_state=0)
    agop = DeepRFM(**params).fit(X_train, y_train).metrics_
    control = DeepRFM(projection="identity", **params).fit(X_train, y_train).metrics_
    assert agop[0]["nc1_input"] / agop[-1]["nc1_features"] >= 100
    assert all(m["nc1_projected"] < m["nc1_input"] for m in agop)
    assert all(m["train_accuracy"] >= 0.99 for m in agop)
    assert control[-1]["nc1_features"] >= control[0]["nc1_input"]


def test_errors(digits):
    X_train, y_train, _, _ = digits
    with pytest.raises(ValueError, match="feature_map"):
        DeepRFM(feature_map="tanh").fit(X_train[:20], y_train[:20])
    with pytest.raises(ValueError, match="projection"):
        DeepRFM(projection="pca").fit(X_train[:20], y_train[:20])
    with pytest.raises(ValueError, match="depth"):
        DeepRFM(depth=0).fit(X_train[:20], y_train[:20])
    with pytest.raises(NotFittedError, match="not fitted"):
        DeepRFM().transform(X_train[:2])
    with pytest.raises(ValueError, match="2 classes"):
        DeepRFM(depth=1).fit(X_train[:5], np.zeros(5, dtype=int))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(digits):
    from rfm_fast.models import RFM

    X_train, y_train, X_test, y_test = digits
    cpu = DeepRFM(depth=2, width=128, random_state=0, dtype="float64").fit(X_train[:300], y_train[:300])
    gpu = DeepRFM(depth=2, width=128, random_state=0, dtype="float64", device="cuda").fit(X_train[:300],
                                                                                          y_train[:300])
    for a, b in zip(_measures(cpu.metrics_), _measures(gpu.metrics_)):
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9)
    assert gpu.layers_[0].W.device.type == "cuda"
    rfm = RFM(bandwidth=10.0, iters=1, device="cuda").fit(X_train, y_train)
    assert rfm.M_.device.type == "cuda" and rfm.score(X_test, y_test) >= 0.97


def test_input_mistakes_are_named():
    gen = np.random.default_rng(3)
    X = gen.normal(size=(80, 5)).astype(np.float32)
    y = (X[:, 0] > 0).astype(int)
    with pytest.raises(ValueError, match="classifier and y looks like a continuous target"):
        DeepRFM(depth=1, width=16).fit(X, X[:, 1] * 1.37)
    with pytest.raises(ValueError, match=r"y_val holds labels the model was not trained on: \[7\]"):
        DeepRFM(depth=1, width=16).fit(X, y, X_val=X[:10], y_val=np.full(10, 7))
    with pytest.raises(ValueError, match="X_val was given without y_val"):
        DeepRFM(depth=1, width=16).fit(X, y, X_val=X[:10])
    with pytest.raises(TypeError, match="sparse"):
        import scipy.sparse

        DeepRFM(depth=1, width=16).fit(scipy.sparse.csr_matrix(X), y)
    # Lists and float labels that are whole numbers are fine; so is a memory budget.
    model = DeepRFM(depth=1, width=16, memory_budget="8MB", random_state=0).fit(X.tolist(), y.astype(float))
    assert model.predict(X[:3]).shape == (3,) and model.get_params()["memory_budget"] == "8MB"
