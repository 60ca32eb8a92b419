"""The "cpp" backend: the kernel core's schedules with the compiled one-pass elementwise kernel
``torch.ops.rfm_fast.tile_pass_`` (csrc/cpu/tile_pass.cpp), for CPU tensors.

Built only on request (``RFM_FAST_BUILD_EXT=1 pip install --no-build-isolation -e .``). ``check`` returns the build
hint when the extension is missing, so ``backend="auto"`` falls back to torch quietly and ``backend="cpp"`` raises
it. Imports nothing heavy at module level.
"""

from __future__ import annotations

from typing import Optional

OPS = ("kernel_matrix", "kernel_mv", "kernel_grad", "agop")


def check(problem) -> Optional[str]:
    if problem.device.type != "cpu":
        return f"the cpp backend runs on CPU tensors, got {problem.device.type}"
    import torch

    if problem.dtype not in (torch.float32, torch.float64):
        return f"the cpp backend takes float32 or float64, got {problem.dtype}"
    from ... import _ext

    return _ext.unavailable_reason()


def prefers(op: str, problem) -> Optional[str]:
    """Auto takes cpp wherever it runs: benchmarks/results/cpp_vs_torch.csv (``python benchmarks/bench_csrc.py
    --sweep``) records where it is faster than the torch pass."""
    return None
