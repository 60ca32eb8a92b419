"""The CUDA ops (csrc/cuda) on the kernel core's arrays: one expansion frame (no direct coordinates: the kernel
recomputes near pairs, and every pair when r <= DIRECT_MAX_R, exactly from u = (z - x) F in its own loop), the
near bound terms, the scaled factor; the raw gradients G~ = acc_alpha (x) u_z - acc_V from the kernel's
accumulator, the AGOP folded by the core."""

from __future__ import annotations

import torch

from ... import _ext
from ...core.agop import agop_from_blocks
from ...core.geometry import DIRECT_MAX_R, Geometry
from ...core.kernels import KernelSpec
from ...core.plan import plan_tiles


class _Arrays:
    def __init__(self, problem):
        _ext.load()
        spec = KernelSpec(problem.kernel, problem.bandwidth)
        self.geom = geom = Geometry.build(problem.x, problem.centers, problem.M, spec, allow_direct=False,
                                          allow_frames=False, allow_wide=False)
        self.frame = geom.frames[0]
        factor = geom.factor
        self.F = None if factor.kind == "identity" else \
            (factor.as_dense(problem.x.device) * spec.coord_scale).to(problem.x.dtype).contiguous()
        self.sigma = spec.coord_scale
        self.laplace = spec.laplace
        self.direct = geom.r <= DIRECT_MAX_R

    def args(self, rows, alpha):
        f, g = self.frame, self.geom
        return (f.ze[rows].contiguous(), f.xe, f.zn[rows].contiguous(), f.xn, f.bz[rows].contiguous(), f.bx,
                alpha.contiguous(), g.z[rows].contiguous(), g.x, self.F, self.sigma, self.laplace, self.direct)


def kernel_mv(problem, budget: int):
    arrays = _Arrays(problem)
    m = problem.x.shape[0]
    if arrays.geom.degenerate:
        return problem.alpha.sum(0, keepdim=True).expand(m, -1).clone()
    return torch.ops.rfm_fast.kernel_mv(*arrays.args(slice(None), problem.alpha), max(1, m))


def _raw_blocks(arrays: _Arrays, problem, budget: int, index=None):
    """(rows, G~ (R, c, r)) per block of rows sized by the planner (accumulator and gradients)."""
    geom, c = arrays.geom, problem.alpha.shape[1]
    m = geom.m if index is None else index.shape[0]
    width = c * (1 + geom.r)
    plan = plan_tiles(m, 1, budget, per_row=2 * width * problem.x.element_size(), device=problem.x.device,
                      preferred=(max(1, m), 1), minimum=(1, 1), what="a block of CUDA gradient rows")
    for rows in plan.row_blocks(m):
        sel = rows if index is None else index[rows]
        acc = torch.ops.rfm_fast.kernel_grad(*arrays.args(sel, problem.alpha), rows.stop - rows.start)
        R = acc.shape[0]
        G = acc[:, :c, None] * arrays.frame.ze[sel][:, None, :] - acc[:, c:].view(R, c, geom.r)
        yield rows, G


def kernel_grad(problem, budget: int):
    m, d, c = problem.x.shape[0], problem.x.shape[1], problem.alpha.shape[1]
    out = torch.zeros(m, c, d, dtype=problem.x.dtype, device=problem.x.device)
    arrays = _Arrays(problem)
    if m == 0 or arrays.geom.degenerate:
        return out
    for rows, G in _raw_blocks(arrays, problem, budget):
        out[rows] = arrays.geom.gradient_to_input(G)
    return out


def agop(problem, budget: int, *, centered: bool, diag: bool):
    m, d, c = problem.x.shape[0], problem.x.shape[1], problem.alpha.shape[1]
    arrays = _Arrays(problem)
    geom = arrays.geom
    if geom.degenerate:
        zeros = problem.x.new_zeros(d, d)
        return torch.diagonal(zeros).clone() if diag else zeros
    return agop_from_blocks(lambda index: _raw_blocks(arrays, problem, budget, index), m, c, geom.factor, geom.spec,
                            centered=centered, diag=diag, dtype=problem.x.dtype, device=problem.x.device)
