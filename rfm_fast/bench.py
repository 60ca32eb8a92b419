"""The AGOP speed table: ``rfm-fast bench`` (or ``python -m rfm_fast.bench``).

For each problem (x = centres, n = m, Laplace, fp32 by default) and each backend that can run here it reports
the median wall time, GFLOP/s, the peak extra memory, and the ratio to a same-run chunked-GEMM floor: the time of
the two GEMMs the AGOP cannot avoid, done in the tile shapes of the fused path with no elementwise work,
    (256 x d) @ (d x n)  and  (256 x n) @ (n x c d)   per 256 evaluation points,
i.e. the ~2 n m d (c + 1) flops at this machine's sgemm rate. When xrfm is installed, its LaplaceKernel.get_agop
(which returns the sum over points, not the mean) is timed on the same problem where its memory need fits.

Peak extra memory is measured in a fresh subprocess per (problem, backend): after the inputs exist, the kernel's
peak-RSS counter is reset (/proc/self/clear_refs) and the op runs once; extra = VmHWM - VmRSS before the call. A
fresh process keeps allocator caches of earlier runs from hiding allocations.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

DEFAULT_CASES = ((20000, 64, 10), (10000, 64, 10), (3000, 64, 10))
QUICK_CASES = ((5000, 64, 10), (2000, 32, 1))
FLOOR_ROWS = 256
# xrfm materialises several n x m matrices and the m x c x d gradients: ~8.6 GB at n = m = 10^4, d = 64, c = 10
# (measured peak 8553 MB; 783 MB at n = 3000), i.e. about 8.6e-8 GB per pair (n x m matrices dominate).
XRFM_GB_PER_PAIR = 8.6e-8
# The peers' rows run only when their estimated memory fits this many GB (``--peer-memory``): a laptop's share.
PEER_MEMORY_GB = 3.0
# KeOps' CPU code is a scalar loop per pair: ~7.6 s at n = m = 3000 (benchmarks/results/keops_crossover.csv), so
# larger problems would take minutes per repetition.
KEOPS_CPU_MAX_PAIRS = 1e7


@dataclass
class Row:
    n: int
    m: int
    d: int
    c: int
    kernel: str
    dtype: str
    backend: str
    median_s: float
    gflops: float
    peak_extra_mb: Optional[float]
    x_floor: Optional[float]
    note: str = ""


def agop_flops(n: int, m: int, d: int, c: int) -> float:
    """The GEMM work every AGOP path needs: distances (2 n m d) and the weighted gradients (2 n m c d)."""
    return 2.0 * n * m * d * (c + 1)


def _median_time(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up: first-call costs (allocator, lazy imports, compiles) are not the op's speed
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_problem(n: int, d: int, c: int, dtype_name: str, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, dtype_name)
    X = torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype)
    alpha = (torch.randn(n, c, generator=gen, dtype=torch.float64) / n**0.5).to(dtype)
    return X, alpha


def gemm_floor(X, c: int) -> Callable[[], None]:
    """The chunked GEMMs of the fused AGOP without its elementwise work (see module docstring)."""
    import torch

    n, d = X.shape
    V = torch.randn(n, c * d, dtype=X.dtype)
    Xt = X.T.contiguous()
    tile = torch.empty(FLOOR_ROWS, n, dtype=X.dtype)
    out = torch.empty(FLOOR_ROWS, c * d, dtype=X.dtype)

    def run():
        for start in range(0, n, FLOOR_ROWS):
            rows = slice(start, min(n, start + FLOOR_ROWS))
            t = tile[: rows.stop - rows.start]
            torch.mm(X[rows], Xt, out=t)
            torch.mm(t, V, out=out[: rows.stop - rows.start])

    return run


def _runner(backend: str, X, alpha, kernel: str, bandwidth: float) -> Callable[[], object]:
    if backend == "xrfm":
        from xrfm.rfm_src.kernels import LaplaceKernel

        # xrfm's kernel is exp(-||u||^p / L^p): p = 1 is our Laplace, p = 2 with L' = sqrt(2) L our Gaussian.
        if kernel == "laplace":
            k = LaplaceKernel(bandwidth=bandwidth, exponent=1.0)
        else:
            k = LaplaceKernel(bandwidth=bandwidth * 2**0.5, exponent=2.0)
        coefs = alpha.T.contiguous()
        return lambda: k.get_agop(X, X, coefs)
    import rfm_fast

    return lambda: rfm_fast.agop(X, X, alpha, kernel=kernel, bandwidth=bandwidth, backend=backend)


def _read_status(field: str) -> int:
    with open("/proc/self/status") as fh:
        match = re.search(rf"^{field}:\s+(\d+) kB", fh.read(), re.M)
    return int(match.group(1)) * 1024 if match else 0


def _child_peak(spec: dict) -> dict:
    """Runs in a fresh process: warm the backend up on a tiny problem (library and thread-pool start-up is not
    the op's memory), build the inputs, reset the peak counter, run the op once."""
    Xs, alphas = make_problem(64, spec["d"], spec["c"], spec["dtype"], seed=1)
    _runner(spec["backend"], Xs, alphas, spec["kernel"], spec["bandwidth"])()
    X, alpha = make_problem(spec["n"], spec["d"], spec["c"], spec["dtype"])
    fn = _runner(spec["backend"], X, alpha, spec["kernel"], spec["bandwidth"])
    import gc

    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return {"peak_extra": None}
    before = _read_status("VmRSS")
    fn()
    return {"peak_extra": _read_status("VmHWM") - before}


def peak_extra_bytes(spec: dict) -> Optional[int]:
    cmd = [sys.executable, "-m", "rfm_fast.bench", "--child", json.dumps(spec)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        return None
    if done.returncode != 0:
        return None
    for line in done.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            return json.loads(line)["peak_extra"]
    return None


def _probe():
    import torch

    from ._validation import prepare

    return prepare(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 1), None, "laplace", 1.0, need_alpha=True)


def default_backends() -> list[str]:
    """torch always; the compiled and KeOps CPU backends when they can run here; xrfm when installed."""
    import importlib.util

    from ._dispatch import REGISTRY

    probe = _probe()
    names = ["torch"]
    for name in ("cpp", "keops"):
        if REGISTRY[name].reason("agop", probe) is None:
            names.append(name)
    if importlib.util.find_spec("xrfm") is not None:
        names.append("xrfm")
    return names


def check_backends(names: list[str]) -> None:
    """ValueError naming the first backend of ``names`` that is unknown or cannot run the CPU AGOP here, and why."""
    import importlib.util

    from ._dispatch import REGISTRY

    probe = _probe()
    for name in names:
        if name == "xrfm":
            if importlib.util.find_spec("xrfm") is None:
                raise ValueError("backend 'xrfm' needs the xrfm package (pip install xrfm)")
            continue
        if name not in REGISTRY:
            raise ValueError(f"unknown backend {name!r}; the backends are {sorted(REGISTRY)} and xrfm")
        reason = REGISTRY[name].reason("agop", probe)
        if reason is not None:
            raise ValueError(f"backend {name!r} cannot run here: {reason}")


def measure(cases, backends, *, kernel="laplace", dtype="float32", bandwidth=10.0, reps=3, memory=True,
            log=print, failed: Optional[list] = None, skipped: Optional[list] = None,
            peer_memory: float = PEER_MEMORY_GB) -> list[Row]:
    """Rows of the table; the names of backends whose run raised are appended to ``failed``, and a line for
    each peer row left out because its memory estimate exceeds ``peer_memory`` GB to ``skipped``."""
    import torch

    rows: list[Row] = []
    for n, d, c in cases:
        X, alpha = make_problem(n, d, c, dtype)
        flops = agop_flops(n, n, d, c)
        floor_s = _median_time(gemm_floor(X, c), reps)
        rows.append(Row(n, n, d, c, kernel, dtype, "gemm-floor", floor_s, flops / floor_s / 1e9, None, 1.0))
        log(f"n={n} d={d} c={c}: GEMM floor {floor_s:.3f} s ({flops / floor_s / 1e9:.0f} GFLOP/s)")
        for backend in backends:
            need = XRFM_GB_PER_PAIR * n * n
            if backend == "xrfm" and need > peer_memory:
                message = f"xrfm skipped at n={n}: it needs ~{need:.1f} GB (more than --peer-memory {peer_memory:g})"
                log(f"  {message}")
                if skipped is not None:
                    skipped.append(message)
                continue
            if backend == "keops" and n * n > KEOPS_CPU_MAX_PAIRS and X.device.type == "cpu":
                log(f"  keops skipped at n={n}: minutes per call on CPU (see benchmarks/results/keops_crossover.csv)")
                continue
            note = ""
            try:
                fn = _runner(backend, X, alpha, kernel, bandwidth)
                t = _median_time(fn, reps if backend != "xrfm" else max(1, reps - 1))
            except Exception as exc:  # one failing backend must not lose the table
                log(f"  {backend}: failed: {exc}")
                if failed is not None:
                    failed.append(backend)
                continue
            if backend == "xrfm":
                note = "get_agop (sum over points)"
            peak = None
            if memory:
                spec = dict(n=n, d=d, c=c, dtype=dtype, kernel=kernel, bandwidth=bandwidth, backend=backend)
                peak = peak_extra_bytes(spec)
            row = Row(n, n, d, c, kernel, dtype, backend, t, flops / t / 1e9,
                      None if peak is None else peak / 2**20, t / floor_s, note)
            rows.append(row)
            mem = "n/a" if row.peak_extra_mb is None else f"{row.peak_extra_mb:.0f} MB"
            log(f"  {backend:>8}: {t:.3f} s  {row.gflops:.0f} GFLOP/s  {row.x_floor:.2f}x floor  peak extra {mem}")
        del X, alpha
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return rows


def format_table(rows: list[Row]) -> str:
    head = "| n = m | d | c | backend | median time (s) | GFLOP/s | peak extra memory (MB) | x GEMM floor |"
    lines = [head, "|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        mem = "" if r.peak_extra_mb is None else f"{r.peak_extra_mb:.0f}"
        ratio = "" if r.x_floor is None else f"{r.x_floor:.2f}"
        lines.append(f"| {r.n} | {r.d} | {r.c} | {r.backend} | {r.median_s:.3f} | {r.gflops:.0f} | {mem} | {ratio} |")
    xrfm = {(r.n, r.d, r.c): r for r in rows if r.backend == "xrfm"}
    best = {}
    for r in rows:
        if r.backend not in ("xrfm", "gemm-floor"):
            key = (r.n, r.d, r.c)
            if key not in best or r.median_s < best[key].median_s:
                best[key] = r
    for key, xr in xrfm.items():
        if key in best:
            lines.append("")
            speed = xr.median_s / best[key].median_s
            pace = f"{speed:.1f}x faster than" if speed >= 1 else f"{1 / speed:.1f}x slower than"
            memory = ""
            if xr.peak_extra_mb is not None and best[key].peak_extra_mb is not None:
                share = xr.peak_extra_mb / max(best[key].peak_extra_mb, 1.0)
                memory = (f" and uses {share:.0f}x less extra memory" if share >= 1
                          else f" and uses {1 / max(share, 1e-9):.1f}x more extra memory")
            lines.append(f"n = {key[0]}, d = {key[1]}, c = {key[2]}: rfm_fast ({best[key].backend}) is {pace} "
                         f"xrfm{memory}.")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .cli import _positive_int, positive_float

    parser.add_argument("--n", type=_positive_int, nargs="*", help="problem sizes n = m (default: 20000 10000)")
    parser.add_argument("--d", type=_positive_int, default=64, help="input dimension d (default: 64)")
    parser.add_argument("--c", type=_positive_int, default=10, help="outputs c, the columns of alpha (default: 10)")
    parser.add_argument("--quick", action="store_true", help="small problems only (seconds)")
    parser.add_argument("--backends", nargs="*", help="backends to time (default: torch, cpp/keops when "
                        "available, xrfm when installed); a named backend that cannot run is an error")
    parser.add_argument("--kernel", default="laplace", choices=("laplace", "gaussian"), help="(default: laplace)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"), help="(default: float32)")
    parser.add_argument("--bandwidth", type=positive_float, default=10.0, help="kernel bandwidth L (default: 10)")
    parser.add_argument("--reps", type=_positive_int, default=3, help="timed runs per row, the median is shown "
                        "(default: 3)")
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--peer-memory", type=positive_float, default=PEER_MEMORY_GB,
                        help="run a peer's row (xrfm) only when its estimated memory fits this many GB "
                             f"(default: {PEER_MEMORY_GB:g}; xrfm needs ~8.6 GB at n = 10000)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--csv", help="also write the rows to this CSV file")
    parser.add_argument("--child", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "child", None):
        print(json.dumps(_child_peak(json.loads(args.child))))
        return 0
    if args.n:
        cases = tuple((n, args.d, args.c) for n in args.n)
    else:
        cases = QUICK_CASES if args.quick else DEFAULT_CASES
    if args.backends:
        check_backends(args.backends)
    backends = args.backends or default_backends()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"rfm_fast AGOP benchmark: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.kernel}, {args.dtype}, x = centres, medians of {args.reps}", flush=True)
    failed: list = []
    skipped: list = []
    rows = measure(cases, backends, kernel=args.kernel, dtype=args.dtype, bandwidth=args.bandwidth,
                   reps=args.reps, memory=not args.no_memory, log=lambda s: print(s, flush=True), failed=failed,
                   skipped=skipped, peer_memory=args.peer_memory)
    print()
    print(format_table(rows))
    for line in skipped:
        print(f"\n{line}: not in the table")
    if args.csv:
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        with open(args.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(asdict(rows[0]).keys()))
            writer.writeheader()
            writer.writerows(asdict(r) for r in rows)
    if failed and args.backends:
        print(f"rfm-fast bench: failed: {', '.join(sorted(set(failed)))} (named with --backends)", file=sys.stderr)
        return 1
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    from .cli import Parser

    parser = Parser(prog="rfm-fast bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
