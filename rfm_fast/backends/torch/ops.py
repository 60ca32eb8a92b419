"""The four ops on the kernel core with the torch elementwise pass (``rfm_fast.core.tiles.TorchPass``)."""

from __future__ import annotations

from ...core import ops as core
from ...core.kernels import KernelSpec


def _spec(problem) -> KernelSpec:
    return KernelSpec(problem.kernel, problem.bandwidth)


def kernel_matrix(problem, budget: int):
    return core.kernel_matrix(problem.x, problem.centers, problem.M, _spec(problem), budget, core.torch_evaluator)


def kernel_mv(problem, budget: int):
    return core.kernel_mv(problem.x, problem.centers, problem.alpha, problem.M, _spec(problem), budget,
                          core.torch_evaluator)


def kernel_normal_mv(problem, budget: int):
    return core.kernel_normal_mv(problem.x, problem.centers, problem.alpha, problem.M, _spec(problem), budget,
                                 core.torch_evaluator)


def kernel_grad(problem, budget: int):
    return core.kernel_grad(problem.x, problem.centers, problem.alpha, problem.M, _spec(problem), budget,
                            core.torch_evaluator)


def agop(problem, budget: int, *, centered: bool, diag: bool):
    return core.agop(problem.x, problem.centers, problem.alpha, problem.M, _spec(problem), budget,
                     core.torch_evaluator, centered=centered, diag=diag)
