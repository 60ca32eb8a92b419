"""Input checking and numpy/torch conversion shared by every public op.

Every public op funnels its arguments through :func:`prepare`, which returns a :class:`Problem` holding torch
tensors in one dtype on one device, with ``alpha`` always 2-D.  Errors name the offending argument:
``TypeError`` for a wrong kind of object or dtype, ``ValueError`` for a wrong shape or value.
"""

from __future__ import annotations

import math
import numbers
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

KERNELS = ("laplace", "gaussian")
FLOAT_DTYPES = (torch.float32, torch.float64)
# Half-precision inputs are accepted only by backends that accumulate in fp32 (Triton); the rest refuse them.
HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class Problem:
    """Canonical, validated arguments of one op call (all torch, one dtype, one device)."""

    x: torch.Tensor  # (m, d) evaluation points
    centers: torch.Tensor  # (n, d)
    alpha: Optional[torch.Tensor]  # (n, c) or None for kernel_matrix
    M: Any  # None, (d,) or (d, d) tensor, or a MetricFactor when the caller gave M_factor
    kernel: str
    bandwidth: float
    squeeze_c: bool  # alpha was 1-D: drop the c axis of the outputs
    numpy_out: bool  # inputs were numpy: return numpy

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    def output(self, result: torch.Tensor) -> Any:
        return result.cpu().numpy() if self.numpy_out else result


def tensor_or_array(name: str, value: Any) -> torch.Tensor:
    """The solvers' and the sharded ops' inputs: a torch tensor as it is, a numpy array as a tensor (a copy only
    when it is not contiguous; integer arrays keep their dtype for the caller to cast), any other array-like (a
    list, a pandas frame) through the ops' conversion (``_to_tensor``: float32 unless float64 was given)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray) and value.dtype != object and not np.iscomplexobj(value):
        return torch.from_numpy(np.ascontiguousarray(value))
    return _to_tensor(name, value)


def _to_tensor(name: str, value: Any) -> torch.Tensor:
    """Any array-like as a torch tensor: tensors as they are; numpy arrays without a copy where possible (negative
    strides and non-native byte order are copied); lists, tuples, pandas frames and other array-likes through
    numpy. Integer and bool data become float32, as do array-likes that are not numpy/torch arrays (a list of
    Python floats is float32 here, not float64); a float64 array stays float64."""
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or (not value.is_floating_point() and not value.is_complex()):
            return value.to(torch.float32)
        return value
    if hasattr(value, "toarray") and hasattr(value, "tocsr"):
        raise TypeError(f"{name} is a scipy sparse matrix; rfm_fast works on dense arrays: pass {name}.toarray()")
    from_array = isinstance(value, np.ndarray) or hasattr(value, "__array__") and not isinstance(value, (list, tuple))
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be an array-like of real numbers, got {type(value).__name__} ({exc})") from None
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"Complex data not supported: {name} has dtype {arr.dtype}; the kernels take real numbers")
    if arr.dtype == object:  # numbers held as Python objects: converted (numpy's TypeError names what is not one)
        arr = arr.astype(np.float64).astype(np.float32)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise TypeError(f"{name} must hold real numbers, got {type(value).__name__} with dtype {arr.dtype}")
    if arr.dtype.byteorder == ">" or any(st < 0 for st in arr.strides):
        arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("=") if arr.dtype.byteorder == ">" else None)
    if arr.dtype != np.float64 or not from_array:
        if arr.dtype not in (np.float32, np.float64) or not from_array:
            arr = arr.astype(np.float32)
    return torch.from_numpy(arr)


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of t is finite. A sum is finite only if every entry is (NaN and inf carry through it),
    so one reduction settles the usual case: 17 us against 375 us for isfinite(t).all() at 4000 x 64 float32; a
    sum that overflows on finite entries falls back to the entrywise test."""
    if t.numel() == 0:
        return True
    if not t.is_floating_point():
        return True
    t = t.detach()
    wide = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else None
    if math.isfinite(float(t.sum(dtype=wide))):
        return True
    return bool(torch.isfinite(t).all())


def _check_finite(name: str, t: torch.Tensor) -> None:
    if not all_finite(t):
        raise ValueError(f"{name} contains NaN or inf")


def check_kernel(kernel: Any) -> str:
    if not isinstance(kernel, str) or kernel.lower() not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    return kernel.lower()


def check_bandwidth(bandwidth: Any) -> float:
    if isinstance(bandwidth, torch.Tensor) and bandwidth.numel() == 1:
        bandwidth = bandwidth.item()
    elif isinstance(bandwidth, np.ndarray) and bandwidth.size == 1:
        bandwidth = bandwidth.item()
    if isinstance(bandwidth, bool) or not isinstance(bandwidth, numbers.Real):
        raise TypeError(f"bandwidth must be a real number, got {type(bandwidth).__name__}")
    bandwidth = float(bandwidth)
    if not math.isfinite(bandwidth) or bandwidth <= 0.0:
        raise ValueError(f"bandwidth must be finite and > 0, got {bandwidth}")
    return bandwidth


def check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


# Validated M tensors, keyed by the caller's tensor (a weak reference: the same object, its version counter unchanged
# by in-place writes) and the dimension, device and dtype of the work. An RFM iteration passes one M to its solve, its
# AGOP and its predictions; the checks cost ~10 small ops (40-60 us, 3% of a mat-vec at n = 1280, d = 10), and the
# tensor they hand on (cast to x's dtype or moved to its device when it arrives otherwise) keys the factor cache of
# ``rfm_fast.core.metric``: cast afresh on every call, it would redo M's eigendecomposition every time. numpy inputs
# and tensors that require grad are checked every time (no version counter; a cast would carry a stale graph).
CHECKED_M_CACHE = 4
_CHECKED_M: dict = {}
_CHECKED_M_LOCK = threading.Lock()


def _check_M(M: Any, d: int, like: torch.Tensor) -> Optional[torch.Tensor]:
    if M is None:
        return None
    if not isinstance(M, torch.Tensor) or M.requires_grad:
        return _check_M_now(M, d, like)
    key = (d, like.device, like.dtype)
    hit = _CHECKED_M.get(id(M))
    if hit is not None and hit[0]() is M:
        seen = hit[1].get(key)
        if seen is not None and seen[0] == M._version:
            return M if seen[1] is None else seen[1]
    out = _check_M_now(M, d, like)
    with _CHECKED_M_LOCK:
        hit = _CHECKED_M.get(id(M))
        if hit is None or hit[0]() is not M:
            _CHECKED_M.pop(id(M), None)
            while len(_CHECKED_M) >= CHECKED_M_CACHE:
                _CHECKED_M.pop(next(iter(_CHECKED_M)))
            # The entry goes with its tensor (the callback runs before the id can be reused).
            hit = (weakref.ref(M, lambda _, k=id(M): _CHECKED_M.pop(k, None)), {})
            _CHECKED_M[id(M)] = hit
        if len(hit[1]) >= CHECKED_M_CACHE:
            hit[1].clear()
        hit[1][key] = (M._version, None if out is M else out)  # M itself as None: the entry must not keep it alive
    return out


def _check_M_now(M: Any, d: int, like: torch.Tensor) -> Optional[torch.Tensor]:
    M = _to_tensor("M", M)
    if M.is_complex() or M.dtype == torch.bool:
        raise TypeError(f"M must hold real numbers, got {M.dtype}")
    if M.ndim == 1:
        if M.shape[0] != d:
            raise ValueError(f"M given as a diagonal must have shape ({d},), got {tuple(M.shape)}")
    elif M.ndim == 2:
        if tuple(M.shape) != (d, d):
            raise ValueError(f"M must have shape ({d}, {d}) or ({d},), got {tuple(M.shape)}")
    else:
        raise ValueError(f"M must be None, a (d,) diagonal or a (d, d) matrix, got ndim={M.ndim}")
    M = M.to(device=like.device)
    _check_finite("M", M)
    M64 = M.detach().to(torch.float64)
    diag = M64 if M.ndim == 1 else torch.diagonal(M64)
    if bool((diag < 0).any()):
        raise ValueError("M must be positive semi-definite: it has a negative diagonal entry")
    if M.ndim == 2:
        scale = float(M64.abs().max()) if M64.numel() else 0.0
        # Symmetric up to the rounding of the dtype M arrived in (an AGOP computed in fp32 is symmetric to ~1e-7).
        eps = torch.finfo(M.dtype).eps if M.dtype.is_floating_point else torch.finfo(torch.float64).eps
        tol = 64 * eps * max(scale, 1e-300)
        if float((M64 - M64.T).abs().max()) > tol:
            raise ValueError("M must be symmetric")
    return M if M.dtype == torch.float64 else M.to(like.dtype)


def _check_factor(S: Any, d: int, like: torch.Tensor):
    """M_factor S (d, k), k >= 1, M = S S^T: validated and factored (rfm_fast.core.metric.MetricFactor)."""
    from .core.metric import MetricFactor

    S = _to_tensor("M_factor", S)
    if S.is_complex() or S.dtype == torch.bool or not S.dtype.is_floating_point:
        raise TypeError(f"M_factor must hold real floating-point numbers, got {S.dtype}")
    if S.ndim != 2 or S.shape[0] != d or S.shape[1] == 0:
        raise ValueError(f"M_factor must have shape ({d}, k) with k >= 1 (M = S S^T), got {tuple(S.shape)}")
    if S.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("gradients with respect to M_factor are not supported: pass M_factor.detach()")
    S = S.to(device=like.device)
    _check_finite("M_factor", S)
    return MetricFactor.from_factor(S, like.dtype, like.device)


def prepare(
    x: Any,
    centers: Any,
    alpha: Any,
    M: Any,
    kernel: Any,
    bandwidth: Any,
    *,
    need_alpha: bool,
    M_factor: Any = None,
    allow_half: bool = False,
    allow_empty_x: bool = True,
) -> Problem:
    """Validate and canonicalise the arguments of a public op.

    The output kind (torch for torch input, numpy for anything else), dtype and device follow ``x``. Array-likes
    are converted as :func:`_to_tensor` says; ``centers`` must then match ``x`` in dtype; ``alpha`` and ``M`` are
    cast to it (M keeps float64 when given so: its factor is computed in float64 anyway). ``M_factor`` S (d, k)
    stands for M = S S^T and is factored without forming M.
    """
    kernel = check_kernel(kernel)
    bandwidth = check_bandwidth(bandwidth)
    numpy_out = not isinstance(x, torch.Tensor)
    xt = _to_tensor("x", x)
    ct = _to_tensor("centers", centers)
    allowed = FLOAT_DTYPES + (HALF_DTYPES if allow_half else ())
    if xt.dtype not in allowed:
        raise TypeError(f"x must have a floating dtype in {[str(t) for t in allowed]}, got {xt.dtype}")
    if ct.dtype != xt.dtype:
        raise TypeError(f"centers must have the same dtype as x ({xt.dtype}), got {ct.dtype}")
    if xt.ndim != 2:
        raise ValueError(f"x must be 2-D (m, d), got shape {tuple(xt.shape)}")
    if ct.ndim != 2:
        raise ValueError(f"centers must be 2-D (n, d), got shape {tuple(ct.shape)}")
    if ct.device != xt.device:
        raise ValueError(f"centers is on {ct.device} but x is on {xt.device}")
    m, d = xt.shape
    n = ct.shape[0]
    if ct.shape[1] != d:
        raise ValueError(f"centers must have d = {d} columns like x, got shape {tuple(ct.shape)}")
    if d == 0:
        raise ValueError("x must have at least one feature column (d >= 1)")
    if n == 0:
        raise ValueError("centers must hold at least one row")
    if m == 0 and not allow_empty_x:
        raise ValueError("x must hold at least one evaluation point (the AGOP of an empty set is undefined)")
    _check_finite("x", xt)
    _check_finite("centers", ct)

    at = None
    squeeze_c = False
    if need_alpha:
        at = _to_tensor("alpha", alpha)
        if at.is_complex():
            raise TypeError(f"alpha must be real, got {at.dtype}")
        if at.ndim == 1:
            squeeze_c = True
            at = at[:, None]
        elif at.ndim != 2:
            raise ValueError(f"alpha must be 1-D (n,) or 2-D (n, c), got shape {tuple(at.shape)}")
        if at.shape[0] != n:
            raise ValueError(f"alpha must have n = {n} rows (one per centre), got shape {tuple(at.shape)}")
        if at.shape[1] == 0:
            raise ValueError("alpha must have at least one column")
        if at.device != xt.device:
            raise ValueError(f"alpha is on {at.device} but x is on {xt.device}")
        at = at.to(xt.dtype)
        _check_finite("alpha", at)
    if M_factor is not None:
        if M is not None:
            raise ValueError("give either M or M_factor (M = M_factor M_factor^T), not both")
        Mt = _check_factor(M_factor, d, xt)
    else:
        Mt = _check_M(M, d, xt)
    return Problem(xt, ct, at, Mt, kernel, bandwidth, squeeze_c, numpy_out)


def finish(problem: Problem, result: torch.Tensor, squeeze_axis: Optional[int] = None) -> Any:
    """Drop the c axis for 1-D alpha and convert back to numpy when the inputs were numpy."""
    if problem.squeeze_c and squeeze_axis is not None:
        result = result.squeeze(squeeze_axis)
    return problem.output(result)

