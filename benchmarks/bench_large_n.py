"""Large-n benchmarks: kernel ridge regression by Nystrom-PCG against the direct solve, and the weak scaling of
the sharded AGOP over torch.distributed ranks (gloo, CPU).

    python benchmarks/bench_large_n.py                     # n = 50000, d = 32: the issue's case (minutes on CPU)
    python benchmarks/bench_large_n.py --n 10000 --direct-n 4000 --agop-m 1000 --agop-n 4000   # a quick run

Every measurement runs in a fresh subprocess so that its peak resident memory (VmHWM from /proc/self/status)
is its own; ``baseline_mb`` is the same process's peak just before the solve (interpreter, torch, the data),
so ``peak_mb - baseline_mb`` is what the solver itself added. The residual is recomputed independently after the
solve with a float64 kernel product: ||Y - (K + reg I) alpha|| / ||Y||, largest over the columns.
The direct solve (Cholesky, ``rfm_fast.krr_solve(solver="cholesky")``) needs about 2 n^2 elements; it runs
only where that fits ``--direct-budget`` (default 8 GiB), at ``--direct-n`` and at n when it fits.
The AGOP weak-scaling rows run ``torchrun --nproc_per_node R`` with ``--agop-m`` evaluation points per rank
against ``--agop-n`` centres and one thread per rank; the 2-rank row also reports the relative Frobenius
difference of the sharded AGOP from the single-process AGOP over the same points.

Data: a 10-class mixture on an 8-dimensional latent space mapped non-linearly to d dimensions, standardised,
one-hot targets (c = 10): a kernel spectrum that decays as for real data, not the flat spectrum of pure noise.
Results go to benchmarks/results/large_n.csv (one row per measurement, appended runs replace the file).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
CHILD_ARGS_ENV = "RFM_FAST_BENCH_LARGE_N_ARGS"
FIELDS = ["case", "n", "d", "c", "ranks", "threads", "dtype", "nystrom_rank", "seconds", "setup_seconds",
          "iterations", "restarts", "residual", "peak_mb", "baseline_mb", "rel_diff_vs_single", "note"]


def make_data(n: int, d: int, c: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    means = 2.0 * torch.randn(c, 8, generator=g)
    labels = torch.randint(0, c, (n,), generator=g)
    z = means[labels] + torch.randn(n, 8, generator=g)
    X = torch.tanh(z @ torch.randn(8, d, generator=g) / 8**0.5) + 0.1 * torch.randn(n, d, generator=g)
    X = (X - X.mean(0)) / X.std(0)
    return X.contiguous(), torch.nn.functional.one_hot(labels, c).float()


def vm_hwm_mb() -> float:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _residual(X, Y, alpha, args) -> float:
    import torch

    import rfm_fast

    X64, a64 = X.double(), alpha.double()
    KA = rfm_fast.kernel_mv(X64, X64, a64, kernel=args.kernel, bandwidth=args.bandwidth)
    R = Y.double() - KA - args.reg * a64
    return float((R.norm(dim=0) / Y.double().norm(dim=0)).max())


def child_solve(args) -> dict:
    """One KRR solve (PCG or Cholesky) in this process; returns the row."""
    import torch

    import rfm_fast

    torch.set_num_threads(args.threads)
    X, Y = make_data(args.n, args.d, args.c)
    baseline = vm_hwm_mb()
    start = time.perf_counter()
    alpha, info = rfm_fast.krr_solve(X, Y, kernel=args.kernel, bandwidth=args.bandwidth, reg=args.reg,
                                     solver=args.child, tol=args.tol, rank=args.rank, return_info=True,
                                     memory_budget=args.direct_budget if args.child == "cholesky" else None)
    seconds = time.perf_counter() - start
    peak = vm_hwm_mb()
    return dict(case=f"krr_{args.child}", n=args.n, d=args.d, c=args.c, ranks=1, threads=args.threads,
                dtype="float32", nystrom_rank=info.get("rank", ""), seconds=round(seconds, 2),
                setup_seconds=round(info["setup_seconds"], 2) if "setup_seconds" in info else "",
                iterations=info.get("iterations", 0), restarts=info.get("restarts", ""),
                residual=f"{_residual(X, Y, alpha, args):.3e}",
                peak_mb=round(peak, 1), baseline_mb=round(baseline, 1), rel_diff_vs_single="",
                note=f"kernel={args.kernel} L={args.bandwidth} reg={args.reg} tol={args.tol}")


def child_agop(args) -> dict:
    """Under torchrun: the sharded AGOP, args.agop_m points per rank against args.agop_n centres."""
    import torch
    import torch.distributed as dist

    import rfm_fast
    import rfm_fast.distributed as rd

    torch.set_num_threads(1)
    rank, world = rd.init("gloo")
    X, _ = make_data(args.agop_n + args.agop_m * world, args.d, args.c, seed=1)
    centres, points = X[: args.agop_n], X[args.agop_n:]
    alpha = torch.randn(args.agop_n, args.c, generator=torch.Generator().manual_seed(2))
    mine = points[args.agop_m * rank: args.agop_m * (rank + 1)]
    ops = dict(kernel=args.kernel, bandwidth=args.bandwidth)
    rd.agop(mine[:64], centres[:256], alpha[:256], **ops)  # warm-up: first-call costs out of the timing
    dist.barrier()
    start = time.perf_counter()
    A = rd.agop(mine, centres, alpha, **ops)
    seconds = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    diff = ""
    if world > 1 and rank == 0:
        ref = rfm_fast.agop(points, centres, alpha, **ops)
        diff = f"{float((A.double() - ref.double()).norm() / ref.double().norm()):.2e}"
    dist.barrier()
    row = dict(case="agop_sharded_weak", n=args.agop_n, d=args.d, c=args.c, ranks=world, threads=1,
               dtype="float32", nystrom_rank="", seconds=round(float(seconds), 2), iterations="", residual="",
               peak_mb=round(vm_hwm_mb(), 1), baseline_mb="", rel_diff_vs_single=diff,
               note=f"{args.agop_m} points per rank, {args.agop_m * world} in all")
    dist.destroy_process_group()
    return row if rank == 0 else {}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_child(argv: list[str], args, *, ranks: int = 0) -> dict:
    common = [f"--n={args.n}", f"--d={args.d}", f"--c={args.c}", f"--tol={args.tol}", f"--reg={args.reg}",
              f"--bandwidth={args.bandwidth}", f"--kernel={args.kernel}", f"--threads={args.threads}",
              f"--agop-m={args.agop_m}", f"--agop-n={args.agop_n}", f"--direct-budget={args.direct_budget}"]
    if args.rank is not None:
        common.append(f"--rank={args.rank}")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads if not ranks else 1), MASTER_ADDR="127.0.0.1")
    if ranks:
        if pathlib.Path("/sys/class/net/lo").exists():
            env["GLOO_SOCKET_IFNAME"] = "lo"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={ranks}",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", __file__]
    else:
        cmd = [sys.executable, __file__]
    # The child's options travel in the environment: torchrun would try to parse "--n=..." as its own.
    env[CHILD_ARGS_ENV] = json.dumps(common + argv)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    rows = [json.loads(line[5:]) for line in proc.stdout.splitlines() if line.startswith("ROW: ")]
    if proc.returncode != 0 or not rows:
        return dict(case=" ".join(argv), n=args.n, d=args.d, note=f"failed: {proc.stderr.strip()[-400:]}")
    return rows[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--d", type=int, default=32)
    p.add_argument("--c", type=int, default=10)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--reg", type=float, default=1e-3)
    p.add_argument("--bandwidth", type=float, default=10.0)
    p.add_argument("--kernel", default="laplace", choices=["laplace", "gaussian"])
    p.add_argument("--rank", type=int, default=None, help="Nystrom rank (default: the solver's default)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads of the single-process solves (default: all CPUs; on a shared machine 1 "
                        "gives steadier timings)")
    p.add_argument("--direct-n", type=int, default=10_000, help="n of the direct-vs-PCG comparison")
    p.add_argument("--direct-budget", default="8GiB", help="largest 2 n^2 fp32 the direct solve may take")
    p.add_argument("--agop-m", type=int, default=8000, help="evaluation points per rank (weak scaling)")
    p.add_argument("--agop-n", type=int, default=16000, help="centres of the weak-scaling AGOP")
    p.add_argument("--skip", nargs="*", default=[], choices=["pcg", "direct", "agop"])
    p.add_argument("--out", default=str(HERE / "results" / "large_n.csv"))
    p.add_argument("--child", choices=["pcg", "cholesky", "agop"], help=argparse.SUPPRESS)
    if argv is None and CHILD_ARGS_ENV in os.environ:
        argv = json.loads(os.environ.pop(CHILD_ARGS_ENV))
    args = p.parse_args(argv)

    if args.child:
        row = child_agop(args) if args.child == "agop" else child_solve(args)
        if row:
            print("ROW: " + json.dumps(row), flush=True)
        return 0

    sys.path.insert(0, str(HERE.parent))
    from rfm_fast._config import parse_bytes

    budget = parse_bytes(args.direct_budget)
    rows = []

    def record(row):
        rows.append(row)
        print(", ".join(f"{k}={row.get(k, '')}" for k in FIELDS if row.get(k, "") != ""), flush=True)

    if "pcg" not in args.skip:
        record(_run_child(["--child=pcg"], args))
    if "direct" not in args.skip:
        need = 2 * args.n**2 * 4
        if need <= budget:
            record(_run_child(["--child=cholesky"], args))
        else:
            record(dict(case="krr_cholesky", n=args.n, d=args.d, c=args.c, dtype="float32",
                        note=f"skipped: needs ~{need / 2**30:.0f} GiB (K and its factor, 2 n^2 fp32) > "
                             f"--direct-budget {budget / 2**30:.0f} GiB; K alone is {need / 2**31:.0f} GiB"))
        small = argparse.Namespace(**{**vars(args), "n": args.direct_n})
        if args.direct_n != args.n and 2 * args.direct_n**2 * 4 <= budget:
            record(_run_child(["--child=pcg"], small))
            record(_run_child(["--child=cholesky"], small))
    if "agop" not in args.skip:
        for ranks in (1, 2):
            record(_run_child(["--child=agop"], args, ranks=ranks))
        t = [float(r["seconds"]) for r in rows if r.get("case") == "agop_sharded_weak" and "seconds" in r]
        if len(t) == 2:
            print(f"weak-scaling efficiency (1-rank time / 2-rank time): {t[0] / t[1]:.2f}")

    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in FIELDS})
    print(f"wrote {out}")
    return 0 if all(not str(r.get("note", "")).startswith("failed") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
