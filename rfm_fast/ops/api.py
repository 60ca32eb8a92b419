"""The public ops: kernel matrix, kernel mat-vec, predictor gradient and AGOP.

Conventions (../CONVENTIONS.md): evaluation points x (m, d), centres (n, d), coefficients alpha (n, c) or (n,),
bandwidth L > 0, M None / (d,) diagonal / (d, d) symmetric PSD, ||u||_M = sqrt(u^T M u);
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

from .._config import memory_budget as resolve_budget
from .._dispatch import choose
from .._validation import Problem, check_flag, prepare


def _run(op: str, problem: Problem, backend: str, memory_budget, **options):
    impl = choose(op, problem, backend)
    args = [problem.x, problem.centers]
    if problem.alpha is not None:
        args.append(problem.alpha)
    args += [problem.M, problem.kernel, problem.bandwidth]
    if impl.takes_budget:
        options["memory_budget"] = resolve_budget(memory_budget)
    return impl.function(op)(*args, **options)


def kernel_matrix(x: Any, centers: Any, *, kernel: str = "laplace", bandwidth: float = 1.0, M: Any = None,
                  backend: str = "auto", memory_budget: Optional[int | str] = None) -> Any:
    """Kernel matrix K[j, i] = k_M(x_j, centers_i).

    x: (m, d), centers: (n, d) -> (m, n). The output is the only O(m n) allocation.
    """
    problem = prepare(x, centers, None, M, kernel, bandwidth, need_alpha=False)
    return problem.output(_run("kernel_matrix", problem, backend, memory_budget))


def kernel_mv(x: Any, centers: Any, alpha: Any, *, kernel: str = "laplace", bandwidth: float = 1.0, M: Any = None,
              backend: str = "auto", memory_budget: Optional[int | str] = None) -> Any:
    """Kernel predictor f(x_j) = sum_i alpha_i k_M(x_j, centers_i), i.e. K(x, centers) @ alpha.

    x: (m, d), centers: (n, d), alpha: (n, c) -> (m, c); alpha (n,) -> (m,). No m x n matrix is formed.
    """
    problem = prepare(x, centers, alpha, M, kernel, bandwidth, need_alpha=True, allow_half=True)
    out = _run("kernel_mv", problem, backend, memory_budget)
    return problem.output(out[:, 0] if problem.squeeze_c else out)


def kernel_grad(x: Any, centers: Any, alpha: Any, *, kernel: str = "laplace", bandwidth: float = 1.0, M: Any = None,
                backend: str = "auto", memory_budget: Optional[int | str] = None) -> Any:
    """Gradient of the predictor with respect to its input, J(x_j) in R^{c x d}:

        laplace:  J(z) = sum_i alpha_i (-(1/L) k / ||z - x_i||_M) (M (z - x_i))^T   (0 for z = x_i)
        gaussian: J(z) = sum_i alpha_i (-(1/L^2) k) (M (z - x_i))^T

    x: (m, d), centers: (n, d), alpha: (n, c) -> (m, c, d); alpha (n,) -> (m, d).
    """
    problem = prepare(x, centers, alpha, M, kernel, bandwidth, need_alpha=True, allow_half=True)
    out = _run("kernel_grad", problem, backend, memory_budget)
    return problem.output(out[:, 0] if problem.squeeze_c else out)


def agop(x: Any, centers: Any, alpha: Any, *, kernel: str = "laplace", bandwidth: float = 1.0, M: Any = None,
         centered: bool = False, diag: bool = False, backend: str = "auto",
         memory_budget: Optional[int | str] = None) -> Any:
    """Average gradient outer product of the predictor over the evaluation points x:

        AGOP = (1/m) sum_j J(x_j)^T J(x_j)                       (d, d), symmetric PSD
        centered=True: subtract mu^T mu, mu = (1/m) sum_j J(x_j)  (the gradients' covariance)
        diag=True: return only the diagonal, (d,)

    x: (m >= 1, d), centers: (n, d), alpha: (n, c) or (n,). Neither the m x n weights nor the m x c x d gradients
    are held whole by the streaming backends. The RFM rescaling of M (by its max entry, or the square root of
    Deep RFM) belongs to the models, not to this op.
    """
    centered = check_flag("centered", centered)
    diag = check_flag("diag", diag)
    problem = prepare(x, centers, alpha, M, kernel, bandwidth, need_alpha=True, allow_half=True,
                      allow_empty_x=False)
    return problem.output(_run("agop", problem, backend, memory_budget, centered=centered, diag=diag))
