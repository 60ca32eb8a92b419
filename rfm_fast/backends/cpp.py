"""Probe of the "cpp" backend: the compiled CPU ops of csrc/ (OpenMP-threaded, fused tiles).

Built only on request (RFM_FAST_BUILD_EXT=1 pip install --no-build-isolation -e .). check() returns the build
hint when the extension is missing, so backend="auto" falls back to torch quietly and backend="cpp" raises it.
Imports nothing heavy at module level.
"""

from __future__ import annotations

from typing import Optional

OPS = ("kernel_mv", "kernel_grad", "agop")


def check(op: str, problem) -> Optional[str]:
    if op not in OPS:
        return f"the cpp backend implements {', '.join(OPS)}, not {op}"
    if problem.device.type != "cpu":
        return f"the cpp backend runs on CPU tensors, got {problem.device.type}"
    import torch

    if problem.dtype not in (torch.float32, torch.float64):
        return f"the cpp backend takes float32 or float64, got {problem.dtype}"
    from .. import _ext

    return _ext.unavailable_reason()


def prefers(op: str, problem) -> Optional[str]:
    # Measured on the 2-core reference machine (python -m rfm_fast.bench, benchmarks/results/agop_cpu.csv): at
    # n = m = 20000, d = 64, c = 10, x = centres, the cpp AGOP (symmetric schedule + compiled one-pass weights) and
    # the torch path are both within a few percent of the GEMM floor and of each other (0.91x and 0.95x), inside
    # the run-to-run noise, and off the centres too (1.12x and 1.14x in one run). auto keeps the torch path, which
    # needs no build.
    return "not measurably faster than the torch path on the CPU table (benchmarks/results/agop_cpu.csv)"
