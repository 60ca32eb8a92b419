"""backend="keops" against the float64 naive reference (kernel_mv, kernel_grad, agop; kernel_matrix routed to torch).

Every KeOps formula compiles once per (formula, dtype, d, c), ~5-10 s each on first use (then cached under
$KEOPS_CACHE_FOLDER, see conftest.py). Both kernels and all M forms share one formula per op, and m, n are free,
so the tests vary data, sizes, kernels and metrics freely but use only two (d, c) pairs: (3, 2) and (17, 1), the
latter through a 1-D alpha. float32 with a metric uses the compensated variant of each formula. Total:
2 formulas x 2 (d, c) x (2 dtypes + the compensated float32) = 12 compiles.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("pykeops")

import rfm_fast  # noqa: E402
from rfm_fast._dispatch import REGISTRY, choose, explain  # noqa: E402
from rfm_fast._validation import prepare  # noqa: E402

from .test_ops import KERNELS, M_FORMS, make_data, make_metric, reference  # noqa: E402
from .tolerances import REL_FRO, rel_fro  # noqa: E402

DTYPES = (torch.float32, torch.float64)
OPS = ("kernel_mv", "kernel_grad", "agop")
SIZES = [  # (m, n, d, c); c = 1 runs with a 1-D alpha
    (1, 1, 3, 2),
    (37, 129, 3, 2),
    (129, 37, 17, 1),
    (37, 1000, 17, 1),
]


def _inputs(size, form, dtype, seed):
    m, n, d, c = size
    gen = torch.Generator().manual_seed(seed)
    Z, X, alpha = make_data(m, n, d, c, gen)
    M = make_metric(form, d, gen)
    if c == 1:
        alpha = alpha[:, 0]
    cast = (lambda t: None if t is None else t.to(dtype))
    return cast(Z), cast(X), cast(alpha), cast(M)


def _run(op, Z, X, alpha, M, kernel, bandwidth, backend, **kw):
    return getattr(rfm_fast, op)(Z, X, alpha, kernel=kernel, bandwidth=bandwidth, M=M, backend=backend, **kw)


def _ref(op, Z, X, alpha, M, kernel, bandwidth, **kw):
    a = alpha if alpha.ndim == 2 else alpha[:, None]
    out = reference(op, Z, X, a, M, kernel, bandwidth, **kw)
    return out[:, 0] if alpha.ndim == 1 and op != "agop" else out


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("form", M_FORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_against_reference(op, kernel, form, dtype, size):
    """Self pairs (evaluation points equal to centres) and duplicated centres are in every data set."""
    Z, X, alpha, M = _inputs(size, form, dtype, seed=11)
    bandwidth = 1.7
    out = _run(op, Z, X, alpha, M, kernel, bandwidth, "keops")
    ref = _ref(op, Z, X, alpha, M, kernel, bandwidth)
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    assert rel_fro(out, ref) <= REL_FRO[dtype]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("form", M_FORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("centered,diag", [(True, False), (False, True), (True, True)])
def test_agop_options(kernel, form, dtype, centered, diag):
    Z, X, alpha, M = _inputs((129, 37, 3, 2), form, dtype, seed=5)
    out = _run("agop", Z, X, alpha, M, kernel, 0.9, "keops", centered=centered, diag=diag)
    ref = _ref("agop", Z, X, alpha, M, kernel, 0.9, centered=centered, diag=diag)
    assert out.shape == ref.shape
    assert rel_fro(out, ref) <= REL_FRO[dtype]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("form", M_FORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_x_is_centers_with_duplicates(kernel, form, dtype):
    """agop(X, X, ...): every point is a centre, some twice; the Laplace self terms must vanish exactly."""
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(300, 17, generator=gen, dtype=torch.float64)
    X[100:150] = X[:50]
    alpha = torch.randn(300, generator=gen, dtype=torch.float64)
    M = make_metric(form, 17, gen)
    X, alpha = X.to(dtype), alpha.to(dtype)
    M = None if M is None else M.to(dtype)
    for op in OPS:
        out = _run(op, X, X, alpha, M, kernel, 2.5, "keops")
        ref = _ref(op, X, X, alpha, M, kernel, 2.5)
        assert rel_fro(out, ref) <= REL_FRO[dtype], op


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("form", ["diag", "dense"])
def test_near_pairs_with_a_metric_fp32(kernel, form):
    """Evaluation points 1e-4 away from centres, float32, with a metric: the transformed points carry float32 low
    parts so z' - x' keeps its digits (rounding z S and x S apart cost 5e-5 relative here before)."""
    gen = torch.Generator().manual_seed(8)
    X = torch.randn(400, 17, generator=gen, dtype=torch.float64)
    Z = X[:120] + 1e-4 * torch.randn(120, 17, generator=gen, dtype=torch.float64)
    alpha = torch.randn(400, generator=gen, dtype=torch.float64)
    M = make_metric(form, 17, gen)
    Z, X, alpha, M = (t.to(torch.float32) for t in (Z, X, alpha, M))
    for op in OPS:
        out = _run(op, Z, X, alpha, M, kernel, 1.5, "keops")
        ref = _ref(op, Z, X, alpha, M, kernel, 1.5)
        assert rel_fro(out, ref) <= REL_FRO[torch.float32], op


def test_laplace_gradient_zero_at_a_single_centre():
    """One centre, evaluated at itself: distance 0, so J = 0 exactly and never NaN (KeOps' Rsqrt(0) = 0)."""
    x = torch.randn(1, 3, generator=torch.Generator().manual_seed(0))
    alpha = torch.ones(1, 2)
    J = rfm_fast.kernel_grad(x, x, alpha, kernel="laplace", bandwidth=1.0, backend="keops")
    assert torch.equal(J, torch.zeros(1, 2, 3))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_numpy_and_non_contiguous_inputs(dtype):
    gen = torch.Generator().manual_seed(8)
    big = torch.randn(80, 34, generator=gen, dtype=torch.float64).to(dtype)
    Z = big[::2, ::2]  # (40, 17), strided
    X = big[1::2, 1::2]
    X[5] = Z[7]
    alpha = torch.randn(40, 3, generator=gen, dtype=torch.float64).to(dtype)[:, 1]
    M = make_metric("dense", 17, gen).to(dtype)
    for op in OPS:
        ref = _ref(op, Z, X, alpha, M, "laplace", 1.3)
        out = _run(op, Z, X, alpha, M, "laplace", 1.3, "keops")
        assert rel_fro(out, ref) <= REL_FRO[dtype], op
        out_np = _run(op, Z.numpy(), X.numpy(), alpha.numpy(), M.numpy(), "laplace", 1.3, "keops")
        assert isinstance(out_np, np.ndarray)
        assert rel_fro(torch.from_numpy(out_np), ref) <= REL_FRO[dtype], op


def test_agop_blocks_under_a_small_budget():
    """A 1 MiB budget splits the 1000 evaluation points into blocks; the result must not change."""
    Z, X, alpha, M = _inputs((1000, 37, 17, 1), "diag", torch.float64, seed=2)
    whole = _run("agop", Z, X, alpha, M, "gaussian", 1.1, "keops", centered=True)
    blocked = rfm_fast.agop(Z, X, alpha, kernel="gaussian", bandwidth=1.1, M=M, centered=True, backend="keops",
                            memory_budget=2**20)
    ref = _ref("agop", Z, X, alpha, M, "gaussian", 1.1, centered=True)
    assert rel_fro(blocked, ref) <= REL_FRO[torch.float64]
    assert rel_fro(blocked, whole) <= REL_FRO[torch.float64]


def test_empty_evaluation_set():
    X = torch.randn(5, 3)
    alpha = torch.randn(5, 2)
    assert rfm_fast.kernel_mv(torch.zeros(0, 3), X, alpha, backend="keops").shape == (0, 2)
    assert rfm_fast.kernel_grad(torch.zeros(0, 3), X, alpha, backend="keops").shape == (0, 2, 3)


@pytest.mark.parametrize("form", M_FORMS)
def test_kernel_matrix_is_routed_to_the_automatic_choice(form):
    """KeOps does not implement kernel_matrix (its output is the m x n matrix itself): backend="keops" routes it to
    the backend auto picks, and says so."""
    Z, X, _, M = _inputs((37, 129, 3, 2), form, torch.float32, seed=4)
    out = rfm_fast.kernel_matrix(Z, X, kernel="laplace", bandwidth=1.5, M=M, backend="keops")
    auto_out = rfm_fast.kernel_matrix(Z, X, kernel="laplace", bandwidth=1.5, M=M, backend="auto")
    assert torch.equal(out, auto_out)
    problem = prepare(Z, X, None, M, "laplace", 1.5, need_alpha=False)
    chosen, why = explain("kernel_matrix", problem, "keops")
    assert chosen.name != "keops" and "does not implement kernel_matrix" in why


def test_dispatch():
    problem = prepare(torch.zeros(4, 3), torch.zeros(5, 3), torch.zeros(5, 2), None, "laplace", 1.0,
                      need_alpha=True)
    keops = REGISTRY["keops"]
    assert keops.reason("agop", problem) is None
    # Measured: on CPU the torch path wins everywhere (benchmarks/results/keops_crossover.csv).
    assert keops.declines("agop", problem) is not None
    assert choose("agop", problem, "auto").name != "keops"
    assert choose("agop", problem, "keops").name == "keops"
    half = prepare(torch.zeros(4, 3, dtype=torch.float16), torch.zeros(5, 3, dtype=torch.float16),
                   torch.zeros(5, 2), None, "laplace", 1.0, need_alpha=True, allow_half=True)
    with pytest.raises(RuntimeError, match="float32 and float64"):
        choose("agop", half, "keops")


def test_import_is_light_and_cache_is_honoured(tmp_path):
    """import rfm_fast imports no pykeops; the first KeOps call builds under $KEOPS_CACHE_FOLDER."""
    code = (
        "import sys, rfm_fast\n"
        "assert 'pykeops' not in sys.modules and 'keopscore' not in sys.modules\n"
        "from rfm_fast.backends import keops\n"
        "assert 'pykeops' not in sys.modules\n"
        "import pykeops, os\n"
        "print(pykeops.get_build_folder())\n"
    )
    env = {"KEOPS_CACHE_FOLDER": str(tmp_path / "kc"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith(str(tmp_path / "kc"))
