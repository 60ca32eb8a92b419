"""Malformed input: every case raises ValueError or TypeError whose message names the argument."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import rfm_fast

X = torch.randn(12, 3, dtype=torch.float64)
A = torch.randn(12, 2, dtype=torch.float64)


def good(**overrides):
    kw = dict(x=X, centers=X, alpha=A, kernel="laplace", bandwidth=1.0, M=None)
    kw.update(overrides)
    return kw


def run(op, kw):
    f = getattr(rfm_fast, op)
    extra = {k: kw.pop(k) for k in ("centered", "diag", "backend") if k in kw}
    args = (kw.pop("x"), kw.pop("centers"))
    alpha = kw.pop("alpha")
    if op != "kernel_matrix":
        args = args + (alpha,)
    return f(*args, **kw, **extra)


nan_x = X.clone()
nan_x[3, 1] = float("nan")
inf_c = X.clone()
inf_c[0, 0] = float("inf")
nan_a = A.clone()
nan_a[5, 0] = float("nan")
asym = torch.eye(3, dtype=torch.float64)
asym[0, 1] = 0.5
neg_diag = torch.eye(3, dtype=torch.float64)
neg_diag[2, 2] = -1.0
indefinite = torch.tensor([[1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
nan_M = torch.eye(3, dtype=torch.float64)
nan_M[1, 1] = float("nan")

CASES = [
    # (id, overrides, exception type, word the message must contain)
    ("x-1d", dict(x=X[:, 0]), ValueError, "x"),
    ("x-3d", dict(x=X[None]), ValueError, "x"),
    ("centers-1d", dict(centers=X[:, 0]), ValueError, "centers"),
    ("d-mismatch", dict(centers=torch.randn(12, 4, dtype=torch.float64)), ValueError, "centers"),
    ("alpha-rows", dict(alpha=A[:5]), ValueError, "alpha"),
    ("alpha-3d", dict(alpha=A[None]), ValueError, "alpha"),
    ("M-shape", dict(M=torch.eye(4, dtype=torch.float64)), ValueError, "M"),
    ("M-diag-shape", dict(M=torch.ones(4, dtype=torch.float64)), ValueError, "M"),
    ("M-3d", dict(M=torch.ones(3, 3, 3, dtype=torch.float64)), ValueError, "M"),
    ("M-asymmetric", dict(M=asym), ValueError, "M"),
    ("M-negative-diagonal", dict(M=neg_diag), ValueError, "M"),
    ("M-negative-vector", dict(M=torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)), ValueError, "M"),
    ("M-indefinite", dict(M=indefinite), ValueError, "M"),
    ("M-nan", dict(M=nan_M), ValueError, "M"),
    ("bandwidth-zero", dict(bandwidth=0.0), ValueError, "bandwidth"),
    ("bandwidth-negative", dict(bandwidth=-2), ValueError, "bandwidth"),
    ("bandwidth-inf", dict(bandwidth=float("inf")), ValueError, "bandwidth"),
    ("bandwidth-nan", dict(bandwidth=float("nan")), ValueError, "bandwidth"),
    ("bandwidth-string", dict(bandwidth="1.0"), TypeError, "bandwidth"),
    ("bandwidth-bool", dict(bandwidth=True), TypeError, "bandwidth"),
    ("x-nan", dict(x=nan_x), ValueError, "x"),
    ("centers-inf", dict(centers=inf_c), ValueError, "centers"),
    ("alpha-nan", dict(alpha=nan_a), ValueError, "alpha"),
    ("kernel-unknown", dict(kernel="cauchy"), ValueError, "kernel"),
    ("kernel-not-string", dict(kernel=3), ValueError, "kernel"),
    ("backend-unknown", dict(backend="tpu"), ValueError, "backend"),
    ("x-list", dict(x=[[1.0, 2.0, 3.0]]), TypeError, "x"),
    ("x-int-tensor", dict(x=torch.ones(4, 3, dtype=torch.int64)), TypeError, "x"),
    ("dtype-mismatch", dict(centers=X.float()), TypeError, "centers"),
    ("x-no-columns", dict(x=torch.empty(5, 0, dtype=torch.float64),
                          centers=torch.empty(12, 0, dtype=torch.float64)), ValueError, "x"),
    ("no-centres", dict(centers=torch.empty(0, 3, dtype=torch.float64), alpha=torch.empty(0, 2)), ValueError,
     "centers"),
]


@pytest.mark.parametrize("op", ["kernel_matrix", "kernel_mv", "kernel_grad", "agop"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_malformed_input_names_the_argument(op, case):
    name, overrides, exc, word = case
    if op == "kernel_matrix" and word == "alpha":
        pytest.skip("kernel_matrix takes no alpha")
    with pytest.raises(exc) as info:
        run(op, good(**overrides))
    assert word in str(info.value)


@pytest.mark.parametrize("flag", ["centered", "diag"])
def test_agop_flags_must_be_bool(flag):
    with pytest.raises(TypeError, match=flag):
        rfm_fast.agop(X, X, A, **{flag: "yes"})


def test_agop_needs_evaluation_points():
    with pytest.raises(ValueError, match="x"):
        rfm_fast.agop(X[:0], X, A)


def test_numpy_inputs_are_validated_too():
    with pytest.raises(ValueError, match="x"):
        rfm_fast.agop(np.full((3, 3), np.nan), X.numpy(), A.numpy())
    with pytest.raises(TypeError, match="x"):
        rfm_fast.agop(np.array([["a", "b"]]), X.numpy(), A.numpy())


def test_half_precision_refused_by_the_torch_path():
    with pytest.raises(RuntimeError, match="triton"):
        rfm_fast.agop(X.half(), X.half(), A.half(), backend="torch")


def test_symmetric_within_rounding_is_accepted():
    B = torch.randn(3, 3, dtype=torch.float32)
    M = B @ B.T  # symmetric only up to fp32 rounding of the product
    out = rfm_fast.agop(X.float(), X.float(), A.float(), M=M)
    assert torch.isfinite(out).all()


def test_finiteness_check_by_one_sum_and_its_fallback():
    """The input check reads one sum: NaN and inf anywhere make it non-finite; finite entries whose sum
    overflows fall back to the entrywise test, so they pass; opposite infinities (their sum is NaN) fail."""
    from rfm_fast._validation import all_finite

    x = torch.randn(50, 4)
    assert all_finite(x) and all_finite(torch.empty(0, 3)) and all_finite(torch.arange(5))
    x[7, 2] = float("nan")
    assert not all_finite(x)
    big = torch.full((64,), 3e38)
    assert all_finite(big)  # the float32 sum overflows to inf: the entrywise test decides
    assert all_finite(torch.full((64,), 60000.0, dtype=torch.float16))
    big[5] = float("-inf")
    assert not all_finite(big)
    assert not all_finite(torch.tensor([float("inf"), float("-inf")]))
    with pytest.raises(ValueError, match="NaN or inf"):
        rfm_fast.kernel_mv(torch.tensor([[0.0, float("inf"), 1.0]], dtype=torch.float64), X, A)


def test_checked_metric_is_reused_only_while_the_tensor_is_unchanged():
    """A checked M is kept for the same unchanged tensor (so a cast copy, and with it the eigendecomposition of the
    factor cache, is made once); an in-place change is checked again, and a freed tensor drops its entry."""
    from rfm_fast import _validation
    from rfm_fast.core import metric

    g = torch.Generator().manual_seed(5)
    B = torch.randn(3, 3, generator=g)
    M = B @ B.T + torch.eye(3)  # float32, the work float64: the check hands on a float64 copy
    first = _validation._check_M(M, 3, X)
    assert first.dtype == torch.float64 and first is not M
    assert _validation._check_M(M, 3, X) is first
    assert _validation._check_M(M, 3, X.float()) is M  # float32 work takes M itself
    factor = metric.MetricFactor.from_matrix(first, 3, torch.float64, X.device)
    assert metric.MetricFactor.from_matrix(_validation._check_M(M, 3, X), 3, torch.float64, X.device) is factor
    want = rfm_fast.kernel_mv(X, X, A, M=M.double())
    assert torch.allclose(rfm_fast.kernel_mv(X, X, A, M=M), want, rtol=1e-6, atol=1e-8)
    M[0, 1] += 1.0  # in place, now asymmetric: checked again
    with pytest.raises(ValueError, match="symmetric"):
        rfm_fast.kernel_mv(X, X, A, M=M)
    M[1, 0] += 1.0
    second = _validation._check_M(M, 3, X)
    assert second is not first and torch.equal(second, M.double())
    key = id(M)
    assert key in _validation._CHECKED_M
    del M
    assert key not in _validation._CHECKED_M
    assert len(_validation._CHECKED_M) <= _validation.CHECKED_M_CACHE
    W = (B @ B.T).requires_grad_()  # checked every time: a cached cast would carry a stale graph
    assert _validation._check_M(W, 3, X).requires_grad
    assert id(W) not in _validation._CHECKED_M
