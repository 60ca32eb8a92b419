"""The kernel core on the data that breaks expanded distances: low-rank and near-rank-1 metrics, offsets, near pairs
at every separation, tight clusters, a cancelling centred AGOP; every backend that runs here against float64.

The reproducers of issue 18 (each failed before the core: NaN, 4e-3 .. 2e-4 errors, a crashing PCG) come first;
then a property sweep, the near-pair band (with the mutation check: a weakened near threshold must fail it), and
the geometry's decisions (rank, direct coordinates, frames).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import rfm_fast
from rfm_fast.core import kernels as core_kernels
from rfm_fast.core.geometry import Geometry
from rfm_fast.core.kernels import KernelSpec
from rfm_fast.core.plan import BudgetError

from .test_ops import KERNELS, call, reference
from .tolerances import REL_FRO, rel_fro

BACKENDS = [b for b in rfm_fast.available_backends("cpu") if b in ("torch", "naive", "cpp", "keops")]
FAST = [b for b in BACKENDS if b != "naive"]
TRITON = "triton" in rfm_fast.available_backends()
OPS = ("kernel_matrix", "kernel_mv", "kernel_grad", "agop")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _check(op, Z, X, alpha, M, kernel, bandwidth, backend, dtype=torch.float32, tol=None, **kw):
    """op in ``dtype`` on ``backend`` against the float64 reference on the same (rounded) inputs."""
    cast = [None if t is None else t.to(dtype) for t in (Z, X, alpha, M)]
    if Z is X:
        cast[0] = cast[1]
    out = call(op, *cast, kernel, bandwidth, backend=backend, **kw)
    ref = reference(op, *cast, kernel, bandwidth, **kw)
    assert torch.isfinite(torch.as_tensor(out)).all(), f"{op} on {backend}: non-finite output"
    err = rel_fro(out, ref)
    assert err <= (tol or REL_FRO[dtype]), f"{op} on {backend}: relative error {err:.3g}"
    return err


# ---- issue 18 reproducers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["kernel_matrix", "kernel_mv"])
def test_rank_deficient_metric_never_gives_nan(backend, op):
    """A rank-1 M with two points 1e-3 apart along its null space: (z - x)^T M (z - x) rounds below zero; it
    used to reach sqrt and give NaN (defect 1)."""
    rng = np.random.default_rng(3)
    d = 16
    v = rng.normal(size=d)
    M = np.outer(v, v)
    u = rng.normal(size=d)
    u -= (u @ v) / (v @ v) * v
    X = rng.normal(size=(8, d))
    X[1] = X[0] + 1e-3 * u
    args = (X, X) if op == "kernel_matrix" else (X, X, np.ones((8, 2)))
    out = getattr(rfm_fast, op)(*args, kernel="laplace", bandwidth=1.0, M=M, backend=backend)
    assert np.isfinite(out).all()
    if op == "kernel_matrix":
        assert out[0, 1] == pytest.approx(1.0, abs=1e-9)  # no distance along M's range, to rounding


def test_rfm_fits_a_one_direction_regression_with_its_near_rank_one_metric():
    """The plain model at its defaults, on a target that depends on one direction: its learned M becomes near
    rank 1 within a few iterations; the fit used to stop with NaN in the kernel matrix (defect 1)."""
    from rfm_fast import RFM

    rng = np.random.default_rng(0)
    X = rng.normal(size=(800, 20)).astype(np.float32)
    w = rng.normal(size=20)
    w /= np.linalg.norm(w)
    y = np.tanh(3 * X @ w).astype(np.float32)
    model = RFM(kernel="laplace", bandwidth=10.0, reg=1e-3, iters=8, task="regression", random_state=0).fit(X, y)
    M = model.M_.double()
    assert torch.isfinite(M).all()
    evals = torch.linalg.eigvalsh(M)
    assert float(evals[-2] / evals[-1]) < 1e-3  # near rank 1 indeed
    top = torch.linalg.eigh(M).eigenvectors[:, -1].numpy()
    assert abs(top @ w) > 0.99
    assert model.history_[-1]["train_score"] > 0.99


@pytest.mark.parametrize("backend", BACKENDS)
def test_centered_agop_does_not_cancel_at_a_large_bandwidth(backend):
    """Gradients that vary little across points: E[J^T J] - mu^T mu lost 5e-3 in float32 (defect 2)."""
    gen = _gen(0)
    X = torch.randn(400, 16, generator=gen, dtype=torch.float64)
    alpha = torch.randn(400, 3, generator=gen, dtype=torch.float64)
    alpha -= alpha.mean(0)
    _check("agop", X, X, alpha, None, "gaussian", 30.0, backend, centered=True)
    _check("agop", X[:100] + 0.01, X, alpha, None, "laplace", 30.0, backend, centered=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["kernel_matrix", "agop"])
def test_common_offset_is_removed_before_the_metric(backend, op):
    """Data at 1e3 from the origin with spread 1 and a dense M: transforming before centring cost 2e-3 (defect
    3a)."""
    gen = _gen(1)
    X = torch.randn(300, 64, generator=gen, dtype=torch.float64) + 1e3
    alpha = torch.randn(300, 3, generator=gen, dtype=torch.float64)
    B = torch.randn(64, 64, generator=gen, dtype=torch.float64)
    M = B @ B.T / 64 + 0.05 * torch.eye(64, dtype=torch.float64)
    _check(op, X, X, alpha, M, "laplace", 1.0, backend)


@pytest.mark.parametrize("backend", BACKENDS + (["triton"] if TRITON else []))
@pytest.mark.parametrize("op", ["kernel_mv", "agop"])
def test_tight_clusters_far_apart(backend, op):
    """Two clusters at +-12 per coordinate, d = 64, Gaussian L = sqrt(2 d) / 2: pairs inside a cluster sit just
    above the near threshold about the global centre and carried 1.6e-4 (defect 3b); about their cluster's own
    centre they are exact to float32."""
    gen = _gen(2)
    d, n = 64, 400 if backend != "triton" else 160
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    X[: n // 2] += 12.0
    X[n // 2:] -= 12.0
    alpha = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    _check(op, X, X, alpha, None, "gaussian", math.sqrt(2 * d) / 2, backend)


def test_pcg_solves_a_benign_gaussian_system():
    """Nystrom cut-offs at 1e-12 / 1e-10 left U^T U indefinite and Cholesky raised a raw LinAlgError (defect 4)."""
    X = np.random.default_rng(0).normal(size=(300, 8))
    Y = np.random.default_rng(0).normal(size=(300, 2))
    alpha, info = rfm_fast.krr_solve(X, Y, kernel="gaussian", bandwidth=20.0, reg=1e-2, solver="pcg",
                                     return_info=True)
    ref = rfm_fast.krr_solve(X, Y, kernel="gaussian", bandwidth=20.0, reg=1e-2, solver="cholesky")
    assert info["converged"]
    assert np.abs(alpha - ref).max() <= 1e-6 * np.abs(ref).max()


def test_numpy_with_negative_strides_and_array_likes():
    X = np.random.default_rng(0).normal(size=(30, 4))
    K = rfm_fast.kernel_matrix(X[::-1], X[::-1].copy(), bandwidth=2.0)
    np.testing.assert_allclose(K, rfm_fast.kernel_matrix(X[::-1].copy(), X[::-1].copy(), bandwidth=2.0))
    listed = rfm_fast.kernel_mv(X.tolist(), X.tolist(), [1.0] * 30, bandwidth=2.0)
    assert listed.dtype == np.float32 and listed.shape == (30,)
    ints = rfm_fast.kernel_matrix(np.arange(12).reshape(6, 2), np.arange(12).reshape(6, 2), bandwidth=3.0)
    assert ints.dtype == np.float32 and np.allclose(np.diag(ints), 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_bandwidths(backend):
    """float32 at L = 1e-3 on data of that spread (the raw Gram used to fall into subnormals), and L = 1e-20:
    on unit data float32 cannot square the scaled coordinates, and on data of that spread the AGOP itself
    (~1/L^2 = 1e40) is beyond float32: clear errors naming the bandwidth, never NaN (defect 5)."""
    gen = _gen(3)
    X = torch.randn(200, 8, generator=gen, dtype=torch.float64) * 1e-3
    alpha = torch.randn(200, 2, generator=gen, dtype=torch.float64)
    _check("agop", X, X, alpha, None, "laplace", 1e-3, backend)
    _check("kernel_grad", X[:50] + 1e-4, X, alpha, None, "gaussian", 1e-3, backend)
    if backend == "naive":
        return
    Y = torch.randn(50, 4, generator=gen)
    with pytest.raises(ValueError, match="bandwidth"):
        rfm_fast.agop(Y, Y, torch.randn(50, 2), bandwidth=1e-20, backend=backend)
    tiny = Y * 1e-20
    f = rfm_fast.kernel_mv(tiny, tiny, torch.randn(50, 2, generator=gen), bandwidth=1e-20, backend=backend)
    assert torch.isfinite(f).all()
    with pytest.raises(ValueError, match="overflows"):
        rfm_fast.agop(tiny, tiny, torch.randn(50, 2, generator=gen), bandwidth=1e-20, backend=backend)
    assert torch.isfinite(rfm_fast.agop(tiny.double(), tiny.double(), torch.randn(50, 2, generator=gen).double(),
                                        bandwidth=1e-20, backend=backend)).all()


# ---- a property sweep against explicit differences ----------------------------------------------------------

def _metric_of_rank(rank, d, gen):
    if rank is None:
        return None
    B = torch.randn(d, rank, generator=gen, dtype=torch.float64)
    return B @ B.T / rank


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("offset,separation", [(0.0, 0.0), (1e3, 0.0), (0.0, 30.0), (1e3, 1e-2)])
@pytest.mark.parametrize("bandwidth", [0.5, 5.0])
@pytest.mark.parametrize("rank", [None, 1, 3, 12])
def test_property_sweep(backend, offset, separation, bandwidth, rank):
    """Offsets from the origin, pairs of clusters at a separation (30: far apart; 1e-2: two tight clouds almost
    on top of each other), bandwidths and metric ranks, with self pairs and near-duplicates: every op within the
    float32 tolerance of float64 computed from explicit differences (the naive reference)."""
    gen = _gen(hash_seed(backend, offset, separation, bandwidth, rank))
    d, n, c = 12, 160, 3
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    if separation:
        X[: n // 2] *= 1e-3
        X[n // 2:] = 1e-3 * X[n // 2:] + separation
    X += offset
    X[5] = X[0]
    X[6] = X[1] + 1e-5 * torch.randn(d, generator=gen, dtype=torch.float64)
    Z = torch.cat([X[:40] + 1e-4 * torch.randn(40, d, generator=gen, dtype=torch.float64), X[40:60]])
    alpha = torch.randn(n, c, generator=gen, dtype=torch.float64)
    M = _metric_of_rank(rank, d, gen)
    for op in OPS:
        _check(op, Z, X, alpha, M, "laplace", bandwidth, backend)
    _check("agop", X, X, alpha, M, "gaussian", bandwidth, backend, centered=True)


def hash_seed(*key) -> int:
    import zlib

    return zlib.crc32(repr(key).encode())


# ---- the near-pair band --------------------------------------------------------------------------------------

def _band_data(seed: int, d: int = 16, n: int = 240):
    """Points far from the origin, each other one with a partner at a separation from 1e-1 down to 1e-7 (in units
    of the data's spread): the band just outside the near threshold is covered, as are near-duplicates."""
    gen = _gen(seed)
    X = torch.randn(n, d, generator=gen, dtype=torch.float64) + 100.0
    seps = torch.tensor([1e-1, 5e-2, 2e-2, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7], dtype=torch.float64)
    for i in range(0, n, 2):
        step = torch.randn(d, generator=gen, dtype=torch.float64)
        X[i + 1] = X[i] + seps[(i // 2) % len(seps)] * step / step.norm()
    alpha = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    return X, alpha


@pytest.mark.parametrize("backend", FAST + (["triton"] if TRITON else []))
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("op", OPS)
def test_near_pair_band_float32(backend, kernel, op):
    X, alpha = _band_data(11, n=240 if backend != "triton" else 120)
    Z = X[: X.shape[0] // 2] + 3e-6  # off the centres too: near but not equal
    _check(op, X, X, alpha, None, kernel, 2.0, backend)
    _check(op, Z, X, alpha, None, kernel, 2.0, backend)


def test_the_near_band_test_fails_under_a_weakened_threshold(monkeypatch):
    """The band above catches a near threshold 64x weaker than the kernel description's (2^-14 instead of 2^-8
    for float32): with it the pairs between the two bounds keep their expansion error."""
    X, alpha = _band_data(11)
    X32, a32 = X.float(), alpha.float()
    ref = reference("kernel_grad", X32, X32, a32, None, "laplace", 2.0)
    good = rel_fro(rfm_fast.kernel_grad(X32, X32, a32, bandwidth=2.0, backend="torch"), ref)
    monkeypatch.setitem(core_kernels._NEAR_RTOL, "float32", 2.0**-14)
    weak = rel_fro(rfm_fast.kernel_grad(X32, X32, a32, bandwidth=2.0, backend="torch"), ref)
    assert good <= REL_FRO[torch.float32] < weak


# ---- the geometry's decisions ---------------------------------------------------------------------------------

def _one_direction_metric(d: int, gen: torch.Generator, directions: int = 1) -> torch.Tensor:
    """S (d, d), float32: M = S S^T with one direction (or ``directions``, of decreasing weight) dominating the rest
    by 1e8 (like a metric RFM learns on a target that depends on one direction), so the geometry forms that
    direction directly."""
    v = torch.randn(d, directions, generator=gen, dtype=torch.float64) / torch.arange(1, directions + 1)
    rest = 1e-4 * torch.randn(d, d - directions, generator=gen, dtype=torch.float64) / math.sqrt(d)
    return torch.cat([v, rest], 1).float()


def _band_points(gen: torch.Generator, n: int, d: int) -> torch.Tensor:
    """Points with duplicates and near-duplicates (1e-6 .. 1e-3 apart), in float32."""
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    X[1::9] = X[0::9][: X[1::9].shape[0]]
    for k, sep in enumerate((1e-6, 1e-5, 1e-4, 1e-3)):
        rows = slice(2 + k, n, 9)
        X[rows] = X[0::9][: X[rows].shape[0]] + sep * torch.randn(X[rows].shape, generator=gen, dtype=torch.float64)
    return X.float()


def _band_problem(seed: int, n: int, d: int = 12, directions: int = 1) -> tuple:
    """(X, Z, alpha, S, M64): band points, 300 evaluation points of them (every fifth moved by 1e-5), 3 outputs, a
    factor S with ``directions`` dominating ones and M = S S^T in float64."""
    gen = _gen(seed)
    X = _band_points(gen, n, d)
    Z = X[:300].clone()
    Z[::5] += 1e-5
    alpha = torch.randn(n, 3, generator=gen)
    S = _one_direction_metric(d, gen, directions)
    return X, Z, alpha, S, S.double() @ S.double().T


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("op", ["kernel_mv", "kernel_matrix", "kernel_normal_mv"])
def test_band_of_a_learned_metric_keeps_value_ops_exact(kernel, op, monkeypatch):
    """Value tiles of the torch pass under a one-direction metric take the band (points sorted along that
    direction; pairs outside a strip's band from one GEMM with no direct pass and no near test): float32 within
    the usual tolerance of float64, with self pairs, duplicates and near-duplicates, centres equal to the
    evaluation points or not."""
    from rfm_fast.core import geometry
    from rfm_fast.ops.api import kernel_normal_mv

    monkeypatch.setattr(geometry, "BAND_MIN_N", 64)
    X, Z, alpha, S, M64 = _band_problem(21, 500)
    geom = Geometry.build(X, X, S @ S.T, KernelSpec(kernel, 3.0), allow_band=True)
    assert geom.band is not None and geom.kdir == 1
    for z in (X, Z):
        if op == "kernel_normal_mv":
            out = kernel_normal_mv(z, X, alpha, kernel=kernel, bandwidth=3.0, M_factor=S, backend="torch")
            K = km_reference(z.double(), X.double(), M64, kernel, 3.0)
            ref = K.T @ (K @ alpha.double())
        else:
            out = call(op, z, X, alpha, None, kernel, 3.0, backend="torch", M_factor=S)
            ref = reference(op, z, X, alpha, M64, kernel, 3.0)
        err = rel_fro(out, ref)
        assert err <= REL_FRO[torch.float32], f"{op}: relative error {err:.3g}"


def km_reference(Z, X, M, kernel, bandwidth):
    return reference("kernel_matrix", Z, X, None, M, kernel, bandwidth)


def test_band_margin_holds_every_pair_the_expansion_leaves_near(monkeypatch):
    """The band's certificate, checked pair by pair: every pair the near test of the band's frame (all
    coordinates in the expansion) flags lies in its strip's band, so skipping that test outside the band loses
    none. A margin 16 times too narrow (rho = near_rtol / 16) misses some: the check can fail."""
    from rfm_fast.core.geometry import Band
    from rfm_fast.core import geometry
    from rfm_fast.core.tiles import TileEvaluator, near_indices

    monkeypatch.setattr(geometry, "BAND_MIN_N", 64)
    gen = _gen(22)
    X = _band_points(gen, 1200, 10)
    S = _one_direction_metric(10, gen)
    spec = KernelSpec("laplace", 3.0)
    geom = Geometry.build(X, X, S @ S.T, spec, allow_band=True, allow_frames=False)
    assert geom.band is not None
    frame = geom.frames[geom.band.FRAME]
    z_aug, x_aug = TileEvaluator(geom, None)._aug(True)[geom.band.FRAME]
    narrow = Band(geom.band.tz, geom.band.tx, spec.near_rtol(torch.float32) / 16, geom.band.rest)
    flagged = missed_narrow = 0
    for start in range(0, geom.m, 64):
        rows = slice(start, min(geom.m, start + 64))
        tile = z_aug[rows] @ x_aug.T
        near = near_indices(tile, frame.bz[rows], frame.bx, 1.0)
        near = near[near[:, 0] + start != near[:, 1]]  # self pairs are known, never tested
        flagged += near.shape[0]
        a, b = geom.band.columns(rows)
        assert bool(((near[:, 1] >= a) & (near[:, 1] < b)).all()), f"rows {rows}: a near pair outside [{a}, {b})"
        a, b = narrow.columns(rows)
        missed_narrow += int(((near[:, 1] < a) | (near[:, 1] >= b)).sum())
    assert flagged > 1000  # the expansion leaves many pairs near under this metric: the check has work to do
    assert missed_narrow > 0


def _band_thresholds_low(monkeypatch) -> None:
    from rfm_fast.core import geometry

    for name in ("BAND_MIN_N", "BAND_GRADIENT_MIN_N", "BAND_GRADIENT_MIN_N_WIDE"):
        monkeypatch.setattr(geometry, name, 64)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("op,kw", [("kernel_grad", {}), ("agop", {}), ("agop", {"centered": True})])
@pytest.mark.parametrize("directions", [1, 2])
def test_band_of_a_learned_metric_keeps_gradient_ops_exact(kernel, op, kw, directions, monkeypatch):
    """Gradient tiles of the torch pass under a one-direction metric take the band too: the pairs outside a strip's
    band get the direct coordinate's part by expansion from the whole-tile product, the band's pairs by direct
    differences (their weights zeroed before that product). float32 within the usual tolerance of float64, with
    self pairs, duplicates and near-duplicates, centres equal to the evaluation points or not, and the centred
    AGOP (its sample of rows keeps the band); one or two direct coordinates."""
    _band_thresholds_low(monkeypatch)
    X, Z, alpha, S, M64 = _band_problem(24, 600, directions=directions)
    geom = Geometry.build(X, X, S @ S.T, KernelSpec(kernel, 3.0), allow_band="gradient")
    assert geom.band is not None and geom.kdir == directions
    for z in (X, Z):
        out = call(op, z, X, alpha, None, kernel, 3.0, backend="torch", M_factor=S, **kw)
        ref = reference(op, z, X, alpha, M64, kernel, 3.0, **kw)
        err = rel_fro(out, ref)
        assert err <= REL_FRO[torch.float32], f"{op}: relative error {err:.3g}"


def test_band_gradient_split_matters(monkeypatch):
    """The check above can fail: with the band's pairs left in the whole-tile product (their direct part by
    expansion, as outside the band) the Laplace gradients of near-duplicates lose their digits."""
    from rfm_fast.core import gradient

    _band_thresholds_low(monkeypatch)
    gen = _gen(24)
    X = _band_points(gen, 600, 12)
    alpha = torch.randn(600, 3, generator=gen)
    S = _one_direction_metric(12, gen)
    ref = reference("kernel_grad", X, X, alpha, S.double() @ S.double().T, "laplace", 3.0)
    good = rel_fro(call("kernel_grad", X, X, alpha, None, "laplace", 3.0, M_factor=S), ref)
    monkeypatch.setattr(gradient, "_band_span", lambda geom, rows, cols: (0, 0))
    bad = rel_fro(call("kernel_grad", X, X, alpha, None, "laplace", 3.0, M_factor=S), ref)
    assert good <= REL_FRO[torch.float32] < bad


def test_band_takers_and_thresholds(monkeypatch):
    """The torch pass takes the band for value and gradient tiles, the compiled pass for none (measured slower
    there); gradient tiles take it from fewer centres when the factor has few coordinates; no band unless asked."""
    from rfm_fast.backends.cpp import ops as cpp_ops
    from rfm_fast.core import geometry
    from rfm_fast.core.ops import torch_evaluator

    assert set(torch_evaluator.band) == {"value", "gradient"} and not getattr(cpp_ops._pass, "band", ())
    assert geometry.band_min_n("gradient", 6) < geometry.band_min_n("value", 6) < geometry.band_min_n("gradient", 35)
    gen = _gen(23)
    X = _band_points(gen, 300, 8)
    S = _one_direction_metric(8, gen)
    spec = KernelSpec("laplace", 3.0)
    assert Geometry.build(X, X, S @ S.T, spec, allow_band="gradient").band is None  # 300 centres: too few
    _band_thresholds_low(monkeypatch)
    assert Geometry.build(X, X, S @ S.T, spec, allow_band=True).band is not None
    assert Geometry.build(X, X, S @ S.T, spec).band is None



def test_rank_of_the_metric_and_directly_formed_coordinates():
    spec = KernelSpec("laplace", 2.0)
    gen = _gen(4)
    X = torch.randn(300, 20, generator=gen)
    for r in (1, 3, 8):
        M = _metric_of_rank(r, 20, gen)
        geom = Geometry.build(X, X, M, spec)
        assert geom.r == r and geom.kdir == (r if r <= 4 else 0)
    # A near-rank-1 metric that float32 still resolves: full rank, its leading direction formed directly.
    v = torch.randn(20, 1, generator=gen, dtype=torch.float64)
    M = v @ v.T + 1e-6 * torch.eye(20, dtype=torch.float64)
    geom = Geometry.build(X, X, M, spec)
    assert geom.r == 20 and geom.kdir == 1
    assert Geometry.build(X, X, None, spec).kdir == 0


def test_frames_on_clustered_data_only():
    spec = KernelSpec("laplace", 2.0)
    gen = _gen(5)
    centres = torch.randn(10, 64, generator=gen)
    centres /= centres.norm(dim=1, keepdim=True)
    labels = torch.arange(1000) % 10
    X = centres[labels] + 1e-3 * torch.randn(1000, 64, generator=gen)
    geom = Geometry.build(X, X, None, spec)
    assert len(geom.frames) == 2 and len(geom.layout.framed) == 10
    Y = torch.randn(1000, 64, generator=gen)
    assert len(Geometry.build(Y, Y, None, spec).frames) == 1
    # Pairs of one cluster are evaluated about its own centre: no exact recomputations beyond the self pairs.
    from rfm_fast.core.tiles import pair_counts

    alpha = torch.randn(1000, 10, generator=gen)
    pair_counts(reset=True)
    rfm_fast.agop(X, X, alpha, bandwidth=2.0, backend="torch")
    counts = pair_counts(reset=True)
    assert counts["exact"] <= 2 * 1000


@pytest.mark.parametrize("backend", [b for b in FAST if b in ("torch", "cpp")])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("metric", ["identity", "rank1", "hybrid"])
def test_self_pairs_are_known_and_other_near_pairs_still_found(backend, kernel, metric):
    """Evaluation points that are the centres: the self pairs get k(0) = 1 and weight 0 without a near test or an
    exact recomputation, while a duplicated row (a near pair that is not a self pair) is still found and
    recomputed. The same rows through the one-sided path (z a strict subset, so not "the same points") agree."""
    from rfm_fast.core.tiles import pair_counts

    gen = _gen(11)
    X = torch.randn(700, 9, generator=gen)
    X[350] = X[20]  # one duplicated pair
    alpha = torch.randn(700, 2, generator=gen)
    w = torch.randn(9, 1, generator=gen)
    M = {"identity": None, "rank1": w @ w.T,
         "hybrid": w @ w.T + 1e-6 * torch.eye(9)}[metric]
    pair_counts(reset=True)
    K = rfm_fast.kernel_matrix(X, X, kernel=kernel, bandwidth=2.0, M=M, backend=backend)
    counts = pair_counts(reset=True)
    assert torch.equal(K.diagonal(), torch.ones(700))
    assert 2 <= counts["exact"] <= 50, counts  # (20, 350) both ways, not the 700 self pairs
    assert float(K[20, 350]) == 1.0 and float(K[350, 20]) == 1.0
    for op in ("kernel_mv", "agop"):
        got = call(op, X, X, alpha, M, kernel, 2.0, backend=backend)
        ref = reference(op, X.double(), X.double(), alpha.double(), None if M is None else M.double(), kernel, 2.0)
        assert rel_fro(got, ref) <= REL_FRO[torch.float32], op
    sub = call("kernel_grad", X[:-1], X, alpha, M, kernel, 2.0, backend=backend)
    full = call("kernel_grad", X, X, alpha, M, kernel, 2.0, backend=backend)
    assert rel_fro(full[:-1], sub) <= REL_FRO[torch.float32]


def test_budget_too_small_raises_a_clear_error():
    X = torch.randn(50, 2000)
    with pytest.raises(BudgetError, match="memory_budget"):
        rfm_fast.agop(X[:10], X, torch.randn(50, 100), bandwidth=10.0, backend="torch", memory_budget="1MB")


def test_symmetric_schedule_streams_in_groups_under_a_small_budget(monkeypatch):
    """A budget that cannot hold every block's accumulator: several groups, the same answer."""
    from rfm_fast.core import gradient, plan as planner

    plans = []

    def spy(*args, **kwargs):
        plan = planner.plan_symmetric(*args, **kwargs)
        plans.append(plan)
        return plan

    monkeypatch.setattr(gradient, "plan_symmetric", spy)
    gen = _gen(6)
    X = torch.randn(3000, 40, generator=gen, dtype=torch.float64)
    alpha = torch.randn(3000, 7, generator=gen, dtype=torch.float64)
    small = rfm_fast.agop(X, X, alpha, bandwidth=4.0, backend="torch", memory_budget="6MB")
    assert plans and plans[-1] is not None and plans[-1].group * plans[-1].block < 3000
    big = rfm_fast.agop(X, X, alpha, bandwidth=4.0, backend="torch", memory_budget="1GB")
    assert rel_fro(small, big) <= 1e-12


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("metric", ["identity", "learned"])
def test_symmetric_mat_vec_halves_diagonal_blocks_exactly(backend, metric, monkeypatch):
    """Small blocks cut into strips (each strip against its own square and the block's later rows, mirrored):
    duplicates and near pairs in different strips of one block, and across blocks, give the float64 answer."""
    from rfm_fast.core import matvec, plan as planner

    monkeypatch.setitem(planner.SYMMETRIC_BLOCK, "cpu", 96)
    monkeypatch.setattr(matvec, "strip_rows", lambda device: 32)
    gen = _gen(21)
    X = torch.randn(250, 6, generator=gen)
    X[40] = X[5]  # one block (0..95), different strips
    X[70] = X[5] + 1e-4
    X[200] = X[10]  # across blocks
    alpha = torch.randn(250, 3, generator=gen)
    M = None
    if metric == "learned":
        w = torch.randn(6, 1, generator=gen, dtype=torch.float64)
        M = w @ w.T + 1e-7 * torch.eye(6, dtype=torch.float64)
    got = rfm_fast.kernel_mv(X, X, alpha, M=M, bandwidth=3.0, backend=backend)
    want = rfm_fast.kernel_matrix(X.double(), X.double(), M=M, bandwidth=3.0, backend="torch") @ alpha.double()
    assert rel_fro(got.double(), want) <= 2e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_frames_found_on_a_sketch_of_wide_features(backend):
    """d = 300 (> 2 x the sketch's 32 columns): the component search runs on the principal sketch; it must still
    find the 10 tight clusters, place evaluation points that are not the centres (the lifted split directions),
    and keep float32 exact with only self pairs recomputed."""
    from rfm_fast.core.frames import SKETCH_DIM
    from rfm_fast.core.tiles import pair_counts

    gen = _gen(12)
    d = 300
    assert d > 2 * SKETCH_DIM
    centres = torch.randn(10, d, generator=gen, dtype=torch.float64)
    centres /= centres.norm(dim=1, keepdim=True)
    X = centres[torch.arange(600) % 10] + 1e-3 * torch.randn(600, d, generator=gen, dtype=torch.float64)
    Z = centres[torch.arange(200) % 10] + 1e-3 * torch.randn(200, d, generator=gen, dtype=torch.float64)
    alpha = torch.randn(600, 3, generator=gen, dtype=torch.float64)
    geom = Geometry.build(X.float(), X.float(), None, KernelSpec("laplace", 2.0))
    assert len(geom.frames) == 2 and len(geom.layout.framed) == 10
    pair_counts(reset=True)
    for op in ("kernel_mv", "agop"):
        got = call(op, X.float(), X.float(), alpha.float(), None, "laplace", 2.0, backend=backend)
        assert rel_fro(got, reference(op, X, X, alpha, None, "laplace", 2.0)) <= REL_FRO[torch.float32], op
        got = call(op, Z.float(), X.float(), alpha.float(), None, "laplace", 2.0, backend=backend)
        assert rel_fro(got, reference(op, Z, X, alpha, None, "laplace", 2.0)) <= REL_FRO[torch.float32], op
    if backend in ("torch", "cpp"):
        assert pair_counts(reset=True)["exact"] <= 2 * 2 * 600  # the self pairs of the two x = centres calls


@pytest.mark.parametrize("backend", BACKENDS)
def test_products_across_framed_and_unframed_components(backend):
    """The gradient products run in mixed coordinates (framed components about their own centres, the rest about
    the global one) with the offsets added back per bucket: four tight clusters (framed) around a wide cloud
    (not framed), far from the origin, so that a wrong or rounded offset shows; gradients of evaluation points
    that are not the centres, the symmetric AGOP and the centred one, within the float32 tolerance."""
    gen = _gen(13)
    d = 20
    v = torch.randn(2, d, generator=gen, dtype=torch.float64)
    v = 0.5 * v / v.norm(dim=1, keepdim=True)
    centres = torch.cat([v, -v])
    tight = centres[torch.arange(320) % 4] + 1e-3 * torch.randn(320, d, generator=gen, dtype=torch.float64)
    wide = 0.03 * torch.randn(160, d, generator=gen, dtype=torch.float64)
    # 1e3 from the origin: the global centre rounded to float32 is 6e-5 off, visible in the offsets if ignored.
    X = (torch.cat([tight, wide]) + 1e3)[torch.randperm(480, generator=gen)]
    Z = X[::3] + 1e-4 * torch.randn(160, d, generator=gen, dtype=torch.float64)
    alpha = torch.randn(480, 3, generator=gen, dtype=torch.float64)
    geom = Geometry.build(X.float(), X.float(), None, KernelSpec("laplace", 0.5))
    assert geom.layout is not None and 0 < len(geom.layout.framed) < len(geom.layout.x_ranges)
    for op, zs, kw in (("kernel_grad", Z, {}), ("agop", X, {}), ("agop", Z, {}), ("agop", X, {"centered": True})):
        _check(op, zs, X, alpha, None, "laplace", 0.5, backend, **kw)
    _check("agop", X, X, alpha, None, "gaussian", 0.5, backend)
    # The kernel matrix's backward (the one-sided schedule with pair weights) through the same products.
    Zr, Xr = Z.float().double(), X.float().double()  # the float32 inputs, for the reference too
    weights = torch.randn(Z.shape[0], X.shape[0], generator=gen, dtype=torch.float64)
    grads = []
    for dtype, name in ((torch.float64, "naive"), (torch.float32, backend)):
        z, x = (t.to(dtype).detach().clone().requires_grad_(True) for t in (Zr, Xr))
        K = rfm_fast.kernel_matrix(z, x, kernel="laplace", bandwidth=0.5, backend=name)
        (K * weights.to(dtype)).sum().backward()
        grads.append((z.grad.double(), x.grad.double()))
    for got, want in zip(grads[1], grads[0]):
        assert rel_fro(got, want) <= REL_FRO[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_metric_given_by_its_factor(backend, op):
    """M_factor=S is M = S S^T on every backend, for thin, square, wide and rank-deficient factors."""
    gen = _gen(11)
    Z = torch.randn(40, 9, generator=gen)
    X = torch.randn(50, 9, generator=gen)
    alpha = torch.randn(50, 2, generator=gen)
    base = torch.randn(9, 2, generator=gen)
    for S in (torch.randn(9, 1, generator=gen), torch.randn(9, 9, generator=gen), torch.randn(9, 12, generator=gen),
              torch.cat([base, base, 0 * base], dim=1)):
        S = S / S.norm() * 3
        got = call(op, Z, X, alpha, None, "laplace", 2.0, backend=backend, M_factor=S)
        # The reference in the projected coordinates t = u S (exact), not through S S^T: rank-1 metrics put
        # pairs at |t| ~ 1e-6 whose gradient direction a dense M's rounding would lose.
        Zt, Xt, S64 = Z.double() @ S.double(), X.double() @ S.double(), S.double()
        want = reference(op, Zt, Xt, alpha, None, "laplace", 2.0)
        if op == "kernel_grad":
            want = want @ S64.T
        elif op == "agop":
            want = S64 @ want @ S64.T
        assert rel_fro(got, want) <= REL_FRO[torch.float32], S.shape


def test_metric_factor_errors_and_rank():
    X = torch.randn(10, 4)
    with pytest.raises(ValueError, match="either M or M_factor"):
        rfm_fast.kernel_mv(X, X, torch.ones(10), M=torch.eye(4), M_factor=torch.ones(4, 1))
    with pytest.raises(ValueError, match="M_factor must have shape"):
        rfm_fast.kernel_mv(X, X, torch.ones(10), M_factor=torch.ones(3, 1))
    with pytest.raises(ValueError, match="M_factor"):
        rfm_fast.kernel_mv(X, X, torch.ones(10), M_factor=torch.full((4, 1), float("nan")))
    S = torch.randn(4, 1, dtype=torch.float64)
    from rfm_fast.core.metric import MetricFactor

    factor = MetricFactor.from_factor(torch.cat([S, 2 * S, 1e-9 * S], 1), torch.float32, X.device)
    assert factor.r == 1
    assert torch.allclose(factor.as_dense() @ factor.as_dense().T, 5 * S @ S.T, rtol=1e-5)


def test_dense_factor_is_reused_only_for_the_same_unchanged_tensor():
    """The eigendecomposition of a dense M is kept for the same tensor object; an in-place change, an equal copy, a
    dtype or a new tensor at a recycled id get their own, and the results follow M's values."""
    from rfm_fast.core.metric import MetricFactor

    g = torch.Generator().manual_seed(3)
    B = torch.randn(6, 6, generator=g, dtype=torch.float64)
    M = B @ B.T
    first = MetricFactor.from_matrix(M, 6, torch.float32, M.device)
    assert MetricFactor.from_matrix(M, 6, torch.float32, M.device) is first
    assert MetricFactor.from_matrix(M, 6, torch.float64, M.device) is not first
    assert MetricFactor.from_matrix(M.clone(), 6, torch.float32, M.device) is not first
    X = torch.randn(30, 6, generator=g)
    alpha = torch.randn(30, 2, generator=g)
    before = rfm_fast.kernel_mv(X, X, alpha, M=M, bandwidth=3.0)
    M.mul_(4.0)  # in place: the version counter moves on
    after = MetricFactor.from_matrix(M, 6, torch.float32, M.device)
    assert after is not first
    assert torch.allclose(after.as_dense() @ after.as_dense().T, M, rtol=1e-10, atol=1e-10)
    want = rfm_fast.kernel_mv(X, X, alpha, M=M.clone(), bandwidth=3.0)
    assert torch.allclose(rfm_fast.kernel_mv(X, X, alpha, M=M, bandwidth=3.0), want, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(before, want, rtol=1e-3)
    for _ in range(8):  # more tensors than the cache holds, some at recycled ids: each gets its own factor
        other = B @ B.T * float(torch.rand(1, generator=g) + 0.5)
        f = MetricFactor.from_matrix(other, 6, torch.float32, other.device)
        assert torch.allclose(f.as_dense() @ f.as_dense().T, other, rtol=1e-10, atol=1e-10)
        del other
    from rfm_fast.core import metric

    assert len(metric._DENSE_FACTORS) <= metric.DENSE_FACTOR_CACHE
    key = id(M)
    MetricFactor.from_matrix(M, 6, torch.float32, M.device)
    assert key in metric._DENSE_FACTORS
    del M  # a freed tensor takes its entry with it
    assert key not in metric._DENSE_FACTORS


def test_hybrid_decision_is_kept_only_for_the_same_unchanged_centres(monkeypatch):
    """The choice of directly formed coordinates is made once per (factor, centres) and again after an in-place
    change of the centres; results match a fresh decision either way."""
    from rfm_fast.core import geometry

    g = torch.Generator().manual_seed(11)
    X = torch.randn(300, 8, generator=g)
    w = torch.randn(8, 1, generator=g, dtype=torch.float64)
    M = w @ w.T + 1e-6 * torch.eye(8, dtype=torch.float64)  # near rank 1: one leading direction taken direct
    alpha = torch.randn(300, 2, generator=g)
    calls = []
    inner = geometry._hybrid
    monkeypatch.setattr(geometry, "_hybrid", lambda *a: calls.append(1) or inner(*a))
    first = rfm_fast.agop(X, X, alpha, M=M, bandwidth=2.0, backend="torch")
    second = rfm_fast.agop(X, X, alpha, M=M, bandwidth=2.0, backend="torch")
    assert len(calls) == 1 and torch.equal(first, second)
    assert geometry.Geometry.build(X, X, M, KernelSpec("laplace", 2.0)).kdir == 1 and len(calls) == 1
    X.mul_(1.5)  # in place: decided again
    after = rfm_fast.agop(X, X, alpha, M=M, bandwidth=2.0, backend="torch")
    assert len(calls) == 2
    want = rfm_fast.agop(X.double(), X.double(), alpha.double(), M=M, bandwidth=2.0, backend="torch")
    assert torch.allclose(after.double(), want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))


@pytest.mark.parametrize("backend", FAST)
def test_degenerate_metric(backend):
    """M = 0: every distance 0, kernel 1, gradients 0."""
    X = torch.randn(20, 5)
    M = torch.zeros(5, 5)
    assert torch.allclose(rfm_fast.kernel_mv(X, X, torch.ones(20), M=M, backend=backend), torch.full((20,), 20.0))
    assert torch.count_nonzero(rfm_fast.agop(X, X, torch.ones(20), M=M, backend=backend)) == 0


def test_kernel_spec_is_the_one_place_of_the_constants():
    for name in KERNELS:
        spec = KernelSpec(name, 2.0)
        s = torch.tensor([0.0, 0.25, 4.0], dtype=torch.float64)
        r = (s.sqrt() / spec.coord_scale)  # back to the distance in input units
        k = torch.exp(-r / 2.0) if name == "laplace" else torch.exp(-(r**2) / 8.0)
        assert torch.allclose(spec.value_of(s), k)
        assert spec.weight_of(s)[0] == 0.0
        tile = spec.tile_sign * s[1:].clone()
        assert torch.allclose(spec.values_(tile), k[1:])
    with pytest.raises(ValueError):
        KernelSpec("cauchy", 1.0)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_ops_leave_their_inputs_untouched(backend, dtype):
    """No op writes into the caller's tensors, on every geometry path (plain, near-rank-1 M with directly formed
    coordinates, clustered data with frames, x = centres and not): a float64 input is its own float64 copy, so
    an in-place step on "the float64 coordinates" would otherwise change the caller's data."""
    gen = _gen(21)
    d = 64
    centres = torch.randn(5, d, generator=gen, dtype=torch.float64)
    X = (centres[torch.arange(200) % 5] + 1e-3 * torch.randn(200, d, generator=gen, dtype=torch.float64) + 3.0)
    Z = X[:50] + 1e-4
    alpha = torch.randn(200, 2, generator=gen, dtype=torch.float64)
    w = torch.randn(d, 1, generator=gen, dtype=torch.float64)
    for M in (None, w @ w.T + 1e-9 * torch.eye(d, dtype=torch.float64)):
        inputs = [t.to(dtype) for t in (Z, X, alpha)] + [None if M is None else M.to(dtype)]
        saved = [None if t is None else t.clone() for t in inputs]
        Zt, Xt, at, Mt = inputs
        for op in OPS:
            for z in (Zt, Xt):
                call(op, z, Xt, at, Mt, "laplace", 2.0, backend=backend)
        for t, s in zip(inputs, saved):
            assert t is None or torch.equal(t, s)


def test_exact_from_float64_coordinates_keeps_every_pair_exact(monkeypatch):
    """float32 work with a dense factor recomputes near pairs from float64 coordinates of the points (formed once,
    r products a pair instead of d r) once many pairs come: s and u_z - u_x agree with the recomputation from the
    points to 2^-26 for every pair, duplicates give exactly 0 and near-duplicates (one ulp, 1e-7 .. 1e-3 apart)
    keep their digits because the pairs below the threshold tau are still formed from the points. Without that
    fallback (tau = 0) the closest near-duplicates lose them: the check can fail."""
    from rfm_fast.core import geometry

    gen = _gen(25)
    n, d = 400, 96
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    X[1::7] = X[0::7][: X[1::7].shape[0]]
    for k, sep in enumerate((1e-7, 1e-6, 1e-4, 1e-3)):
        rows = slice(2 + k, n, 7)
        X[rows] = X[0::7][: X[rows].shape[0]] + sep * torch.randn(X[rows].shape, generator=gen, dtype=torch.float64)
    X = X.float()
    X[6::7, 0] = torch.nextafter(X[0::7][: X[6::7].shape[0], 0], torch.tensor(math.inf))  # one ulp apart
    X[6::7, 1:] = X[0::7][: X[6::7].shape[0], 1:]
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    M = ((Q * torch.logspace(0, -6, d, dtype=torch.float64)) @ Q.T).float()
    geom = Geometry.build(X, X, M, KernelSpec("laplace", 2.0), allow_frames=False)
    assert geom.factor.kind == "dense" and geom.kdir == 0
    rows = torch.arange(n).repeat_interleave(7)
    cols = (rows + torch.arange(7).repeat(n)) % n  # each point against itself and its 6 successors
    s_raw, diff_raw = geom._exact_raw(rows, cols, True)
    s, diff = geom.exact(rows, cols, with_diff=True)
    assert geom._coords64 is not None  # 2800 pairs asked for: more than half of the 400 points
    assert bool((s[rows == cols] == 0).all()) and bool((s[s_raw == 0] == 0).all())
    err = ((s - s_raw).abs() / s_raw.clamp_min(1e-300)).max()
    assert float(err) <= 2.0**-26
    assert float(((diff - diff_raw).norm(dim=1) / s_raw.sqrt().clamp_min(1e-300)).max()) <= 2.0**-26
    # the fallback matters: the pairs below tau, taken from the float64 coordinates too, lose their digits
    uz, nz, ux, nx = geom._coords64
    close = (s_raw > 0) & (s_raw <= d * d * 2.0**-50 * (nz[rows] + nx[cols]))
    assert bool(close.any())
    u = uz[rows] - ux[cols]
    loose = ((u * u).sum(1) - s_raw).abs() / s_raw.clamp_min(1e-300)
    assert float(loose[close].max()) > 2.0**-26
    # float64 work, or float64 coordinates over the memory cap: always from the points
    assert Geometry.build(X.double(), X.double(), M.double(), KernelSpec("laplace", 2.0))._exact_coords() is None
    monkeypatch.setattr(geometry, "EXACT_COORDS_MAX_BYTES", 0)
    assert Geometry.build(X, X, M, KernelSpec("laplace", 2.0))._exact_coords() is None


@pytest.mark.parametrize("kernel", KERNELS)
def test_wide_hybrid_for_a_leading_direction_of_a_large_factor(kernel):
    """Beyond HYBRID_GRAM_R coordinates the leading direction is formed directly once it holds most of the spread
    (here ~90%), with float64 only for it and the rest in float32 under one more near-bound term: float32 within
    the usual tolerance of float64 for every op and both tile backends, with duplicates and near-duplicates."""
    from rfm_fast.core import geometry

    gen = _gen(26)
    n, d = 700, 160
    X = _band_points(gen, n, d)
    Z = X[:300].clone()
    Z[::5] += 1e-5
    alpha = torch.randn(n, 3, generator=gen)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    evals = torch.cat([torch.ones(1, dtype=torch.float64), 0.5 * torch.logspace(-2, -5, d - 1, dtype=torch.float64)])
    M = ((Q * evals) @ Q.T).float()
    geom = Geometry.build(X, X, M, KernelSpec(kernel, 3.0))
    assert geom.r > geometry.HYBRID_GRAM_R and geom.kdir == 1 and geom.xt[1] is not None
    f = geom.frames[0]
    assert bool((f.bx >= geometry.HYBRID_FLOAT32_RTOL * (f.xn + (geom.xt[0] ** 2).sum(1))).all())
    for z in (X, Z):
        for op in ("kernel_mv", "kernel_grad", "agop"):
            ref = reference(op, z, X, alpha, M, kernel, 3.0)
            for backend in [b for b in ("torch", "cpp") if b in rfm_fast.available_backends("cpu")]:
                err = rel_fro(call(op, z, X, alpha, M, kernel, 3.0, backend=backend), ref)
                assert err <= REL_FRO[torch.float32], f"{op} {backend}: relative error {err:.3g}"
