"""The AGOP on the data Deep RFM makes: its cost layer by layer as the classes collapse, and the share of pairs
that take an exact path.

For each dataset a depth-``--depth`` Deep RFM is fitted (the CLI's defaults: Laplace L = 2, reg 1e-3, ReLU width
1024), every layer's unit-norm input X_l is kept, and for each backend the AGOP of that layer's ridge predictor,
agop(X_l, X_l, alpha_l), is timed (median of ``--reps``, one process, layers interleaved) together with the share of
pairs recomputed exactly (``rfm_fast.core.tiles.pair_counts``) and the number of centring frames the geometry used.
Datasets: scikit-learn's digits, and ``clusters``: 10 Gaussian clusters on the unit sphere of R^64 with spreads from
1e-1 down to 1e-4 (fed to Deep RFM like digits; the raw clusters themselves are also timed as layer 0).

    python benchmarks/bench_collapse.py --depth 20 --csv benchmarks/results/collapse.csv
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time

import numpy as np
import torch

import rfm_fast
from rfm_fast import DeepRFM, krr_solve
from rfm_fast.core.geometry import Geometry
from rfm_fast.core.kernels import KernelSpec
from rfm_fast.core.tiles import pair_counts
from rfm_fast.data import train_test


def clusters(n: int = 2000, d: int = 64, k: int = 10, seed: int = 0):
    """k clusters on the unit sphere, cluster j with spread 10^-(1 + 3 j / (k - 1)) (1e-1 .. 1e-4)."""
    g = np.random.default_rng(seed)
    centres = g.normal(size=(k, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    y = np.arange(n) % k
    spreads = 10.0 ** -(1 + 3 * np.arange(k) / (k - 1))
    X = centres[y] + spreads[y, None] * g.normal(size=(n, d)) / np.sqrt(d)
    return X.astype(np.float32), y


def layer_inputs(X, y, depth: int, seed: int = 0) -> list:
    kept = []
    DeepRFM(depth=depth, random_state=seed).fit(X, y, callback=lambda i, m, t: kept.append(t["input"].clone()))
    return kept


def time_agop(X: torch.Tensor, alpha: torch.Tensor, backend: str, reps: int) -> tuple:
    rfm_fast.agop(X, X, alpha, kernel="laplace", bandwidth=2.0, backend=backend)
    times = []
    pair_counts(reset=True)
    for _ in range(reps):
        start = time.perf_counter()
        rfm_fast.agop(X, X, alpha, kernel="laplace", bandwidth=2.0, backend=backend)
        times.append(time.perf_counter() - start)
    counts = pair_counts(reset=True)
    return statistics.median(times), counts["exact"] / max(1, counts["pairs"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=20, help="Deep RFM depth (default: 20)")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per layer (default: 3)")
    parser.add_argument("--backends", nargs="*", default=None, help="default: torch, and cpp when built")
    parser.add_argument("--datasets", nargs="*", default=["digits", "clusters"], help="default: digits clusters")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    backends = args.backends or [b for b in ("torch", "cpp") if b in rfm_fast.available_backends()]
    rows = []
    for name in args.datasets:
        if name == "digits":
            X, y, _, _ = train_test("digits")
        else:
            X, y = clusters()
        inputs = layer_inputs(X, y, args.depth)
        if name == "clusters":
            inputs = [rfm_fast.models._common.row_normalize(torch.as_tensor(X))] + inputs
        targets = 2.0 * torch.eye(int(y.max()) + 1)[torch.as_tensor(y)] - 1.0
        spec = KernelSpec("laplace", 2.0)
        for layer, Xl in enumerate(inputs, start=0 if name == "clusters" else 1):
            alpha = krr_solve(Xl, targets, kernel="laplace", bandwidth=2.0, reg=1e-3)
            frames = len(Geometry.build(Xl, Xl, None, spec).frames)
            for backend in backends:
                seconds, exact = time_agop(Xl, alpha, backend, args.reps)
                row = {"dataset": name, "layer": layer, "n": Xl.shape[0], "d": Xl.shape[1], "backend": backend,
                       "seconds": round(seconds, 4), "exact_share": f"{exact:.2e}", "frames": frames}
                rows.append(row)
                print(row, flush=True)
    for name in args.datasets:
        for backend in backends:
            sel = [r for r in rows if r["dataset"] == name and r["backend"] == backend]
            first = next(r for r in sel if r["layer"] == 1)
            last = sel[-1]
            print(f"{name} {backend}: layer {last['layer']} / layer 1 AGOP time = "
                  f"{last['seconds'] / first['seconds']:.2f} (exact share {first['exact_share']} -> "
                  f"{last['exact_share']})")
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
