"""Nystrom kernel ridge regression against the exact solve as the number of centres m grows (Falkon's error vs m).

Falkon (Rudi, Carratino, Rosasco 2017) shows that m of order sqrt(n) log n uniformly sampled centres reach the
exact KRR's test error; the predictor itself converges to the exact one as m -> n. On the two tasks of
``bench_nystrom_rfm.py`` at one n (M = I: plain KRR, Laplace, reg 1e-3), for each m: the test accuracy, the test
error's gap to the exact solve, and the relative distance of the Nystrom predictions from the exact ones on the
test points, ||f_m - f_exact|| / ||f_exact||, with the solve's seconds and CG iterations. (m = n, where the
Nystrom solve is exact KRR, is a test: tests/test_solvers.py.)

    python benchmarks/bench_nystrom_m.py --n 20000 --csv benchmarks/results/nystrom_m.csv
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

import rfm_fast
from _results import write_csv
from bench_nystrom_rfm import digits_task, sector_task


def one_hot(y: np.ndarray, c: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.from_numpy(y).long(), c).float()


def sweep(task: str, n: int, ms: list, reg: float) -> list:
    if task == "sector":
        X, y, _ = sector_task(n + 20000, 64, 10)
        Xtr, ytr, Xte, yte = X[:n], y[:n], X[n:], y[n:]
        bandwidth = 10.0
    else:
        Xtr, ytr, Xte, yte = digits_task(n)
        bandwidth = 5.0
    c = int(ytr.max()) + 1
    Xtr, Xte = torch.from_numpy(Xtr), torch.from_numpy(Xte)
    Y = one_hot(ytr, c)
    start = time.perf_counter()
    exact = rfm_fast.krr_solve(Xtr, Y, bandwidth=bandwidth, reg=reg, solver="cholesky")
    exact_s = time.perf_counter() - start
    f_exact = rfm_fast.kernel_mv(Xte, Xtr, exact, bandwidth=bandwidth)
    exact_err = float((f_exact.argmax(1).numpy() != yte).mean())
    rows = [{"task": task, "n": n, "m": "exact (cholesky)", "seconds": round(exact_s, 2), "cg_iterations": "",
             "test_error": round(exact_err, 4), "error_gap": 0.0, "prediction_gap": 0.0,
             "sqrt_n_log_n": round(math.sqrt(n) * math.log(n))}]
    print(rows[-1], flush=True)
    for m in ms:
        m = min(m, n)
        start = time.perf_counter()
        alpha, info = rfm_fast.krr_solve(Xtr, Y, bandwidth=bandwidth, reg=reg, solver="nystrom", centres=m,
                                         return_info=True)
        seconds = time.perf_counter() - start
        f = rfm_fast.kernel_mv(Xte, Xtr[info["centres"]], alpha, bandwidth=bandwidth)
        err = float((f.argmax(1).numpy() != yte).mean())
        rows.append({"task": task, "n": n, "m": m, "seconds": round(seconds, 2),
                     "cg_iterations": info["iterations"], "test_error": round(err, 4),
                     "error_gap": round(err - exact_err, 4),
                     "prediction_gap": f"{float((f - f_exact).norm() / f_exact.norm()):.2e}",
                     "sqrt_n_log_n": rows[0]["sqrt_n_log_n"]})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="training points (default: 20000)")
    parser.add_argument("--m", type=int, nargs="*", default=[100, 250, 500, 1000, 2000, 5000, 10000])
    parser.add_argument("--tasks", nargs="*", default=["sector", "digits"])
    parser.add_argument("--reg", type=float, default=1e-3)
    parser.add_argument("--csv", default=None)
    args = parser.parse_args()
    rows = []
    for task in args.tasks:
        rows += sweep(task, args.n, args.m, args.reg)
    if args.csv:
        write_csv(rows, args.csv)


if __name__ == "__main__":
    main()
