"""The "triton" backend: fused Triton kernels on the kernel core's arrays (backends/triton/kernels.py).

Runs on CUDA tensors (compute capability >= 8.0: tf32 / tensor-core ``tl.dot``), or on CPU tensors when
``TRITON_INTERPRET=1`` was set before triton was first imported (Triton's interpreter: for tests, very slow).
Auto picks it first on CUDA and never on CPU. Accepts float32/float64 and float16/bfloat16 (promoted to float32).
Settings: ``$RFM_FAST_TRITON_PRECISION`` ("tf32x3" default, "ieee", "tf32"), ``$RFM_FAST_TRITON_REGIME`` and
``$RFM_FAST_TRITON_FUSED_MAX_CD`` (see backends/triton/ops.py). Imports nothing heavy at module level.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

OPS = ("kernel_matrix", "kernel_mv", "kernel_grad", "agop")
INTERPRET_ENV = "TRITON_INTERPRET"


def _interpreting() -> bool:
    return os.environ.get(INTERPRET_ENV, "0") not in ("", "0")


def check(problem) -> Optional[str]:
    """Why the triton backend cannot run this call here, or None."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'rfm_fast[triton]')"
    device = problem.device
    if device.type == "cuda":
        import torch

        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return f"the GPU has compute capability {major}.{minor}; the triton kernels need >= 8.0"
        return None
    if device.type == "cpu":
        if _interpreting():
            return None
        return ("the tensors are on the CPU: the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 set "
                "before importing rfm_fast, for Triton's slow interpreter)")
    return f"the triton backend does not run on {device.type} tensors"


def prefers(op: str, problem) -> Optional[str]:
    """Auto takes triton first on CUDA; on CPU the interpreter is a test vehicle, never an automatic choice."""
    if problem.device.type != "cuda":
        return "on CPU triton only runs in its (slow) interpreter"
    return None
