"""Run xrfm's Laplace and Gaussian kernels on rfm_fast: one switch, fully undoable.

    from rfm_fast.integrations.xrfm import use_rfm_fast
    with use_rfm_fast():                     # or enable() ... disable()
        model = xrfm.RFM(kernel="laplace", bandwidth=10.0, device="cpu")
        model.fit((X_train, y_train), (X_val, y_val), iters=3, reg=1e-3)

What changes (xrfm 0.4.x). While the switch is on, these methods of xrfm are replaced by rfm_fast-backed versions:

* ``LaplaceKernel.get_agop`` / ``get_agop_diag`` and the same two methods of ``LightLaplaceKernel`` ("l2_light"),
  the AGOP that ``RFM.update_M`` accumulates;
* ``RFM.predict``: ``K(samples, centers) @ weights`` becomes one streamed ``rfm_fast.kernel_mv`` call, so no
  samples x centres matrix is held.

xrfm's conventions, reproduced exactly (the formulas xrfm 0.4.5 computes, rewritten in rfm_fast's terms):

* Kernel ``k(x, z) = exp(-||(x - z) T||^p / L^p)`` with ``L = kernel.bandwidth``, ``p = kernel.exponent`` and
  ``T`` the matrix xrfm passes as ``mat``: ``sqrtM`` for ``LaplaceKernel`` (``RFM.use_sqrtM``), so the metric is
  ``M = sqrtM sqrtM^T``; for ``LightLaplaceKernel`` the distance is ``||x - z||_mat`` directly, so ``M = mat``.
  A 1-D ``mat`` is a diagonal. ``p = 1`` is rfm_fast's ``laplace`` with bandwidth ``L``; ``p = 2`` is its
  ``gaussian`` with bandwidth ``L / sqrt(2)`` (``exp(-r^2 / L^2) = exp(-r^2 / (2 (L/sqrt 2)^2))``).
* The gradient is taken with respect to the evaluation points ``z`` (xrfm's ``samples``) of
  ``f_l(z) = sum_i coefs[l, i] k(x_i, z)``, giving ``G_{l,j} = grad f_l(z_j)`` in original coordinates.
* ``get_agop`` returns the SUM ``sum_{l,j} G_lj G_lj^T`` over the c outputs and the m points (rfm_fast.agop is the
  mean over points, so the switch multiplies by m); ``get_agop_diag`` its diagonal. ``center_grads=True``
  subtracts the mean of the c*m gradient rows (one mean over outputs AND points, unlike rfm_fast's per-output
  ``centered``), i.e. ``sum G G^T - c m g g^T`` with ``g = mean_j grad(sum_l f_l)(z_j) / c``.
* The result has the dtype of xrfm's own result (that of ``x``).

Self pairs (a point equal to a centre: every training point during ``fit``): the Laplace gradient has no limit
there and xrfm drops a pair when its computed distance is below ``kernel.eps`` (1e-10). Its distances come from
``torch.cdist``, whose expansion ``|x|^2 + |z|^2 - 2 x.z`` leaves rounding noise of ~sqrt(eps_dtype) |x| instead of
0, far above 1e-10, so in float32 the self pairs are NOT dropped and add cancellation noise to the AGOP. Measured
on standardised digits (d = 64, n = 1000, c = 10, relative Frobenius error against the float64 formula):
float32 xrfm ~3e-6 at its default bandwidth 10, ~3e-5 at 3, ~5e-4 at 1 (~3e-2 on Gaussian d = 64 data at 1);
even float64 xrfm is off by ~1e-10 at bandwidth 10 and up to ~1e-8 .. 1e-6 at bandwidth 1. rfm_fast recomputes
near-zero distances exactly from the differences and drops exactly-zero ones, so under the switch the float32
AGOP is 1e-7 .. 5e-7 from the float64 formula at every bandwidth (same data). This is the one intended difference from xrfm: pairs at
a true distance in (0, eps) keep their gradient (of norm k/L) instead of being dropped.

Left to xrfm's own code (the original method is called): every other kernel class (product / "l1", Lpq,
sum-power, Kermac variants) and subclasses of the two classes above; exponents other than 1 and 2; a custom
``eps`` above xrfm's default; categorical features (``handle_categorical``); a pending adaptive-bandwidth update
(predict); a non-square ``mat`` or a ``sqrtM`` that is not symmetric to within sqrt(eps_dtype) (xrfm's formula is
then not the gradient of its kernel, and only its own code reproduces it); mixed dtypes or devices, dtypes other
than float32/float64, non-finite inputs, an empty sample batch.

Undoing (``disable()`` or leaving the context) puts back the exact original function objects, so the classes'
``__dict__`` are as before. ``enable()`` checks the signatures it relies on and runs a tiny float64 self-check
against xrfm's own code; if the installed xrfm changed those internals, it raises :class:`XRFMIntegrationError`
and patches nothing.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import math
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch

__all__ = ["XRFMIntegrationError", "use_rfm_fast", "enable", "disable", "is_enabled", "xrfm_agop_sum"]

_FLOATS = (torch.float32, torch.float64)
# Parameter names the switch relies on (it forwards calls with these names and reads these arguments).
_AGOP_PARAMS = ("self", "x", "z", "coefs", "mat", "center_grads")
_SIGNATURES = {
    ("Kernel", "get_agop"): _AGOP_PARAMS,
    ("Kernel", "get_agop_diag"): _AGOP_PARAMS,
    ("Kernel", "get_kernel_matrix"): ("self", "x", "z", "mat"),
    ("LaplaceKernel", "__init__"): ("self", "bandwidth", "exponent", "eps"),
    ("LightLaplaceKernel", "__init__"): ("self", "bandwidth", "exponent", "eps"),
    ("RFM", "predict"): ("self", "samples", "max_batch_size"),
    ("RFM", "validate_samples"): ("self", "samples"),
    ("RFM", "convert_to_format"): ("self", "tensor", "original_format"),
}
# (class, uses sqrtM): LaplaceKernel receives sqrtM (M = T T^T); LightLaplaceKernel receives M itself.
_KERNEL_CLASSES = (("LaplaceKernel", True), ("LightLaplaceKernel", False))


class XRFMIntegrationError(RuntimeError):
    """The installed xrfm no longer has the internals (names, signatures, formulas) the switch relies on."""


@dataclass(frozen=True)
class _Options:
    backend: str
    memory_budget: Optional[int | str]
    predict: bool


_LOCK = threading.RLock()
_options: Optional[_Options] = None
# (owner class, attribute name, owner had its own attribute, that attribute): what disable() puts back.
_saved: list[tuple[type, str, bool, Any]] = []
# Exact kernel classes taking the fast path -> (uses sqrtM, xrfm's default eps).
_fast_classes: dict[type, tuple[bool, float]] = {}
# The sets of xrfm function objects that passed the self-check (held, so an id cannot be reused).
_checked: list[tuple] = []


def is_enabled() -> bool:
    """Whether xrfm currently runs on rfm_fast."""
    return _options is not None


def _modules():
    try:
        kernels = importlib.import_module("xrfm.rfm_src.kernels")
        rfm_mod = importlib.import_module("xrfm.rfm_src.recursive_feature_machine")
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == "xrfm":
            raise ImportError("rfm_fast.integrations.xrfm needs xrfm: pip install xrfm") from exc
        raise XRFMIntegrationError(f"importing xrfm failed: {exc}") from exc
    return kernels, rfm_mod


def _resolve(kernels, rfm_mod) -> dict[str, type]:
    classes = {}
    for name in ("Kernel", "LaplaceKernel", "LightLaplaceKernel"):
        classes[name] = getattr(kernels, name, None)
    classes["RFM"] = getattr(rfm_mod, "RFM", None)
    missing = [name for name, cls in classes.items() if not isinstance(cls, type)]
    if missing:
        raise XRFMIntegrationError(f"xrfm no longer defines {missing}; rfm_fast's switch supports xrfm 0.4.x")
    for (owner, method), expected in _SIGNATURES.items():
        func = getattr(classes[owner], method, None)
        if not callable(func):
            raise XRFMIntegrationError(f"xrfm's {owner}.{method} is gone; rfm_fast's switch supports xrfm 0.4.x")
        names = tuple(inspect.signature(func).parameters)
        if names[: len(expected)] != expected:
            raise XRFMIntegrationError(f"xrfm's {owner}.{method} changed its signature to {names}; expected "
                                       f"{expected} (xrfm 0.4.x)")
    for name, _ in _KERNEL_CLASSES:
        if not issubclass(classes[name], classes["Kernel"]):
            raise XRFMIntegrationError(f"xrfm's {name} no longer derives from Kernel")
    return classes


def _default_eps(cls: type) -> float:
    default = inspect.signature(cls.__init__).parameters["eps"].default
    if not isinstance(default, float) or not default > 0:
        raise XRFMIntegrationError(f"xrfm's {cls.__name__} has no positive default eps (got {default!r})")
    return default


def _metric(mat: Optional[torch.Tensor], uses_sqrt: bool, d: int, like: torch.Tensor) -> tuple[bool, Any]:
    """(ok, M) for rfm_fast from the matrix xrfm passes; ok False when only xrfm's own formula reproduces it."""
    if mat is None:
        return True, None
    if not isinstance(mat, torch.Tensor) or not mat.dtype.is_floating_point:
        return False, None
    T = mat.to(device=like.device, dtype=torch.float64)
    if not bool(torch.isfinite(T).all()):
        return False, None
    if T.ndim == 1:
        if T.shape[0] != d:
            return False, None
        if uses_sqrt:
            return True, (T * T).to(like.dtype)
        return (bool((T >= 0).all()), T.to(like.dtype))
    if T.ndim != 2 or tuple(T.shape) != (d, d):
        return False, None
    scale = float(T.abs().max())
    tol = math.sqrt(torch.finfo(mat.dtype).eps) * scale
    if float((T - T.T).abs().max()) > tol:
        return False, None
    if uses_sqrt:
        # xrfm forms G = J' T from the gradient J' at (z T, x T); for symmetric T that is (z - x)^T T T^T, the
        # gradient of rfm_fast's kernel with M = T T^T.
        M = T @ T.T
        return True, (0.5 * (M + M.T)).to(like.dtype)
    M = 0.5 * (T + T.T)
    evals = torch.linalg.eigvalsh(M)
    if float(evals.min()) < -math.sqrt(torch.finfo(mat.dtype).eps) * max(float(evals.abs().max()), 1e-300):
        return False, None
    return True, M.to(like.dtype)


def _fast_spec(kernel: Any, x: Any, z: Any, coefs: Any, mat: Any) -> Optional[tuple[str, float, Any]]:
    """(rfm_fast kernel name, rfm_fast bandwidth, M) when rfm_fast reproduces xrfm's formula here, else None."""
    entry = _fast_classes.get(type(kernel))
    if entry is None or getattr(kernel, "handle_categorical", False):
        return None
    uses_sqrt, default_eps = entry
    exponent = getattr(kernel, "exponent", None)
    bandwidth = getattr(kernel, "bandwidth", None)
    eps = getattr(kernel, "eps", None)
    if exponent not in (1.0, 2.0) or not isinstance(bandwidth, (int, float)) or not bandwidth > 0:
        return None
    if not isinstance(eps, (int, float)) or eps > default_eps:
        return None
    tensors = (x, z, coefs)
    if not all(isinstance(t, torch.Tensor) and t.ndim == 2 for t in tensors):
        return None
    if x.dtype not in _FLOATS or z.dtype != x.dtype or coefs.dtype != x.dtype:
        return None
    if z.device != x.device or coefs.device != x.device:
        return None
    n, d = x.shape
    if n == 0 or d == 0 or z.shape[0] == 0 or z.shape[1] != d or coefs.shape[1] != n or coefs.shape[0] == 0:
        return None
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        return None
    ok, M = _metric(mat, uses_sqrt, d, x)
    if not ok:
        return None
    if exponent == 1.0:
        return "laplace", float(bandwidth), M
    return "gaussian", float(bandwidth) / math.sqrt(2.0), M


def xrfm_agop_sum(x: torch.Tensor, z: torch.Tensor, coefs: torch.Tensor, *, kernel: str, bandwidth: float,
                  M: Any = None, center_grads: bool = False, diag: bool = False, backend: str = "auto",
                  memory_budget: Optional[int | str] = None) -> torch.Tensor:
    """xrfm's AGOP convention on rfm_fast's kernels: the SUM over outputs and points.

        G_lj = grad_z f_l(z_j),  f_l(z) = sum_i coefs[l, i] k_M(z, x_i)   (rfm_fast's kernel, M, bandwidth)
        returns sum_{l,j} G_lj G_lj^T                                      (d, d), or its diagonal (d,)
        center_grads: subtract the mean of the c*m rows G_lj first (xrfm's centring, over outputs and points)

    x: centres (n, d); z: evaluation points (m >= 1, d); coefs: (c, n) (xrfm's layout, weights transposed).
    Returns in x's dtype. Raises what ``rfm_fast.agop`` raises for malformed input.
    """
    import rfm_fast

    alpha = coefs.T
    m, c = z.shape[0], alpha.shape[1]
    common = dict(kernel=kernel, bandwidth=bandwidth, M=M, backend=backend, memory_budget=memory_budget)
    A = rfm_fast.agop(z, x, alpha, diag=diag, **common).to(torch.float64) * m
    if center_grads:
        grads = rfm_fast.kernel_grad(z, x, alpha.sum(1), **common)
        g = grads.to(torch.float64).mean(0) / c
        A = A - (c * m) * (g * g if diag else torch.outer(g, g))
    return A.to(x.dtype)


def _agop_method(original: Callable, diag: bool) -> Callable:
    @functools.wraps(original)
    def get_agop(self, x, z, coefs, mat=None, center_grads=False):
        opts = _options
        spec = None if opts is None else _fast_spec(self, x, z, coefs, mat)
        if spec is None or not isinstance(center_grads, bool):
            return original(self, x, z, coefs, mat=mat, center_grads=center_grads)
        kernel, bandwidth, M = spec
        return xrfm_agop_sum(x, z, coefs, kernel=kernel, bandwidth=bandwidth, M=M, center_grads=center_grads,
                             diag=diag, backend=opts.backend, memory_budget=opts.memory_budget)

    get_agop.__rfm_fast_original__ = original
    return get_agop


def _predict_method(original: Callable) -> Callable:
    @functools.wraps(original)
    def predict(self, samples, max_batch_size=50_000):
        opts = _options
        kernel = getattr(self, "kernel_obj", None)
        centers, weights = getattr(self, "centers", None), getattr(self, "weights", None)
        if (opts is None or not opts.predict or type(kernel) not in _fast_classes
                or not getattr(kernel, "is_adaptive_bandwidth", False)
                or not isinstance(centers, torch.Tensor) or not isinstance(weights, torch.Tensor)):
            return original(self, samples, max_batch_size)
        points, original_format = self.validate_samples(samples)
        centers, weights = centers.to(self.device), weights.to(self.device)
        mat = self.sqrtM if self.use_sqrtM else self.M
        spec = _fast_spec(kernel, centers, points, weights.T if weights.ndim == 2 else weights, mat)
        if spec is None:
            return original(self, samples, max_batch_size)
        import rfm_fast

        name, bandwidth, M = spec
        out = rfm_fast.kernel_mv(points, centers, weights, kernel=name, bandwidth=bandwidth, M=M,
                                 backend=opts.backend, memory_budget=opts.memory_budget)
        return self.convert_to_format(out, original_format)

    predict.__rfm_fast_original__ = original
    return predict


def _patch(cls: type, name: str, replacement: Callable) -> None:
    had_own = name in cls.__dict__
    _saved.append((cls, name, had_own, cls.__dict__.get(name)))
    setattr(cls, name, replacement)


def _restore() -> None:
    while _saved:
        cls, name, had_own, value = _saved.pop()
        if had_own:
            setattr(cls, name, value)
        else:
            delattr(cls, name)
    _fast_classes.clear()


def _self_check(classes: dict[str, type]) -> None:
    """Compare the switched methods with xrfm's own on a tiny float64 problem (self pairs included)."""
    gen = torch.Generator().manual_seed(0)
    n, d, c = 9, 4, 2
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    z = torch.cat([x[:5], torch.randn(3, d, generator=gen, dtype=torch.float64)])
    coefs = torch.randn(c, n, generator=gen, dtype=torch.float64)
    A = torch.randn(d, d, generator=gen, dtype=torch.float64)
    dense = A @ A.T / d + 0.1 * torch.eye(d, dtype=torch.float64)
    vec = torch.rand(d, generator=gen, dtype=torch.float64) + 0.5
    cases = (("get_agop", dense, True), ("get_agop", None, False), ("get_agop_diag", vec, True))
    for name, _ in _KERNEL_CLASSES:
        cls = classes[name]
        for exponent in (1.0, 2.0):
            kernel = cls(bandwidth=2.0, exponent=exponent)
            for method, mat, center in cases:
                fast = getattr(kernel, method)(x=x, z=z, coefs=coefs, mat=mat, center_grads=center)
                own = getattr(cls, method).__rfm_fast_original__(kernel, x=x, z=z, coefs=coefs, mat=mat,
                                                                 center_grads=center)
                _compare(fast, own, f"{name}(exponent={exponent}).{method}(center_grads={center}, "
                                    f"mat={'None' if mat is None else tuple(mat.shape)})")
            model = classes["RFM"](kernel=kernel, device="cpu", verbose=False)
            model.centers, model.weights = x, coefs.T.contiguous()
            model.M = dense if not model.use_sqrtM else dense @ dense
            model.sqrtM = dense if model.use_sqrtM else None
            _compare(model.predict(z), classes["RFM"].predict.__rfm_fast_original__(model, z),
                     f"RFM.predict with {name}(exponent={exponent})")


def _compare(fast: Any, own: Any, what: str) -> None:
    fast, own = torch.as_tensor(fast, dtype=torch.float64), torch.as_tensor(own, dtype=torch.float64)
    if fast.shape != own.shape:
        raise XRFMIntegrationError(f"{what}: xrfm returns shape {tuple(own.shape)}, the switch {tuple(fast.shape)}")
    err = float((fast - own).norm() / own.norm().clamp_min(1e-300))
    # A changed convention (sum/mean, bandwidth scaling, exponent, sqrtM handling) is off by O(1); 1e-6 leaves
    # room for xrfm's own float64 rounding at self pairs (LightLaplaceKernel's expanded distances: ~1e-9).
    if not err <= 1e-6:
        raise XRFMIntegrationError(f"{what}: the installed xrfm computes something else than rfm_fast's switch "
                                   f"assumes (relative difference {err:.2e}); its internals changed")


def enable(backend: str = "auto", *, memory_budget: Optional[int | str] = None, predict: bool = True) -> None:
    """Make xrfm's Laplace and Gaussian kernels compute their AGOP (and RFM.predict) through rfm_fast.

    backend / memory_budget: passed to ``rfm_fast.agop`` / ``kernel_mv`` (see ``rfm_fast.ops.api``).
    predict: also route ``RFM.predict`` through ``rfm_fast.kernel_mv`` (no samples x centres matrix).

    Calling it again while enabled only changes the options. Raises ImportError without xrfm,
    XRFMIntegrationError (nothing patched) when the installed xrfm changed the internals the switch relies on,
    TypeError / ValueError for bad options.
    """
    global _options
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if not isinstance(predict, bool):
        raise TypeError(f"predict must be a bool, got {type(predict).__name__}")
    if memory_budget is not None:
        from .._config import parse_bytes

        parse_bytes(memory_budget)
    options = _Options(backend.lower(), memory_budget, predict)
    with _LOCK:
        if _options is not None:
            _options = options
            return
        classes = _resolve(*_modules())
        try:
            for name, uses_sqrt in _KERNEL_CLASSES:
                cls = classes[name]
                _fast_classes[cls] = (uses_sqrt, _default_eps(cls))
                _patch(cls, "get_agop", _agop_method(cls.get_agop, diag=False))
                _patch(cls, "get_agop_diag", _agop_method(cls.get_agop_diag, diag=True))
            _patch(classes["RFM"], "predict", _predict_method(classes["RFM"].predict))
            # The self-check runs on the torch path whatever backend was asked for: it tests xrfm's formulas.
            # It is repeated only when xrfm's functions are not the very objects that passed it before.
            originals = tuple(getattr(cls, attr).__rfm_fast_original__ for cls, attr, _, _ in _saved) + tuple(
                getattr(classes[name], attr) for name in ("Kernel", "LaplaceKernel", "LightLaplaceKernel")
                for attr in ("get_kernel_matrix", "get_function_grads", "_get_function_grad_impl",
                             "_get_kernel_matrix_impl"))
            if originals not in _checked:
                _options = _Options("torch", None, True)
                _self_check(classes)
                _checked.append(originals)
        except XRFMIntegrationError:
            _options = None
            _restore()
            raise
        except Exception as exc:
            _options = None
            _restore()
            raise XRFMIntegrationError(f"xrfm's internals changed: the switch's self-check failed with "
                                       f"{type(exc).__name__}: {exc}") from exc
        _options = options


def disable() -> None:
    """Put xrfm back exactly as it was (the original function objects). A no-op when not enabled."""
    global _options
    with _LOCK:
        _options = None
        _restore()


@contextlib.contextmanager
def use_rfm_fast(backend: str = "auto", *, memory_budget: Optional[int | str] = None,
                 predict: bool = True) -> Iterator[None]:
    """Context manager form of :func:`enable`; on exit the previous state (off, or the outer options) returns."""
    with _LOCK:
        previous = _options
    enable(backend, memory_budget=memory_budget, predict=predict)
    try:
        yield
    finally:
        if previous is None:
            disable()
        else:
            enable(previous.backend, memory_budget=previous.memory_budget, predict=previous.predict)
