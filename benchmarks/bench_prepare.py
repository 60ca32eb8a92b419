"""Time of one geometry preparation (``rfm_fast.core.geometry.Geometry.build``), M = I against the near-rank-1
learned M of ``bench_rank.learned_metrics``: what every op call pays before its first tile (at n ~ 1000 about a
quarter of a mat-vec). Medians of ``--rounds`` builds, evaluation points equal to the centres ("same") and 300 other
points ("z != x"), float32.

    python benchmarks/bench_prepare.py --shapes 1280x10 4000x10 4000x64
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch

from rfm_fast.core.geometry import Geometry
from rfm_fast.core.kernels import KernelSpec

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_rank import BANDWIDTH, learned_metrics, median_time  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=["1280x10", "4000x10", "4000x64"], help="n x d")
    parser.add_argument("--rounds", type=int, default=101)
    args = parser.parse_args()
    spec = KernelSpec("laplace", BANDWIDTH)
    for shape in args.shapes:
        n, d = (int(v) for v in shape.lower().split("x"))
        g = torch.Generator().manual_seed(0)
        X = torch.randn(n, d, generator=g)
        Z = torch.randn(300, d, generator=g)
        M = learned_metrics(X[:4000], 5)[-1][1]
        for name, metric in (("identity", None), ("learned", M)):
            same = 1e3 * median_time(lambda: Geometry.build(X, X, metric, spec, allow_band="gradient"), args.rounds)
            other = 1e3 * median_time(lambda: Geometry.build(Z, X, metric, spec, allow_band="value"), args.rounds)
            print(f"{shape} {name:8s} same {same:.3f} ms   z != x {other:.3f} ms", flush=True)


if __name__ == "__main__":
    main()
