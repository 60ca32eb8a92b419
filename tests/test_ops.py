"""The four ops on the torch path (and the dispatcher) against the float64 naive reference and autograd."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

import rfm_fast
from rfm_fast.ops.agop import naive as agop_naive
from rfm_fast.ops.kernel_grad import naive as grad_naive
from rfm_fast.ops.kernel_matrix import naive as km_naive
from rfm_fast.ops.kernel_mv import naive as mv_naive

from .tolerances import REL_FRO, rel_fro

KERNELS = ("laplace", "gaussian")
M_FORMS = ("none", "diag", "dense")
DTYPES = (torch.float32, torch.float64)


def make_metric(form: str, d: int, gen: torch.Generator):
    if form == "none":
        return None
    if form == "diag":
        return torch.rand(d, generator=gen, dtype=torch.float64) + 0.1
    B = torch.randn(d, d, generator=gen, dtype=torch.float64)
    return B @ B.T / d + 0.05 * torch.eye(d, dtype=torch.float64)


def make_data(m: int, n: int, d: int, c: int, gen: torch.Generator, *, self_pairs: bool = True,
              duplicates: bool = True):
    """Centres with duplicated rows; evaluation points that include copies of centres (zero distances)."""
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    if duplicates and n >= 4:
        X[n // 2] = X[0]
        X[n - 1] = X[1]
    Z = torch.randn(m, d, generator=gen, dtype=torch.float64)
    if self_pairs:
        k = min(m, n)
        Z[: k // 2 + 1] = X[: k // 2 + 1]
    alpha = torch.randn(n, c, generator=gen, dtype=torch.float64)
    return Z, X, alpha


def make_spread_data(n: int, d: int, c: int, form: str, dtype: torch.dtype, gen: torch.Generator):
    """Points to be used as both evaluation points and centres, with a duplicate and a near pair whose members
    lie far apart in the row order (different blocks of a tiled schedule), coefficients and a metric."""
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    X[2 * n // 3] = X[2]
    X[n - 49] = X[n // 6] + 1e-3 * torch.randn(d, generator=gen, dtype=torch.float64)
    alpha = torch.randn(n, c, generator=gen, dtype=torch.float64)
    M = make_metric(form, d, gen)
    return X.to(dtype), alpha.to(dtype), None if M is None else M.to(dtype)


def reference(op: str, Z, X, alpha, M, kernel, bandwidth, **kw):
    """The naive op in float64 on the float64 copies of the (possibly rounded) inputs."""
    args = [t.double() for t in (Z, X)]
    M64 = None if M is None else M.double()
    if op == "kernel_matrix":
        return km_naive.kernel_matrix(*args, M64, kernel, bandwidth)
    a = alpha.double()
    if op == "kernel_mv":
        return mv_naive.kernel_mv(*args, a, M64, kernel, bandwidth)
    if op == "kernel_grad":
        return grad_naive.kernel_grad(*args, a, M64, kernel, bandwidth)
    return agop_naive.agop(*args, a, M64, kernel, bandwidth, **kw)


def call(op: str, Z, X, alpha, M, kernel, bandwidth, backend="torch", **kw):
    f = getattr(rfm_fast, op)
    args = (Z, X) if op == "kernel_matrix" else (Z, X, alpha)
    return f(*args, kernel=kernel, bandwidth=bandwidth, M=M, backend=backend, **kw)


SIZES = [  # (m, n, d, c)
    (1, 1, 1, 1),
    (37, 129, 3, 2),
    (129, 37, 17, 3),
    (37, 1000, 64, 4),
    (1000, 37, 5, 1),
    (37, 129, 257, 2),
]


@pytest.mark.parametrize("op", ["kernel_matrix", "kernel_mv", "kernel_grad", "agop"])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("form", M_FORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_op_matches_float64_reference(op, kernel, form, dtype, size):
    m, n, d, c = size
    gen = torch.Generator().manual_seed(zlib.crc32(repr((op, kernel, form, size)).encode()))
    Z, X, alpha = make_data(m, n, d, c, gen)
    M = make_metric(form, d, gen)
    bandwidth = 0.7 * d**0.5 + 0.3
    Zc, Xc, ac = Z.to(dtype), X.to(dtype), alpha.to(dtype)
    Mc = None if M is None else M.to(dtype)
    out = call(op, Zc, Xc, ac, Mc, kernel, bandwidth)
    ref = reference(op, Zc, Xc, ac, Mc, kernel, bandwidth)
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    assert rel_fro(out, ref) <= REL_FRO[dtype]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("form", M_FORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("centered,diag", [(False, False), (True, False), (False, True), (True, True)])
def test_agop_options_x_is_centers(kernel, form, dtype, centered, diag):
    gen = torch.Generator().manual_seed(7)
    n, d, c = 300, 24, 5
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    X[10:20] = X[:10]  # duplicated centres
    alpha = torch.randn(n, c, generator=gen, dtype=torch.float64)
    M = make_metric(form, d, gen)
    Xc, ac, Mc = X.to(dtype), alpha.to(dtype), None if M is None else M.to(dtype)
    out = rfm_fast.agop(Xc, Xc, ac, kernel=kernel, bandwidth=3.0, M=Mc, centered=centered, diag=diag,
                        backend="torch")
    ref = reference("agop", Xc, Xc, ac, Mc, kernel, 3.0, centered=centered, diag=diag)
    assert out.shape == ((d,) if diag else (d, d))
    assert rel_fro(out, ref) <= REL_FRO[dtype]
    if not diag:
        assert torch.allclose(out, out.T)
        assert torch.linalg.eigvalsh(out.double()).min() >= -1e-6 * out.abs().max()


@pytest.mark.parametrize("kernel", KERNELS)
def test_gradient_matches_autograd_off_centres(kernel):
    gen = torch.Generator().manual_seed(3)
    n, m, d, c = 50, 20, 6, 3
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    Z = torch.randn(m, d, generator=gen, dtype=torch.float64)
    alpha = torch.randn(n, c, generator=gen, dtype=torch.float64)
    B = torch.randn(d, d, generator=gen, dtype=torch.float64)
    M = B @ B.T / d
    L = 1.7

    def predictor(z):
        diff = z - X
        sq = ((diff @ M) * diff).sum(-1)
        k = torch.exp(-sq.sqrt() / L) if kernel == "laplace" else torch.exp(-sq / (2 * L * L))
        return k @ alpha

    J_auto = torch.stack([torch.autograd.functional.jacobian(predictor, z) for z in Z])
    J = rfm_fast.kernel_grad(Z, X, alpha, kernel=kernel, bandwidth=L, M=M, backend="torch")
    assert rel_fro(J, J_auto) <= 1e-12
    A = rfm_fast.agop(Z, X, alpha, kernel=kernel, bandwidth=L, M=M, backend="torch")
    A_auto = torch.einsum("mcd,mce->de", J_auto, J_auto) / m
    assert rel_fro(A, A_auto) <= 1e-12
    f = rfm_fast.kernel_mv(Z, X, alpha, kernel=kernel, bandwidth=L, M=M, backend="torch")
    assert rel_fro(f, torch.stack([predictor(z) for z in Z])) <= 1e-12


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("op", ["kernel_mv", "kernel_grad", "agop"])
def test_tiling_and_streamed_coefficients(kernel, op):
    """A 1 MiB budget forces many row and column tiles and builds alpha (x) x per tile instead of whole."""
    gen = torch.Generator().manual_seed(11)
    Z, X, alpha = make_data(700, 3000, 40, 7, gen)
    big = call(op, Z, X, alpha, None, kernel, 4.0)
    small = call(op, Z, X, alpha, None, kernel, 4.0, memory_budget="1MB")
    assert rel_fro(small, big) <= 1e-12
    assert rel_fro(small, reference(op, Z, X, alpha, None, kernel, 4.0)) <= REL_FRO[torch.float64]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("op", ["kernel_mv", "kernel_grad", "agop"])
@pytest.mark.parametrize("form", M_FORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group", [2, None], ids=["groups", "one-group"])
def test_symmetric_schedule_x_is_centers(monkeypatch, kernel, op, form, dtype, group):
    """z equal to x takes the symmetric schedule (each tile between two blocks used twice). Small blocks make
    mirrored tiles, and a cap of two blocks per group (what a tight budget gives at large n) splits the
    accumulator; duplicates and near pairs sit in different blocks so their exact contributions are mirrored too.
    An equal copy of x must take the same path as x itself."""
    import dataclasses

    from rfm_fast.core import gradient, matvec, plan as planner

    monkeypatch.setitem(planner.SYMMETRIC_BLOCK, "cpu", 64)
    plans = []

    def capped(*args, **kw):
        plan = planner.plan_symmetric(*args, **kw)
        if group is not None:
            plan = dataclasses.replace(plan, group=min(plan.group, group))
        plans.append(plan)
        return plan

    monkeypatch.setattr(gradient, "plan_symmetric", capped)
    monkeypatch.setattr(matvec, "plan_symmetric", capped)
    X, alpha, M = make_spread_data(450, 19, 3, form, dtype, torch.Generator().manual_seed(23))
    out = call(op, X, X.clone(), alpha, M, kernel, 2.5)
    assert len(plans) == 1 and plans[0].block == 64
    ref = reference(op, X, X, alpha, M, kernel, 2.5)
    assert torch.isfinite(out).all()
    assert rel_fro(out, ref) <= REL_FRO[dtype]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("op", ["kernel_mv", "kernel_grad", "agop"])
@pytest.mark.parametrize("form", M_FORMS)
def test_near_duplicates_and_offset_data_fp32(kernel, op, form):
    """Points a hair away from centres and data far from the origin: the GEMM expansion alone loses these
    distances in fp32; the exact recheck and the near-field gradient keep ~1e-5."""
    gen = torch.Generator().manual_seed(5)
    n, d = 400, 32
    X = torch.randn(n, d, generator=gen, dtype=torch.float64) + 20.0
    Z = X[:150] + 1e-4 * torch.randn(150, d, generator=gen, dtype=torch.float64)
    Z = torch.cat([Z, X[150:200]])
    alpha = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    M = make_metric(form, d, gen)
    Z32, X32, a32 = Z.float(), X.float(), alpha.float()
    M32 = None if M is None else M.float()
    out = call(op, Z32, X32, a32, M32, kernel, 2.0)
    ref = reference(op, Z32, X32, a32, M32, kernel, 2.0)
    assert rel_fro(out, ref) <= REL_FRO[torch.float32]


def test_zero_distance_contributes_nothing_and_kernel_is_one():
    X = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0]], dtype=torch.float32)
    alpha = torch.tensor([[1.0], [2.0], [-1.0]], dtype=torch.float32)
    K = rfm_fast.kernel_matrix(X, X, kernel="laplace", bandwidth=1.0, backend="torch")
    assert torch.equal(torch.diagonal(K), torch.ones(3))
    assert K[1, 2] == 1.0
    J = rfm_fast.kernel_grad(X[:1], X, alpha, kernel="laplace", bandwidth=1.0, backend="torch")
    # only the two centres at (1, 0) contribute: 2 - 1 = 1 times d/dz exp(-|z - x|) at z = 0, = e^{-1} e_x
    assert torch.allclose(J[0, 0], torch.tensor([np.exp(-1.0), 0.0], dtype=torch.float32))
    for kernel in KERNELS:
        A = rfm_fast.agop(X, X, alpha, kernel=kernel, bandwidth=0.5, backend="torch")
        assert torch.isfinite(A).all()


def test_one_dimensional_alpha_drops_the_output_axis_and_numpy_round_trip():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((30, 4))
    a = rng.standard_normal(30)
    f = rfm_fast.kernel_mv(X, X, a, backend="torch")
    J = rfm_fast.kernel_grad(X, X, a, backend="torch")
    A = rfm_fast.agop(X, X, a, backend="torch")
    assert isinstance(f, np.ndarray) and f.shape == (30,) and f.dtype == np.float64
    assert isinstance(J, np.ndarray) and J.shape == (30, 4)
    assert isinstance(A, np.ndarray) and A.shape == (4, 4)
    K = rfm_fast.kernel_matrix(X, X, backend="torch")
    np.testing.assert_allclose(f, K @ a, rtol=1e-12)
    f2 = rfm_fast.kernel_mv(X, X, a[:, None], backend="torch")
    assert f2.shape == (30, 1)
    x32 = X.astype(np.float32)
    assert rfm_fast.agop(x32, x32, a, backend="torch").dtype == np.float32


def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(40, 200, generator=gen, dtype=torch.float64)
    X = base.T[::2]  # (100, 40), strided
    Z = base.T[1::3][:50]
    alpha = torch.randn(3, 100, generator=gen, dtype=torch.float64).T
    M = make_metric("dense", 40, gen)[::1, ::1].T
    assert not X.is_contiguous() and not alpha.is_contiguous()
    for op in ("kernel_matrix", "kernel_mv", "kernel_grad", "agop"):
        out = call(op, Z, X, alpha, M, "laplace", 5.0)
        ref = reference(op, Z.contiguous(), X.contiguous(), alpha.contiguous(), M.contiguous(), "laplace", 5.0)
        assert rel_fro(out, ref) <= REL_FRO[torch.float64]


def test_empty_evaluation_set_is_fine_except_for_agop():
    X = torch.randn(10, 3)
    a = torch.randn(10, 2)
    empty = torch.empty(0, 3)
    assert rfm_fast.kernel_mv(empty, X, a).shape == (0, 2)
    assert rfm_fast.kernel_grad(empty, X, a).shape == (0, 2, 3)
    assert rfm_fast.kernel_matrix(empty, X).shape == (0, 10)
    with pytest.raises(ValueError, match="x"):
        rfm_fast.agop(empty, X, a)


def test_dispatcher_env_override_and_explicit_failures(monkeypatch):
    X = torch.randn(20, 3, dtype=torch.float64)
    a = torch.randn(20, 1, dtype=torch.float64)
    ref = rfm_fast.agop(X, X, a, backend="naive")
    monkeypatch.setenv("RFM_FAST_BACKEND", "naive")
    calls = []
    import rfm_fast.ops.agop.naive as mod

    real = mod.agop
    monkeypatch.setattr(mod, "agop", lambda *args, **kw: calls.append(1) or real(*args, **kw))
    assert torch.allclose(rfm_fast.agop(X, X, a), ref)
    assert calls, "the environment override must route backend='auto' to the named backend"
    assert rfm_fast.agop(X, X, a, backend="torch").shape == (3, 3)  # an explicit argument wins
    monkeypatch.setenv("RFM_FAST_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="RFM_FAST_BACKEND"):
        rfm_fast.agop(X, X, a)
    monkeypatch.delenv("RFM_FAST_BACKEND")
    with pytest.raises(ValueError, match="backend"):
        rfm_fast.agop(X, X, a, backend="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="cuda"):
            rfm_fast.agop(X, X, a, backend="cuda")


def test_memory_budget_argument_and_environment(monkeypatch):
    X = torch.randn(50, 4, dtype=torch.float64)
    a = torch.randn(50, 2, dtype=torch.float64)
    ref = rfm_fast.agop(X, X, a, backend="torch")
    monkeypatch.setenv("RFM_FAST_MEMORY_BUDGET", "2MB")
    assert torch.allclose(rfm_fast.agop(X, X, a, backend="torch"), ref)
    monkeypatch.setenv("RFM_FAST_MEMORY_BUDGET", "lots")
    with pytest.raises(ValueError, match="RFM_FAST_MEMORY_BUDGET"):
        rfm_fast.agop(X, X, a, backend="torch")
    with pytest.raises(ValueError, match="memory_budget"):
        rfm_fast.agop(X, X, a, backend="torch", memory_budget=10)
