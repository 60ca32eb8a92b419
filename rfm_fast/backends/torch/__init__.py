"""The "torch" backend: the kernel core's schedules with the torch elementwise pass, on CPU and CUDA tensors."""

from __future__ import annotations

from typing import Optional

from .. import full_precision_only

OPS = ("kernel_matrix", "kernel_mv", "kernel_grad", "agop")


check = full_precision_only


def prefers(op: str, problem) -> Optional[str]:
    return None
