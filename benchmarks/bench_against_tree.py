"""The AGOP against the GEMM floor, this checkout against another one (e.g. an older commit), in alternating fresh
processes so that the machine's drifts hit both alike.

    git worktree add --detach /tmp/old dbed50d && (cd /tmp/old && RFM_FAST_BUILD_EXT=1 python setup.py build_ext --inplace)
    python benchmarks/bench_against_tree.py --tree /tmp/old --n 20000 --rounds 3

Each process imports rfm_fast from its tree only, times the floor (``rfm_fast.bench.gemm_floor``) before and after,
and the torch and cpp AGOP (x = centres, Laplace L = 10, float32, d = 64, c = 10, median of --reps); the table
gives, per tree and backend, the median over rounds of time / mean floor of its own process.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parents[1]


def child(tree: str, n: int, d: int, c: int, reps: int) -> dict:
    sys.path[:] = [p for p in sys.path if p not in ("", str(HERE))]
    sys.path.insert(0, tree)
    import torch

    import rfm_fast
    # The tree's own bench helpers (both trees have them): its problem, its floor and its median timer.
    from rfm_fast.bench import _median_time, gemm_floor, make_problem

    if not rfm_fast.__file__.startswith(tree):
        raise RuntimeError(f"rfm_fast came from {rfm_fast.__file__}, not from {tree}")
    X, alpha = make_problem(n, d, c, "float32")

    def median(fn) -> float:
        return _median_time(fn, reps)

    floor = gemm_floor(X, c)
    out = {"tree": tree, "threads": torch.get_num_threads(), "floor": median(floor)}
    for backend in ("torch", "cpp"):
        try:
            out[backend] = median(lambda: rfm_fast.agop(X, X, alpha, kernel="laplace", bandwidth=10.0,
                                                        backend=backend))
        except Exception as exc:  # e.g. a tree without the built extension
            out[backend] = None
            out[f"{backend}_error"] = str(exc).splitlines()[0]
    out["floor_after"] = median(floor)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", required=True, help="the other checkout (its rfm_fast/ is imported from there)")
    parser.add_argument("--n", type=int, default=20000, help="n = m (default: 20000)")
    parser.add_argument("--d", type=int, default=64, help="(default: 64)")
    parser.add_argument("--c", type=int, default=10, help="(default: 10)")
    parser.add_argument("--rounds", type=int, default=3, help="process pairs, alternating (default: 3)")
    parser.add_argument("--reps", type=int, default=3, help="timed runs per op in a process (default: 3)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.n, args.d, args.c, args.reps)))
        return
    trees = [str(pathlib.Path(args.tree).resolve()), str(HERE)]
    rows = []
    for _ in range(args.rounds):
        for tree in trees:
            done = subprocess.run([sys.executable, __file__, "--tree", args.tree, "--child", tree, "--n", str(args.n),
                                   "--d", str(args.d), "--c", str(args.c), "--reps", str(args.reps)],
                                  capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    print(f"\nn = m = {args.n}, d = {args.d}, c = {args.c}: time / GEMM floor, median of {args.rounds} rounds")
    for tree in trees:
        for backend in ("torch", "cpp"):
            ratios = [r[backend] / (0.5 * (r["floor"] + r["floor_after"])) for r in rows
                      if r["tree"] == tree and r.get(backend)]
            if ratios:
                print(f"  {tree}  {backend}: {statistics.median(ratios):.3f}  ({', '.join(f'{x:.3f}' for x in ratios)})")


if __name__ == "__main__":
    main()
