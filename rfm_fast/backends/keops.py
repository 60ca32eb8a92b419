"""KeOps backend: probe (``check`` / ``prefers``) and the shared run-time pieces of rfm_fast/ops/<op>/keops.py.

Nothing here imports pykeops at module level: the probe answers from ``importlib.util.find_spec`` and the
problem's dtype and device, and pykeops is imported by :func:`genred` on the first reduction that runs.

Compile cache. pykeops 2.3 reads ``$KEOPS_CACHE_FOLDER`` once, when ``keopscore`` is imported, and builds its
formulas under ``<folder>/<platform tag>/`` (default folder: ``~/.cache/keops<version>``). rfm_fast therefore
never imports pykeops at ``import rfm_fast`` and never overrides the variable: set it before the first KeOps call
(the test suite points it at ``<repo>/.cache/keops``, git-ignored) or leave it unset for KeOps' own default under
the user's cache. When pykeops was already imported by the caller, its folder is kept as it is.

Formulas. Every op runs on Euclidean coordinates z' = z S, x' = x S with S = M^{1/2} (rfm_fast/ops/common.py), so
one formula serves M None, diagonal and dense; both kernels share it through a parameter vector p = (a, b):

    s = ||z' - x'||^2 (from the coordinate differences: exactly 0 for equal rows)
    k = exp(-(a sqrt(s) + b s))            laplace: a = 1/L, b = 0;  gaussian: a = 0, b = 1/(2 L^2)
    w = (a rsqrt(s) + 2 b) k               the gradient weight up to sign: laplace k / (L r), gaussian k / L^2

KeOps' Rsqrt is 0 at 0, so a pair at distance 0 has Laplace weight 0 (CONVENTIONS.md), never NaN. The shared
formula cost no measurable time against a Laplace-only one (0.74 s against 0.78 s, m = n = 4000, d = 64, c = 1,
on a shared 2-core machine), and an explicit Factorize of the distance was slower (1.12 s). Formulas compile once
per (formula, dtype, d, c); m and n are free.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
from typing import NamedTuple, Optional


def _formulas(diff: str, sq: str) -> dict[str, str]:
    """s, k and w above in KeOps' formula language, for a difference expression ``diff`` and its squared norm
    ``sq``; z, x are Vi(d) / Vj(d), a is Vj(c), p is Pm(2)."""
    kernel = f"Exp(-(Elem(p, 0) * Sqrt({sq}) + Elem(p, 1) * {sq}))"
    weight = f"((Elem(p, 0) * Rsqrt({sq}) + IntCst(2) * Elem(p, 1)) * {kernel})"
    return {
        # kernel_mv: sum_i k_ji alpha_i, output c.
        "mv": f"{kernel} * a",
        # kernel_grad / agop: sum_i (w_ji alpha_i) (x) (z'_j - x'_i), output c * d (row-major c x d). Scaling alpha
        # by w before the tensor product costs c multiplications a pair instead of c * d, and was ~25% faster than
        # w * TensorProd(alpha, z - x) (2.7 s against 3.7 s, m = n = 2000, d = 64, c = 10). The differences are
        # taken directly, so near pairs lose no digits; a "weights once" form w * [alpha | alpha (x) x'] (J =
        # (W alpha) z'^T - W V) was no faster (2.9 s) and cancels catastrophically for near pairs.
        "grad": f"TensorProd({weight} * a, {diff})",
    }


_FORMULAS = _formulas("z - x", "SqDist(z, x)")
MV_FORMULA, GRAD_FORMULA = _FORMULAS["mv"], _FORMULAS["grad"]
# Compensated coordinates (float32 with a metric): the transformed points come as hi + lo, two float32 arrays
# whose sum is the float64 product z S to ~2^-48, and the difference is (z_hi - x_hi) + (z_lo - x_lo). Rounding
# z S and x S separately to float32 leaves each off by ~2^-24 |z S|, which for a near pair (distance delta) is a
# relative error ~2^-24 |z S| / delta in z' - x', and the Laplace term of such a pair has full size k / L
# whatever delta is: measured 5e-5 relative AGOP error with neighbours at 1e-4 (d = 16, dense M), against 1e-5
# required. The low parts cost 2 d more loads and adds a pair, small beside the c d of the gradient.
_COMPENSATED_DIFF = "((z - x) + (zl - xl))"
_FORMULAS_COMPENSATED = _formulas(_COMPENSATED_DIFF, f"SqNorm2({_COMPENSATED_DIFF})")

# Where backend="auto" picks KeOps: (op, min(m, n) at least, d at most, c at most) per device type, from
# benchmarks/results/keops_crossover.csv (`python benchmarks/bench_keops.py --sweep`: same-process medians against
# backend="torch", timed in alternation, one thread each). On CPU the torch path won all 36 cases (n in
# {1000, 5000, 20000}, d in {8, 64, 256}, c in {1, 10}, kernel_mv and agop): KeOps took 1.7x (n = 1000, d = 8) to
# 67x (n = 20000, d = 256) the torch time, growing with d and n. KeOps' CPU map-reduce is a scalar double loop per
# pair, while the torch path runs the d- and c*d-sized work as GEMMs. So auto never picks KeOps on CPU. No GPU was
# at hand to measure on; until a GPU sweep adds rows here, auto keeps the triton/torch paths on CUDA as well.
_AUTO_WINS: dict[str, tuple] = {"cpu": (), "cuda": ()}


@functools.lru_cache(maxsize=None)
def _installed() -> bool:
    return importlib.util.find_spec("pykeops") is not None


@functools.lru_cache(maxsize=None)
def _missing_compiler() -> Optional[str]:
    compiler = os.environ.get("CXX") or "g++"
    if shutil.which(compiler) is None and shutil.which("clang++") is None:
        return f"KeOps compiles its formulas on CPU with a C++ compiler; {compiler!r} was not found"
    return None


def check(op: str, problem) -> Optional[str]:
    """Why backend="keops" cannot run ``op`` on ``problem`` here, or None. Runs on every auto dispatch on CPU, so
    the environment lookups are cached and pykeops is imported only for CUDA tensors."""
    if not _installed():
        return "pykeops is not installed (pip install 'rfm_fast[keops]')"
    import torch

    if problem.dtype not in (torch.float32, torch.float64):
        return f"KeOps runs float32 and float64 only, got {problem.dtype}"
    device = problem.device.type
    if device == "cpu":
        return _missing_compiler()
    if device == "cuda":
        try:
            import pykeops.config
        except Exception as exc:  # a broken install must read as "cannot run", not crash auto dispatch
            return f"pykeops failed to import: {exc}"
        if not pykeops.config.gpu_available:
            return "this pykeops installation has no CUDA support"
        return None
    return f"KeOps runs on CPU and CUDA tensors, got device {problem.device}"


def prefers(op: str, problem) -> Optional[str]:
    """Why backend="auto" should not pick KeOps for this call, or None (see ``_AUTO_WINS``)."""
    if op == "kernel_matrix":
        return "kernel_matrix materialises its m x n output: KeOps adds nothing, the torch path runs it"
    wins = _AUTO_WINS.get(problem.device.type, ())
    m, d = problem.x.shape
    n, c = problem.centers.shape[0], problem.alpha.shape[1]
    for win_op, n_min, d_max, c_max in wins:
        if win_op == op and min(m, n) >= n_min and d <= d_max and c <= c_max:
            return None
    return (f"the torch path measured faster than KeOps for {op} on {problem.device.type} at this size "
            "(benchmarks/results/keops_crossover.csv)")


_GENREDS: dict = {}


def _import_genred():
    """pykeops.torch.Genred; the first import fixes KeOps' compile cache from $KEOPS_CACHE_FOLDER."""
    from pykeops.torch import Genred

    return Genred


def genred(kind: str, d: int, c: int, compensated: bool = False):
    """The (cached) KeOps reduction ``kind`` ("mv" or "grad") for dimension d and c outputs per point: a
    callable (z' (m, d), x' (n, d), alpha (n, c), p (2,)[, z'_lo (m, d), x'_lo (n, d)]) -> (m, c) or
    (m, c * d), summing over the centres; ``compensated`` takes the low parts of the points too."""
    key = (kind, d, c, compensated)
    routine = _GENREDS.get(key)
    if routine is None:
        Genred = _import_genred()
        aliases = [f"z = Vi({d})", f"x = Vj({d})", f"a = Vj({c})", "p = Pm(2)"]
        formulas = _FORMULAS
        if compensated:
            aliases += [f"zl = Vi({d})", f"xl = Vj({d})"]
            formulas = _FORMULAS_COMPENSATED
        routine = Genred(formulas[kind], aliases, reduction_op="Sum", axis=1)
        _GENREDS[key] = routine
    return routine


def kernel_params(kernel: str, bandwidth: float, like):
    """The parameter vector p = (a, b) of the shared formulas, in ``like``'s dtype and device."""
    import torch

    if kernel == "laplace":
        values = (1.0 / bandwidth, 0.0)
    else:
        values = (0.0, 0.5 / bandwidth**2)
    return torch.tensor(values, dtype=like.dtype, device=like.device)


def reduce(routine, points: "EuclideanPoints", rows: slice, alpha, p):
    """Run a reduction for the evaluation points ``rows`` on the device of the inputs (contiguous copies where
    needed)."""
    import torch

    parts = [points.z[rows], points.x, alpha, p]
    if points.compensated:
        parts += [points.z_lo[rows], points.x_lo]
    args = [t.contiguous() for t in parts]
    z = args[0]
    with torch.no_grad():
        if z.device.type == "cuda":
            return routine(*args, backend="GPU", device_id=z.device.index or 0)
        return routine(*args, backend="CPU")


class EuclideanPoints(NamedTuple):
    """The points in Euclidean coordinates for the formulas: z' = z S, x' = x S (S = M^{1/2} in float64, None for
    the identity), with float32 low parts z_lo, x_lo when ``compensated`` (see _COMPENSATED_DIFF)."""

    z: "object"
    x: "object"
    S: "object"
    z_lo: "object" = None
    x_lo: "object" = None

    @property
    def compensated(self) -> bool:
        return self.z_lo is not None


def euclidean_points(z, x, M) -> EuclideanPoints:
    """z S and x S for S = M^{1/2} (rfm_fast/ops/common.py), as hi + lo float32 pairs for float32 input.

    Equal rows of z and x must map to bit-equal rows, or a self pair gets a tiny nonzero distance and a full-size
    Laplace gradient term (k (z - x) / (L r) has norm ~1/L however small r is). A dense S goes through a GEMM, and
    a GEMM does not promise one summation order for all its rows (measured: MKL on an AMD EPYC gave equal float64
    rows of one product different last bits, at d = 17). So the distinct rows of z and x are found first
    (torch.unique), transformed once in float64, split into the input dtype (plus a float32 low part), and
    gathered back: equal rows share one transformed row by construction. A diagonal S is applied row by row.
    """
    import torch

    from ..ops.common import metric_sqrt

    S = metric_sqrt(M, torch.float64)
    if S is None:
        return EuclideanPoints(z, x, None)
    same = _same_tensor(z, x)
    both = z if same else torch.cat([z, x])
    if S.ndim == 1:
        wide = both.to(torch.float64) * S
    else:
        distinct, inverse = torch.unique(both, dim=0, return_inverse=True)
        wide = (distinct.to(torch.float64) @ S)[inverse]
    hi = wide.to(z.dtype)
    lo = (wide - hi.to(torch.float64)).to(z.dtype) if z.dtype == torch.float32 else None
    m = z.shape[0]
    if same:
        return EuclideanPoints(hi, hi, S, lo, lo)
    return EuclideanPoints(hi[:m], hi[m:], S, None if lo is None else lo[:m], None if lo is None else lo[m:])


def _same_tensor(a, b) -> bool:
    """a and b view the same memory the same way (agop(X, X, ...) from numpy gives two such tensors)."""
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride())
