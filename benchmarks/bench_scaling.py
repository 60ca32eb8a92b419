"""Scaling curves at large n: seconds and peak memory of the AGOP, the exact kernel ridge solve and the Nystrom RFM
fit against n, with xrfm's AGOP where it fits in memory; fitted exponents (time ~ n^p); log-log PNG plots.

    python benchmarks/bench_scaling.py                          # the README's curves (~1 h on 2 cores)
    python benchmarks/bench_scaling.py --agop-n 2000 4000 --solve-n 2000 --nystrom-n 5000 10000 --m 2000  # quick

Every point runs in a fresh subprocess under an address-space limit (``--limit-gb``, default 8): its peak
memory (VmHWM) is its own, and a peer that needs more than the limit fails there, recorded as "does not fit"
(an x on the plots) instead of taking the machine down. Data: the sector task of bench_nystrom_rfm.py (x ~ N(0,
I_64), the class from the angle in a hidden 2-plane, c = 10). Cases:
- ``agop``: rfm_fast.agop(X, X, alpha) (m = n evaluation points, n centres, d = 64, c = 10, float32, M = I);
- ``xrfm_agop``: xrfm's LaplaceKernel.get_agop on the same inputs (xrfm from PyPI);
- ``exact_solve``: krr_solve(solver="auto") on n points (Cholesky while 2 n^2 floats fit the budget, then PCG);
- ``nystrom_fit``: RFM(solver="nystrom", centres=min(m, n), iters=1) (two solves and one AGOP at all n points).
Writes benchmarks/results/scaling.csv, scaling_exponents.csv and scaling_time.png / scaling_memory.png.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"
CASES = ("agop", "xrfm_agop", "exact_solve", "nystrom_fit")


def _vm_hwm_mb() -> float:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def child(case: str, n: int, m: int) -> dict:
    """One measurement, in this (fresh) process: seconds and peak resident MB (baseline: after the data)."""
    import numpy as np
    import torch

    sys.path.insert(0, str(HERE))
    from bench_nystrom_rfm import sector_task

    import rfm_fast

    X, y, _ = sector_task(n, 64, 10)
    X = torch.from_numpy(X)
    Y = torch.nn.functional.one_hot(torch.from_numpy(y), 10).float()
    alpha = (Y - Y.mean(0)) / n
    baseline = _vm_hwm_mb()
    start = time.perf_counter()
    if case == "agop":
        rfm_fast.agop(X, X, alpha, bandwidth=10.0)
    elif case == "xrfm_agop":
        from bench_xrfm import xrfm_agop

        xrfm_agop(X, X, alpha, bandwidth=10.0)
    elif case == "exact_solve":
        rfm_fast.krr_solve(X, Y, bandwidth=10.0, reg=1e-3, memory_budget="8GB")
    elif case == "nystrom_fit":
        rfm_fast.RFM(solver="nystrom", centres=min(m, n), iters=1, bandwidth=10.0, random_state=0).fit(X, np.asarray(y))
    else:
        raise ValueError(case)
    return {"seconds": time.perf_counter() - start, "peak_mb": _vm_hwm_mb(), "baseline_mb": baseline}


def run_point(case: str, n: int, m: int, limit_gb: float, timeout: float) -> dict:
    env = dict(os.environ, RFM_FAST_SCALING_CHILD=json.dumps([case, n, m]))

    def limit():
        size = int(limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (size, size))

    row = {"case": case, "n": n, "m": min(m, n) if case == "nystrom_fit" else "", "seconds": "", "peak_mb": "",
           "baseline_mb": "", "status": "ok"}
    try:
        proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=timeout,
                              preexec_fn=limit)
    except subprocess.TimeoutExpired:
        row["status"] = f"over the {timeout:.0f} s time limit"
        return row
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1][:160]
        out_of_memory = "memory" in proc.stderr.lower() or "alloc" in proc.stderr.lower()
        row["status"] = f"does not fit in {limit_gb:g} GB" if out_of_memory else f"failed: {tail}"
        return row
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    row.update(seconds=round(result["seconds"], 3), peak_mb=round(result["peak_mb"]),
               baseline_mb=round(result["baseline_mb"]))
    return row


def exponents(rows: list) -> list:
    """Least-squares slope of log seconds and log (peak - baseline) MB against log n, per case (ok points)."""
    import numpy as np

    out = []
    for case in CASES:
        pts = [r for r in rows if r["case"] == case and r["status"] == "ok"]
        if len(pts) < 2:
            continue
        n = np.log([p["n"] for p in pts])
        t = np.polyfit(n, np.log([p["seconds"] for p in pts]), 1)[0]
        extra = [max(p["peak_mb"] - p["baseline_mb"], 1.0) for p in pts]
        mem = np.polyfit(n, np.log(extra), 1)[0]
        out.append({"case": case, "points": len(pts), "n_range": f"{pts[0]['n']}..{pts[-1]['n']}",
                    "time_exponent": round(float(t), 2), "memory_exponent": round(float(mem), 2)})
    return out


def plot(rows: list, folder: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"agop": ("rfm_fast AGOP", "C0", "o"), "xrfm_agop": ("xrfm AGOP", "C3", "s"),
              "exact_solve": ("rfm_fast exact KRR solve", "C2", "^"),
              "nystrom_fit": ("rfm_fast Nystrom RFM fit (m = 10^4)", "C1", "D")}
    for key, label, name in (("seconds", "seconds", "scaling_time.png"),
                             ("peak_mb", "peak resident memory (MB)", "scaling_memory.png")):
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for case, (text, colour, marker) in styles.items():
            ok = [r for r in rows if r["case"] == case and r["status"] == "ok"]
            bad = [r for r in rows if r["case"] == case and r["status"] != "ok"]
            if ok:
                ax.plot([r["n"] for r in ok], [r[key] for r in ok], marker=marker, color=colour, label=text)
            if bad:
                top = max([r[key] for r in rows if r["status"] == "ok"] or [1.0])
                ax.scatter([r["n"] for r in bad], [top] * len(bad), marker="x", s=80, color=colour,
                           label=f"{text}: does not fit / not run")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("n (points)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"{label} vs n (2-core CPU, float32, d = 64, c = 10)", fontsize=9)
        fig.tight_layout()
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agop-n", type=int, nargs="*", default=[5000, 10000, 20000, 50000, 100000, 200000])
    parser.add_argument("--xrfm-n", type=int, nargs="*", default=None, help="(default: --agop-n)")
    parser.add_argument("--solve-n", type=int, nargs="*", default=[5000, 10000, 20000, 50000, 100000, 200000])
    parser.add_argument("--nystrom-n", type=int, nargs="*", default=[10000, 30000, 100000, 300000, 1000000])
    parser.add_argument("--m", type=int, default=10000, help="Nystrom centres (default: 10000)")
    parser.add_argument("--limit-gb", type=float, default=8.0, help="address-space limit per point (default: 8)")
    parser.add_argument("--timeout", type=float, default=2400.0, help="seconds per point (default: 2400)")
    parser.add_argument("--out", default=str(RESULTS), help="results folder (default: benchmarks/results)")
    args = parser.parse_args()
    folder = pathlib.Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    plan = ([("agop", n) for n in args.agop_n] + [("xrfm_agop", n) for n in (args.xrfm_n or args.agop_n)]
            + [("exact_solve", n) for n in args.solve_n] + [("nystrom_fit", n) for n in args.nystrom_n])
    sys.path.insert(0, str(HERE))
    from _results import write_csv

    rows = []
    for case, n in plan:
        row = run_point(case, n, args.m, args.limit_gb, args.timeout)
        rows.append(row)
        print(", ".join(f"{k} = {v}" for k, v in row.items()), flush=True)
        write_csv(rows, folder / "scaling.csv")
    fits = exponents(rows)
    for f in fits:
        print(", ".join(f"{k} = {v}" for k, v in f.items()))
    if fits:
        write_csv(fits, folder / "scaling_exponents.csv")
    plot(rows, folder)


if __name__ == "__main__":
    if "RFM_FAST_SCALING_CHILD" in os.environ:
        case, n, m = json.loads(os.environ["RFM_FAST_SCALING_CHILD"])
        print(json.dumps(child(case, n, m)))
    else:
        main()
