"""agop on CUDA tensors through the compiled op torch.ops.rfm_fast.agop (csrc/cuda/). The binding is the same as
the CPU one (rfm_fast/ops/agop/cpp.py): the torch op dispatches on the tensors' device."""

from .cpp import agop

__all__ = ["agop"]
