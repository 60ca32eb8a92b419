"""pytest-benchmark cases for the four ops on the torch path (not part of the default test run).

    python -m pytest benchmarks/bench_ops.py --benchmark-only

Problems come from the same setup function as the speed table (rfm_fast.bench.make_problem), so the two cannot
drift. The table with floors, ratios and memory is `rfm-fast bench`.
"""

import pytest
import torch

import rfm_fast

try:
    import pytest_benchmark  # noqa: F401  (provides the ``benchmark`` fixture)
except ImportError:
    pytestmark = pytest.mark.skip(reason="needs pytest-benchmark: pip install -e '.[bench]'")
from rfm_fast.bench import gemm_floor, make_problem

SIZES = [(2000, 64, 10), (5000, 64, 10), (5000, 256, 1)]


@pytest.fixture(params=SIZES, ids=lambda s: "n{}-d{}-c{}".format(*s))
def problem(request):
    n, d, c = request.param
    X, alpha = make_problem(n, d, c, "float32")
    return X, alpha


@pytest.mark.parametrize("kernel", ["laplace", "gaussian"])
def test_agop(benchmark, problem, kernel):
    X, alpha = problem
    out = benchmark(rfm_fast.agop, X, X, alpha, kernel=kernel, bandwidth=10.0, backend="torch")
    assert torch.isfinite(out).all()


def test_gemm_floor(benchmark, problem):
    X, alpha = problem
    benchmark(gemm_floor(X, alpha.shape[1]))


def test_kernel_mv(benchmark, problem):
    X, alpha = problem
    out = benchmark(rfm_fast.kernel_mv, X, X, alpha, bandwidth=10.0, backend="torch")
    assert out.shape == alpha.shape


def test_kernel_grad(benchmark, problem):
    X, alpha = problem
    out = benchmark(rfm_fast.kernel_grad, X[:1000], X, alpha, bandwidth=10.0, backend="torch")
    assert out.shape == (1000, alpha.shape[1], X.shape[1])
