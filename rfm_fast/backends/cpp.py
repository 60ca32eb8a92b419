"""Probe of the "cpp" backend: the compiled CPU ops of csrc/ (OpenMP-threaded, fused tiles).

Built only on request (RFM_FAST_BUILD_EXT=1 pip install --no-build-isolation -e .). check() returns the build
hint when the extension is missing, so backend="auto" falls back to torch quietly and backend="cpp" raises it;
prefers() keeps auto on torch for float64 (measured).
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
    """auto picks cpp for float32 and keeps the torch path for float64, as measured by
    ``python benchmarks/bench_csrc.py --sweep`` (benchmarks/results/cpp_vs_torch.csv, 2 cores, AVX-512 build):
    in float32 cpp was faster in all 18 cases (kernel_mv, kernel_grad, agop; three shapes; x = centres and not;
    0.63-0.97x the torch time), in float64 slower in all 18 (1.05-2.1x: its float64 exp is libm's, scalar, where
    torch's is vectorised). At n = m = 20000, d = 64, c = 10 (rfm-fast bench) the AGOP took 0.91x the GEMM floor
    against 0.95x for torch."""
    import torch

    if problem.dtype == torch.float32:
        return None
    return "float64 runs faster on the torch path (benchmarks/results/cpp_vs_torch.csv)"
