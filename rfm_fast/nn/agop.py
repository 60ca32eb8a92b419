"""Average gradient outer products of neural (sub-)networks, computed with torch.func in bounded memory.

For a callable f taking a batch (b, *in_shape) to (b, *out_shape), with d = prod(in_shape) inputs and
c = prod(out_shape) outputs per sample, and J_i = d f(x_i) / d x_i in R^{c x d}:

    layer_agop(f, X)            = sum_i J_i^T J_i          (d, d), symmetric PSD
    layer_agop(f, X, mean=True) = (1/n) sum_i J_i^T J_i    (the convention of rfm_fast.agop)

When f is the part of a network from a layer's input to the network output, this is the AGOP of the network
with respect to that layer's input: the matrix the neural feature ansatz compares with W^T W. The helpers below
cut an ``nn.Sequential`` MLP into the piece before a linear layer (its input features Phi) and the piece from that
layer to the output.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Optional

import torch
from torch import nn

from .._config import memory_budget as resolve_budget

_MODES = ("auto", "rev", "fwd")


def _module_device_dtype(fn: Any) -> tuple[Optional[torch.device], Optional[torch.dtype]]:
    if isinstance(fn, nn.Module):
        for p in fn.parameters():
            return p.device, p.dtype
    return None, None


def _as_tensor(X: Any) -> torch.Tensor:
    X = torch.as_tensor(X)
    if not X.is_floating_point():
        raise TypeError(f"X must hold floating point values, got dtype {X.dtype}")
    if X.ndim < 2:
        raise ValueError(f"X must be (n, *in_shape) with n >= 1 samples, got shape {tuple(X.shape)}")
    if X.shape[0] == 0:
        raise ValueError("X holds no samples")
    return X


@contextlib.contextmanager
def _count_activations(fn: Any):
    """Counts the elements of every leaf module's output during one forward pass of ``fn`` (0 if fn is not a
    module): the per-sample activation footprint that sizes the default batch."""
    count = [0]
    handles = []
    if isinstance(fn, nn.Module):
        def hook(module, inputs, output):
            if isinstance(output, torch.Tensor):
                count[0] += output.numel()

        handles = [m.register_forward_hook(hook) for m in fn.modules() if next(m.children(), None) is None]
    try:
        yield count
    finally:
        for handle in handles:
            handle.remove()


def _per_sample(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    # The callable is written for batches; giving it a batch of one keeps any batch-first code working under vmap.
    def single(x: torch.Tensor) -> torch.Tensor:
        return fn(x.unsqueeze(0)).squeeze(0).reshape(-1)

    return single


def layer_agop(fn: Callable[[torch.Tensor], torch.Tensor], X: Any, *, batch_size: Optional[int] = None,
               mean: bool = False, device: Optional[str | torch.device] = None,
               dtype: Optional[torch.dtype] = None, mode: str = "auto",
               memory_budget: Optional[int | str] = None) -> torch.Tensor:
    """AGOP of ``fn`` with respect to its input: sum_i J_i^T J_i, or the mean over samples with ``mean=True``.

    fn: an ``nn.Module`` or any callable mapping a batch (b, *in_shape) to (b, *out_shape). Each sample's output
        must depend on that sample only (put dropout / batch norm layers in eval mode first). Non-differentiable
        points take torch's choice of subgradient (ReLU'(0) = 0).
    X: (n, *in_shape) tensor or numpy array, n >= 1. It may stay on the CPU: only one batch at a time is moved to
        ``device``.
    batch_size: samples per vmap call. Default: as many as fit ``memory_budget`` (bytes or "256MB"; default
        $RFM_FAST_MEMORY_BUDGET or 128 MiB) by an estimate of the batch's Jacobians (b, c, d), their temporaries
        and fn's activations once per differentiated direction (counted with forward hooks on a module's leaf
        modules during one probe call; for a plain callable, c + d per sample is assumed).
    mean: divide by n.
    device: where fn is evaluated. Default: the device of fn's first parameter when fn is a module with
        parameters, else X's device. fn must already live there; it is never moved.
    dtype: the compute dtype X is cast to. Default: the dtype of fn's first parameter, else X's dtype.
    mode: "rev" (torch.func.jacrev: c backward passes per batch), "fwd" (jacfwd: d forward passes per batch) or
        "auto" (fwd when d < c, else rev).

    Returns a (d, d) tensor in the compute dtype on ``device`` with d = prod(in_shape); the batch sums are
    accumulated in float64 and symmetrised. No more than one batch of Jacobians is alive at any time.

    Raises TypeError for a non-float X, ValueError for an empty X, an unknown mode or a batch_size < 1, and
    whatever fn raises (torch.func cannot vmap some ops, e.g. in-place updates of captured tensors or
    data-dependent control flow).
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or int(batch_size) < 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    X = _as_tensor(X)
    module_device, module_dtype = _module_device_dtype(fn)
    device = torch.device(device) if device is not None else (module_device or X.device)
    dtype = dtype or module_dtype or X.dtype
    n, d = X.shape[0], math.prod(X.shape[1:])

    single = _per_sample(fn)
    with torch.no_grad(), _count_activations(fn) as activations:
        probe = single(X[:1][0].to(device=device, dtype=dtype))
    c = probe.numel()
    if mode == "auto":
        mode = "fwd" if d < c else "rev"
    jacobian = torch.func.jacfwd(single) if mode == "fwd" else torch.func.jacrev(single)
    batched = torch.func.vmap(jacobian)

    if batch_size is None:
        # Per sample: the Jacobian and its temporaries (~3 c d), and each intermediate activation once per
        # output (rev) or input (fwd) direction, kept for the vmapped backward / forward pass.
        directions = c if mode == "rev" else d
        per_sample = 3 * c * d + 3 * directions * max(activations[0], c + d)
        batch_size = max(1, resolve_budget(memory_budget) // (per_sample * (torch.finfo(dtype).bits // 8)))
    batch_size = min(int(batch_size), n)

    total = torch.zeros(d, d, dtype=torch.float64, device=device)
    # torch.func transforms see through an outer no_grad, which keeps autograd from also recording the
    # parameters' graph for the whole batch.
    with torch.no_grad():
        for start in range(0, n, batch_size):
            xb = X[start:start + batch_size].to(device=device, dtype=dtype)
            J = batched(xb).reshape(-1, d)
            total += (J.T @ J).to(torch.float64)
    total = 0.5 * (total + total.T)
    if mean:
        total /= n
    return total.to(dtype)


def linear_indices(model: nn.Sequential) -> list[int]:
    """Positions of the ``nn.Linear`` modules in an ``nn.Sequential`` (top level only).

    Raises TypeError when model is not an nn.Sequential, ValueError when it holds no nn.Linear.
    """
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"model must be an nn.Sequential, got {type(model).__name__}")
    indices = [i for i, module in enumerate(model) if isinstance(module, nn.Linear)]
    if not indices:
        raise ValueError("model holds no nn.Linear module at its top level")
    return indices


def features_before(model: nn.Sequential, index: int) -> nn.Sequential:
    """The sub-network model[:index]: it maps the network input to the input of module ``index`` (Phi)."""
    return model[:index]


def head_from(model: nn.Sequential, index: int) -> nn.Sequential:
    """The sub-network model[index:]: it maps the input of module ``index`` to the network output.

    Its modules are shared with ``model`` (no copy), so ``layer_agop(head_from(model, i), Phi)`` is the AGOP of the
    network with respect to the input of layer i.
    """
    return model[index:]


def batched_apply(fn: Callable[[torch.Tensor], torch.Tensor], X: torch.Tensor, *, batch_size: int = 4096,
                  device: Optional[str | torch.device] = None) -> torch.Tensor:
    """fn applied to X in batches under no_grad, concatenated on ``device`` (default X's device)."""
    device = torch.device(device) if device is not None else X.device
    module_device, module_dtype = _module_device_dtype(fn)
    run_device = module_device or device
    outputs = []
    with torch.no_grad():
        for start in range(0, X.shape[0], batch_size):
            xb = X[start:start + batch_size].to(device=run_device, dtype=module_dtype or X.dtype)
            outputs.append(fn(xb).to(device))
    return torch.cat(outputs)
