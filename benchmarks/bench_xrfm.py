"""xrfm's own RFM fit with and without rfm_fast underneath (rfm_fast.integrations.xrfm).

    python benchmarks/bench_xrfm.py                       # n = 10^4, d = 64, c = 10, 2 iterations, float32
    python benchmarks/bench_xrfm.py --n 4000 --iters 1    # a quicker row

Each fit runs in a fresh subprocess so the peak memory of one cannot hide another's: the peak is the process's
peak resident set (/proc/self/status VmHWM, reset through /proc/self/clear_refs after the data exist) minus the
resident set right after the data were created, i.e. the extra memory the fit needed. Prints a table and writes
benchmarks/results/xrfm_fit.csv (one row per mode plus the ratios).

For the AGOP speed table, :func:`time_xrfm_agop` times xrfm's ``LaplaceKernel.get_agop`` alone on given
(x, centers, alpha) and returns (seconds, peak extra bytes). xrfm's get_agop returns the SUM over the m evaluation
points, rfm_fast.agop the MEAN: ``xrfm_agop(...) == m * rfm_fast.agop(...)`` (checked in
tests/test_xrfm_integration.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import subprocess
import sys
import time
from typing import Any, Optional

import torch
from _results import write_csv  # noqa: E402  (benchmarks/, the scripts' folder)

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
CSV_NAME = "xrfm_fit.csv"
MODES = ("xrfm", "rfm_fast")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
    """Reset VmHWM to the current resident set (Linux >= 4.0); False where that is not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Extra peak memory of a block: CUDA allocator peak on a GPU, else the resident-set high-water mark."""

    def __init__(self, device: torch.device):
        self.device = device
        self.extra_bytes: Optional[int] = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.exact = _reset_peak()
            self.base = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.extra_bytes = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            # Without the reset the high-water mark may predate the block: an upper bound, flagged by `exact`.
            self.extra_bytes = max(0, _status_kib("VmHWM") * 1024 - self.base)
        return False


def make_data(n: int, d: int, c: int, *, n_val: int = 1000, seed: int = 0, dtype=torch.float32):
    """Synthetic classification in the RFM regime: labels depend on a few directions of standardised inputs."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n + n_val, d, generator=gen, dtype=torch.float64)
    W = torch.randn(min(d, 8), c, generator=gen, dtype=torch.float64)
    logits = torch.tanh(X[:, : W.shape[0]]) @ W
    Y = torch.nn.functional.one_hot(logits.argmax(1), c).to(torch.float64)
    X, Y = X.to(dtype), Y.to(dtype)
    return X[:n], Y[:n], X[n:], Y[n:]


def _xrfm_kernel(kernel: str, bandwidth: float):
    from xrfm.rfm_src.kernels import LaplaceKernel

    if kernel == "laplace":
        return LaplaceKernel(bandwidth=bandwidth, exponent=1.0)
    if kernel == "gaussian":  # xrfm: exp(-r^2 / Lx^2) = rfm_fast's exp(-r^2 / (2 L^2)) with Lx = sqrt(2) L
        return LaplaceKernel(bandwidth=math.sqrt(2.0) * bandwidth, exponent=2.0)
    raise ValueError(f"kernel must be 'laplace' or 'gaussian', got {kernel!r}")


def _sqrt_metric(M: Any, like: torch.Tensor) -> Optional[torch.Tensor]:
    """xrfm's sqrtM for rfm_fast's M (None, (d,) or symmetric PSD (d, d))."""
    if M is None:
        return None
    M = torch.as_tensor(M, dtype=torch.float64, device=like.device)
    if M.ndim == 1:
        return M.clamp_min(0).sqrt().to(like.dtype)
    evals, evecs = torch.linalg.eigh(0.5 * (M + M.T))
    return ((evecs * evals.clamp_min(0).sqrt()) @ evecs.T).to(like.dtype)


def xrfm_agop(x: torch.Tensor, centers: torch.Tensor, alpha: torch.Tensor, *, kernel: str = "laplace",
              bandwidth: float = 10.0, M: Any = None) -> torch.Tensor:
    """xrfm's own ``LaplaceKernel.get_agop`` on rfm_fast's arguments: the SUM over the m points x (d, d).

    x (m, d) evaluation points, centers (n, d), alpha (n, c); kernel / bandwidth / M in rfm_fast's convention.
    Equals ``m * rfm_fast.agop(x, centers, alpha, kernel=kernel, bandwidth=bandwidth, M=M)`` up to xrfm's
    rounding (see the module docstring of rfm_fast.integrations.xrfm for its self-pair error).
    """
    k = _xrfm_kernel(kernel, bandwidth)
    return k.get_agop(x=centers, z=x, coefs=alpha.T, mat=_sqrt_metric(M, x))


def time_xrfm_agop(x: torch.Tensor, centers: torch.Tensor, alpha: torch.Tensor, *, kernel: str = "laplace",
                   bandwidth: float = 10.0, M: Any = None) -> tuple[float, int]:
    """Seconds and peak extra bytes of one xrfm ``get_agop`` call (see :func:`xrfm_agop`), the inputs excluded.

    CPU: resident-set high-water mark above the resident set at the start; CUDA: allocator peak above the
    allocation at the start.
    """
    with PeakMemory(x.device) as peak:
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        start = time.perf_counter()
        out = xrfm_agop(x, centers, alpha, kernel=kernel, bandwidth=bandwidth, M=M)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        seconds = time.perf_counter() - start
        del out
    return seconds, int(peak.extra_bytes)


def _child(args: argparse.Namespace) -> int:
    """One fit in this (fresh) process; prints one JSON line."""
    import contextlib

    from xrfm import RFM

    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    torch.manual_seed(0)
    X, Y, Xv, Yv = make_data(args.n, args.d, args.c, n_val=args.n_val, dtype=dtype)
    model = RFM(kernel="laplace", bandwidth=args.bandwidth, exponent=1.0, device="cpu", verbose=False)
    if args.mode == "rfm_fast":
        from rfm_fast.integrations.xrfm import use_rfm_fast

        context = use_rfm_fast(backend=args.backend)
    else:
        context = contextlib.nullcontext()
    with context:
        with PeakMemory(torch.device("cpu")) as peak:
            start = time.perf_counter()
            model.fit((X, Y), (Xv, Yv), iters=args.iters, reg=1e-3, early_stop_rfm=False,
                      return_best_params=False)
            seconds = time.perf_counter() - start
        accuracy = float((model.predict(Xv).argmax(1) == Yv.argmax(1)).double().mean())
    print(json.dumps(dict(mode=args.mode, fit_seconds=seconds, peak_extra_bytes=peak.extra_bytes,
                          peak_exact=peak.exact, val_accuracy=accuracy)))
    return 0


def _run_child(args: argparse.Namespace, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--mode", mode, "--n", str(args.n), "--d", str(args.d),
           "--c", str(args.c), "--n-val", str(args.n_val), "--iters", str(args.iters), "--dtype", args.dtype,
           "--bandwidth", str(args.bandwidth), "--backend", args.backend]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=dict(os.environ))
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} fit failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--c", type=int, default=10)
    parser.add_argument("--n-val", type=int, default=1000)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--bandwidth", type=float, default=10.0)
    parser.add_argument("--backend", default="auto", help="rfm_fast backend under the switch")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per fit")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / CSV_NAME)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, default="xrfm", help=argparse.SUPPRESS)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args)
    rows = []
    for mode in MODES:
        r = _run_child(args, mode)
        rows.append(dict(n=args.n, d=args.d, c=args.c, iters=args.iters, dtype=args.dtype, bandwidth=args.bandwidth,
                         backend=args.backend if mode == "rfm_fast" else "-", mode=mode,
                         fit_seconds=round(r["fit_seconds"], 3),
                         peak_extra_mib=round(r["peak_extra_bytes"] / 2**20, 1), peak_exact=r["peak_exact"],
                         val_accuracy=round(r["val_accuracy"], 4)))
    base, fast = rows
    speedup = base["fit_seconds"] / fast["fit_seconds"]
    memory = base["peak_extra_mib"] / max(fast["peak_extra_mib"], 0.1)
    for row in rows:
        row["speedup_vs_xrfm"] = round(base["fit_seconds"] / row["fit_seconds"], 2)
        row["memory_ratio_vs_xrfm"] = round(base["peak_extra_mib"] / max(row["peak_extra_mib"], 0.1), 2)
    print(f"xrfm RFM fit, n={args.n} d={args.d} c={args.c} iters={args.iters} {args.dtype} "
          f"bandwidth={args.bandwidth} (peak = extra resident memory of the fit, fresh process each)")
    print(f"{'mode':<10} {'fit s':>9} {'peak MiB':>10} {'val acc':>8}")
    for row in rows:
        print(f"{row['mode']:<10} {row['fit_seconds']:>9.2f} {row['peak_extra_mib']:>10.1f} "
              f"{row['val_accuracy']:>8.4f}")
    print(f"speed-up x{speedup:.2f}, peak memory /{memory:.1f}")
    write_csv(rows, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
