"""KeOps against the torch path: pytest-benchmark cases, and the crossover sweep behind ``backend="auto"``.

    pytest benchmarks/bench_keops.py                       # pytest-benchmark: kernel_mv and agop, keops vs torch
    python benchmarks/bench_keops.py --sweep               # writes benchmarks/results/keops_crossover.csv
    python benchmarks/bench_keops.py --sweep --quick       # n in {1000, 5000} only

The sweep times both backends in the same process on the same inputs (centres X (n, d), evaluation points the
first m rows of X, so self pairs are included as in RFM training; Laplace, float32) and records the median of each
and their ratio. Both backends cost ~m n, so m is capped (``--m``, default 500) to keep the sweep to minutes on a
shared 2-core machine without changing the ratio. rfm_fast/backends/keops.py encodes the result in ``prefers``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
os.environ.setdefault("KEOPS_CACHE_FOLDER", str(REPO / ".cache" / "keops"))

import pytest  # noqa: E402
import torch  # noqa: E402
from _results import write_csv  # noqa: E402  (benchmarks/, the scripts' folder)

RESULTS = REPO / "benchmarks" / "results" / "keops_crossover.csv"
SWEEP_N = (1000, 5000, 20000)
SWEEP_D = (8, 64, 256)
SWEEP_C = (1, 10)
BANDWIDTH = 10.0


def make_problem(n: int, m: int, d: int, c: int, dtype=torch.float32, seed: int = 0):
    """Centres X (n, d), evaluation points X[:m], coefficients alpha (n, c) scaled like a KRR solution."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype)
    alpha = (torch.randn(n, c, generator=gen, dtype=torch.float64) / n**0.5).to(dtype)
    return X[:m], X, alpha


def op_call(op: str, backend: str, Z, X, alpha, kernel: str = "laplace"):
    import rfm_fast

    f = getattr(rfm_fast, op)
    return lambda: f(Z, X, alpha, kernel=kernel, bandwidth=BANDWIDTH, backend=backend)


def paired_medians(fns: dict, budget_s: float = 6.0, max_rounds: int = 9) -> dict:
    """Median wall time of each callable, timed in alternation (one run of each per round) so that load changes on
    a shared machine hit every backend alike. After a warm-up (KeOps compiles there), rounds continue until
    ``budget_s`` is spent: up to ``max_rounds`` for cheap cases, one for cases slower than the budget (there the
    ratio is far from 1 and noise does not decide anything)."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    spent = 0.0
    for _ in range(max_rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
            spent += times[name][-1]
        if spent > budget_s:
            break
    return {name: statistics.median(t) for name, t in times.items()}


def sweep(ns, ds, cs, m_cap: int, ops=("kernel_mv", "agop"), log=print) -> list[dict]:
    rows = []
    for n in ns:
        for d in ds:
            for c in cs:
                m = min(n, m_cap)
                Z, X, alpha = make_problem(n, m, d, c)
                for op in ops:
                    med = paired_medians({b: op_call(op, b, Z, X, alpha) for b in ("torch", "keops")})
                    row = dict(device="cpu", op=op, n=n, m=m, d=d, c=c, kernel="laplace", dtype="float32",
                               torch_s=round(med["torch"], 4), keops_s=round(med["keops"], 4),
                               keops_over_torch=round(med["keops"] / med["torch"], 2),
                               threads=torch.get_num_threads(), load_avg=round(os.getloadavg()[0], 1))
                    rows.append(row)
                    log(", ".join(f"{k}={v}" for k, v in row.items()))
                    sys.stdout.flush()
    return rows



def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="run the crossover sweep and write the CSV")
    parser.add_argument("--quick", action="store_true", help="n in {1000, 5000} only")
    parser.add_argument("--m", type=int, default=500, help="evaluation points per case (cap), default 500")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for both backends (default 1, see below)")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not args.sweep:
        parser.print_help()
        return 0
    # One thread each by default: on an oversubscribed shared machine, 2-thread OpenMP regions wait at barriers for
    # descheduled threads (torch kernel_mv at n = 1000, m = 500, d = 8: 0.47 s with 2 threads, 0.012 s with 1 at
    # load 12), which measures the machine, not the algorithms. Both backends split the evaluation points across
    # threads, so per-core ratios carry over to more cores. KeOps' OpenMP reads OMP_NUM_THREADS when its first
    # compiled formula loads, after this line.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ns = SWEEP_N[:2] if args.quick else SWEEP_N
    rows = sweep(ns, SWEEP_D, SWEEP_C, args.m)
    write_csv(rows, args.out)
    wins = [r for r in rows if r["keops_over_torch"] < 1.0]
    print(f"wrote {args.out}: KeOps faster in {len(wins)} of {len(rows)} cases")
    return 0


# pytest-benchmark cases (collected when this file is named on the pytest command line), (n = m, d, c).
BENCH_CASES = [(4000, 64, 10), (4000, 8, 1)]


@pytest.mark.parametrize("case", BENCH_CASES, ids=lambda s: "n{}-d{}-c{}".format(*s))
@pytest.mark.parametrize("backend", ["torch", "keops"])
@pytest.mark.parametrize("op", ["kernel_mv", "agop"])
def test_bench(benchmark, op, backend, case):
    if backend == "keops":
        pytest.importorskip("pykeops")
    n, d, c = case
    Z, X, alpha = make_problem(n, n, d, c)
    fn = op_call(op, backend, Z, X, alpha)
    fn()  # compile outside the timed rounds
    benchmark.pedantic(fn, rounds=3, iterations=1)


if __name__ == "__main__":
    sys.exit(main())
