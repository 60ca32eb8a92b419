"""RFM on Nystrom centres at large n: fit time, peak memory, test accuracy, how well M finds the directions the target
depends on, and the same task fitted by exact RFM at the largest n where the exact solve fits.

Tasks (``--task``):
- ``sector``: x ~ N(0, I_d), the class is the angle of (x . w_1, x . w_2) cut into c sectors, for two hidden
  orthonormal directions w_1, w_2 (feature learning matters: a kernel on all d coordinates sees mostly noise).
  Reported: the cosines of the principal angles between span(w_1, w_2) and M's top-2 eigenvectors (1 = found).
- ``digits``: scikit-learn's 8 x 8 digits (d = 64, c = 10), its 80/20 split by original image; the training
  images augmented to n by random small affine maps (shift up to 1 pixel, rotation up to 12 degrees, scale
  0.9 .. 1.1, bilinear) plus pixel noise; tested on the held-out original images (never augmented, never seen).

Per solve: seconds, CG iterations, residual, training accuracy; per AGOP its seconds (``RFM.history_``). Peak
memory is the process's VmHWM at the end (data included); the documented figures come from ``/usr/bin/time -v``.

    /usr/bin/time -v python benchmarks/bench_nystrom_rfm.py --n 1000000 --m 10000 --iters 3 --exact-n 20000 \\
        --csv benchmarks/results/nystrom_rfm.csv
"""

from __future__ import annotations

import argparse
import math
import pathlib
import time

import numpy as np
import torch

from _results import write_csv
from rfm_fast import RFM


def sector_task(n: int, d: int, c: int, seed: int = 0):
    g = np.random.default_rng(seed)
    X = g.normal(size=(n, d)).astype(np.float32)
    W = np.linalg.qr(g.normal(size=(d, 2)))[0]
    Z = X @ W
    y = np.digitize(np.arctan2(Z[:, 1], Z[:, 0]), np.linspace(-np.pi, np.pi, c + 1)[1:-1])
    return X, y, W


def augment_digits(images: np.ndarray, labels: np.ndarray, n: int, seed: int = 0, batch: int = 65536):
    """n random small affine copies of 8 x 8 images (values 0..16) with pixel noise, scaled to 0..1: (n, 64)."""
    g = torch.Generator().manual_seed(seed)
    src = torch.from_numpy(images.reshape(-1, 1, 8, 8).astype(np.float32) / 16.0)
    X = torch.empty(n, 64)
    y = torch.empty(n, dtype=torch.long)
    lab = torch.from_numpy(labels)
    for start in range(0, n, batch):
        b = min(batch, n - start)
        pick = torch.randint(0, len(src), (b,), generator=g)
        angle = (torch.rand(b, generator=g) * 2 - 1) * math.radians(12)
        scale = 0.9 + 0.2 * torch.rand(b, generator=g)
        shift = (torch.rand(b, 2, generator=g) * 2 - 1) * (2.0 / 8)  # up to one pixel in [-1, 1] grid units
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0] = torch.cos(angle) / scale
        theta[:, 0, 1] = -torch.sin(angle) / scale
        theta[:, 1, 0] = torch.sin(angle) / scale
        theta[:, 1, 1] = torch.cos(angle) / scale
        theta[:, :, 2] = shift
        grid = torch.nn.functional.affine_grid(theta, (b, 1, 8, 8), align_corners=False)
        out = torch.nn.functional.grid_sample(src[pick], grid, mode="bilinear", padding_mode="zeros",
                                              align_corners=False)
        X[start:start + b] = (out.reshape(b, 64) + 0.03 * torch.randn(b, 64, generator=g)).clamp_(0, 1)
        y[start:start + b] = lab[pick]
    return X.numpy(), y.numpy()


def digits_task(n: int, seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(images, labels, test_size=0.2, random_state=seed, stratify=labels)
    X, y = augment_digits(Xtr, ytr, n, seed)
    return X, y, (Xte / 16.0).astype(np.float32), yte


def vm_hwm_mb() -> float:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("sector", "digits"), default="sector", help="(default: sector)")
    parser.add_argument("--n", type=int, default=200000, help="training points (default: 200000)")
    parser.add_argument("--m", type=int, default=5000, help="Nystrom centres (default: 5000)")
    parser.add_argument("--d", type=int, default=64, help="sector task's dimension (default: 64)")
    parser.add_argument("--c", type=int, default=10, help="sector task's classes (default: 10)")
    parser.add_argument("--iters", type=int, default=2, help="RFM iterations (default: 2)")
    parser.add_argument("--bandwidth", type=float, default=None,
                        help="Laplace bandwidth (default: 10 for sector, 5 for digits)")
    parser.add_argument("--agop-samples", type=int, default=None,
                        help="AGOP at this many training points per iteration (default: all n)")
    parser.add_argument("--exact-n", type=int, default=0,
                        help="also fit exact RFM (Cholesky) on this many training points of the same task")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--csv", default=None, help="append-free results file (one row per fit)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bandwidth = args.bandwidth or (10.0 if args.task == "sector" else 5.0)
    W = None
    if args.task == "sector":
        X, y, W = sector_task(args.n + 20000, args.d, args.c)
        Xtr, ytr, Xte, yte = X[:args.n], y[:args.n], X[args.n:], y[args.n:]
    else:
        Xtr, ytr, Xte, yte = digits_task(args.n)
    rows = []

    def fit(name, n, **kw):
        start = time.perf_counter()
        model = RFM(iters=args.iters, bandwidth=bandwidth, random_state=0, **kw).fit(Xtr[:n], ytr[:n])
        seconds = time.perf_counter() - start
        cosines = ""
        if W is not None:
            vecs = np.linalg.eigh(model.M_.double().cpu().numpy())[1][:, -2:]
            cosines = " ".join(f"{v:.5f}" for v in np.linalg.svd(W.T @ vecs, compute_uv=False))
        hist = model.history_
        row = {"task": args.task, "fit": name, "n": n, "m": kw.get("centres", n), "d": Xtr.shape[1],
               "c": len(np.unique(ytr)), "iters": args.iters, "bandwidth": bandwidth,
               "agop_samples": kw.get("agop_samples") or n, "fit_seconds": round(seconds, 1),
               "solve_seconds": " ".join(f"{h['solve_seconds']:.1f}" for h in hist),
               "cg_iterations": " ".join(str(h["solver_iterations"]) for h in hist),
               "agop_seconds": " ".join(f"{h['agop_seconds']:.1f}" for h in hist if "agop_seconds" in h),
               "train_accuracy": " ".join(f"{h['train_score']:.4f}" for h in hist),
               "test_accuracy": round(model.score(Xte, yte), 4), "top2_cosines": cosines,
               "peak_mb_so_far": round(vm_hwm_mb())}
        rows.append(row)
        print(", ".join(f"{k} = {v}" for k, v in row.items()), flush=True)

    fit("nystrom", args.n, solver="nystrom", centres=min(args.m, args.n), agop_samples=args.agop_samples)
    if args.exact_n:
        fit("exact", min(args.exact_n, args.n), solver="cholesky")
        fit("nystrom", min(args.exact_n, args.n), solver="nystrom", centres=min(args.m, args.exact_n, args.n))
    if args.csv:
        write_csv(rows, args.csv)


if __name__ == "__main__":
    main()
