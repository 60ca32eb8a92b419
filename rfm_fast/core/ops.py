"""The four ops (and the Nystrom normal-equations product) on the kernel core, for every backend that works on
tiles (torch, cpp, and Triton where its fused kernels do not apply). Inputs are canonical tensors
(``rfm_fast._validation.Problem``): z (m, d), x (n, d), alpha (n, c), M None / (d,) / (d, d), in one float
dtype on one device; outputs in the caller's order.

What a backend plugs in is an *evaluator factory*: (geometry, gradient) -> (TileEvaluator, scratch tiles it
needs), i.e. the elementwise pass (``torch_evaluator``, ``pass_evaluator(compiled)``) or a whole tile kernel.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from . import matvec
from .agop import agop_from_blocks
from .geometry import Geometry
from .gradient import gradient_blocks
from .kernels import KernelSpec
from .tiles import ElementwisePass, TileEvaluator, TorchPass

EvaluatorFactory = Callable[[Geometry, bool], tuple]


class _LazyScratchPass:
    """TorchPass with a scratch buffer grown on first use to the largest tile it sees."""

    separable = True

    def __init__(self):
        self.inner = TorchPass()

    def _grow(self, tile, spec, gradient):
        if gradient and spec.laplace:
            buf = self.inner.scratch
            if buf is None or buf.numel() < tile.numel() or buf.dtype != tile.dtype or buf.device != tile.device:
                self.inner.scratch = torch.empty(tile.numel(), dtype=tile.dtype, device=tile.device)

    def __call__(self, tile, bz, bx, spec, gradient):
        self._grow(tile, spec, gradient)
        return self.inner(tile, bz, bx, spec, gradient)

    def formulas(self, tile, spec, gradient, near):
        self._grow(tile, spec, gradient)
        self.inner.formulas(tile, spec, gradient, near)


def torch_evaluator(geom: Geometry, gradient: bool):
    """Tiles with the torch elementwise pass; Laplace gradient tiles need one scratch tile."""
    return TileEvaluator(geom, _LazyScratchPass()), (1 if gradient and geom.spec.laplace else 0)


# The tiles ("value", "gradient") for which an evaluator takes the band (``Geometry.band``). The torch pass takes it
# for both: its near test and its direct passes are separate torch passes, which the band skips for most pairs.
torch_evaluator.band = ("value", "gradient")


def _geometry(z, x, M, spec, make_evaluator, tiles: str = "value") -> Geometry:
    """The geometry of an op on value or gradient ``tiles``: with a band where the evaluator takes one."""
    return Geometry.build(z, x, M, spec, allow_band=tiles if tiles in getattr(make_evaluator, "band", ()) else False)


def pass_evaluator(elementwise: ElementwisePass) -> EvaluatorFactory:
    """An evaluator factory for an elementwise pass that needs no scratch (the compiled one)."""
    return lambda geom, gradient: (TileEvaluator(geom, elementwise), 0)


def _unpermute_matrix(geom: Geometry, K: torch.Tensor) -> torch.Tensor:
    if geom.perm_z is None and geom.perm_x is None:
        return K
    rows = geom.perm_z if geom.perm_z is not None else torch.arange(geom.m, device=K.device)
    cols = geom.perm_x if geom.perm_x is not None else torch.arange(geom.n, device=K.device)
    out = torch.empty_like(K)
    out[rows[:, None], cols[None, :]] = K
    return out


def kernel_matrix(z, x, M, spec: KernelSpec, budget: int, make_evaluator: EvaluatorFactory,
                  geom: Optional[Geometry] = None) -> torch.Tensor:
    """K (m, n), K[j, i] = k_M(z_j, x_i)."""
    geom = geom or _geometry(z, x, M, spec, make_evaluator)
    if geom.degenerate:
        return torch.ones(geom.m, geom.n, dtype=z.dtype, device=z.device)
    evaluator, _ = make_evaluator(geom, False)
    return _unpermute_matrix(geom, matvec.kernel_matrix(geom, evaluator, budget))


def kernel_mv(z, x, alpha, M, spec: KernelSpec, budget: int, make_evaluator: EvaluatorFactory,
              geom: Optional[Geometry] = None) -> torch.Tensor:
    """K(z, x) alpha, (m, c)."""
    geom = geom or _geometry(z, x, M, spec, make_evaluator)
    if geom.degenerate:
        return alpha.sum(0, keepdim=True).expand(geom.m, -1).clone()
    evaluator, _ = make_evaluator(geom, False)
    out = matvec.kernel_mv(geom, geom.permute_alpha(alpha).contiguous(), evaluator, budget)
    return geom.unpermute_rows(out)


def kernel_normal_mv(z, x, alpha, M, spec: KernelSpec, budget: int, make_evaluator: EvaluatorFactory,
                     geom: Optional[Geometry] = None) -> torch.Tensor:
    """K(z, x)^T (K(z, x) alpha), (n, c) float64: each tile of K computed once (``matvec.kernel_normal_mv``)."""
    geom = geom or _geometry(z, x, M, spec, make_evaluator)
    if geom.degenerate:
        return (geom.m * alpha.to(torch.float64).sum(0, keepdim=True)).expand(geom.n, -1).clone()
    evaluator, _ = make_evaluator(geom, False)
    out = matvec.kernel_normal_mv(geom, geom.permute_alpha(alpha).contiguous(), evaluator, budget)
    if geom.perm_x is None:
        return out
    result = torch.empty_like(out)
    result[geom.perm_x] = out
    return result


def raw_gradient_blocks(geom: Geometry, alpha: torch.Tensor, budget: int, make_evaluator: EvaluatorFactory,
                        **kw):
    """(rows, G~) blocks of raw gradients (permuted rows), ``alpha`` in the caller's order."""
    evaluator, scratch = make_evaluator(geom, True)
    return gradient_blocks(geom, geom.permute_alpha(alpha).contiguous(), evaluator, budget, scratch_cells=scratch,
                           **kw)


def kernel_grad(z, x, alpha, M, spec: KernelSpec, budget: int, make_evaluator: EvaluatorFactory,
                geom: Optional[Geometry] = None) -> torch.Tensor:
    """J (m, c, d), J[j] = d f / d z at z_j."""
    geom = geom or _geometry(z, x, M, spec, make_evaluator, "gradient")
    m, c, d = geom.m, alpha.shape[1], geom.d
    if geom.degenerate:
        return torch.zeros(m, c, d, dtype=z.dtype, device=z.device)
    out = torch.empty(m, c, d, dtype=z.dtype, device=z.device)
    for rows, G in raw_gradient_blocks(geom, alpha, budget, make_evaluator):
        out[rows] = geom.gradient_to_input(G)
    return geom.unpermute_rows(out)


def agop(z, x, alpha, M, spec: KernelSpec, budget: int, make_evaluator: EvaluatorFactory, *, centered: bool,
         diag: bool, geom: Optional[Geometry] = None) -> torch.Tensor:
    """AGOP (d, d), or its diagonal (d,)."""
    geom = geom or _geometry(z, x, M, spec, make_evaluator, "gradient")
    m, c, d = geom.m, alpha.shape[1], geom.d
    if geom.degenerate:
        zeros = torch.zeros(d, d, dtype=z.dtype, device=z.device)
        return torch.diagonal(zeros).clone() if diag else zeros

    def blocks(index):
        return raw_gradient_blocks(geom if index is None else geom.rows_subset(index), alpha, budget,
                                   make_evaluator)

    return agop_from_blocks(blocks, m, c, geom.factor, geom.spec, centered=centered, diag=diag, dtype=z.dtype,
                            device=z.device)


def pair_weighted_gradient(z, x, P: torch.Tensor, M, spec: KernelSpec, budget: int,
                           make_evaluator: EvaluatorFactory = torch_evaluator) -> torch.Tensor:
    """sum_i P[j, i] grad_z k_M(z, x_i) at z = z_j, (m, d): the backward of ``kernel_matrix`` for an upstream
    gradient P (m, n), by the gradient schedule with every weight w_ji multiplied by P[j, i] (c = 1)."""
    geom = Geometry.build(z, x, M, spec)
    m, n, d = geom.m, geom.n, geom.d
    out = torch.zeros(m, d, dtype=z.dtype, device=z.device)
    if geom.degenerate:
        return out
    if geom.perm_z is not None or geom.perm_x is not None:
        rows = geom.perm_z if geom.perm_z is not None else torch.arange(m, device=z.device)
        cols = geom.perm_x if geom.perm_x is not None else torch.arange(n, device=z.device)
        P = P[rows[:, None], cols[None, :]]
    ones = torch.ones(n, 1, dtype=z.dtype, device=z.device)
    for rows, G in raw_gradient_blocks(geom, ones, budget, make_evaluator, pair_weights=P.to(z.dtype)):
        out[rows] = geom.gradient_to_input(G)[:, 0]
    return geom.unpermute_rows(out)
