"""The ops under a low-rank or learned near-rank-1 metric M, against M = I and against xrfm, in one process.

Part 1 (``rank``): M = B B^T of exact rank r in {1, 2, 8, d} (B Gaussian, float64): the core works in r
coordinates (directly formed ones for r <= 4), so time should fall with r.
Part 2 (``learned``): the M an RFM loop learns on a target that depends on one direction (y = tanh(3 x.w),
Laplace L = 10, reg 1e-3, M <- AGOP / max), after each of ``--iters`` iterations: its second eigenvalue falls from
~1e-2 to ~1e-8 of the first, the regime where the expanded distances of the old code flagged ~11% of all pairs as
near. Each M is timed against M = I and against xrfm 0.4.5's ``LaplaceKernel.get_agop`` (mat = M^{1/2}).

Per row: median seconds of ``--reps`` calls of agop(X, X, alpha) and kernel_mv(X, X, alpha), n = m, c = 10, and
the share of pairs recomputed exactly. Results: benchmarks/results/rank.csv.

    python benchmarks/bench_rank.py --n 4000 --d 64 --csv benchmarks/results/rank.csv
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import torch

import rfm_fast
from rfm_fast.core.geometry import Geometry
from rfm_fast.core.kernels import KernelSpec
from rfm_fast.core.metric import psd_sqrt
from rfm_fast.core.tiles import pair_counts
from _results import write_csv  # noqa: E402  (benchmarks/, the scripts' folder)

BANDWIDTH = 10.0


def median_time(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def learned_metrics(X: torch.Tensor, iters: int) -> list:
    """(iteration, M) of an RFM loop on y = tanh(3 x.w)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(X.shape[1], generator=g, dtype=torch.float64)
    w /= w.norm()
    y = torch.tanh(3.0 * X.double() @ w).to(X.dtype)
    out, M = [], None
    for it in range(1, iters + 1):
        alpha = rfm_fast.krr_solve(X, y, kernel="laplace", bandwidth=BANDWIDTH, M=M, reg=1e-3)
        A = rfm_fast.agop(X, X, alpha, kernel="laplace", bandwidth=BANDWIDTH, M=M)
        M = 0.5 * (A + A.T)
        M = M / M.max()
        out.append((it, M.clone()))
    return out


def measure(label: str, X, alpha, M, backends, reps: int, xrfm: bool) -> list:
    rows = []
    spec = KernelSpec("laplace", BANDWIDTH)
    geom = Geometry.build(X, X, M, spec)
    evals = torch.linalg.eigvalsh(M.double()).flip(0) if M is not None and M.ndim == 2 else None
    ratio = float(evals[1] / evals[0]) if evals is not None and evals.numel() > 1 else 1.0
    for backend in backends:
        pair_counts(reset=True)
        t_agop = median_time(lambda: rfm_fast.agop(X, X, alpha, kernel="laplace", bandwidth=BANDWIDTH, M=M,
                                                   backend=backend), reps)
        counts = pair_counts(reset=True)
        t_mv = median_time(lambda: rfm_fast.kernel_mv(X, X, alpha, kernel="laplace", bandwidth=BANDWIDTH, M=M,
                                                      backend=backend), reps)
        rows.append({"case": label, "backend": backend, "e2_over_e1": f"{ratio:.2e}", "rank": geom.r,
                     "direct": geom.kdir, "agop_s": round(t_agop, 4), "mv_s": round(t_mv, 4),
                     "exact_share": f"{counts['exact'] / max(1, counts['pairs']):.2e}"})
        print(rows[-1], flush=True)
    if xrfm:
        from xrfm.rfm_src.kernels import LaplaceKernel

        kernel = LaplaceKernel(bandwidth=BANDWIDTH, exponent=1.0)
        root = None if M is None else psd_sqrt(M.double()).to(X.dtype)
        coefs = alpha.T.contiguous()
        t = median_time(lambda: kernel.get_agop(X, X, coefs, mat=root), reps)
        rows.append({"case": label, "backend": "xrfm", "e2_over_e1": f"{ratio:.2e}", "rank": "", "direct": "",
                     "agop_s": round(t, 4), "mv_s": "", "exact_share": ""})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000, help="points, n = m (default: 4000)")
    parser.add_argument("--d", type=int, default=64, help="dimension (default: 64)")
    parser.add_argument("--c", type=int, default=10, help="outputs of the coefficients (default: 10)")
    parser.add_argument("--iters", type=int, default=5, help="RFM iterations of the learned metric (default: 5)")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions (default: 3)")
    parser.add_argument("--parts", nargs="*", default=["rank", "learned"], help="default: rank learned")
    parser.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    args = parser.parse_args()
    backends = [b for b in ("torch", "cpp") if b in rfm_fast.available_backends()]
    xrfm = importlib.util.find_spec("xrfm") is not None
    g = torch.Generator().manual_seed(0)
    X = torch.randn(args.n, args.d, generator=g)
    alpha = torch.randn(args.n, args.c, generator=g) / args.n**0.5
    rows = measure("M = I", X, alpha, None, backends, args.reps, xrfm)
    if "rank" in args.parts:
        for r in sorted({1, 2, 8, args.d}):
            B = torch.randn(args.d, r, generator=g, dtype=torch.float64)
            rows += measure(f"rank {r}", X, alpha, (B @ B.T / r), backends, args.reps, False)
    if "learned" in args.parts:
        for it, M in learned_metrics(X, args.iters):
            rows += measure(f"learned, iteration {it}", X, alpha, M, backends, args.reps, xrfm)
    if args.csv:
        write_csv(rows, args.csv)


if __name__ == "__main__":
    main()
