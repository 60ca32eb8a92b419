"""Autograd through kernel_matrix and kernel_mv, the same on every backend (rfm_fast/core/autograd.py).

float64 ``torch.autograd.gradcheck`` with self pairs in the data (a point equal to a centre: the Laplace kernel's
cusp, whose derivative the zero-distance rule sets to 0, as a central difference gives) on torch, cpp and keops;
the triton backend (interpreter) in float32 against central differences; kernel_grad and agop refuse inputs that
require grad, with the way out in the message.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

import rfm_fast

from .test_ops import KERNELS

# The CPU backends with a backward pass (naive has none; triton runs through its interpreter below).
BACKENDS = [b for b in rfm_fast.available_backends("cpu") if b in ("torch", "cpp", "keops")]
TRITON = "triton" in rfm_fast.available_backends()


def _inputs(seed: int, m=7, n=9, d=3, c=2):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    Z = torch.randn(m, d, generator=gen, dtype=torch.float64)
    Z[:2] = X[:2]  # self pairs: points equal to centres
    alpha = torch.randn(n, c, generator=gen, dtype=torch.float64)
    B = torch.randn(d, d, generator=gen, dtype=torch.float64)
    M = B @ B.T / d + 0.2 * torch.eye(d, dtype=torch.float64)
    return Z, X, alpha, M


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("metric", [False, True], ids=["M=I", "dense M"])
def test_kernel_mv_gradcheck(backend, kernel, metric):
    Z, X, alpha, M = _inputs(1)
    M = M if metric else None
    inputs = tuple(t.clone().requires_grad_() for t in (Z, X, alpha))

    def f(z, x, a):
        return rfm_fast.kernel_mv(z, x, a, kernel=kernel, bandwidth=1.3, M=M, backend=backend)

    assert gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_matrix_gradcheck(backend, kernel):
    Z, X, _, M = _inputs(2)
    inputs = tuple(t.clone().requires_grad_() for t in (Z, X))

    def f(z, x):
        return rfm_fast.kernel_matrix(z, x, kernel=kernel, bandwidth=1.1, M=M, backend=backend)

    assert gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_tensor_as_points_and_centres(backend):
    """kernel_mv(X, X, alpha): both uses of X receive their gradient; self pairs stay at distance 0 under any
    perturbation of X, so the Laplace terms there contribute exactly nothing and nothing is NaN."""
    _, X, alpha, _ = _inputs(3)
    X = X.clone().requires_grad_()
    a = alpha.clone().requires_grad_()
    assert gradcheck(lambda x, w: rfm_fast.kernel_mv(x, x, w, kernel="laplace", bandwidth=0.9, backend=backend),
                     (X, a), eps=1e-6, atol=1e-7, rtol=1e-5)
    out = rfm_fast.kernel_mv(X, X, a, kernel="laplace", bandwidth=0.9, backend=backend).sum()
    out.backward()
    assert torch.isfinite(X.grad).all() and torch.isfinite(a.grad).all()


def test_backward_is_the_kernel_transposed_and_the_contracted_gradient():
    """dL/dalpha = K^T g and dL/dx = sum_k g_k J_k (J from kernel_grad), checked against the ops themselves."""
    Z, X, alpha, M = _inputs(4, m=30, n=40, d=5, c=3)
    g = torch.randn(30, 3, dtype=torch.float64)
    z, x, a = (t.clone().requires_grad_() for t in (Z, X, alpha))
    (rfm_fast.kernel_mv(z, x, a, bandwidth=2.0, M=M) * g).sum().backward()
    K = rfm_fast.kernel_matrix(Z, X, bandwidth=2.0, M=M)
    assert torch.allclose(a.grad, K.T @ g, rtol=1e-10, atol=1e-12)
    J = rfm_fast.kernel_grad(Z, X, alpha, bandwidth=2.0, M=M)
    assert torch.allclose(z.grad, torch.einsum("mcd,mc->md", J, g), rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(not TRITON, reason="needs triton (CUDA or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("op", ["kernel_mv", "kernel_matrix"])
def test_triton_float32_against_central_differences(op):
    gen = torch.Generator().manual_seed(5)
    X = torch.randn(12, 4, generator=gen)
    Z = torch.randn(6, 4, generator=gen)
    alpha = torch.randn(12, 2, generator=gen)
    weights = torch.randn(6, 2 if op == "kernel_mv" else 12, generator=gen)

    def loss(z):
        args = (z, X, alpha) if op == "kernel_mv" else (z, X)
        return (getattr(rfm_fast, op)(*args, kernel="gaussian", bandwidth=1.5, backend="triton") * weights).sum()

    z = Z.clone().requires_grad_()
    loss(z).backward()
    h = 1e-2
    numeric = torch.zeros_like(Z)
    for idx in range(Z.numel()):
        step = torch.zeros_like(Z).view(-1)
        step[idx] = h
        step = step.view_as(Z)
        numeric.view(-1)[idx] = (loss(Z + step) - loss(Z - step)) / (2 * h)
    assert torch.allclose(z.grad, numeric, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("op", ["kernel_grad", "agop"])
def test_gradient_ops_refuse_autograd_with_the_way_out(op):
    Z, X, alpha, _ = _inputs(6)
    with pytest.raises(RuntimeError, match="detach"):
        getattr(rfm_fast, op)(Z.requires_grad_(), X, alpha)
    with torch.no_grad():
        assert torch.isfinite(getattr(rfm_fast, op)(Z, X, alpha)).all()


def test_metric_gradients_are_refused():
    Z, X, alpha, M = _inputs(7)
    with pytest.raises(RuntimeError, match="M.detach"):
        rfm_fast.kernel_mv(Z, X, alpha, M=M.requires_grad_())


def test_laplace_zero_distance_pair_has_zero_gradient():
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    c = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    out = rfm_fast.kernel_mv(x, c, torch.ones(1, dtype=torch.float64), kernel="laplace", bandwidth=1.0)
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
