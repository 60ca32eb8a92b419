"""kernel_mv on CUDA tensors through the compiled op torch.ops.rfm_fast.kernel_mv (csrc/cuda/). The binding is the same as
the CPU one (rfm_fast/ops/kernel_mv/cpp.py): the torch op dispatches on the tensors' device."""

from .cpp import kernel_mv

__all__ = ["kernel_mv"]
