"""The reference formulas behind ``backend="naive"`` (``memory_budget`` does not apply: they materialise)."""

from __future__ import annotations

from ...ops.agop import naive as _agop
from ...ops.kernel_grad import naive as _grad
from ...ops.kernel_matrix import naive as _matrix
from ...ops.kernel_mv import naive as _mv


def kernel_matrix(problem, budget: int):
    return _matrix.kernel_matrix(problem.x, problem.centers, problem.M, problem.kernel, problem.bandwidth)


def kernel_mv(problem, budget: int):
    return _mv.kernel_mv(problem.x, problem.centers, problem.alpha, problem.M, problem.kernel, problem.bandwidth)


def kernel_normal_mv(problem, budget: int):
    K = _matrix.kernel_matrix(problem.x, problem.centers, problem.M, problem.kernel, problem.bandwidth)
    return K.T.double() @ (K.double() @ problem.alpha.double())


def kernel_grad(problem, budget: int):
    return _grad.kernel_grad(problem.x, problem.centers, problem.alpha, problem.M, problem.kernel, problem.bandwidth)


def agop(problem, budget: int, *, centered: bool, diag: bool):
    return _agop.agop(problem.x, problem.centers, problem.alpha, problem.M, problem.kernel, problem.bandwidth,
                      centered=centered, diag=diag)
