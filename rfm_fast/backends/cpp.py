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
    """auto picks cpp wherever it can run (CPU, float32/float64, the extension built), as measured by
    ``python benchmarks/bench_csrc.py --sweep`` (benchmarks/results/cpp_vs_torch.csv, 2 cores, AVX-512 build): cpp
    was faster than the torch path in all 36 cases (kernel_mv, kernel_grad, agop; three shapes; float32 and
    float64; x = centres and not; 0.59-0.99x the torch time). At n = m = 20000, d = 64, c = 10 (rfm-fast bench)
    the AGOP took 0.91x the GEMM floor against 0.95x for torch."""
    return None
