"""The fused ops and the large-n solver sharded over ``torch.distributed`` ranks (gloo on CPU, NCCL on GPUs).

Start one process per device with ``torchrun`` and call :func:`init` (or ``torch.distributed.init_process_group``
yourself) before any function here. Every function is collective: all ranks of ``group`` must call it, in the
same order, with arguments of the same kinds. Communication is PyTorch's own (``all_reduce`` / ``all_gather``);
tensors live on each rank's device (``cuda:LOCAL_RANK`` under NCCL).

How the work is split (docs/maths.md for the maths):
- :func:`agop`: by evaluation points. Each rank passes its own points ``x`` (any number, sizes may differ) and
  the whole ``centers`` / ``alpha``; the result is the AGOP over the union of all ranks' points, identical on
  every rank: AGOP = sum_r m_r AGOP_r / m (centred: the mean gradients are combined the same way first).
- :func:`kernel_mv`: by centres. Each rank passes the same ``x`` and its own block of centres with the matching
  rows of ``alpha``; K(x, centres) @ alpha is the sum of the ranks' partial products (all_reduce).
  (Split by evaluation points, kernel_mv needs no communication: call ``rfm_fast.kernel_mv`` on the local points.)
- :func:`nystrom_pcg`: by rows. Every rank holds X (n, d) and Y whole (O(n (d + c)), small next to n^2); each
  owns the rows :func:`shard` gives it of every n-sized vector and of the Nystrom basis, gathers the search
  direction (n x c) for its rows of K p, and all-reduces the dot products. The solution is gathered on every rank.
- :func:`nystrom_krr`: the Nystrom (Falkon-style) solve of ``krr_solve(solver="nystrom")`` by rows of K_nm:
  each rank passes its own rows of X and Y and the same centres; the m-sized products are all-reduced.
- :func:`fit_rfm`: the RFM loop of ``rfm_fast.RFM`` (solve, AGOP at the training points, M <- AGOP / its largest
  entry) on the two sharded pieces above; :func:`predict` splits test points. ``python -m rfm_fast.distributed``
  runs a fit under torchrun.

Results equal the single-process ones up to the order of floating-point sums (float64: to rounding).
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional

import torch
import torch.distributed as dist

from ._validation import tensor_or_array as _as_tensor
from .ops.api import agop as _agop
from .ops.api import kernel_grad as _kernel_grad
from .ops.api import kernel_mv as _kernel_mv
from .solvers.cg import ConvergenceError
from .solvers.preconditioned import check_solver_args, failure_message, pcg_rows

__all__ = ["init", "shard", "all_gather_rows", "agop", "kernel_mv", "nystrom_pcg", "nystrom_krr", "fit_rfm",
           "predict", "RankComm"]


def init(backend: Optional[str] = None) -> tuple[int, int]:
    """Initialise the default process group from torchrun's environment; returns (rank, world_size).

    backend: "nccl" or "gloo"; default NCCL when CUDA is available (and then each process is bound to
    ``cuda:LOCAL_RANK``), else gloo. Outside torchrun (no WORLD_SIZE in the environment) a one-process group on
    a free loopback port is made, so the same script also runs as plain ``python``. A no-op when the group
    already exists.
    """
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed")
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend=backend)
        else:
            import socket

            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size()


def _require(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("rfm_fast.distributed needs an initialised process group: start the script with torchrun "
                           "and call rfm_fast.distributed.init() first")
    return dist.get_rank(group), dist.get_world_size(group)


def shard(n: int, *, group=None, rank: Optional[int] = None, world_size: Optional[int] = None) -> slice:
    """This rank's contiguous block of range(n): sizes differ by at most one, rank order (rank r gets
    [r n / w, (r + 1) n / w)). Pass ``rank`` and ``world_size`` to ask without a process group."""
    if rank is None or world_size is None:
        rank, world_size = _require(group)
    return slice(rank * n // world_size, (rank + 1) * n // world_size)


def all_gather_rows(local: torch.Tensor, *, group=None) -> torch.Tensor:
    """Concatenate every rank's ``local`` (rows_r, ...) along dim 0 in rank order; row counts may differ."""
    _, world = _require(group)
    if world == 1:
        return local
    counts = torch.tensor([local.shape[0]], device=local.device)
    all_counts = [torch.zeros_like(counts) for _ in range(world)]
    dist.all_gather(all_counts, counts, group=group)
    sizes = [int(c) for c in all_counts]
    return _gather_padded(local, sizes, group)


def _gather_padded(local: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    # all_gather wants equal shapes on every backend: pad each block to the largest, then trim.
    top = max(sizes)
    padded = local.new_zeros((top,) + tuple(local.shape[1:]))
    padded[: local.shape[0]] = local
    blocks = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(blocks, padded.contiguous(), group=group)
    return torch.cat([b[:s] for b, s in zip(blocks, sizes)], dim=0)


class RankComm:
    """What the PCG core needs from a process group: sums over ranks and gathering row blocks of known sizes."""

    def __init__(self, group, n: int):
        self.group = group
        self.rank, self.world_size = _require(group)
        blocks = [shard(n, rank=r, world_size=self.world_size) for r in range(self.world_size)]
        self.sizes = [b.stop - b.start for b in blocks]

    def allsum(self, t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def gather_rows(self, local: torch.Tensor) -> torch.Tensor:
        return _gather_padded(local, self.sizes, self.group)


def agop(x: Any, centers: Any, alpha: Any, *, kernel: str = "laplace", bandwidth: float = 1.0, M: Any = None,
         centered: bool = False, diag: bool = False, backend: str = "auto", memory_budget: Any = None,
         group=None) -> torch.Tensor:
    """AGOP over the evaluation points of all ranks: (1/m) sum_r sum_{j in rank r} J(x_j)^T J(x_j), m = sum_r m_r.

    x: this rank's points (m_r, d), m_r >= 0 (at least one point over all ranks); centers (n, d) and alpha (n, c)
    or (n,): the same on every rank. centered: subtract mu^T mu with mu the mean gradient over all m points.
    diag: return the diagonal (d,). Returns a torch tensor in x's dtype on x's device, the same on every rank.
    A centred AGOP costs one more gradient pass (the mean gradient must be summed across ranks).
    """
    _require(group)
    x, centers, alpha = _as_tensor("x", x), _as_tensor("centers", centers), _as_tensor("alpha", alpha)
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D (m, d), got shape {tuple(x.shape)}")
    ops = dict(kernel=kernel, bandwidth=bandwidth, M=M, backend=backend, memory_budget=memory_budget)
    m_local = x.shape[0]
    d = x.shape[1]
    c = 1 if alpha.ndim == 1 else alpha.shape[1]
    m = torch.tensor([float(m_local)], dtype=torch.float64, device=x.device)
    dist.all_reduce(m, group=group)
    if float(m) == 0:
        raise ValueError("x must hold at least one evaluation point over all ranks")
    # Each rank's sum (not mean) of J^T J, in float64 so the combination adds no rounding of its own.
    total = torch.zeros((d,) if diag else (d, d), dtype=torch.float64, device=x.device)
    grad_sum = torch.zeros(c, d, dtype=torch.float64, device=x.device)
    if m_local:
        local = _agop(x, centers, alpha, centered=False, diag=diag, **ops)
        total += torch.as_tensor(local).to(torch.float64) * m_local
        if centered:
            grad_sum += _gradient_sum(x, centers, alpha, c, ops)
    dist.all_reduce(total, group=group)
    total /= float(m)
    if centered:
        dist.all_reduce(grad_sum, group=group)
        mu = grad_sum / float(m)
        total -= (mu * mu).sum(0) if diag else mu.T @ mu
    return total.to(x.dtype)


def _gradient_sum(x, centers, alpha, c, ops) -> torch.Tensor:
    """sum_j J(x_j) (c, d) in float64, through kernel_grad on row blocks of bounded size."""
    from ._config import memory_budget as resolve_budget

    d = x.shape[1]
    rows = max(1, resolve_budget(ops["memory_budget"]) // (4 * c * d * x.element_size()))
    out = torch.zeros(c, d, dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[0], rows):
        J = _as_tensor("J", _kernel_grad(x[start:start + rows], centers, alpha, **ops))
        out += J.reshape(J.shape[0], c, d).to(torch.float64).sum(0)
    return out


def kernel_mv(x: Any, centers: Any, alpha: Any, *, kernel: str = "laplace", bandwidth: float = 1.0, M: Any = None,
              backend: str = "auto", memory_budget: Any = None, group=None) -> torch.Tensor:
    """K(x, all centres) @ alpha with the centres split across ranks.

    x (m, d): the same on every rank. centers (n_r, d), alpha (n_r, c) or (n_r,): this rank's centres and their
    coefficients (n_r >= 0; :func:`shard` gives a balanced split). Returns (m, c) (or (m,)) in x's dtype on x's
    device, the same on every rank.
    """
    _require(group)
    x, centers, alpha = _as_tensor("x", x), _as_tensor("centers", centers), _as_tensor("alpha", alpha)
    squeeze = alpha.ndim == 1
    c = 1 if squeeze else alpha.shape[1]
    if centers.shape[0]:
        out = _as_tensor("out", _kernel_mv(x, centers, alpha.reshape(centers.shape[0], c), kernel=kernel,
                                           bandwidth=bandwidth, M=M, backend=backend, memory_budget=memory_budget))
        out = out.to(x.dtype).reshape(x.shape[0], c).contiguous()
    else:
        out = torch.zeros(x.shape[0], c, dtype=x.dtype, device=x.device)
    dist.all_reduce(out, group=group)
    return out[:, 0] if squeeze else out


def nystrom_pcg(X: Any, Y: Any, *, kernel: str = "laplace", bandwidth: float = 1.0, M: Any = None,
                reg: float = 1e-3, tol: Optional[float] = None, max_iter: Optional[int] = None,
                rank: Optional[int] = None, backend: str = "auto", seed: int = 0, progress: bool = False,
                memory_budget: Any = None, raise_on_failure: bool = True, group=None) -> tuple[torch.Tensor, dict]:
    """:func:`rfm_fast.solvers.preconditioned.nystrom_pcg` sharded by rows over the ranks of ``group``.

    X (n, d) and Y (n, c) / (n,): the same on every rank (on each rank's device). Arguments, defaults, info and
    errors as in the single-process solver; the Nystrom centres are drawn with the same seed, so the result
    equals the single-process solve up to the order of floating-point sums. Each rank holds X, Y and alpha
    (O(n (d + c))), its rows of the CG vectors and (n / world) x rank of the Nystrom basis; one product costs
    n^2 / world kernel evaluations per rank plus an all_gather of n x c. The progress bar shows on rank 0.
    Returns (alpha (n, c) or (n,), info) on every rank.
    """
    _require(group)
    (X, Y, squeeze, kernel, bandwidth, M, reg, tol, max_iter, rank, _) = check_solver_args(
        _as_tensor("X", X), _as_tensor("Y", Y), kernel, bandwidth, M, reg, tol, max_iter, rank)
    n = X.shape[0]
    comm = RankComm(group, n)
    rows = shard(n, rank=comm.rank, world_size=comm.world_size)
    alpha_local, info = pcg_rows(X, Y[rows], rows, comm, kernel=kernel, bandwidth=bandwidth, M=M, reg=reg, tol=tol,
                                 max_iter=max_iter, rank=rank, backend=backend, seed=seed, progress=progress,
                                 memory_budget=memory_budget)
    if raise_on_failure and not info["converged"]:
        raise ConvergenceError(failure_message(info, tol, max_iter, X.dtype), iterations=info["iterations"],
                               residual=info["residual"])
    alpha = comm.gather_rows(alpha_local)  # float64, as the single-process solver returns it
    info["world_size"] = comm.world_size
    return (alpha[:, 0] if squeeze else alpha), info


def nystrom_krr(X: Any, Y: Any, centres: Any, *, kernel: str = "laplace", bandwidth: float = 1.0, M: Any = None,
                reg: float = 1e-3, tol: Optional[float] = None, max_iter: Optional[int] = None,
                backend: str = "auto", memory_budget: Any = None, progress: bool = False,
                group=None) -> tuple[torch.Tensor, dict]:
    """Nystrom kernel ridge regression (``krr_solve(solver="nystrom")``, ``rfm_fast.solvers.nystrom``) with the rows
    of K_nm split across the ranks of ``group``.

    X (n_r, d), Y (n_r, c) or (n_r,): this rank's rows (any sizes, n_r = 0 allowed; n = sum_r n_r >= 1). centres
    (m, d): the same on every rank (e.g. the rows ``rfm_fast.solvers.nystrom.choose_centres`` picks of the whole
    data). Per CG iteration each rank computes K_rm^T (K_rm a) on its rows and one all_reduce sums the (m, c)
    products (and once K_rm^T Y_r); K_mm, the preconditioner's factors and the CG on m-vectors are computed alike
    on every rank, so alpha is identical on all of them and equals the single-process solve up to the order of
    floating-point sums. Defaults, info and errors as ``krr_solve(solver="nystrom")``. Returns (alpha (m, c) or
    (m,) float64, info with "world_size") on every rank.
    """
    from .solvers.cg import default_max_iter
    from .solvers.nystrom import default_nystrom_tol, solve_on_rows

    _require(group)
    X, Y, C = _as_tensor("X", X), _as_tensor("Y", Y), _as_tensor("centres", centres)
    squeeze = Y.ndim == 1
    Y = Y[:, None] if squeeze else Y
    if X.ndim != 2 or C.ndim != 2 or C.shape[1] != X.shape[1] or C.shape[0] == 0:
        raise ValueError(f"X must be (n_r, d) and centres (m >= 1, d), got {tuple(X.shape)} and {tuple(C.shape)}")
    if Y.ndim != 2 or Y.shape[0] != X.shape[0]:
        raise ValueError(f"Y must have shape (n_r,) or (n_r, c) with n_r = {X.shape[0]}, got {tuple(Y.shape)}")
    C = C.to(device=X.device, dtype=X.dtype)
    n = torch.tensor([X.shape[0]], dtype=torch.float64, device=X.device)
    dist.all_reduce(n, group=group)
    n = int(n.item())
    if n == 0:
        raise ValueError("X has no rows on any rank")
    comm = RankComm(group, n)
    tol = tol if tol is not None else default_nystrom_tol(X.dtype)
    alpha, info = solve_on_rows(X, Y.to(X.dtype), C, n, comm, kernel=kernel, bandwidth=bandwidth, M=M, reg=reg,
                                tol=tol, max_iter=max_iter if max_iter is not None else default_max_iter(C.shape[0]),
                                backend=backend, memory_budget=memory_budget, progress=progress)
    info["world_size"] = comm.world_size
    return (alpha[:, 0] if squeeze else alpha), info


def fit_rfm(X: Any, Y: Any, *, iters: int = 3, kernel: str = "laplace", bandwidth: float = 10.0, reg: float = 1e-3,
            diag: bool = False, centered: bool = False, tol: Optional[float] = None, rank: Optional[int] = None,
            backend: str = "auto", seed: int = 0, progress: bool = False, centres: Any = None,
            group=None) -> tuple[torch.Tensor, Optional[torch.Tensor], list]:
    """Recursive Feature Machine fitted across ranks: ``iters`` rounds of alpha = (K_M + reg I)^{-1} Y by
    :func:`nystrom_pcg`, AGOP of the predictor at the training points by :func:`agop` (points split across ranks),
    M <- AGOP / max_ij AGOP_ij (the published RFM rescaling, as ``rfm_fast.RFM(normalize="max")``), then a last
    solve with the final M.

    X (n, d), Y (n, c): the same on every rank. Returns (alpha (n, c), M ((d, d), (d,) with diag=True, or None
    when iters = 0), history: the solver's info dict of every solve), identical on every rank.
    centres (an integer m or indices, as ``rfm_fast.RFM(solver="nystrom", centres=...)``): solve by
    :func:`nystrom_krr` instead, each rank on its rows of X; alpha is then (m, c) for the centres
    X[history[0]["centres"]] (drawn once with ``seed``), e.g. ``predict(X_test, X[idx], alpha, ...)``.
    """
    rank_id, world = _require(group)
    X, Y = _as_tensor("X", X), _as_tensor("Y", Y)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an integer >= 0, got {iters!r}")
    M = None
    history = []
    part = shard(X.shape[0], rank=rank_id, world_size=world)
    idx = None
    if centres is not None:
        from .solvers.nystrom import choose_centres

        idx = choose_centres(X.shape[0], centres, seed, X.device)
    for iteration in range(iters + 1):
        if idx is None:
            alpha, info = nystrom_pcg(X, Y, kernel=kernel, bandwidth=bandwidth, M=M, reg=reg, tol=tol, rank=rank,
                                      backend=backend, seed=seed, progress=progress, group=group)
        else:
            alpha, info = nystrom_krr(X[part], Y[part], X[idx], kernel=kernel, bandwidth=bandwidth, M=M, reg=reg,
                                      tol=tol, backend=backend, progress=progress, group=group)
            info["centres"] = idx
        history.append(info)
        if iteration == iters:
            break
        G = agop(X[part], X if idx is None else X[idx], alpha, kernel=kernel, bandwidth=bandwidth, M=M,
                 centered=centered, diag=diag, backend=backend, group=group)
        G = G if diag else 0.5 * (G + G.T)
        top = float(G.max())
        if not top > 0:
            raise RuntimeError("the AGOP is zero: the predictor is constant, so M cannot be rescaled")
        M = G / top
    return alpha, M, history


def predict(X_test: Any, X: Any, alpha: Any, *, group=None, **ops) -> torch.Tensor:
    """K_M(X_test, X) @ alpha with the test points split across ranks and the rows gathered on every rank."""
    rank_id, world = _require(group)
    X_test = _as_tensor("X_test", X_test)
    part = shard(X_test.shape[0], rank=rank_id, world_size=world)
    local = _as_tensor("out", _kernel_mv(X_test[part], X, alpha, **ops)) if part.stop > part.start else \
        torch.zeros((0,) + tuple(alpha.shape[1:]), dtype=X_test.dtype, device=X_test.device)
    return all_gather_rows(local.contiguous(), group=group)


def main(argv=None) -> int:
    """``torchrun --nproc_per_node=R -m rfm_fast.distributed --dataset NAME``: a sharded RFM fit, accuracies."""
    import argparse

    import numpy as np

    parser = argparse.ArgumentParser(prog="python -m rfm_fast.distributed", description=main.__doc__)
    parser.add_argument("--dataset", default="digits", help="digits, mnist, cifar10, svhn or a PATH.npz")
    parser.add_argument("--n", type=int, default=None, help="training points (default: all)")
    parser.add_argument("--n-test", type=int, default=None)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--kernel", default="laplace", choices=["laplace", "gaussian"])
    parser.add_argument("--bandwidth", type=float, default=10.0)
    parser.add_argument("--reg", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=None, help="Nystrom rank of the preconditioner")
    parser.add_argument("--diag", action="store_true")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--dist-backend", default=None, choices=[None, "gloo", "nccl"])
    args = parser.parse_args(argv)

    from .data import train_test

    rank_id, world = init(args.dist_backend)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    X, y, X_test, y_test = train_test(args.dataset, args.n, args.n_test, seed=0)
    X, X_test = torch.from_numpy(X).to(device), torch.from_numpy(X_test).to(device)
    classes = int(max(y.max(), y_test.max())) + 1
    Y = torch.nn.functional.one_hot(torch.from_numpy(y).long(), classes).to(device=device, dtype=X.dtype)
    start = time.perf_counter()
    alpha, M, history = fit_rfm(X, Y, iters=args.iters, kernel=args.kernel, bandwidth=args.bandwidth, reg=args.reg,
                                rank=args.rank, diag=args.diag, backend=args.backend, progress=True)
    seconds = time.perf_counter() - start
    ops = dict(kernel=args.kernel, bandwidth=args.bandwidth, M=M, backend=args.backend)
    train_acc = float(np.mean(predict(X, X, alpha, **ops).argmax(1).cpu().numpy() == y))
    test_acc = float(np.mean(predict(X_test, X, alpha, **ops).argmax(1).cpu().numpy() == y_test))
    if rank_id == 0:
        its = [h["iterations"] for h in history]
        print(f"ranks={world} n={X.shape[0]} d={X.shape[1]} fit {seconds:.1f}s, PCG iterations per solve {its}, "
              f"train acc {train_acc:.4f}, test acc {test_acc:.4f}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
