"""Autograd through ``kernel_matrix`` and ``kernel_mv``, the same on every backend: custom Functions whose backward
passes are themselves fused ops, never an m x n x d tensor.

For f = K(x, c) alpha and an upstream gradient g (m, c):
    dL/dalpha = K(c, x) g                                   (a kernel_mv with the roles swapped)
    dL/dx_j   = sum_k g_jk J_k(x_j),  J = kernel_grad(x, c, alpha)     (contracted row block by row block)
    dL/dc_i   = sum_k alpha_ik J'_k(c_i),  J' = kernel_grad(c, x, g)  (k is symmetric: grad_c k(x, c) is the
                                                                        gradient of k(., x) at c)
For K = K(x, c) and an upstream gradient G (m, n): dL/dx_j = sum_i G_ji grad k(x_j, c_i), the gradient schedule
with every weight multiplied by G (``rfm_fast.core.ops.pair_weighted_gradient``), and dL/dc likewise with G^T.
A pair at distance 0 contributes gradient 0 (the Laplace kernel's cusp, by the zero-distance rule), which is also
what a central finite difference gives. Gradients with respect to M, and second derivatives, are not provided.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.autograd.function import once_differentiable

from .kernels import KernelSpec


def _run(op: str, problem, backend: str, budget: int, **options):
    from .._dispatch import choose

    return choose(op, problem, backend).function(op)(problem, budget, **options)


def _detached(problem):
    return dataclasses.replace(problem, x=problem.x.detach(), centers=problem.centers.detach(),
                               alpha=None if problem.alpha is None else problem.alpha.detach())


def _contracted_gradient(problem, coeff: torch.Tensor, backend: str, budget: int) -> torch.Tensor:
    """sum_k coeff[j, k] J_k(x_j), (m, d), with J = kernel_grad(problem), a block of rows at a time."""
    m, d = problem.x.shape
    c = problem.alpha.shape[1]
    step = max(1, budget // max(1, 4 * c * d * problem.x.element_size()))
    out = torch.empty(m, d, dtype=problem.x.dtype, device=problem.x.device)
    for start in range(0, m, step):
        rows = slice(start, min(m, start + step))
        part = dataclasses.replace(problem, x=problem.x[rows])
        J = _run("kernel_grad", part, backend, budget)
        out[rows] = torch.einsum("rcd,rc->rd", J, coeff[rows].to(J.dtype))
    return out


class KernelMvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, centers, alpha, problem, backend, budget):
        ctx.problem, ctx.backend, ctx.budget = _detached(problem), backend, budget
        return _run("kernel_mv", ctx.problem, backend, budget)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        p, backend, budget = ctx.problem, ctx.backend, ctx.budget
        g = g.contiguous().to(p.x.dtype)
        grad_x = grad_c = grad_a = None
        if ctx.needs_input_grad[2]:
            grad_a = _run("kernel_mv", dataclasses.replace(p, x=p.centers, centers=p.x, alpha=g), backend, budget)
        if ctx.needs_input_grad[0]:
            grad_x = _contracted_gradient(p, g, backend, budget)
        if ctx.needs_input_grad[1]:
            swapped = dataclasses.replace(p, x=p.centers, centers=p.x, alpha=g)
            grad_c = _contracted_gradient(swapped, p.alpha, backend, budget)
        return grad_x, grad_c, grad_a, None, None, None


class KernelMatrixFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, centers, problem, backend, budget):
        ctx.problem, ctx.budget = _detached(problem), budget
        return _run("kernel_matrix", ctx.problem, backend, budget)

    @staticmethod
    @once_differentiable
    def backward(ctx, G):
        from .ops import pair_weighted_gradient

        p, budget = ctx.problem, ctx.budget
        spec = KernelSpec(p.kernel, p.bandwidth)
        G = G.to(p.x.dtype)
        grad_x = grad_c = None
        if ctx.needs_input_grad[0]:
            grad_x = pair_weighted_gradient(p.x, p.centers, G, p.M, spec, budget)
        if ctx.needs_input_grad[1]:
            grad_c = pair_weighted_gradient(p.centers, p.x, G.T, p.M, spec, budget)
        return grad_x, grad_c, None, None, None


def needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)
