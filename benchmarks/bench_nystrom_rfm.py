"""RFM on Nystrom centres at large n: fit time, peak memory, test accuracy and how well M finds the directions the
target depends on.

Synthetic task where feature learning matters: x ~ N(0, I_d), the class is the angle of (x . w_1, x . w_2) cut into
c sectors, for two hidden orthonormal directions w_1, w_2. Reported: fit seconds, test accuracy on 20000 fresh
points, the cosines of the principal angles between span(w_1, w_2) and M's top-2 eigenvectors (1 = found), and
the training accuracy after each solve. Peak memory: run it under ``/usr/bin/time -v``.

    /usr/bin/time -v python benchmarks/bench_nystrom_rfm.py --n 200000 --m 5000 --iters 2
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from rfm_fast import RFM


def sector_task(n: int, d: int, c: int, seed: int = 0):
    g = np.random.default_rng(seed)
    X = g.normal(size=(n, d)).astype(np.float32)
    W = np.linalg.qr(g.normal(size=(d, 2)))[0]
    Z = X @ W
    y = np.digitize(np.arctan2(Z[:, 1], Z[:, 0]), np.linspace(-np.pi, np.pi, c + 1)[1:-1])
    return X, y, W


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200000, help="training points (default: 200000)")
    parser.add_argument("--m", type=int, default=5000, help="Nystrom centres (default: 5000)")
    parser.add_argument("--d", type=int, default=64, help="(default: 64)")
    parser.add_argument("--c", type=int, default=10, help="classes (default: 10)")
    parser.add_argument("--iters", type=int, default=2, help="RFM iterations (default: 2)")
    parser.add_argument("--agop-samples", type=int, default=20000, help="AGOP points per iteration (default: 20000)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    X, y, W = sector_task(args.n + 20000, args.d, args.c)
    Xtr, ytr, Xte, yte = X[:args.n], y[:args.n], X[args.n:], y[args.n:]
    start = time.perf_counter()
    model = RFM(solver="nystrom", centres=args.m, iters=args.iters, bandwidth=10.0, agop_samples=args.agop_samples,
                random_state=0).fit(Xtr, ytr)
    seconds = time.perf_counter() - start
    vecs = np.linalg.eigh(model.M_.double().cpu().numpy())[1][:, -2:]
    cosines = np.linalg.svd(W.T @ vecs, compute_uv=False)
    print(f"n = {args.n}, m = {args.m}, d = {args.d}, c = {args.c}, {args.iters} RFM iterations: fit {seconds:.1f} s, "
          f"test accuracy {model.score(Xte, yte):.3f}, principal-angle cosines {np.round(cosines, 4).tolist()}, "
          f"training accuracy per solve {[round(h['train_score'], 3) for h in model.history_]}")


if __name__ == "__main__":
    main()
