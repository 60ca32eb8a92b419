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
import contextlib
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
from _results import write_csv  # noqa: E402  (benchmarks/, the scripts' folder)


def clusters(n: int = 2000, d: int = 64, k: int = 10, seed: int = 0):
    """k clusters on the unit sphere, cluster j with spread 10^-(1 + 3 j / (k - 1)) (1e-1 .. 1e-4)."""
    g = np.random.default_rng(seed)
    centres = g.normal(size=(k, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    y = np.arange(n) % k
    spreads = 10.0 ** -(1 + 3 * np.arange(k) / (k - 1))
    X = centres[y] + spreads[y, None] * g.normal(size=(n, d)) / np.sqrt(d)
    return X.astype(np.float32), y


@contextlib.contextmanager
def no_frames():
    """Geometries without centring frames (one global frame), as before frames existed."""
    saved = Geometry._add_frames
    Geometry._add_frames = lambda self, *args: None
    try:
        yield
    finally:
        Geometry._add_frames = saved


def layer_inputs(X, y, depth: int, seed: int = 0) -> list:
    kept = []
    DeepRFM(depth=depth, random_state=seed).fit(X, y, callback=lambda i, m, t: kept.append(t["input"].clone()))
    return kept


def time_agop(X: torch.Tensor, alpha: torch.Tensor, backend: str) -> tuple:
    """Seconds of one agop(X, X, alpha) and the share of its pairs recomputed exactly."""
    pair_counts(reset=True)
    start = time.perf_counter()
    rfm_fast.agop(X, X, alpha, kernel="laplace", bandwidth=2.0, backend=backend)
    seconds = time.perf_counter() - start
    counts = pair_counts(reset=True)
    return seconds, counts["exact"] / max(1, counts["pairs"])


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
        first = 0 if name == "clusters" else 1
        alphas = [krr_solve(Xl, targets, kernel="laplace", bandwidth=2.0, reg=1e-3) for Xl in inputs]
        frames = [len(Geometry.build(Xl, Xl, None, spec).frames) for Xl in inputs]
        for backend in backends:
            for Xl, alpha in zip(inputs, alphas):  # warm-up
                time_agop(Xl, alpha, backend)
            times = [[] for _ in inputs]
            exact = [0.0] * len(inputs)
            for _ in range(args.reps):  # layers interleaved, so drifts of the machine hit every layer alike
                for i, (Xl, alpha) in enumerate(zip(inputs, alphas)):
                    seconds, exact[i] = time_agop(Xl, alpha, backend)
                    times[i].append(seconds)
            # The last layer once more without centring frames: the old behaviour, for comparison.
            with no_frames():
                plain = [time_agop(inputs[-1], alphas[-1], backend) for _ in range(max(1, args.reps // 2))]
            for i, Xl in enumerate(inputs):
                row = {"dataset": name, "layer": first + i, "n": Xl.shape[0], "d": Xl.shape[1], "backend": backend,
                       "seconds": round(statistics.median(times[i]), 4), "exact_share": f"{exact[i]:.2e}",
                       "frames": frames[i], "seconds_no_frames": "", "exact_share_no_frames": ""}
                if i == len(inputs) - 1:
                    row["seconds_no_frames"] = round(statistics.median(t for t, _ in plain), 4)
                    row["exact_share_no_frames"] = f"{plain[-1][1]:.2e}"
                rows.append(row)
                print(row, flush=True)
    for name in args.datasets:
        for backend in backends:
            sel = [r for r in rows if r["dataset"] == name and r["backend"] == backend]
            last = sel[-1]
            # The first layer of the same n, d, c (digits' layer 1 sees the 64 raw pixels, later layers 1024
            # features).
            base = next(r for r in sel if r["d"] == last["d"] and r["layer"] >= 1)
            print(f"{name} {backend}: layer {last['layer']} / layer {base['layer']} (first with d = {last['d']}) "
                  f"AGOP time = {last['seconds'] / base['seconds']:.2f}, exact share {base['exact_share']} -> "
                  f"{last['exact_share']}; without frames: {last['seconds_no_frames']} s, exact share "
                  f"{last['exact_share_no_frames']}")
    if args.csv:
        write_csv(rows, args.csv)


if __name__ == "__main__":
    main()
