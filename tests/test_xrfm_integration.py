"""rfm_fast underneath xrfm (rfm_fast.integrations.xrfm): xrfm's own AGOP, predict and fit with and without the
switch, against xrfm itself and against the float64 formula. xrfm is an optional test dependency."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch

xrfm = pytest.importorskip("xrfm")

import rfm_fast  # noqa: E402
from rfm_fast.integrations import xrfm as switch  # noqa: E402
from rfm_fast.ops.kernel_grad.naive import kernel_grad as naive_grad  # noqa: E402
from tests.tolerances import REL_FRO, rel_fro  # noqa: E402
from xrfm.rfm_src import kernels as xk  # noqa: E402
from xrfm.rfm_src.recursive_feature_machine import RFM  # noqa: E402

PATCHED = (xk.LaplaceKernel, xk.LightLaplaceKernel, RFM)
UNTOUCHED = (xk.Kernel, xk.ProductLaplaceKernel, xk.LpqLaplaceKernel, xk.SumPowerLaplaceKernel)


@pytest.fixture(autouse=True)
def switched_off():
    switch.disable()
    yield
    switch.disable()


def _snapshot():
    return {cls: dict(cls.__dict__) for cls in PATCHED + UNTOUCHED}


def _same(a, b) -> bool:
    return all(a[c].keys() == b[c].keys() and all(a[c][k] is b[c][k] for k in a[c]) for c in a)


def _points(n, d, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=dtype)


def _metric_sqrt(d, seed, kind):
    """A sqrtM of the kind RFM passes: None, a positive vector, or a symmetric PSD matrix."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "none":
        return None
    if kind == "diag":
        return torch.rand(d, generator=gen, dtype=torch.float64) + 0.2
    A = torch.randn(d, d, generator=gen, dtype=torch.float64)
    S = A @ A.T / d + 0.05 * torch.eye(d, dtype=torch.float64)
    return S / S.abs().max()


def _reference_sum(x, z, coefs, kernel_cls, exponent, bandwidth, mat, center, diag):
    """xrfm's AGOP convention from rfm_fast's float64 reference gradient: sum over outputs and points."""
    if mat is None:
        M = None
    elif kernel_cls is xk.LaplaceKernel:
        M = mat * mat if mat.ndim == 1 else mat @ mat.T
    else:
        M = mat
    name, L = ("laplace", bandwidth) if exponent == 1.0 else ("gaussian", bandwidth / math.sqrt(2.0))
    G = naive_grad(z.double(), x.double(), coefs.T.double(), None if M is None else M.double(), name, L)
    rows = G.reshape(-1, G.shape[-1])
    if center:
        rows = rows - rows.mean(0, keepdim=True)
    A = rows.T @ rows
    return torch.diagonal(A) if diag else A


def test_enable_disable_restores_the_original_functions():
    before = _snapshot()
    original_agop = xk.LaplaceKernel.get_agop
    switch.enable()
    assert switch.is_enabled()
    assert xk.LaplaceKernel.get_agop is not original_agop
    assert "get_agop" in xk.LightLaplaceKernel.__dict__ and "predict" in RFM.__dict__
    for cls in UNTOUCHED:
        assert dict(cls.__dict__).keys() == before[cls].keys()
        assert all(cls.__dict__[k] is v for k, v in before[cls].items())
    switch.enable(backend="torch")  # options only
    switch.disable()
    assert not switch.is_enabled()
    assert _same(before, _snapshot())
    assert xk.LaplaceKernel.get_agop is xk.Kernel.get_agop
    switch.disable()  # idempotent
    assert _same(before, _snapshot())


def test_context_manager_nests_and_restores_on_error():
    before = _snapshot()
    with pytest.raises(KeyError):
        with switch.use_rfm_fast():
            with switch.use_rfm_fast(backend="torch", predict=False):
                assert switch._options.backend == "torch" and not switch._options.predict
            assert switch.is_enabled() and switch._options.predict
            raise KeyError("boom")
    assert not switch.is_enabled()
    assert _same(before, _snapshot())


@pytest.mark.parametrize("bad", [dict(backend=3), dict(predict="yes"), dict(memory_budget="lots")])
def test_bad_options_raise_and_patch_nothing(bad):
    before = _snapshot()
    with pytest.raises((TypeError, ValueError)):
        switch.enable(**bad)
    assert _same(before, _snapshot())


def test_changed_signature_raises(monkeypatch):
    def get_agop(self, x, centers, weights, mat=None):
        raise AssertionError("never called")

    monkeypatch.setattr(xk.Kernel, "get_agop", get_agop)
    before = _snapshot()
    with pytest.raises(switch.XRFMIntegrationError, match="signature"):
        switch.enable()
    assert _same(before, _snapshot()) and not switch.is_enabled()


def test_missing_class_raises(monkeypatch):
    monkeypatch.delattr(xk, "LightLaplaceKernel")
    with pytest.raises(switch.XRFMIntegrationError, match="LightLaplaceKernel"):
        switch.enable()
    assert not switch.is_enabled()


def test_changed_formula_is_caught_by_the_self_check(monkeypatch):
    original = xk.LaplaceKernel._get_function_grad_impl

    def rescaled(self, x, z, coefs, mat=None):  # e.g. xrfm switching to a mean, or another bandwidth scaling
        return 0.5 * original(self, x, z, coefs, mat)

    monkeypatch.setattr(xk.LaplaceKernel, "_get_function_grad_impl", rescaled)
    before = _snapshot()
    with pytest.raises(switch.XRFMIntegrationError, match="internals changed"):
        switch.enable()
    assert _same(before, _snapshot()) and not switch.is_enabled()


@pytest.mark.parametrize("kernel_cls", [xk.LaplaceKernel, xk.LightLaplaceKernel])
@pytest.mark.parametrize("exponent", [1.0, 2.0])
@pytest.mark.parametrize("kind", ["none", "diag", "dense"])
def test_agop_float64_matches_xrfm_and_the_formula(kernel_cls, exponent, kind):
    n, d, c = 150, 9, 3
    x = _points(n, d, 1)
    z = torch.cat([x[:60], _points(20, d, 2)])  # self pairs, as in RFM.fit, plus fresh points
    coefs = _points(c, n, 3)
    mat = _metric_sqrt(d, 4, kind)
    bandwidth = 3.0
    kernel = kernel_cls(bandwidth=bandwidth, exponent=exponent)
    for center in (False, True):
        for method, diag in (("get_agop", False), ("get_agop_diag", True)):
            own = getattr(kernel, method)(x=x, z=z, coefs=coefs, mat=mat, center_grads=center)
            with switch.use_rfm_fast(backend="torch"):
                fast = getattr(kernel, method)(x=x, z=z, coefs=coefs, mat=mat, center_grads=center)
            ref = _reference_sum(x, z, coefs, kernel_cls, exponent, bandwidth, mat, center, diag)
            assert fast.dtype == own.dtype == torch.float64 and fast.shape == own.shape
            assert rel_fro(fast, ref) <= REL_FRO[torch.float64]
            # xrfm itself is off by up to ~1e-9 here: its self-pair distances are rounding noise, not 0.
            assert rel_fro(own, ref) <= 1e-7


def test_agop_sum_equals_m_times_rfm_fast_mean():
    x = _points(120, 6, 5)
    coefs = _points(4, 120, 6)
    kernel = xk.LaplaceKernel(bandwidth=2.0, exponent=1.0)
    total = kernel.get_agop(x, x, coefs, None)
    mean = rfm_fast.agop(x, x, coefs.T, kernel="laplace", bandwidth=2.0, backend="naive")
    assert rel_fro(total, x.shape[0] * mean) <= 1e-7


@pytest.mark.parametrize("bandwidth", [10.0, 1.0])
def test_agop_float32_self_pairs_are_exact_under_the_switch(bandwidth):
    """xrfm's fp32 self pairs survive its 1e-10 distance threshold; rfm_fast drops exact zeros exactly."""
    n, d, c = 400, 64, 10
    x = _points(n, d, 7)
    coefs = _points(c, n, 8)
    kernel = xk.LaplaceKernel(bandwidth=bandwidth, exponent=1.0)
    ref = _reference_sum(x, x, coefs, xk.LaplaceKernel, 1.0, bandwidth, None, False, False)
    x32, c32 = x.float(), coefs.float()
    own = kernel.get_agop(x32, x32, c32, None)
    with switch.use_rfm_fast(backend="torch"):
        fast = kernel.get_agop(x32, x32, c32, None)
    assert fast.dtype == torch.float32
    err_fast, err_own = rel_fro(fast, ref), rel_fro(own, ref)
    assert err_fast <= REL_FRO[torch.float32]
    assert err_fast <= err_own


def test_other_kernels_and_unsupported_cases_use_xrfms_own_code(monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        raise AssertionError("rfm_fast must not run for this kernel")

    x = _points(40, 5, 9)
    coefs = _points(2, 40, 10)
    cases = [
        (xk.ProductLaplaceKernel(bandwidth=2.0, exponent=1.0), None),
        (xk.LpqLaplaceKernel(bandwidth=2.0, p=1.5, q=1.0), None),
        (xk.LaplaceKernel(bandwidth=2.0, exponent=1.5), None),  # exponent rfm_fast does not implement
        (xk.LaplaceKernel(bandwidth=2.0, exponent=1.0, eps=1e-3), None),  # a deliberate, larger threshold
        (xk.LaplaceKernel(bandwidth=2.0, exponent=1.0), torch.randn(5, 5, dtype=torch.float64)),  # non-sym
    ]

    class Subclass(xk.LaplaceKernel):
        pass

    cases.append((Subclass(bandwidth=2.0, exponent=1.0), None))
    expected = [k.get_agop(x, x, coefs, mat) for k, mat in cases]
    with switch.use_rfm_fast():
        monkeypatch.setattr(rfm_fast, "agop", spy)
        got = [k.get_agop(x, x, coefs, mat) for k, mat in cases]
    assert not calls
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


def test_predict_numpy_in_numpy_out_and_matches():
    x = _points(300, 8, 11)
    weights = _points(300, 3, 12)
    model = RFM(kernel="laplace", bandwidth=4.0, device="cpu", verbose=False)
    model.centers, model.weights = x, weights
    S = _metric_sqrt(8, 13, "dense")
    model.sqrtM, model.M = S, S @ S
    samples = _points(50, 8, 14).numpy()
    own = model.predict(samples)
    with switch.use_rfm_fast(backend="torch"):
        fast = model.predict(samples)
    assert isinstance(fast, np.ndarray) and fast.shape == own.shape == (50, 3)
    assert rel_fro(torch.from_numpy(fast), torch.from_numpy(own)) <= 1e-12


def _digits():
    sklearn = pytest.importorskip("sklearn.datasets")
    X, y = sklearn.load_digits(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(X))
    X, y = X[perm][:700], y[perm][:700]
    mu, sd = X[:450].mean(0), X[:450].std(0)
    X = (X - mu) / np.where(sd > 0, sd, 1.0)
    Y = np.eye(10)[y]
    return X[:450], Y[:450], X[450:550], Y[450:550], X[550:]


def _synthetic():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((600, 10))
    y = (np.sin(2 * X[:, 0]) + X[:, 1] * X[:, 2])[:, None] + 0.05 * rng.standard_normal((600, 1))
    return X[:400], y[:400], X[400:500], y[400:500], X[500:]


def _fit(data, dtype, on, *, exponent, bandwidth, diag):
    Xtr, ytr, Xv, yv, Xte = (torch.as_tensor(a, dtype=dtype) for a in data)
    model = RFM(kernel="laplace", bandwidth=bandwidth, exponent=exponent, device="cpu", diag=diag, verbose=False)
    with switch.use_rfm_fast(backend="torch") if on else contextlib.nullcontext():
        model.fit((Xtr, ytr), (Xv, yv), iters=2, reg=1e-3, early_stop_rfm=False, return_best_params=False)
        pred = model.predict(Xte)
    return model.M.double(), pred.double()


FITS = [
    ("digits", 1.0, 10.0, False),
    ("synthetic", 1.0, 3.0, True),
    ("synthetic", 2.0, 10.0, False),
]


@pytest.mark.parametrize("dataset,exponent,bandwidth,diag", FITS)
def test_xrfm_fit_with_and_without_the_switch(dataset, exponent, bandwidth, diag):
    data = _digits() if dataset == "digits" else _synthetic()
    kw = dict(exponent=exponent, bandwidth=bandwidth, diag=diag)
    M64, P64 = _fit(data, torch.float64, False, **kw)
    M64s, P64s = _fit(data, torch.float64, True, **kw)
    # float64: the same fit to rounding (xrfm's own self-pair noise, ~1e-10 in its AGOP, passes through the
    # solve; measured <= 1e-8).
    assert rel_fro(M64s, M64) <= 1e-7
    assert rel_fro(P64s, P64) <= 1e-7
    # float32: both runs are within xrfm's own float32 error of the float64 fit (it is dominated by the
    # float32 solve of K + reg I; the switch's AGOP is the more accurate of the two).
    M32, P32 = _fit(data, torch.float32, False, **kw)
    M32s, P32s = _fit(data, torch.float32, True, **kw)
    own = max(rel_fro(M32, M64), rel_fro(P32, P64))
    assert own < 1e-2
    assert rel_fro(M32s, M64) <= 3 * own
    assert rel_fro(P32s, P64) <= 3 * own
    assert rel_fro(M32s, M32) <= 3 * own
    assert rel_fro(P32s, P32) <= 3 * own


def _bench_module(monkeypatch):
    import importlib.util
    import pathlib

    folder = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
    # The scripts import their shared helpers (benchmarks/_results.py) from their own folder, which Python puts on
    # sys.path only when a script is run directly.
    monkeypatch.syspath_prepend(str(folder))
    spec = importlib.util.spec_from_file_location("bench_xrfm", folder / "bench_xrfm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kernel", ["laplace", "gaussian"])
def test_bench_xrfm_agop_is_m_times_the_rfm_fast_mean(kernel, monkeypatch):
    bench = _bench_module(monkeypatch)
    x = _points(90, 7, 15)
    centers = torch.cat([x[:40], _points(30, 7, 16)])
    alpha = _points(70, 3, 17)
    S = _metric_sqrt(7, 18, "dense")
    M = S @ S
    total = bench.xrfm_agop(x, centers, alpha, kernel=kernel, bandwidth=2.5, M=M)
    mean = rfm_fast.agop(x, centers, alpha, kernel=kernel, bandwidth=2.5, M=M, backend="naive")
    assert rel_fro(total, x.shape[0] * mean) <= 1e-7
    seconds, extra = bench.time_xrfm_agop(x, centers, alpha, kernel=kernel, bandwidth=2.5, M=M)
    assert seconds > 0 and isinstance(extra, int) and extra >= 0
