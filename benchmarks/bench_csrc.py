"""Speed of the compiled CPU op ("cpp") against the same-run chunked-GEMM floor and the torch path.

pytest-benchmark cases (``pytest benchmarks/bench_csrc.py --benchmark-only``) time the AGOP and the mat-vec at a
moderate size; the script form interleaves floor / cpp / torch runs in one process and prints median ratios, the
issue-6 target being cpp <= 1.15x floor and faster than torch at n = m = 20000, d = 64, c = 10, fp32, Laplace:

    python benchmarks/bench_csrc.py --n 20000 --reps 5
    python benchmarks/bench_csrc.py --sweep        # cpp / torch per op, dtype, shape, x = centres or not -> CSV

The sweep is what backend="auto" follows (rfm_fast/backends/cpp.py): benchmarks/results/cpp_vs_torch.csv.

The floor is rfm_fast.bench.gemm_floor (the distance GEMM and the W @ V GEMM in 256-row tiles, no elementwise
work), so this script and the ``rfm-fast bench`` table agree on it. Skips (pytest) or exits with the build hint
(script) when the extension is not built.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import pytest
import torch

import rfm_fast
from rfm_fast import _ext
from rfm_fast.bench import agop_flops, gemm_floor, make_problem
from _results import write_csv  # noqa: E402  (benchmarks/, the scripts' folder)

BENCH_N, BENCH_D, BENCH_C = 5000, 64, 10
BANDWIDTH = 10.0


def _agop(X, alpha, backend, kernel="laplace"):
    return lambda: rfm_fast.agop(X, X, alpha, kernel=kernel, bandwidth=BANDWIDTH, backend=backend)


def _kernel_mv(X, alpha, backend, kernel="laplace"):
    return lambda: rfm_fast.kernel_mv(X, X, alpha, kernel=kernel, bandwidth=BANDWIDTH, backend=backend)


@pytest.fixture(scope="module")
def problem():
    reason = _ext.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    return make_problem(BENCH_N, BENCH_D, BENCH_C, "float32")


@pytest.mark.parametrize("backend", ["cpp", "torch", "floor"])
def test_agop_speed(benchmark, problem, backend):
    X, alpha = problem
    fn = gemm_floor(X, BENCH_C) if backend == "floor" else _agop(X, alpha, backend)
    benchmark.group = f"agop n=m={BENCH_N} d={BENCH_D} c={BENCH_C} fp32 laplace"
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("kernel", ["laplace", "gaussian"])
def test_kernel_mv_speed(benchmark, problem, backend, kernel):
    X, alpha = problem
    benchmark.group = f"kernel_mv n=m={BENCH_N} d={BENCH_D} c={BENCH_C} fp32 {kernel}"
    benchmark.pedantic(_kernel_mv(X, alpha, backend, kernel), rounds=3, warmup_rounds=1)


def floor_ratios(n: int = 20000, d: int = 64, c: int = 10, *, dtype: str = "float32", kernel: str = "laplace",
                 reps: int = 5, backends=("cpp", "torch"), log=print) -> dict:
    """Median time of the floor and of each backend's AGOP, interleaved in one process (so load from other
    processes hits all of them alike), and the per-round ratios to the floor. Returns
    {"floor": s, backend: s, ..., "ratio": {backend: median of per-round ratios}}."""
    X, alpha = make_problem(n, d, c, dtype)
    fns = {"floor": gemm_floor(X, c), **{b: _agop(X, alpha, b, kernel) for b in backends}}
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for rep in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
        log(f"round {rep + 1}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()))
    out = {k: statistics.median(v) for k, v in times.items()}
    out["ratio"] = {b: statistics.median(t / f for t, f in zip(times[b], times["floor"])) for b in backends}
    flops = agop_flops(n, n, d, c)
    log(f"n=m={n} d={d} c={c} {dtype} {kernel}, {torch.get_num_threads()} threads: floor {out['floor']:.3f}s "
        f"({flops / out['floor'] / 1e9:.0f} GFLOP/s); " +
        ", ".join(f"{b} {out[b]:.3f}s = {out['ratio'][b]:.3f}x floor" for b in backends))
    return out


SWEEP_SHAPES = ((8000, 64, 10), (8000, 16, 1), (4000, 256, 3))


def sweep(path: str, reps: int = 3) -> None:
    """Median time of cpp and torch, timed in alternation in one process, for kernel_mv, kernel_grad and agop at
    SWEEP_SHAPES (n = m, d, c), float32 and float64, with x = centres and with points 1e-3 away; one CSV row each."""

    rows = []
    gen = torch.Generator().manual_seed(0)
    for n, d, c in SWEEP_SHAPES:
        X = torch.randn(n, d, generator=gen)
        alpha = torch.randn(n, c, generator=gen) / n**0.5
        near = X + 1e-3 * torch.randn(n, d, generator=gen)
        for dtype in (torch.float32, torch.float64):
            Xd, ad = X.to(dtype), alpha.to(dtype)
            for where, Z in (("centres", Xd), ("off", near.to(dtype))):
                for op in ("kernel_mv", "kernel_grad", "agop"):
                    f = getattr(rfm_fast, op)
                    calls = {b: (lambda b=b: f(Z, Xd, ad, bandwidth=BANDWIDTH, backend=b)) for b in ("torch", "cpp")}
                    times = {b: [] for b in calls}
                    for fn in calls.values():
                        fn()
                    for _ in range(reps):
                        for b, fn in calls.items():
                            start = time.perf_counter()
                            fn()
                            times[b].append(time.perf_counter() - start)
                    med = {b: statistics.median(v) for b, v in times.items()}
                    row = dict(op=op, n=n, d=d, c=c, dtype=str(dtype)[6:], points=where, torch_s=round(med["torch"], 4),
                               cpp_s=round(med["cpp"], 4), cpp_over_torch=round(med["cpp"] / med["torch"], 3),
                               threads=torch.get_num_threads())
                    rows.append(row)
                    print(", ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    write_csv(rows, path)
    print(f"wrote {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--c", type=int, default=10)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--kernel", default="laplace", choices=("laplace", "gaussian"))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--backends", nargs="*", default=["cpp", "torch"])
    parser.add_argument("--sweep", action="store_true", help="the cpp / torch table that backend='auto' follows")
    parser.add_argument("--csv", default="benchmarks/results/cpp_vs_torch.csv", help="where --sweep writes")
    args = parser.parse_args(argv)
    reason = _ext.unavailable_reason()
    if reason is not None and ("cpp" in args.backends or args.sweep):
        print(reason, file=sys.stderr)
        return 1
    if args.sweep:
        sweep(args.csv)
        return 0
    floor_ratios(args.n, args.d, args.c, dtype=args.dtype, kernel=args.kernel, reps=args.reps,
                 backends=tuple(args.backends))
    return 0


if __name__ == "__main__":
    sys.exit(main())
