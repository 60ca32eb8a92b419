"""KeOps reductions on the kernel core's scaled coordinates (``rfm_fast.core``).

Every op runs on u = (t - c) F sigma (the core's metric factor F, centre c = the centres' mean, sigma the kernel
description's coordinate scale), so one formula serves M None, diagonal and dense and both kernels, through the
parameters (a, b, c) of ``KernelSpec.keops_params``:

    s = ||u_z - u_x||^2 (from the coordinate differences: exactly 0 for equal rows)
    k = exp(-(a sqrt(s) + b s)),   w = (a rsqrt(s) + c) k       (laplace (1, 0, 0), gaussian (0, 1, 1))

KeOps' Rsqrt is 0 at 0, so a pair at distance 0 has Laplace weight 0 (the zero-distance rule), never NaN. The
reductions sum over the centres: k alpha (mat-vec, output c) and (w alpha) (x) (u_z - u_x) (the raw gradient G~,
output c * r); the core maps G~ back (J = gamma G~ F^T) and folds the AGOP (``rfm_fast.core.agop``).

Precision: for float32 the coordinates come as compensated hi + lo pairs (``rfm_fast.core.geometry.
compensated_pair``) and the difference is (z_hi - x_hi) + (z_lo - x_lo): rounding u_z and u_x separately to
float32 left near pairs (1e-4 apart) a 5e-5 relative AGOP error, against 2.2e-7 with the low parts. Scaling alpha
by w before the tensor product costs c multiplications a pair instead of c r (~25% faster), and one reduction
with the whole c r output beat splitting it (KeOps re-evaluates the distance in every reduction).
"""

from __future__ import annotations

import torch

from ...core.agop import agop_from_blocks
from ...core.geometry import compensated_pair, same_points
from ...core.kernels import KernelSpec
from ...core.metric import MetricFactor
from ...core.plan import plan_tiles


def _formulas(diff: str, sq: str) -> dict:
    kernel = f"Exp(-(Elem(p, 0) * Sqrt({sq}) + Elem(p, 1) * {sq}))"
    weight = f"((Elem(p, 0) * Rsqrt({sq}) + Elem(p, 2)) * {kernel})"
    return {"mv": f"{kernel} * a", "grad": f"TensorProd({weight} * a, {diff})"}


_PLAIN = _formulas("z - x", "SqDist(z, x)")
_COMPENSATED = _formulas("((z - x) + (zl - xl))", "SqNorm2((z - x) + (zl - xl))")
_GENREDS: dict = {}


def _genred(kind: str, r: int, c: int, compensated: bool):
    """The cached reduction ``kind`` ("mv" or "grad") for r coordinates and c outputs per point."""
    key = (kind, r, c, compensated)
    routine = _GENREDS.get(key)
    if routine is None:
        from pykeops.torch import Genred  # the first import fixes KeOps' compile cache from $KEOPS_CACHE_FOLDER

        aliases = [f"z = Vi({r})", f"x = Vj({r})", f"a = Vj({c})", "p = Pm(3)"]
        if compensated:
            aliases += [f"zl = Vi({r})", f"xl = Vj({r})"]
        routine = Genred((_COMPENSATED if compensated else _PLAIN)[kind], aliases, reduction_op="Sum", axis=1)
        _GENREDS[key] = routine
    return routine


class _Points:
    """The call's coordinates: (hi, lo) of z and x, the factor and the kernel description."""

    def __init__(self, problem):
        z, x = problem.x, problem.centers
        self.spec = KernelSpec(problem.kernel, problem.bandwidth)
        self.factor = MetricFactor.from_matrix(problem.M, z.shape[1], z.dtype, z.device)
        centre = x.to(torch.float64).mean(0, keepdim=True)
        (self.zh, self.zl), (self.xh, self.xl) = compensated_pair(z, x, same_points(z, x), centre, self.factor,
                                                                  self.spec.coord_scale, z.dtype)
        self.p = torch.tensor(self.spec.keops_params(), dtype=z.dtype, device=z.device)
        self.r = self.factor.r

    def reduce(self, kind: str, rows, alpha: torch.Tensor) -> torch.Tensor:
        compensated = self.zl is not None
        args = [self.zh[rows], self.xh, alpha, self.p]
        if compensated:
            args += [self.zl[rows], self.xl]
        args = [t.contiguous() for t in args]
        routine = _genred(kind, self.r, alpha.shape[1], compensated)
        with torch.no_grad():
            if args[0].device.type == "cuda":
                return routine(*args, backend="GPU", device_id=args[0].device.index or 0)
            return routine(*args, backend="CPU")


def kernel_mv(problem, budget: int):
    m, c = problem.x.shape[0], problem.alpha.shape[1]
    points = _Points(problem)
    if m == 0:
        return problem.x.new_zeros(0, c)
    if points.r == 0:
        return problem.alpha.sum(0, keepdim=True).expand(m, -1).clone()
    return points.reduce("mv", slice(None), problem.alpha)


def _raw_blocks(points: _Points, problem, budget: int, rows_index=None):
    """(rows, G~ (R, c, r)) per block of evaluation points, blocks sized by the planner (gradients and their
    float64 Gram operand take at most the budget)."""
    m = problem.x.shape[0] if rows_index is None else rows_index.shape[0]
    c, r = problem.alpha.shape[1], points.r
    item = problem.x.element_size()
    plan = plan_tiles(m, 1, budget, per_row=2 * c * r * (item + 8), device=problem.x.device,
                      preferred=(max(1, m), 1), minimum=(1, 1), what="a block of KeOps gradients")
    for rows in plan.row_blocks(m):
        index = rows if rows_index is None else rows_index[rows]
        yield rows, points.reduce("grad", index, problem.alpha).view(-1, c, r)


def kernel_grad(problem, budget: int):
    m, d, c = problem.x.shape[0], problem.x.shape[1], problem.alpha.shape[1]
    out = torch.zeros(m, c, d, dtype=problem.x.dtype, device=problem.x.device)
    points = _Points(problem)
    if m == 0 or points.r == 0:
        return out
    for rows, G in _raw_blocks(points, problem, budget):
        out[rows] = points.factor.to_input(G) * points.spec.grad_scale
    return out


def agop(problem, budget: int, *, centered: bool, diag: bool):
    m, d, c = problem.x.shape[0], problem.x.shape[1], problem.alpha.shape[1]
    points = _Points(problem)
    if points.r == 0:
        zeros = problem.x.new_zeros(d, d)
        return torch.diagonal(zeros).clone() if diag else zeros
    return agop_from_blocks(lambda index: _raw_blocks(points, problem, budget, index), m, c, points.factor,
                            points.spec, centered=centered, diag=diag, dtype=problem.x.dtype,
                            device=problem.x.device)
