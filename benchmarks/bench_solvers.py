"""Float32 ridge systems at the paper's ridge: the true (float64) relative residual every solver reaches.

scikit-learn's digits, rows scaled to unit norm, 20 rows duplicated (n = 1817), one-hot targets, Laplace kernel,
float32 data. For each bandwidth and reg: the condition number of K + reg I (float64 eigenvalues), then
krr_solve with "cholesky", "cg" and "pcg", its seconds, and ||Y - (K + reg I) alpha|| / ||Y|| recomputed
independently from the float64 kernel matrix.

    python benchmarks/bench_solvers.py --csv benchmarks/results/solvers_float32.csv
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn.datasets import load_digits

import rfm_fast
from rfm_fast.solvers import ConvergenceError, krr_solve
from _results import write_csv  # noqa: E402  (benchmarks/, the scripts' folder)

CASES = ((1.0, 1e-3), (10.0, 1e-3), (10.0, 1.8e-4))  # (bandwidth, reg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    args = parser.parse_args()
    X, y = load_digits(return_X_y=True)
    X = X / np.linalg.norm(X, axis=1, keepdims=True)
    dup = np.random.default_rng(0).choice(len(X), 20, replace=False)
    X, y = np.concatenate([X, X[dup]]), np.concatenate([y, y[dup]])
    X32 = torch.tensor(X, dtype=torch.float32)
    Y32 = torch.tensor(np.eye(10)[y], dtype=torch.float32)
    X64, Y64 = X32.double(), Y32.double()
    rows = []
    for bandwidth, reg in CASES:
        A = rfm_fast.kernel_matrix(X64, X64, bandwidth=bandwidth, backend="naive")
        A.diagonal().add_(reg)
        evals = torch.linalg.eigvalsh(A)
        cond = float(evals[-1] / evals[0])
        for solver in ("cholesky", "cg", "pcg"):
            start = time.perf_counter()
            try:
                alpha, info = krr_solve(X32, Y32, bandwidth=bandwidth, reg=reg, solver=solver, return_info=True)
                seconds = time.perf_counter() - start
                true = float(((Y64 - A @ alpha.double()).norm(dim=0) / Y64.norm(dim=0)).max())
                row = {"n": len(X), "bandwidth": bandwidth, "reg": reg, "cond": f"{cond:.3g}", "solver": solver,
                       "seconds": round(seconds, 3), "true_residual": f"{true:.3g}",
                       "iterations": info["iterations"], "restarts": info.get("restarts", ""), "raised": ""}
            except ConvergenceError as exc:
                row = {"n": len(X), "bandwidth": bandwidth, "reg": reg, "cond": f"{cond:.3g}", "solver": solver,
                       "seconds": round(time.perf_counter() - start, 3), "true_residual": f"{exc.residual:.3g}",
                       "iterations": exc.iterations, "restarts": "", "raised": str(exc)}
            rows.append(row)
            print(row, flush=True)
    if args.csv:
        write_csv(rows, args.csv)


if __name__ == "__main__":
    main()
