"""The triton backend against the float64 naive reference.

Without CUDA these run on CPU tensors under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before
rfm_fast is imported); sizes are small because the interpreter executes every program in numpy. Tests marked
``gpu`` need CUDA and run the compiled kernels, in every precision mode.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch

import rfm_fast
from rfm_fast._validation import prepare
from rfm_fast.backends import triton as probe

from .test_ops import M_FORMS, KERNELS, call, make_data, make_metric, reference
from .tolerances import REL_FRO, rel_fro

pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_backend = pytest.mark.skipif(not CUDA and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                                   reason="needs CUDA or TRITON_INTERPRET=1")
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
pytestmark = needs_backend

OPS = ("kernel_matrix", "kernel_mv", "kernel_grad", "agop")
SIZES = [(1, 1, 1, 1), (37, 129, 3, 2), (129, 37, 17, 3), (40, 200, 64, 4)]


def _to(dtype, *ts):
    return [None if t is None else t.to(device=DEVICE, dtype=dtype) for t in ts]


def _check(op, Z, X, alpha, M, kernel, bandwidth, dtype, **kw):
    Zc, Xc, ac, Mc = _to(dtype, Z, X, alpha, M)
    out = call(op, Zc, Xc, ac, Mc, kernel, bandwidth, backend="triton", **kw)
    ref = reference(op, Zc, Xc, ac, Mc, kernel, bandwidth, **kw)
    assert out.dtype == dtype and out.shape == ref.shape and out.device.type == DEVICE
    assert torch.isfinite(out).all()
    err = rel_fro(out, ref)
    assert err <= REL_FRO[dtype], f"{op}: relative error {err:.3g} > {REL_FRO[dtype]:.1g}"
    return out


@pytest.fixture(params=["fused", "gemm"])
def regime(request, monkeypatch):
    monkeypatch.setenv("RFM_FAST_TRITON_REGIME", request.param)
    return request.param


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("form", M_FORMS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_reference(op, kernel, form, dtype, size):
    m, n, d, c = size
    gen = torch.Generator().manual_seed(zlib.crc32(repr((op, kernel, form, size)).encode()))
    Z, X, alpha = make_data(m, n, d, c, gen)  # self pairs and duplicated centres
    M = make_metric(form, d, gen)
    _check(op, Z, X, alpha, M, kernel, 0.7 * d**0.5 + 0.3, dtype)


@pytest.mark.parametrize("op", ["kernel_grad", "agop"])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("form", ["none", "dense"])
def test_both_gradient_regimes(op, kernel, form, regime):
    gen = torch.Generator().manual_seed(17)
    Z, X, alpha = make_data(150, 300, 24, 5, gen)
    M = make_metric(form, 24, gen)
    _check(op, Z, X, alpha, M, kernel, 3.0, torch.float32)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("centered,diag", [(False, False), (True, False), (False, True), (True, True)])
def test_agop_options_x_is_centers(kernel, centered, diag, regime):
    gen = torch.Generator().manual_seed(7)
    n, d, c = 200, 20, 3
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    X[10:20] = X[:10]  # duplicated centres: exact zeros off the diagonal too
    alpha = torch.randn(n, c, generator=gen, dtype=torch.float64)
    M = make_metric("diag", d, gen)
    out = _check("agop", X, X, alpha, M, kernel, 3.0, torch.float32, centered=centered, diag=diag)
    if not diag:
        assert torch.equal(out, out.T)
        A = out.double().cpu()
        assert torch.linalg.eigvalsh(A).min() >= -1e-6 * A.abs().max()


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("op", ["kernel_mv", "kernel_grad", "agop"])
@pytest.mark.parametrize("form", M_FORMS)
def test_near_duplicates_and_offset_data_fp32(kernel, op, form, regime):
    """Points a hair away from centres, far from the origin: the expansion loses these distances in fp32; the
    near-pair list and the exact recomputation keep ~1e-5 (in the fused AGOP: the patched rows)."""
    gen = torch.Generator().manual_seed(5)
    n, d = 160, 32
    X = torch.randn(n, d, generator=gen, dtype=torch.float64) + 20.0
    Z = torch.cat([X[:60] + 1e-4 * torch.randn(60, d, generator=gen, dtype=torch.float64), X[60:90]])
    alpha = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    _check(op, Z, X, alpha, make_metric(form, d, gen), kernel, 2.0, torch.float32)


@pytest.mark.parametrize("op", ["kernel_mv", "kernel_grad", "agop"])
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("kernel", KERNELS)
def test_half_inputs_accumulate_in_fp32(op, dtype, kernel):
    gen = torch.Generator().manual_seed(23)
    Z, X, alpha = make_data(70, 150, 16, 3, gen)
    # The reference runs in float64 on the rounded inputs (what the kernel actually receives).
    Zh, Xh, ah = (t.to(dtype).double() for t in (Z, X, alpha))
    _check(op, Zh, Xh, ah, None, kernel, 2.5, dtype)


def test_zero_distance_gives_kernel_one_and_no_gradient():
    X = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0]], device=DEVICE)
    alpha = torch.tensor([[1.0], [2.0], [-1.0]], device=DEVICE)
    K = rfm_fast.kernel_matrix(X, X, kernel="laplace", bandwidth=1.0, backend="triton")
    assert torch.equal(torch.diagonal(K).cpu(), torch.ones(3)) and K[1, 2] == 1.0
    J = rfm_fast.kernel_grad(X[:1], X, alpha, kernel="laplace", bandwidth=1.0, backend="triton")
    expected = torch.tensor([torch.exp(torch.tensor(-1.0)).item(), 0.0])
    assert torch.allclose(J[0, 0].cpu(), expected, rtol=1e-6, atol=1e-7)
    for kernel in KERNELS:
        assert torch.isfinite(rfm_fast.agop(X, X, alpha, kernel=kernel, bandwidth=0.5, backend="triton")).all()


@pytest.mark.parametrize("op", OPS)
def test_many_duplicates_overflow_the_near_list(op):
    """60 copies of one point against themselves: 3600 zero-distance pairs overflow the first list (1024
    slots), so the launch is repeated with room for all of them."""
    gen = torch.Generator().manual_seed(4)
    X = torch.randn(100, 8, generator=gen, dtype=torch.float64)
    X[:60] = X[0]
    alpha = torch.randn(100, 2, generator=gen, dtype=torch.float64)
    _check(op, X, X, alpha, None, "laplace", 2.0, torch.float32)


def test_wide_alpha_runs_in_column_groups():
    gen = torch.Generator().manual_seed(8)
    Z, X, alpha = make_data(40, 90, 6, 70, gen)
    _check("kernel_mv", Z, X, alpha, None, "gaussian", 2.0, torch.float32)


def test_gemm_regime_with_small_budget_tiles_rows_and_columns(monkeypatch):
    monkeypatch.setenv("RFM_FAST_TRITON_REGIME", "gemm")
    gen = torch.Generator().manual_seed(9)
    Z, X, alpha = make_data(260, 1100, 8, 2, gen)
    Zc, Xc, ac = _to(torch.float64, Z, X, alpha)
    small = rfm_fast.agop(Zc, Xc, ac, bandwidth=3.0, backend="triton", memory_budget="1MB")
    big = rfm_fast.agop(Zc, Xc, ac, bandwidth=3.0, backend="triton", memory_budget="1GB")
    assert rel_fro(small, big) <= 1e-12
    assert rel_fro(small, reference("agop", Zc, Xc, ac, None, "laplace", 3.0)) <= REL_FRO[torch.float64]


def test_fused_agop_is_deterministic_and_chunked(monkeypatch):
    monkeypatch.setenv("RFM_FAST_TRITON_REGIME", "fused")
    gen = torch.Generator().manual_seed(10)
    Z, X, alpha = make_data(300, 120, 16, 2, gen)
    Zc, Xc, ac = _to(torch.float32, Z, X, alpha)
    # 1 MiB -> slots for 256 KiB: 4 * 64 rows per chunk, so 300 rows take two chunks.
    a = rfm_fast.agop(Zc, Xc, ac, bandwidth=3.0, backend="triton", memory_budget="1MB", centered=True)
    b = rfm_fast.agop(Zc, Xc, ac, bandwidth=3.0, backend="triton", memory_budget="1MB", centered=True)
    assert torch.equal(a, b)
    ref = reference("agop", Zc, Xc, ac, None, "laplace", 3.0, centered=True)
    assert rel_fro(a, ref) <= REL_FRO[torch.float32]


def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(40, 200, generator=gen, dtype=torch.float64)
    X, Z = base.T[::2], base.T[1::3][:50]
    alpha = torch.randn(3, 100, generator=gen, dtype=torch.float64).T
    M = make_metric("dense", 40, gen)
    for op in OPS:
        _check(op, Z, X, alpha, M, "laplace", 5.0, torch.float64)


def test_empty_evaluation_set():
    X = torch.randn(10, 3, device=DEVICE)
    a = torch.randn(10, 2, device=DEVICE)
    empty = torch.zeros(0, 3, device=DEVICE)
    assert rfm_fast.kernel_mv(empty, X, a, backend="triton").shape == (0, 2)
    assert rfm_fast.kernel_grad(empty, X, a, backend="triton").shape == (0, 2, 3)
    assert rfm_fast.kernel_matrix(empty, X, backend="triton").shape == (0, 10)


def test_settings_are_validated(monkeypatch):
    X = torch.randn(20, 3, device=DEVICE)
    a = torch.randn(20, 1, device=DEVICE)
    monkeypatch.setenv("RFM_FAST_TRITON_PRECISION", "fp8")
    with pytest.raises(ValueError, match="RFM_FAST_TRITON_PRECISION"):
        rfm_fast.kernel_mv(X, X, a, backend="triton")
    monkeypatch.setenv("RFM_FAST_TRITON_PRECISION", "tf32")
    assert rfm_fast.kernel_mv(X, X, a, backend="triton").shape == (20, 1)
    monkeypatch.delenv("RFM_FAST_TRITON_PRECISION")
    monkeypatch.setenv("RFM_FAST_TRITON_REGIME", "fastest")
    with pytest.raises(ValueError, match="RFM_FAST_TRITON_REGIME"):
        rfm_fast.agop(X, X, a, backend="triton")


def test_probe_reasons(monkeypatch):
    problem = prepare(torch.randn(5, 2), torch.randn(5, 2), None, None, "laplace", 1.0, need_alpha=False)
    assert probe.prefers("agop", problem) is not None  # never auto on CPU
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = probe.check(problem)
    assert reason is not None and "CUDA" in reason
    with pytest.raises(RuntimeError, match="triton"):
        rfm_fast.agop(torch.randn(5, 2), torch.randn(5, 2), torch.randn(5), backend="triton")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["tf32x3", "ieee", "tf32"])
@pytest.mark.parametrize("op", OPS)
def test_gpu_precision_modes(op, precision, monkeypatch):
    monkeypatch.setenv("RFM_FAST_TRITON_PRECISION", precision)
    gen = torch.Generator().manual_seed(31)
    Z, X, alpha = make_data(300, 700, 64, 4, gen)
    Zc, Xc, ac = _to(torch.float32, Z, X, alpha)
    out = call(op, Zc, Xc, ac, None, "laplace", 6.0, backend="triton")
    ref = reference(op, Zc, Xc, ac, None, "laplace", 6.0)
    # tf32 is the explicit fast mode: ~1e-3 relative, not held to the float32 table.
    assert rel_fro(out, ref) <= (3e-3 if precision == "tf32" else REL_FRO[torch.float32])


@gpu
@pytest.mark.gpu
def test_gpu_auto_picks_triton():
    X = torch.randn(64, 8, device="cuda")
    a = torch.randn(64, 2, device="cuda")
    from rfm_fast._dispatch import choose

    problem = prepare(X, X, a, None, "laplace", 1.0, need_alpha=True)
    assert choose("agop", problem, "auto").name == "triton"


def test_float64_pair_just_above_the_near_threshold():
    """A near-duplicate whose squared distance sits just above the foundation's fp64 threshold (2^-26 of the
    norms): its expanded distance carries ~3e-9 relative error, which the Laplace weight 1/r passes to the
    gradient. The triton threshold (2^-16) recomputes it exactly."""
    torch.manual_seed(1)
    gen = torch.Generator().manual_seed(1)
    m, n, d = 60, 90, 16
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    Z = torch.randn(m, d, generator=gen, dtype=torch.float64)
    Z[:30] = X[:30]
    alpha = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    Z[-5:] = X[-5:] + 1e-4 * torch.randn(5, d, dtype=torch.float64)
    B = torch.randn(d, d, dtype=torch.float64)
    M = B @ B.T / d + 0.1 * torch.eye(d, dtype=torch.float64)
    for op in ("kernel_grad", "agop"):
        _check(op, Z, X, alpha, M, "laplace", 0.7 * d**0.5, torch.float64)
