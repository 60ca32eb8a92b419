"""The four ops on the kernel core with the compiled elementwise pass: the core fills each tile's distances by GEMM
and the compiled op does the near test and the values (or gradient weights) in one vectorised pass, returning the
near pairs for the core's exact recomputation."""

from __future__ import annotations

import torch

from ... import _ext
from ...core import ops as core
from ...core.kernels import KernelSpec


class CompiledPass:
    """``ElementwisePass`` through ``torch.ops.rfm_fast.tile_pass_``; the kernel description's sign and formula
    choice are passed as arguments. It also forms the directly formed coordinates' part of s (and, in gradient
    tiles, the weighted differences) in the same pass (``fuses_direct``)."""

    fuses_direct = True
    # For one output it can also sum the direct coordinates' part of the gradient in the same pass
    # (``accumulate``: alpha of the columns, the rows' (k, R) sums, and for the mirrored side alpha of the rows and
    # the columns' (k, C) sums), instead of writing w * dhi for the core's products.
    accumulates_direct = True

    def __call__(self, tile, bz, bx, spec: KernelSpec, gradient: bool, direct=None, accumulate=None):
        if direct is None:
            return torch.ops.rfm_fast.tile_pass_(tile, bz, bx, spec.tile_sign, spec.laplace, gradient)
        zh, xh, dout = direct
        if accumulate is not None:
            a_cols, acc_rows, a_rows, acc_cols = accumulate
            return torch.ops.rfm_fast.tile_pass_(tile, bz, bx, spec.tile_sign, spec.laplace, gradient,
                                                 zh.contiguous(), xh.T.contiguous(), None, a_cols, a_rows, acc_rows,
                                                 acc_cols)
        return torch.ops.rfm_fast.tile_pass_(tile, bz, bx, spec.tile_sign, spec.laplace, gradient,
                                             zh.contiguous(), xh.T.contiguous(), dout)


_pass = core.pass_evaluator(CompiledPass())


def _spec(problem) -> KernelSpec:
    _ext.load()
    return KernelSpec(problem.kernel, problem.bandwidth)


def kernel_matrix(problem, budget: int):
    return core.kernel_matrix(problem.x, problem.centers, problem.M, _spec(problem), budget, _pass)


def kernel_mv(problem, budget: int):
    return core.kernel_mv(problem.x, problem.centers, problem.alpha, problem.M, _spec(problem), budget, _pass)


def kernel_normal_mv(problem, budget: int):
    return core.kernel_normal_mv(problem.x, problem.centers, problem.alpha, problem.M, _spec(problem), budget,
                                 _pass)


def kernel_grad(problem, budget: int):
    return core.kernel_grad(problem.x, problem.centers, problem.alpha, problem.M, _spec(problem), budget, _pass)


def agop(problem, budget: int, *, centered: bool, diag: bool):
    return core.agop(problem.x, problem.centers, problem.alpha, problem.M, _spec(problem), budget, _pass,
                     centered=centered, diag=diag)
