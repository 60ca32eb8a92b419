"""The compiled backends ("cpp" on CPU tensors, "cuda" on CUDA tensors) against the float64 naive reference.

Skipped when the extension is not built (build: RFM_FAST_BUILD_EXT=1 pip install --no-build-isolation -e .; on a
box without pip, set RFM_FAST_EXT_JIT=1 and the module builds it once with rfm_fast._ext.build_inplace()). The
CUDA cases run only where torch sees a GPU and the extension has its CUDA kernels. The missing-extension error is
tested whether or not the extension is built.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch

import rfm_fast
from rfm_fast import _dispatch, _ext
from rfm_fast._validation import prepare

from .test_ops import KERNELS, M_FORMS, call, make_data, make_metric, make_spread_data, reference
from .tolerances import REL_FRO, rel_fro

if os.environ.get("RFM_FAST_EXT_JIT") == "1" and _ext.unavailable_reason() is not None:
    _ext._state.update(loaded=False, error=None)
    _ext.build_inplace(verbose=False)

EXT_REASON = _ext.unavailable_reason()
needs_ext = pytest.mark.skipif(EXT_REASON is not None, reason=str(EXT_REASON))
DEVICES = ["cpu"]
if EXT_REASON is None and torch.cuda.is_available() and _ext.has_cuda_kernels():
    DEVICES.append("cuda")
BACKEND = {"cpu": "cpp", "cuda": "cuda"}
DTYPES = (torch.float32, torch.float64)
OPS = ("kernel_matrix", "kernel_mv", "kernel_grad", "agop")
SIZES = [  # (m, n, d, c): a single pair, direct small-d path, awkward tile remainders, wide d
    (1, 1, 1, 1),
    (50, 60, 3, 2),
    (37, 129, 17, 3),
    (129, 37, 64, 2),
    (37, 129, 257, 2),
]


def _on(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


def _seed(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("form", M_FORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_reference(device, op, kernel, form, dtype, size):
    if device == "cuda" and op == "kernel_matrix":
        pytest.skip("the cuda backend routes kernel_matrix to the automatic choice")
    m, n, d, c = size
    Z, X, alpha = make_data(m, n, d, c, _seed(op, kernel, form, size))
    M = make_metric(form, d, _seed(form, d))
    bandwidth = 0.7 * d**0.5 + 0.3
    Zt, Xt, at, Mt = (None if t is None else t.to(dtype) for t in (Z, X, alpha, M))
    out = call(op, *_on(device, Zt, Xt, at, Mt), kernel, bandwidth, backend=BACKEND[device])
    ref = reference(op, Zt, Xt, at, Mt, kernel, bandwidth)
    assert out.dtype == dtype and out.device.type == device and out.shape == ref.shape
    assert torch.isfinite(out).all()
    assert rel_fro(out, ref) <= REL_FRO[dtype]


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("form", M_FORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("centered,diag", [(False, False), (True, False), (False, True), (True, True)])
def test_agop_options_x_is_centers(device, kernel, form, dtype, centered, diag):
    gen = _seed("options", kernel, form)
    n, d, c = 300, 24, 5
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    X[10:20] = X[:10]  # duplicated centres: self pairs and duplicate pairs at distance 0
    alpha = torch.randn(n, c, generator=gen, dtype=torch.float64)
    M = make_metric(form, d, gen)
    Xt, at, Mt = X.to(dtype), alpha.to(dtype), None if M is None else M.to(dtype)
    Xd, ad, Md = _on(device, Xt, at, Mt)
    out = rfm_fast.agop(Xd, Xd, ad, kernel=kernel, bandwidth=3.0, M=Md, centered=centered, diag=diag,
                        backend=BACKEND[device])
    ref = reference("agop", Xt, Xt, at, Mt, kernel, 3.0, centered=centered, diag=diag)
    assert out.shape == ((d,) if diag else (d, d))
    assert rel_fro(out, ref) <= REL_FRO[dtype]
    if not diag:
        assert torch.equal(out, out.T)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS[1:])
def test_one_dimensional_alpha(device, op):
    gen = _seed("alpha1d", op)
    Z, X, alpha = make_data(40, 70, 9, 1, gen)
    a1 = alpha[:, 0]
    out = call(op, *_on(device, Z, X, a1), None, "laplace", 2.0, backend=BACKEND[device])
    ref = reference(op, Z, X, alpha, None, "laplace", 2.0)
    if op != "agop":
        ref = ref[:, 0]
    assert out.shape == ref.shape
    assert rel_fro(out, ref) <= REL_FRO[torch.float64]


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("op", OPS)
def test_small_budget_tiles_and_streamed_coefficients(device, kernel, op):
    """A 1 MiB budget forces many tiles and per-tile alpha (x) x: same answer as the default plan."""
    gen = _seed("budget", kernel, op)
    Z, X, alpha = make_data(300, 2500, 40, 7, gen)
    Zd, Xd, ad = _on(device, Z, X, alpha)
    big = call(op, Zd, Xd, ad, None, kernel, 4.0, backend=BACKEND[device])
    small = call(op, Zd, Xd, ad, None, kernel, 4.0, backend=BACKEND[device], memory_budget="1MB")
    assert rel_fro(small, big) <= 1e-12
    assert rel_fro(small, reference(op, Z, X, alpha, None, kernel, 4.0)) <= REL_FRO[torch.float64]


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and the extension's CUDA kernels")
@pytest.mark.parametrize("tile_rows", [1, 7, 64, 1000])
def test_cuda_raw_ops_any_tile_rows(tile_rows):
    """The raw CUDA ops on the core's arrays, with row chunks that leave remainders, against the torch path."""
    from rfm_fast.backends.cuda.ops import _Arrays

    gen = _seed("raw", tile_rows)
    Z, X, alpha = make_data(45, 101, 11, 3, gen)
    M = make_metric("dense", 11, gen)
    Zd, Xd, ad, Md = _on("cuda", Z, X, alpha, M)
    problem = prepare(Zd, Xd, ad, Md, "laplace", 1.5, need_alpha=True)
    arrays = _Arrays(problem)
    f = torch.ops.rfm_fast.kernel_mv(*arrays.args(slice(None), ad), tile_rows)
    assert rel_fro(f, reference("kernel_mv", Z, X, alpha, M, "laplace", 1.5)) <= REL_FRO[torch.float64]
    acc = torch.ops.rfm_fast.kernel_grad(*arrays.args(slice(None), ad), tile_rows)
    assert acc.shape == (45, 3 * (1 + arrays.geom.r))


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("form", M_FORMS)
def test_near_duplicates_and_offset_data_fp32(device, kernel, op, form):
    """Points a hair away from centres, data far from the origin: the exact near-field recheck keeps ~1e-5."""
    gen = _seed("near", kernel, op, form)
    n, d = 400, 32
    X = torch.randn(n, d, generator=gen, dtype=torch.float64) + 20.0
    Z = torch.cat([X[:150] + 1e-4 * torch.randn(150, d, generator=gen, dtype=torch.float64), X[150:200]])
    alpha = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    M = make_metric(form, d, gen)
    Z32, X32, a32, M32 = (None if t is None else t.float() for t in (Z, X, alpha, M))
    out = call(op, *_on(device, Z32, X32, a32, M32), kernel, 2.0, backend=BACKEND[device])
    ref = reference(op, Z32, X32, a32, M32, kernel, 2.0)
    assert rel_fro(out, ref) <= REL_FRO[torch.float32]


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs_and_determinism(device):
    gen = _seed("strided")
    Z, X, alpha = make_data(90, 160, 20, 4, gen)
    Zs = torch.cat([Z, Z], dim=1).float()[:, ::2]  # every other column: not contiguous
    Xs, a = X.float().T.contiguous().T, alpha.float()  # column-major
    assert not Zs.is_contiguous() and not Xs.is_contiguous()
    Zs, Xs, a = _on(device, Zs, Xs, a)
    first = rfm_fast.agop(Zs, Xs, a, backend=BACKEND[device], centered=True)
    again = rfm_fast.agop(Zs, Xs, a, backend=BACKEND[device], centered=True)
    assert torch.equal(first, again)
    ref = reference("agop", Zs.cpu(), Xs.cpu(), a.cpu(), None, "laplace", 1.0, centered=True)
    assert rel_fro(first, ref) <= REL_FRO[torch.float32]


@needs_ext
def test_auto_follows_the_measured_cpp_torch_table():
    # benchmarks/results/cpp_vs_torch.csv: cpp faster than the torch path in every measured case
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(20, 8, dtype=dtype)
        problem = prepare(x, x, torch.randn(20, 2, dtype=dtype), None, "laplace", 1.0, need_alpha=True)
        for op in ("kernel_matrix", "kernel_mv", "kernel_grad", "agop"):
            assert _dispatch.choose(op, problem, "auto").name == "cpp"
            assert _dispatch.choose(op, problem, "torch").name == "torch"
    x = torch.randn(20, 8)
    assert torch.allclose(rfm_fast.kernel_matrix(x, x, backend="cpp"), rfm_fast.kernel_matrix(x, x, backend="torch"),
                          rtol=1e-6, atol=0)


def test_cuda_backend_refuses_cpu_tensors():
    x = torch.randn(10, 3)
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        rfm_fast.agop(x, x, torch.randn(10), backend="cuda")


def test_explicit_request_without_the_extension_raises_the_build_hint(monkeypatch):
    """Simulate an installation without rfm_fast._C: backend="cpp" raises one actionable error, auto falls back."""
    real_import = _ext.importlib.import_module

    def fake_import(name, *args, **kwargs):
        if name == "rfm_fast._C":
            raise ModuleNotFoundError("No module named 'rfm_fast._C'", name="rfm_fast._C")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(_ext.importlib, "import_module", fake_import)
    monkeypatch.setattr(_ext, "_ops_registered", lambda: False)
    monkeypatch.setattr(_ext, "_state", {"loaded": False, "error": None})
    x = torch.randn(12, 5)
    alpha = torch.randn(12, 2)
    with pytest.raises(RuntimeError, match=r"RFM_FAST_BUILD_EXT=1 pip install --no-build-isolation -e \.") as err:
        rfm_fast.agop(x, x, alpha, backend="cpp")
    assert "backend='cpp'" in str(err.value) and "not built" in str(err.value)
    problem = prepare(x, x, alpha, None, "laplace", 1.0, need_alpha=True)
    assert _dispatch.choose("agop", problem, "auto").name != "cpp"
    with pytest.raises(RuntimeError, match="not built"):
        _ext.load()


@needs_ext
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("form", M_FORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op,options", [("agop", {}), ("agop", {"centered": True}), ("kernel_grad", {}),
                                        ("kernel_mv", {}), ("kernel_matrix", {})],
                         ids=["agop", "centred", "grad", "mv", "matrix"])
def test_cpp_symmetric_schedule_with_the_compiled_pass(monkeypatch, kernel, form, dtype, op, options):
    """op(x, x) on the cpp backend runs the core's symmetric schedule with the compiled pass (tile_pass_): small
    blocks make mirrored tiles; duplicates and a near pair sit in different blocks."""
    from rfm_fast.core import plan as planner

    monkeypatch.setitem(planner.SYMMETRIC_BLOCK, "cpu", 64)
    calls = []
    original = torch.ops.rfm_fast.tile_pass_

    class Spy:
        def __call__(self, *args):
            calls.append(args[0].shape)
            return original(*args)

    monkeypatch.setattr(torch.ops.rfm_fast, "tile_pass_", Spy())
    X, alpha, M = make_spread_data(300, 21, 3, form, dtype, _seed("sym", kernel, form, str(dtype), op, options))
    out = call(op, X, X, alpha, M, kernel, 2.0, backend="cpp", **options)
    assert calls, "the compiled tile_pass_ was not used"
    ref = reference(op, X, X, alpha, M, kernel, 2.0, **options)
    assert rel_fro(out, ref) <= REL_FRO[dtype]


@needs_ext
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gradient", [False, True], ids=["values", "weights"])
def test_tile_pass_matches_the_torch_pass(kernel, dtype, gradient):
    """The compiled one-pass op against the torch pass on a strided strip: near pairs listed (the same ones),
    zeroed in a weight tile, and every other entry the same value."""
    from rfm_fast.core.kernels import KernelSpec
    from rfm_fast.core.tiles import TorchPass

    spec = KernelSpec(kernel, 1.0)
    gen = _seed("pass", kernel, str(dtype), gradient)
    R, C = 37, 130
    s = (torch.rand(R, C + 9, generator=gen, dtype=torch.float64) * 30 + 0.5).to(dtype)  # far from the bounds
    s[3, 5] = 0.0
    s[7, 11] = 1e-9
    s[8, 12] = -1e-7  # rounding below zero
    bz = torch.full((R,), 1e-6, dtype=dtype)
    bx = torch.full((C,), 1e-6, dtype=dtype)
    tile = (spec.tile_sign * s)[:, :C]
    expected = tile.clone()
    near = torch.ops.rfm_fast.tile_pass_(tile, bz, bx, spec.tile_sign, spec.laplace, gradient)
    near_torch = TorchPass()(expected, bz, bx, spec, gradient)
    assert sorted(map(tuple, near.tolist())) == sorted(map(tuple, near_torch.tolist())) == [(3, 5), (7, 11), (8, 12)]
    keep = torch.ones(R, C, dtype=torch.bool)
    keep[near[:, 0], near[:, 1]] = False
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    assert torch.allclose(tile[keep], expected[keep], rtol=tol, atol=0)
    if gradient:
        assert torch.all(tile[~keep] == 0)


@needs_ext
@pytest.mark.parametrize("gradient", [False, True])
def test_compiled_pass_is_the_same_on_any_thread_count(gradient):
    """The compiled pass splits a tile's rows over torch's threads (the extension is built with OpenMP, or
    ATen's parallel_for would run it on one): the same values and the same near pairs on 1 and 2 threads."""
    gen = _seed("threads", gradient)
    tile = torch.rand(300, 700, generator=gen) * 4
    tile[::7, ::11] = 1e-9  # near entries scattered over every row block
    bz, bx = torch.full((300,), 1e-6), torch.full((700,), 1e-6)
    saved = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = tile.clone()
            near = torch.ops.rfm_fast.tile_pass_(out, bz, bx, 1.0, True, gradient)
            results.append((out, near[torch.argsort(near[:, 0] * 700 + near[:, 1])]))
    finally:
        torch.set_num_threads(saved)
    (a, na), (b, nb) = results
    assert torch.equal(a, b) and torch.equal(na, nb) and na.shape[0] == 43 * 64


@needs_ext
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("threads", [1, 2])
def test_tile_pass_sums_the_direct_part_for_one_output(kernel, k, threads):
    """tile_pass_ with alpha and accumulators (one output) sums ((W o D_q) alpha)_j into the rows' (k, R) sums and,
    mirrored, subtracts ((W o D_q)^T alpha)_i from the columns' (k, C) sums, instead of writing W o D_q: the same
    numbers as the weighted differences of the dout path multiplied by alpha, on 1 and 2 threads, near entries
    (weight 0) excluded."""
    from rfm_fast.core.kernels import KernelSpec

    spec = KernelSpec(kernel, 1.0)
    gen = _seed("sums", kernel, k, threads)
    R, C = 150, 333
    zh = torch.randn(R, k, generator=gen, dtype=torch.float64)
    xh = torch.randn(k, C, generator=gen, dtype=torch.float64)
    s = torch.rand(R, C, generator=gen, dtype=torch.float64) * 3 + 0.1
    s[::13, ::17] = -1e-9  # pushed below the bound below: near
    bz, bx = torch.full((R,), 1e-12, dtype=torch.float64), torch.full((C,), 1e-12, dtype=torch.float64)
    bz[::13] = 1.0  # rows with near entries: s + sum dhi^2 <= 1 somewhere
    a_cols = torch.randn(C, generator=gen, dtype=torch.float64)
    a_rows = torch.randn(R, generator=gen, dtype=torch.float64)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        t1 = (spec.tile_sign * s).clone()
        dout = torch.empty(k, R, C, dtype=torch.float64)
        n1 = torch.ops.rfm_fast.tile_pass_(t1, bz, bx, spec.tile_sign, spec.laplace, True, zh, xh, dout)
        t2 = (spec.tile_sign * s).clone()
        acc_rows = torch.full((k, R + 5), 0.5, dtype=torch.float64)[:, :R]  # strided planes, added to
        acc_cols = torch.full((k, C), -0.25, dtype=torch.float64)
        n2 = torch.ops.rfm_fast.tile_pass_(t2, bz, bx, spec.tile_sign, spec.laplace, True, zh, xh, None, a_cols,
                                           a_rows, acc_rows, acc_cols)
    finally:
        torch.set_num_threads(saved)
    assert n1.shape[0] > 0 and torch.equal(n1, n2) and torch.equal(t1, t2)
    assert torch.allclose(acc_rows, 0.5 + dout @ a_cols, rtol=1e-12, atol=1e-12)
    assert torch.allclose(acc_cols, -0.25 - torch.einsum("qrc,r->qc", dout, a_rows), rtol=1e-12, atol=1e-12)


@needs_ext
@pytest.mark.parametrize("same", [True, False], ids=["symmetric", "one-sided"])
def test_cpp_gradients_of_one_output_sum_the_direct_part_in_the_pass(monkeypatch, same):
    """Under a one-direction metric with one output the cpp gradient schedules let the pass sum the direct
    coordinate's part (no weighted-difference tiles): the same gradients as the dout path, within float32 of float64."""
    from rfm_fast.core import gradient

    gen = _seed("cpp-sums", same)
    X = torch.randn(400, 10, generator=gen)
    Z = X if same else X[:150] + 1e-3
    v = torch.randn(10, 1, generator=gen, dtype=torch.float64)
    S = torch.cat([v, 1e-4 * torch.randn(10, 9, generator=gen, dtype=torch.float64)], 1).float()
    alpha = torch.randn(400, 1, generator=gen)
    ref = reference("kernel_grad", Z, X, alpha, (S.double() @ S.double().T), "laplace", 2.0)
    used = []
    original = gradient._accumulating
    monkeypatch.setattr(gradient, "_accumulating", lambda *a: used.append(original(*a)) or used[-1])
    fast = call("kernel_grad", Z, X, alpha, None, "laplace", 2.0, backend="cpp", M_factor=S)
    assert used and all(used)
    monkeypatch.setattr(gradient, "_accumulating", lambda *a: False)
    slow = call("kernel_grad", Z, X, alpha, None, "laplace", 2.0, backend="cpp", M_factor=S)
    assert rel_fro(fast, ref) <= REL_FRO[torch.float32] and rel_fro(fast, slow) <= 1e-6
