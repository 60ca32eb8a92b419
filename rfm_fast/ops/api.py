"""The public ops: kernel matrix, kernel mat-vec, predictor gradient and AGOP.

Conventions (docs/maths.md): evaluation points x (m, d), centres (n, d), coefficients alpha (n, c) or (n,),
bandwidth L > 0, M None / (d,) diagonal / (d, d) symmetric PSD, ||u||_M = sqrt(u^T M u);
``M_factor=S`` (d, k) instead of M stands for M = S S^T (a low-rank metric the caller holds as a factor: it is
used through its thin SVD, and M is never formed). Every op works in the metric's numerical rank r (eigenvalues
of M above eps^2 times the largest, eps of the working dtype): its GEMMs cost r, not d, columns;
laplace k = exp(-||z - x||_M / L), gaussian k = exp(-||z - x||_M^2 / (2 L^2)).

Type rules: numpy in gives numpy out, torch in gives torch out on the device and dtype of ``x``. float32 and
float64 everywhere (float16/bfloat16 on the triton backend). ``centers`` must share the dtype and device of ``x``;
``alpha`` and ``M`` are cast to that dtype. A 1-D alpha means c = 1 and drops the c axis of the outputs.

Errors: TypeError / ValueError naming the argument for malformed input (shapes, dtypes, non-finite values, an M
that is not symmetric PSD, bandwidth <= 0, unknown kernel or backend names); RuntimeError when an explicitly
requested backend cannot run here, with the reason.

``memory_budget`` (bytes or a string such as "256MB"; default ``$RFM_FAST_MEMORY_BUDGET`` or 128 MiB) bounds the
working memory of the streaming backends, beyond inputs and outputs.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .._config import memory_budget as resolve_budget
from .._dispatch import choose
from .._validation import Problem, all_finite, check_flag, prepare
from ..core.autograd import KernelMatrixFunction, KernelMvFunction, needs_grad


def _run(op: str, problem: Problem, backend: str, budget: int, **options):
    out = choose(op, problem, backend).function(op)(problem, budget, **options)
    if op != "kernel_matrix" and not all_finite(out):
        # Finite inputs can only give a non-finite result by overflowing the output dtype.
        raise ValueError(f"{op} overflows {problem.dtype}: its result is beyond the dtype's range for these inputs "
                         f"(bandwidth {problem.bandwidth:.3g}); use float64 inputs or a larger bandwidth")
    return out


def _no_autograd(op: str, problem: Problem) -> None:
    if needs_grad(problem.x, problem.centers, problem.alpha, problem.M):
        raise RuntimeError(f"{op} is not differentiable: call it on detached tensors (x.detach(), "
                           "centers.detach(), alpha.detach()) or under torch.no_grad(); kernel_matrix and kernel_mv "
                           "support autograd")


def _check_M_grad(problem: Problem) -> None:
    if isinstance(problem.M, torch.Tensor) and problem.M.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("gradients with respect to M are not supported: pass M.detach()")


def kernel_matrix(x: Any, centers: Any, *, kernel: str = "laplace", bandwidth: float = 1.0, M: Any = None,
                  backend: str = "auto", memory_budget: Optional[int | str] = None, M_factor: Any = None) -> Any:
    """Kernel matrix K[j, i] = k_M(x_j, centers_i).

    x: (m, d), centers: (n, d) -> (m, n). The output is the only O(m n) allocation. Differentiable with respect
    to x and centers (torch tensors that require grad).
    """
    problem = prepare(x, centers, None, M, kernel, bandwidth, need_alpha=False, M_factor=M_factor)
    budget = resolve_budget(memory_budget)
    _check_M_grad(problem)
    if needs_grad(problem.x, problem.centers):
        return KernelMatrixFunction.apply(problem.x, problem.centers, problem, backend, budget)
    return problem.output(_run("kernel_matrix", problem, backend, budget))


def kernel_mv(x: Any, centers: Any, alpha: Any, *, kernel: str = "laplace", bandwidth: float = 1.0, M: Any = None,
              backend: str = "auto", memory_budget: Optional[int | str] = None, M_factor: Any = None) -> Any:
    """Kernel predictor f(x_j) = sum_i alpha_i k_M(x_j, centers_i), i.e. K(x, centers) @ alpha.

    x: (m, d), centers: (n, d), alpha: (n, c) -> (m, c); alpha (n,) -> (m,). No m x n matrix is formed.
    Differentiable with respect to x, centers and alpha (torch tensors that require grad).
    """
    problem = prepare(x, centers, alpha, M, kernel, bandwidth, need_alpha=True, allow_half=True,
                      M_factor=M_factor)
    budget = resolve_budget(memory_budget)
    _check_M_grad(problem)
    if needs_grad(problem.x, problem.centers, problem.alpha):
        out = KernelMvFunction.apply(problem.x, problem.centers, problem.alpha, problem, backend, budget)
    else:
        out = _run("kernel_mv", problem, backend, budget)
    return problem.output(out[:, 0] if problem.squeeze_c else out)


def kernel_grad(x: Any, centers: Any, alpha: Any, *, kernel: str = "laplace", bandwidth: float = 1.0, M: Any = None,
                backend: str = "auto", memory_budget: Optional[int | str] = None, M_factor: Any = None) -> Any:
    """Gradient of the predictor with respect to its input, J(x_j) in R^{c x d}:

        laplace:  J(z) = sum_i alpha_i (-(1/L) k / ||z - x_i||_M) (M (z - x_i))^T   (0 for z = x_i)
        gaussian: J(z) = sum_i alpha_i (-(1/L^2) k) (M (z - x_i))^T

    x: (m, d), centers: (n, d), alpha: (n, c) -> (m, c, d); alpha (n,) -> (m, d). Not differentiable itself
    (raises on inputs that require grad).
    """
    problem = prepare(x, centers, alpha, M, kernel, bandwidth, need_alpha=True, allow_half=True,
                      M_factor=M_factor)
    _no_autograd("kernel_grad", problem)
    out = _run("kernel_grad", problem, backend, resolve_budget(memory_budget))
    return problem.output(out[:, 0] if problem.squeeze_c else out)


def agop(x: Any, centers: Any, alpha: Any, *, kernel: str = "laplace", bandwidth: float = 1.0, M: Any = None,
         centered: bool = False, diag: bool = False, backend: str = "auto",
         memory_budget: Optional[int | str] = None, M_factor: Any = None) -> Any:
    """Average gradient outer product of the predictor over the evaluation points x:

        AGOP = (1/m) sum_j J(x_j)^T J(x_j)                       (d, d), symmetric PSD
        centered=True: the gradients' covariance, (1/m) sum_j (J_j - mu)^T (J_j - mu), mu = (1/m) sum_j J_j
        diag=True: return only the diagonal, (d,)

    x: (m >= 1, d), centers: (n, d), alpha: (n, c) or (n,). Neither the m x n weights nor the m x c x d gradients
    are held whole by the streaming backends. The RFM rescaling of M (by its max entry, or the square root of
    Deep RFM) belongs to the models, not to this op. Not differentiable (raises on inputs that require grad).
    """
    centered = check_flag("centered", centered)
    diag = check_flag("diag", diag)
    problem = prepare(x, centers, alpha, M, kernel, bandwidth, need_alpha=True, allow_half=True,
                      allow_empty_x=False, M_factor=M_factor)
    _no_autograd("agop", problem)
    return problem.output(_run("agop", problem, backend, resolve_budget(memory_budget), centered=centered,
                               diag=diag))


def kernel_normal_mv(x: Any, centers: Any, alpha: Any, *, kernel: str = "laplace", bandwidth: float = 1.0,
                     M: Any = None, backend: str = "auto", memory_budget: Optional[int | str] = None,
                     M_factor: Any = None) -> torch.Tensor:
    """K^T (K alpha) with K = K(x, centers) (m, n): the product of the Nystrom normal equations, each kernel tile
    computed once (two ``kernel_mv`` calls compute every tile twice). x: (m, d), centers: (n, d), alpha (n, c)
    -> (n, c) float64 torch tensor (per-row-block products summed in float64). Private to the solvers: runs on
    the backends that work on the core's tiles (torch, cpp; naive as the reference); :func:`fuses_normal_mv`
    says whether a call reaches one. Not differentiable."""
    problem = prepare(x, centers, alpha, M, kernel, bandwidth, need_alpha=True, M_factor=M_factor)
    _no_autograd("kernel_normal_mv", problem)
    return choose("kernel_normal_mv", problem, backend).function("kernel_normal_mv")(
        problem, resolve_budget(memory_budget))


def fuses_normal_mv(x: Any, centers: Any, *, kernel: str = "laplace", bandwidth: float = 1.0, M: Any = None,
                    backend: str = "auto", M_factor: Any = None) -> bool:
    """Whether ``kernel_mv`` on these inputs runs on a backend that also has :func:`kernel_normal_mv` (otherwise
    the two mat-vecs on the chosen backend are the faster way to the same product)."""
    from .._dispatch import REGISTRY

    problem = prepare(x[:1], centers[:1], None, M, kernel, bandwidth, need_alpha=False, M_factor=M_factor)
    return "kernel_normal_mv" in REGISTRY[choose("kernel_mv", problem, backend).name].ops
