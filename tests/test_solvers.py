"""krr_solve: Cholesky and CG against torch.linalg.solve in float64; CG is matrix-free; errors are clear."""

import numpy as np
import pytest
import torch

import rfm_fast
from rfm_fast.ops.kernel_matrix import naive as naive_kernel_matrix
from rfm_fast.solvers import ConvergenceError, SingularSystemError, choose_solver, krr_solve


def _problem(seed, n=80, d=5, c=3, M_kind="none", dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    Y = torch.randn(n, c, generator=g, dtype=torch.float64)
    M = None
    if M_kind == "diag":
        M = torch.rand(d, generator=g, dtype=torch.float64) + 0.1
    elif M_kind == "dense":
        A = torch.randn(d, d, generator=g, dtype=torch.float64)
        M = A @ A.T / d
    return X.to(dtype), Y.to(dtype), M


def _reference(X, Y, M, kernel, bandwidth, reg):
    K = naive_kernel_matrix.kernel_matrix(X.double(), X.double(), None if M is None else M.double(), kernel,
                                          bandwidth)
    return torch.linalg.solve(K + reg * torch.eye(len(X), dtype=torch.float64), Y.double())


def _rel(a, b):
    return float((torch.as_tensor(a).double() - b).norm() / b.norm())


@pytest.mark.parametrize("kernel", ["laplace", "gaussian"])
@pytest.mark.parametrize("M_kind", ["none", "diag", "dense"])
def test_cholesky_float64_matches_linalg_solve(kernel, M_kind):
    X, Y, M = _problem(0, M_kind=M_kind)
    ref = _reference(X, Y, M, kernel, 2.0, 1e-2)
    alpha = krr_solve(X, Y, kernel=kernel, bandwidth=2.0, M=M, reg=1e-2, solver="cholesky")
    assert alpha.dtype == torch.float64 and alpha.shape == Y.shape
    assert _rel(alpha, ref) < 1e-10


@pytest.mark.parametrize("kernel", ["laplace", "gaussian"])
@pytest.mark.parametrize("M_kind", ["none", "dense"])
def test_cg_float64_matches_linalg_solve(kernel, M_kind):
    X, Y, M = _problem(1, n=60, M_kind=M_kind)
    ref = _reference(X, Y, M, kernel, 2.0, 1e-1)
    alpha, info = krr_solve(X, Y, kernel=kernel, bandwidth=2.0, M=M, reg=1e-1, solver="cg", tol=1e-11,
                            return_info=True)
    assert info["solver"] == "cg" and info["converged"] and info["residual"] <= 1e-11
    assert 0 < info["iterations"] <= 60
    assert _rel(alpha, ref) < 1e-8


def test_float32_and_float64_option():
    X, Y, _ = _problem(2, dtype=torch.float32)
    ref = _reference(X, Y, None, "laplace", 1.0, 1e-2)
    alpha32 = krr_solve(X, Y, bandwidth=1.0, reg=1e-2, solver="cholesky")
    alpha64 = krr_solve(X, Y, bandwidth=1.0, reg=1e-2, solver="cholesky", dtype=torch.float64)
    # float32 products, float64 coefficients (refined against a float64 residual): both are float64
    assert alpha32.dtype == torch.float64 and alpha64.dtype == torch.float64
    assert _rel(alpha64, ref) < 1e-10
    assert _rel(alpha32, ref) < 1e-4
    alpha_cg = krr_solve(X, Y, bandwidth=1.0, reg=1e-2, solver="cg", dtype="float64", tol=1e-10)
    assert _rel(alpha_cg, ref) < 1e-7


def test_cg_never_builds_the_kernel_matrix(monkeypatch):
    X, Y, M = _problem(3, n=50, M_kind="diag")
    ref = _reference(X, Y, M, "laplace", 1.5, 1e-1)

    def forbidden(*args, **kwargs):
        raise AssertionError("CG must not build the n x n kernel matrix")

    import rfm_fast.ops.api as api
    import rfm_fast.core.matvec as core_matvec
    import rfm_fast.solvers.cg as cg_module
    import rfm_fast.solvers.direct as direct

    for module in (api, rfm_fast, direct):
        monkeypatch.setattr(module, "kernel_matrix", forbidden)
    monkeypatch.setattr(core_matvec, "kernel_matrix", forbidden)
    monkeypatch.setattr(naive_kernel_matrix, "kernel_matrix", forbidden)
    calls = []
    real_mv = cg_module.kernel_mv

    def counting_mv(*args, **kwargs):
        calls.append(args[2].shape)
        return real_mv(*args, **kwargs)

    monkeypatch.setattr(cg_module, "kernel_mv", counting_mv)
    alpha, info = krr_solve(X, Y, bandwidth=1.5, M=M, reg=1e-1, solver="cg", tol=1e-10, return_info=True)
    assert _rel(alpha, ref) < 1e-7
    assert len(calls) >= info["iterations"] > 0
    with pytest.raises(AssertionError, match="must not build"):
        krr_solve(X, Y, bandwidth=1.5, M=M, reg=1e-1, solver="cholesky")


def test_cg_reports_non_convergence():
    X, Y, _ = _problem(4, n=100)
    with pytest.raises(ConvergenceError, match="max_iter=3") as info:
        krr_solve(X, Y, reg=1e-6, solver="cg", tol=1e-12, max_iter=3)
    assert isinstance(info.value, RuntimeError)
    assert info.value.iterations == 3 and info.value.residual > 1e-12


def test_singular_systems_raise_clearly():
    X = torch.ones(6, 3, dtype=torch.float64)  # identical points: K is the all-ones matrix (rank 1)
    Y = torch.randn(6, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with pytest.raises(SingularSystemError, match="not positive definite") as info:
        krr_solve(X, Y, reg=0.0, solver="cholesky")
    assert isinstance(info.value, RuntimeError)
    with pytest.raises(ConvergenceError):
        krr_solve(X, Y, reg=0.0, solver="cg", max_iter=50)
    alpha = krr_solve(X, Y, reg=1e-3, solver="cholesky")  # a ridge makes it solvable
    assert torch.isfinite(alpha).all()


def test_auto_choice_follows_the_memory_budget():
    assert choose_solver(100, torch.float64, "128MB") == "cholesky"
    try:
        import rfm_fast.solvers.preconditioned  # noqa: F401
        large = "pcg"
    except ModuleNotFoundError:
        large = "cg"
    assert choose_solver(3000, torch.float64, "64MB") == large
    X, Y, _ = _problem(6, n=30)
    _, info = krr_solve(X, Y, reg=1e-1, return_info=True)
    assert info["solver"] == "cholesky"


def test_numpy_and_1d_targets():
    X, Y, _ = _problem(7, n=40, c=1)
    out = krr_solve(X.numpy(), Y[:, 0].numpy(), reg=1e-2)
    assert isinstance(out, np.ndarray) and out.shape == (40,) and out.dtype == np.float64
    np.testing.assert_allclose(out, _reference(X, Y, None, "laplace", 1.0, 1e-2)[:, 0].numpy(), rtol=1e-9)


def test_argument_errors():
    X, Y, _ = _problem(8, n=10)
    with pytest.raises(ValueError, match="solver"):
        krr_solve(X, Y, solver="lu")
    with pytest.raises(ValueError, match="reg"):
        krr_solve(X, Y, reg=-1.0)
    with pytest.raises(ValueError, match="Y must have shape"):
        krr_solve(X, Y[:5])
    with pytest.raises(ValueError, match="dtype"):
        krr_solve(X, Y, dtype=torch.float16)
    with pytest.raises(ValueError, match="tol"):
        krr_solve(X, Y, solver="cg", tol=0.0)


def test_explicit_pcg_without_the_module_says_so():
    try:
        import rfm_fast.solvers.preconditioned  # noqa: F401
    except ModuleNotFoundError:
        X, Y, _ = _problem(9, n=10)
        with pytest.raises(RuntimeError, match="preconditioned"):
            krr_solve(X, Y, solver="pcg")
    else:
        pytest.skip("rfm_fast.solvers.preconditioned is installed (tested in test_preconditioned.py)")


def test_pcg_is_reachable_through_krr_solve():
    pytest.importorskip("rfm_fast.solvers.preconditioned")
    X, Y, _ = _problem(10, n=120)
    ref = _reference(X, Y, None, "laplace", 1.0, 1e-1)
    alpha, info = krr_solve(X, Y, reg=1e-1, solver="pcg", tol=1e-10, return_info=True)
    assert info["solver"] == "pcg" and info["converged"]
    assert _rel(alpha, ref) < 1e-7


def _ill_conditioned_float32(n=700, reg=1e-4):
    """Unit-norm rows in 2 clusters, 15 duplicated points, Laplace at a wide bandwidth: lambda_max ~ n, so
    cond(K + reg I) ~ n / reg ~ 1e6..1e7, the regime where float32 products alone stall near 1e-4."""
    g = torch.Generator().manual_seed(21)
    centres = torch.randn(2, 30, generator=g, dtype=torch.float64)
    X = centres[torch.arange(n) % 2] + 0.3 * torch.randn(n, 30, generator=g, dtype=torch.float64)
    X = torch.cat([X, X[:15]])
    X = X / X.norm(dim=1, keepdim=True)
    Y = torch.nn.functional.one_hot(torch.arange(len(X)) % 3).double()
    K = naive_kernel_matrix.kernel_matrix(X, X, None, "laplace", 10.0)
    A = K + reg * torch.eye(len(X), dtype=torch.float64)
    return X.float(), Y.float(), A


@pytest.mark.parametrize("solver", ["cholesky", "cg", "pcg"])
def test_float32_solvers_finish_on_ill_conditioned_ridge_systems(solver):
    """Issue 14: every solver reaches a true (float64) relative residual <= 1e-4 in float32 at cond ~ 1e7."""
    X, Y, A = _ill_conditioned_float32()
    evals = torch.linalg.eigvalsh(A)
    assert 1e6 < float(evals[-1] / evals[0]) < 3e7
    alpha, info = krr_solve(X, Y, bandwidth=10.0, reg=1e-4, solver=solver, return_info=True)
    Y64 = Y.double()
    true = float(((Y64 - A @ alpha.double()).norm(dim=0) / Y64.norm(dim=0)).max())
    assert info["converged"] and true <= 1e-4
    assert abs(true - info["residual"]) <= 1e-6  # the reported residual is the true one
    assert alpha.dtype == torch.float64


def test_a_float32_solve_that_cannot_finish_says_what_it_reached():
    X, Y, _ = _ill_conditioned_float32(n=300)
    with pytest.raises(ConvergenceError, match="residual") as excinfo:
        krr_solve(X, Y, bandwidth=10.0, reg=1e-4, solver="cg", tol=1e-15)
    assert excinfo.value.residual > 1e-15
    with pytest.raises(ConvergenceError, match="Cholesky .* refinement steps"):
        krr_solve(X, Y, bandwidth=10.0, reg=1e-4, solver="cholesky", tol=1e-15)


def test_cg_progress_bar(capsys):
    X, Y, _ = _problem(7, n=60)
    krr_solve(X, Y, reg=1e-2, solver="cg", progress=True)
    assert "CG" in capsys.readouterr().err


def test_solvers_take_lists_and_integer_arrays_like_the_ops():
    gen = np.random.default_rng(7)
    X = gen.integers(0, 5, size=(60, 4))
    y = (X[:, 0] > 2).astype(float)
    from_list = krr_solve(X.tolist(), y.tolist(), bandwidth=2.0)
    from_int = krr_solve(X, y, bandwidth=2.0)
    assert isinstance(from_list, np.ndarray) and from_list.shape == (60,)
    assert np.allclose(from_list, from_int, rtol=1e-5, atol=1e-6)


def test_nystrom_converges_to_exact_krr_and_improves_with_m():
    """solver="nystrom": with every point a centre it is exact KRR (float64 to 1e-12, float32 products to 1e-5);
    with fewer centres the predictor approaches the exact one as m grows; centre indices may be given; the
    streamed products honour a small memory budget."""
    gen = torch.Generator().manual_seed(8)
    X = torch.randn(400, 6, generator=gen, dtype=torch.float64)
    Y = torch.sin(X[:, :2].sum(1, keepdim=True)) + 0.1 * torch.randn(400, 1, generator=gen, dtype=torch.float64)
    Z = torch.randn(200, 6, generator=gen, dtype=torch.float64)
    exact = krr_solve(X, Y, bandwidth=2.0, reg=1e-3, solver="cholesky")
    want = rfm_fast.kernel_mv(Z, X, exact, bandwidth=2.0)

    def gap(dtype, centres, **kw):
        alpha, info = krr_solve(X.to(dtype), Y.to(dtype), bandwidth=2.0, reg=1e-3, solver="nystrom",
                                centres=centres, return_info=True, **kw)
        assert alpha.shape == (info["centres"].numel(), 1) and info["converged"]
        got = rfm_fast.kernel_mv(Z, X[info["centres"]], alpha, bandwidth=2.0)
        return float((got - want).norm() / want.norm())

    assert gap(torch.float64, 400) <= 1e-12
    assert gap(torch.float32, 400) <= 1e-5
    gaps = [gap(torch.float64, m) for m in (25, 100, 250)]
    assert gaps[0] > gaps[1] > gaps[2] > 0
    assert gap(torch.float64, torch.arange(0, 400, 2), memory_budget="1MB") <= gaps[1]
    with pytest.raises(ValueError, match="needs centres"):
        krr_solve(X, Y, solver="nystrom")
    with pytest.raises(ValueError, match="centres= goes with"):
        krr_solve(X, Y, centres=10)
    with pytest.raises(ValueError, match="distinct"):
        krr_solve(X, Y, solver="nystrom", centres=[1, 1, 2])
    _, info = krr_solve(X, Y, solver="nystrom", centres=np.int64(30), return_info=True)  # a numpy integer is m
    assert info["centres"].numel() == 30


@pytest.mark.parametrize("backend", [b for b in rfm_fast.available_backends("cpu") if b in ("torch", "cpp")])
@pytest.mark.parametrize("kernel", ["laplace", "gaussian"])
def test_normal_equations_product_matches_two_mat_vecs(backend, kernel):
    """kernel_normal_mv (each tile once, float64 sums over row blocks) equals K^T (K alpha) from float64 explicit
    kernels: framed clusters (the core permutes both point sets), a low-rank metric, a small budget (many row
    blocks), and a rank-0 metric (every kernel value 1)."""
    from rfm_fast.ops.api import kernel_normal_mv

    gen = torch.Generator().manual_seed(3)
    X = torch.randn(700, 12, generator=gen, dtype=torch.float64)
    X[:300] = 5 + 1e-3 * X[:300]  # a tight cluster far out: frames
    C = X[torch.randperm(700, generator=gen)[:90]]
    alpha = torch.randn(90, 3, generator=gen, dtype=torch.float64)
    B = torch.randn(12, 2, generator=gen, dtype=torch.float64)
    for M in (None, B @ B.T, torch.zeros(12, 12, dtype=torch.float64)):
        K = naive_kernel_matrix.kernel_matrix(X, C, M, kernel, 2.0)
        want = K.T @ (K @ alpha)
        got = kernel_normal_mv(X.float(), C.float(), alpha.float(), kernel=kernel, bandwidth=2.0,
                               M=None if M is None else M.float(), backend=backend, memory_budget="1MB")
        assert got.dtype == torch.float64 and got.shape == (90, 3)
        assert float((got - want).norm() / want.norm()) <= 2e-6
    with pytest.raises(RuntimeError, match="not differentiable"):
        kernel_normal_mv(X.requires_grad_(), C, alpha)


def test_nystrom_factors_in_place_and_free_on_return(monkeypatch):
    """The Falkon factors: the in-place LAPACK Cholesky equals torch's, restores its input when it fails (then
    the jitter path succeeds on duplicated centres); lauum's L^T L equals the dense product in the lower
    triangle; and the preconditioner (two m x m factors) is freed when the solve returns, without the garbage
    collector (a class defined inside the solve kept them in a reference cycle)."""
    import gc
    import weakref

    from rfm_fast.solvers import nystrom

    gen = torch.Generator().manual_seed(5)
    A = torch.randn(60, 60, generator=gen, dtype=torch.float64)
    S = A @ A.T + 60 * torch.eye(60, dtype=torch.float64)
    L = nystrom._potrf(S.clone())
    assert torch.allclose(L, torch.linalg.cholesky(S), rtol=0, atol=1e-12) and bool((L.triu(1) == 0).all())
    T = nystrom._lower_gram(L)
    assert torch.allclose(torch.tril(T), torch.tril(L.T @ L), rtol=1e-13, atol=1e-10)
    bad = S.clone()
    bad[5, 5] = -1.0
    kept = bad.clone()
    assert nystrom._potrf(bad) is None and torch.equal(bad, kept)  # restored exactly
    X = torch.randn(50, 3, generator=gen, dtype=torch.float64)
    Kmm = naive_kernel_matrix.kernel_matrix(X[[0, 0, 1, 2]], X[[0, 0, 1, 2]], None, "gaussian", 1.0)
    L = nystrom._cholesky(Kmm.clone(), "K_mm")  # a duplicated centre: singular, factored with jitter
    assert float((L @ L.T - Kmm).abs().max()) <= 1e-10

    seen = []
    original = nystrom._cholesky

    def spy(*args, **kw):
        factor = original(*args, **kw)
        seen.append(weakref.ref(factor))
        return factor

    monkeypatch.setattr(nystrom, "_cholesky", spy)
    Y = torch.randn(50, 2, generator=gen, dtype=torch.float64)
    gc.disable()
    try:
        krr_solve(X, Y, bandwidth=2.0, reg=1e-3, solver="nystrom", centres=20)
        assert len(seen) == 2 and all(ref() is None for ref in seen)
    finally:
        gc.enable()


def test_nystrom_float32_refines_with_float64_residuals():
    """float32 products measure H a only to ~eps32 ||H|| ||a|| (5e-5 of ||b|| here): restarts from a residual
    formed with those products stalled there (at n = 1e6 an RFM fit stopped at 5e-3 > tol = 1e-3). With float64
    residuals (X converted a chunk at a time) CG on float32 products refines to 1e-6, checked independently."""
    from rfm_fast.solvers import nystrom

    g = np.random.default_rng(0)
    X = g.normal(size=(4000, 64)).astype(np.float32)
    W = np.linalg.qr(g.normal(size=(64, 2)))[0]
    Z = X @ W
    y = np.digitize(np.arctan2(Z[:, 1], Z[:, 0]), np.linspace(-np.pi, np.pi, 11)[1:-1])
    Y = torch.nn.functional.one_hot(torch.from_numpy(y), 10).float()
    M = torch.from_numpy(W @ W.T).float() + 1e-2 * torch.eye(64)
    X = torch.from_numpy(X)
    kw = dict(kernel="laplace", bandwidth=10.0, M=M, reg=1e-6, solver="nystrom", centres=400, tol=1e-6)
    old_chunk = nystrom.EXACT_CHUNK
    nystrom.EXACT_CHUNK = 1000  # several chunks
    try:
        alpha, info = krr_solve(X, Y, return_info=True, **kw)
    finally:
        nystrom.EXACT_CHUNK = old_chunk
    assert info["converged"] and info["restarts"] >= 1
    X64, C64 = X.double(), X.double()[info["centres"]]
    Knm = naive_kernel_matrix.kernel_matrix(X64, C64, M.double(), "laplace", 10.0)
    Kmm = naive_kernel_matrix.kernel_matrix(C64, C64, M.double(), "laplace", 10.0)
    b = Knm.T @ Y.double()
    resid = (b - Knm.T @ (Knm @ alpha) - 1e-6 * (Kmm @ alpha)).norm(dim=0) / b.norm(dim=0)
    assert float(resid.max()) <= 2e-6
