"""Nystrom-preconditioned CG (rfm_fast.solvers.preconditioned) against dense float64 solves of the same system."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import rfm_fast
from rfm_fast.solvers import krr_solve
from rfm_fast.solvers import preconditioned as pre
from rfm_fast.solvers.cg import ConvergenceError, cg_solve
from rfm_fast.solvers.preconditioned import NystromPreconditioner, LocalComm, default_rank, nystrom_pcg

from .tolerances import rel_fro


def clustered(n: int, d: int, c: int, seed: int, dtype=torch.float64):
    """Points near a 3-dimensional subspace (a kernel spectrum that decays, as real data do) and targets."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 3, generator=g, dtype=torch.float64)
    X = z @ torch.randn(3, d, generator=g, dtype=torch.float64) + 0.2 * torch.randn(n, d, generator=g,
                                                                                   dtype=torch.float64)
    Y = torch.randn(n, c, generator=g, dtype=torch.float64)
    return X.to(dtype), Y.to(dtype)


def dense_solve(X, Y, kernel, bandwidth, M, reg):
    X64 = X.double()
    K = rfm_fast.kernel_matrix(X64, X64, kernel=kernel, bandwidth=bandwidth, M=M, backend="naive")
    return torch.linalg.solve(K + reg * torch.eye(X.shape[0], dtype=torch.float64), Y.double()), K


def true_residual(K, alpha, Y, reg):
    alpha, Y = alpha.double(), Y.double()
    return float(((Y - K @ alpha - reg * alpha).norm(dim=0) / Y.norm(dim=0)).max())


@pytest.mark.parametrize("kernel,bandwidth", [("laplace", 2.0), ("gaussian", 1.5)])
@pytest.mark.parametrize("M_kind", [None, "diag", "dense"])
def test_float64_matches_dense_solve(kernel, bandwidth, M_kind):
    X, Y = clustered(257, 6, 3, seed=1)
    g = torch.Generator().manual_seed(2)
    M = {None: None, "diag": torch.rand(6, generator=g, dtype=torch.float64) + 0.2,
         "dense": (lambda A: A @ A.T / 6)(torch.randn(6, 6, generator=g, dtype=torch.float64))}[M_kind]
    ref, K = dense_solve(X, Y, kernel, bandwidth, M, 1e-2)
    alpha, info = nystrom_pcg(X, Y, kernel=kernel, bandwidth=bandwidth, M=M, reg=1e-2, tol=1e-11, max_iter=2000,
                              rank=60, backend="torch")
    assert info["converged"] and info["residual"] <= 1e-11
    assert true_residual(K, alpha, Y, 1e-2) <= 1e-10
    assert rel_fro(alpha, ref) <= 1e-8
    assert set(info) >= {"iterations", "residual", "converged", "rank"}


def test_float32_reaches_its_tolerance_on_a_small_ridge():
    # reg = 1e-3 makes alpha ~1000 |Y|: float32 products alone stall near this tolerance; the float64 residual
    # check (iterative refinement) is what gets it there.
    X, Y = clustered(400, 8, 4, seed=3, dtype=torch.float32)
    _, K = dense_solve(X, Y, "gaussian", 1.0, None, 1e-3)
    alpha, info = nystrom_pcg(X, Y, kernel="gaussian", bandwidth=1.0, reg=1e-3, tol=1e-4, rank=100,
                              backend="torch")
    assert alpha.dtype == torch.float64  # float32 products, float64 iterate
    assert info["converged"] and true_residual(K, alpha, Y, 1e-3) <= 1e-4


def test_preconditioner_cuts_iterations_against_plain_cg():
    X, Y = clustered(500, 8, 2, seed=4)
    common = dict(kernel="laplace", bandwidth=2.0, reg=1e-3, tol=1e-8, backend="torch")
    _, cg_info = cg_solve(X, Y, M=None, max_iter=5000, **common)
    _, info = nystrom_pcg(X, Y, max_iter=5000, rank=150, **common)
    assert info["iterations"] * 2 <= cg_info["iterations"], (info["iterations"], cg_info["iterations"])


def test_preconditioner_is_symmetric_positive_definite_and_exact_at_full_rank():
    X, _ = clustered(120, 5, 1, seed=5)
    reg = 1e-3
    common = dict(kernel="laplace", bandwidth=2.0, M=None, reg=reg, backend="torch", memory_budget=None)
    K = rfm_fast.kernel_matrix(X, X, kernel="laplace", bandwidth=2.0, backend="naive")
    for r in (30, 120):
        P = NystromPreconditioner.build(X, slice(0, 120), pre.sample_centres(120, r, 0), comm=LocalComm(),
                                        **common)
        Pinv = P.apply(torch.eye(120, dtype=torch.float64))
        assert float((Pinv - Pinv.T).abs().max()) <= 1e-12
        evals = torch.linalg.eigvalsh(0.5 * (Pinv + Pinv.T))
        assert float(evals.min()) > 0 and float(evals.max()) <= 1 + 1e-10
        if r == 120:
            # Full rank: P ~ (K + reg I) / (s_k + reg), so the preconditioned matrix is nearly a multiple of I.
            spectrum = torch.linalg.eigvals(Pinv @ (K + reg * torch.eye(120, dtype=torch.float64))).real
            assert float(spectrum.max() / spectrum.min()) < 1.5


def test_kernel_is_touched_only_through_fused_ops_on_thin_blocks(monkeypatch):
    n, r = 300, 40
    X, Y = clustered(n, 5, 2, seed=6)
    shapes = []
    real = pre.kernel_matrix

    def spy(x, centers, **kw):
        shapes.append((x.shape[0], centers.shape[0]))
        return real(x, centers, **kw)

    monkeypatch.setattr(pre, "kernel_matrix", spy)
    products = []
    import rfm_fast.solvers.cg as cg_module  # the CG iteration (shared with plain CG) makes the products

    real_mv = cg_module.kernel_mv
    monkeypatch.setattr(cg_module, "kernel_mv", lambda *a, **kw: products.append(1) or real_mv(*a, **kw))
    _, info = nystrom_pcg(X, Y, kernel="laplace", bandwidth=2.0, reg=1e-2, tol=1e-8, rank=r, backend="torch")
    assert shapes and all(min(s) <= r for s in shapes)
    assert len(products) >= info["iterations"]


def test_multiple_right_hand_sides_equal_separate_solves():
    X, Y = clustered(200, 4, 5, seed=7)
    Y[:, 2] = 0.0
    common = dict(kernel="laplace", bandwidth=2.0, reg=1e-2, tol=1e-10, rank=50, backend="torch")
    alpha, info = nystrom_pcg(X, Y, **common)
    assert torch.all(alpha[:, 2] == 0)
    for j in (0, 4):
        single, _ = nystrom_pcg(X, Y[:, j], **common)
        assert single.shape == (200,)
        assert rel_fro(alpha[:, j], single) <= 1e-8


def test_seeded_and_numpy_in_numpy_out():
    X, Y = clustered(150, 4, 2, seed=8)
    common = dict(kernel="gaussian", bandwidth=1.0, reg=1e-2, tol=1e-9, rank=30, backend="torch", seed=5)
    a1, _ = nystrom_pcg(X.numpy(), Y.numpy(), **common)
    a2, _ = nystrom_pcg(X.numpy(), Y.numpy(), **common)
    assert isinstance(a1, np.ndarray) and np.array_equal(a1, a2)


def test_non_convergence_raises_with_iterations_and_residual():
    X, Y = clustered(300, 6, 2, seed=9)
    with pytest.raises(ConvergenceError) as excinfo:
        nystrom_pcg(X, Y, kernel="gaussian", bandwidth=1.0, reg=1e-6, tol=1e-12, max_iter=3, rank=10,
                    backend="torch")
    assert excinfo.value.iterations == 3 and excinfo.value.residual > 1e-12
    alpha, info = nystrom_pcg(X, Y, kernel="gaussian", bandwidth=1.0, reg=1e-6, tol=1e-12, max_iter=3, rank=10,
                              backend="torch", raise_on_failure=False)
    assert not info["converged"] and info["iterations"] == 3 and alpha.shape == Y.shape


def test_progress_bar_shows_the_residual(capsys):
    X, Y = clustered(100, 3, 1, seed=10)
    nystrom_pcg(X, Y, kernel="laplace", bandwidth=2.0, reg=1e-2, tol=1e-8, rank=20, backend="torch",
                progress=True)
    assert "Nystrom-PCG" in capsys.readouterr().err


def test_edge_sizes_and_argument_errors():
    X, Y = clustered(1, 3, 2, seed=11)
    alpha, info = nystrom_pcg(X, Y, kernel="laplace", bandwidth=1.0, reg=0.5, tol=1e-12, backend="torch")
    assert torch.allclose(alpha, Y / 1.5, rtol=1e-12) and info["rank"] == 1
    X, Y = clustered(50, 3, 2, seed=12)
    with pytest.raises(ValueError, match="reg"):
        nystrom_pcg(X, Y, reg=-1.0)
    with pytest.raises(ValueError, match="rank"):
        nystrom_pcg(X, Y, rank=0)
    with pytest.raises(ValueError, match="Y"):
        nystrom_pcg(X, Y[:10])
    with pytest.raises(TypeError, match="float32 or float64"):
        nystrom_pcg(X.int(), Y)
    assert default_rank(10) == 10 and default_rank(50_000) == 1000 and default_rank(10**7) == 100


def test_krr_solve_auto_picks_pcg_past_the_memory_budget():
    X, Y = clustered(600, 5, 2, seed=13, dtype=torch.float32)
    # 2 n^2 float32 = 2.9 MB > 1 MiB budget: "auto" must take the preconditioned path, never an n x n matrix.
    alpha, info = krr_solve(X, Y, kernel="laplace", bandwidth=2.0, reg=1e-2, memory_budget="1MB", return_info=True)
    assert info["solver"] == "pcg" and info["converged"]
    _, K = dense_solve(X, Y, "laplace", 2.0, None, 1e-2)
    assert true_residual(K, alpha, Y, 1e-2) <= 1e-4
