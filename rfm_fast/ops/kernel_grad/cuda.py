"""kernel_grad on CUDA tensors through the compiled op torch.ops.rfm_fast.kernel_grad (csrc/cuda/). The binding is the same as
the CPU one (rfm_fast/ops/kernel_grad/cpp.py): the torch op dispatches on the tensors' device."""

from .cpp import kernel_grad

__all__ = ["kernel_grad"]
