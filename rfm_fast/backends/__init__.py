"""The backends: each supplies primitives to the kernel core (``rfm_fast.core``), never maths of its own.

A backend is a package ``rfm_fast.backends.<name>`` whose ``__init__`` is a light probe (imports nothing heavy at
module level) with

    OPS                          the ops it implements (``rfm_fast._dispatch`` routes the others elsewhere)
    check(problem) -> reason     why it cannot run this call here (None: it can)
    prefers(op, problem) -> why  why ``backend="auto"`` should not pick it (None: auto may)

and whose ``ops`` module holds ``kernel_matrix(problem, budget)``, ``kernel_mv``, ``kernel_grad`` and
``agop(problem, budget, centered=, diag=)`` for the ops it lists. What each supplies:

    torch   the core's schedules with the torch elementwise pass (the reference fast path, CPU and CUDA)
    cpp     the core's schedules with the compiled one-pass elementwise kernel (csrc/cpu/tile_pass.cpp)
    triton  fused Triton kernels on the core's arrays (flash-style mat-vec and gradient, weight tiles)
    cuda    the fused CUDA kernels of csrc/cuda on the core's arrays
    keops   KeOps reductions on the core's metric factor and kernel description
    naive   the formulas of rfm_fast/ops/<op>/naive.py (the tests' reference)

No backend imports another backend; shared code lives in ``rfm_fast.core`` (and the one probe helper here).
"""

from __future__ import annotations

from typing import Optional


def full_precision_only(problem) -> Optional[str]:
    """The probe answer of backends that take float32 and float64 inputs only."""
    import torch

    if problem.dtype not in (torch.float32, torch.float64):
        return f"{problem.dtype} inputs are supported by the triton backend only"
    return None
