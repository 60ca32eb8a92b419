"""The "cuda" backend: the fused CUDA kernels of csrc/cuda on the kernel core's arrays, for CUDA tensors
(kernel_mv, kernel_grad, and agop by folding kernel_grad blocks in the core's accumulator).

Compiled only when the extension is built with torch's CUDA and ``CUDA_HOME`` set (setup.py), or on a box without
pip with ``rfm_fast._ext.build_inplace()``. It has never run on a GPU, so ``backend="auto"`` does not take it
(rfm_fast._dispatch.AUTO_ORDER); ``backend="cuda"`` runs it. Imports nothing heavy at module level.
"""

from __future__ import annotations

from typing import Optional

OPS = ("kernel_mv", "kernel_grad", "agop")


def check(problem) -> Optional[str]:
    if problem.device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors, got {problem.device.type}"
    import torch

    if problem.dtype not in (torch.float32, torch.float64):
        return f"the cuda backend takes float32 or float64, got {problem.dtype}"
    from ... import _ext

    reason = _ext.unavailable_reason()
    if reason is not None:
        return reason
    if not _ext.has_cuda_kernels():
        return ("the compiled extension was built without its CUDA kernels; rebuild it with CUDA_HOME set "
                "(RFM_FAST_BUILD_EXT=1 CUDA_HOME=... pip install --no-build-isolation -e .) or call "
                "rfm_fast._ext.build_inplace()")
    return None


def prefers(op: str, problem) -> Optional[str]:
    return "the cuda backend has not been measured on a GPU yet (benchmarks/gpu_check.py)"
