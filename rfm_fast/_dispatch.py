"""One dispatcher for every public op.

``backend="auto"`` (or ``$RFM_FAST_BACKEND`` when the argument is left at "auto") picks the first backend of the
device's preference list that can run the call and wants it; an explicit choice that cannot run raises
``RuntimeError`` with the reason. Backend modules, and the libraries they need, are imported only when a call
reaches them: ``import rfm_fast`` touches no GPU, no compiler and no optional dependency.

Each backend implements ``rfm_fast.ops.<op>.<module>.<op>(x, centers, [alpha,] M, kernel, bandwidth, ...)`` on
canonical torch tensors (see ``_validation.Problem``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Optional

from ._config import BACKEND_ENV, backend_override
from ._validation import HALF_DTYPES, Problem

OPS = ("kernel_matrix", "kernel_mv", "kernel_grad", "agop")

Check = Callable[[str, Problem], Optional[str]]


def _always(op: str, problem: Problem) -> Optional[str]:
    return None


def _full_precision_only(op: str, problem: Problem) -> Optional[str]:
    if problem.dtype in HALF_DTYPES:
        return f"{problem.dtype} inputs are supported by the triton backend only"
    return None


def _lazy(path: str, default_reason: str) -> Check:
    """A check living in a light probe module ("pkg.module:function"), imported on first use. A missing probe
    module means the backend is not part of this installation."""

    def check(op: str, problem: Problem) -> Optional[str]:
        module_name, func_name = path.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                return default_reason
            raise
        return getattr(module, func_name)(op, problem)

    return check


@dataclass
class Backend:
    name: str
    module: str  # file name under rfm_fast/ops/<op>/
    ops: tuple[str, ...]
    check: Check = _always  # why this backend cannot run the call, or None
    prefers: Check = _always  # why auto should not pick it for this call, or None
    takes_budget: bool = True
    extra: dict = field(default_factory=dict)

    def function(self, op: str):
        mod = importlib.import_module(f"rfm_fast.ops.{op}.{self.module}")
        return getattr(mod, op)


_REGISTRY: dict[str, Backend] = {}
# Preference order of backend="auto" per device type; "torch" runs everywhere and closes every list.
_AUTO_ORDER: dict[str, list[str]] = {"cpu": ["torch"], "cuda": ["torch"]}


def register(backend: Backend, *, auto: dict[str, int] | None = None) -> None:
    """Add a backend; ``auto`` maps device types to its position in that device's auto order."""
    _REGISTRY[backend.name] = backend
    for device, position in (auto or {}).items():
        order = _AUTO_ORDER.setdefault(device, ["torch"])
        if backend.name not in order:
            order.insert(position, backend.name)


register(Backend("torch", "torch", OPS, check=_full_precision_only))
register(Backend("naive", "naive", OPS, check=_full_precision_only, takes_budget=False))
# Optional backends: each has a probe module (rfm_fast/backends/<name>.py) with check(op, problem) and
# prefers(op, problem) that import nothing heavy at module level; the kernels live in rfm_fast/ops/<op>/<name>.py.
for _name, _auto in (("keops", {"cpu": 0, "cuda": 1}), ("triton", {"cuda": 0}), ("cuda", {"cuda": 1}),
                     ("cpp", {"cpu": 0})):
    register(Backend(_name, _name, OPS,
                     check=_lazy(f"rfm_fast.backends.{_name}:check", f"the {_name} backend is not available"),
                     prefers=_lazy(f"rfm_fast.backends.{_name}:prefers", "not preferred")),
             auto=_auto)


def available_backends() -> list[str]:
    return ["auto", *_REGISTRY]


def _unavailable_reason(backend: Backend, op: str, problem: Problem) -> Optional[str]:
    if op not in backend.ops:
        return f"backend {backend.name!r} does not implement {op}"
    return backend.check(op, problem)


def choose(op: str, problem: Problem, backend: str) -> Backend:
    """The backend that runs ``op`` on ``problem``: the named one, or the automatic choice."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    name = backend.lower()
    source = "backend"
    if name == "auto":
        override = backend_override()
        if override is not None and override != "auto":
            name, source = override, BACKEND_ENV
    if name != "auto":
        if name not in _REGISTRY:
            raise ValueError(f"{source} must be one of {available_backends()}, got {name!r}")
        chosen = _REGISTRY[name]
        reason = _unavailable_reason(chosen, op, problem)
        if reason is not None:
            raise RuntimeError(f"{source}={name!r} cannot run {op} here: {reason}")
        return chosen
    order = _AUTO_ORDER.get(problem.device.type, ["torch"])
    for candidate in order:
        entry = _REGISTRY.get(candidate)
        if entry is None or _unavailable_reason(entry, op, problem) is not None:
            continue
        if entry.prefers(op, problem) is None:
            return entry
    reason = _unavailable_reason(_REGISTRY["torch"], op, problem)
    raise RuntimeError(f"no backend can run {op} here: {reason}")
