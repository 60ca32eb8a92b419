"""AGOP and mat-vec under the near-rank-1 M an RFM loop learns, against M = I, interleaved in one process.

The learned M is the last of ``bench_rank.learned_metrics`` on the first 4000 points (y = tanh(3 x.w), Laplace
L = 10, reg 1e-3, M <- AGOP / max); by default n = m = 4000, d = 64, c = 10 (``--shapes``), float32, x = centres.
Each round times every (backend, metric, op) once, in turn, so slow phases of a shared machine hit all of them; the
table gives medians and learned / identity. Every call prepares its geometry (inside a solver, ``reuse()`` pays that
once); the factor of M is computed once per M tensor (``rfm_fast.core.metric``), and the choice of its
directly formed coordinates once per (M, centres) (``geometry._hybrid_of``), as in an RFM iteration, whose solve,
AGOP and predictions share both.

    python benchmarks/bench_learned_vs_identity.py --shapes 4000x64x10 1280x10x1 4000x10x1:11 8000x10x1:7 \
        16000x64x10:5 4000x784x10:5 --rounds 21 --csv benchmarks/results/learned_vs_identity.csv
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import torch

import rfm_fast

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_rank import BANDWIDTH, learned_metrics  # noqa: E402
from _results import write_csv  # noqa: E402  (benchmarks/, the scripts' folder)


# The metric is learned on the first LEARN_N points (an exact RFM fit on all 16000 would dominate the run).
LEARN_N = 4000


def measure(n: int, d: int, c: int, rounds: int) -> list:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, d, generator=g)
    alpha = torch.randn(n, c, generator=g)
    M = learned_metrics(X[:LEARN_N], 5)[-1][1]
    backends = [b for b in ("torch", "cpp") if b in rfm_fast.available_backends("cpu")]
    calls = {}
    for b in backends:
        for name, metric in (("identity", None), ("learned", M)):
            calls[(b, name, "kernel_mv")] = (lambda b=b, m=metric: rfm_fast.kernel_mv(
                X, X, alpha, bandwidth=BANDWIDTH, M=m, backend=b))
            calls[(b, name, "agop")] = (lambda b=b, m=metric: rfm_fast.agop(
                X, X, alpha, bandwidth=BANDWIDTH, M=m, backend=b))
    for fn in calls.values():
        fn()
    times = {key: [] for key in calls}
    for _ in range(rounds):
        for key, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    rows = []
    for b in backends:
        for op in ("kernel_mv", "agop"):
            ident = statistics.median(times[(b, "identity", op)])
            learned = statistics.median(times[(b, "learned", op)])
            rows.append({"n": n, "d": d, "c": c, "backend": b, "op": op, "identity_s": round(ident, 4),
                         "learned_s": round(learned, 4), "learned_over_identity": round(learned / ident, 3),
                         "rounds": rounds})
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=["4000x64x10"],
                        help="n x d x c of each problem, optionally :rounds (default: 4000x64x10; xrfm's own tests: "
                             "1280x10x1)")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    args = parser.parse_args()
    rows = []
    for shape in args.shapes:
        dims, _, rounds = shape.lower().partition(":")
        n, d, c = (int(v) for v in dims.split("x"))
        rows += measure(n, d, c, int(rounds) if rounds else args.rounds)
    if args.csv:
        write_csv(rows, args.csv)


if __name__ == "__main__":
    main()
