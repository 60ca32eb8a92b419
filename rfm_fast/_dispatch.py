"""One dispatcher for every public op.

Which backend runs a call:

* ``backend="auto"`` (or ``$RFM_FAST_BACKEND`` when the argument is left at "auto") takes the first backend of
  :data:`AUTO_ORDER` for the tensors' device that implements the op, can run the call and wants it;
* a named backend runs the call, or raises ``RuntimeError`` with the reason when it cannot run here (extension not
  built, wrong device or dtype); an op it does not implement (:data:`REGISTRY` lists them) is routed to the
  automatic choice for that op, as is every op under an environment override;
* :func:`backends_for` says all of this for a given call, and every call logs its choice at debug level
  (``logging.getLogger("rfm_fast")``).

Backend modules, and the libraries they need, are imported only when a call reaches them: ``import rfm_fast``
touches no GPU, no compiler and no optional dependency.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any, Optional

from ._config import BACKEND_ENV, backend_override
from ._validation import Problem

OPS = ("kernel_matrix", "kernel_mv", "kernel_grad", "agop")
LOG = logging.getLogger("rfm_fast")


@dataclass(frozen=True)
class Backend:
    name: str
    ops: tuple
    takes_budget: bool = True

    def probe(self):
        """The backend's light probe module (``rfm_fast.backends.<name>``), or None when not installed."""
        try:
            return importlib.import_module(f"rfm_fast.backends.{self.name}")
        except ModuleNotFoundError as exc:
            if exc.name and f"rfm_fast.backends.{self.name}".startswith(exc.name):
                return None
            raise

    def reason(self, op: str, problem: Problem) -> Optional[str]:
        """Why this backend cannot run ``op`` on ``problem`` here, or None."""
        if op not in self.ops:
            return f"backend {self.name!r} does not implement {op}"
        probe = self.probe()
        if probe is None:
            return f"the {self.name} backend is not part of this installation"
        return probe.check(problem)

    def declines(self, op: str, problem: Problem) -> Optional[str]:
        """Why ``backend="auto"`` should not pick this backend for the call, or None."""
        return self.probe().prefers(op, problem)

    def function(self, op: str):
        return getattr(importlib.import_module(f"rfm_fast.backends.{self.name}.ops"), op)


_ALL = ("kernel_matrix", "kernel_mv", "kernel_grad", "agop")
# K^T (K alpha) with each tile computed once (the Nystrom solver's product; private, through
# ``rfm_fast.ops.api.kernel_normal_mv``): the backends on the core's tiles, and the reference.
_TILES = _ALL + ("kernel_normal_mv",)
REGISTRY: dict[str, Backend] = {
    "torch": Backend("torch", _TILES),
    "cpp": Backend("cpp", _TILES),
    "triton": Backend("triton", _ALL),
    "keops": Backend("keops", ("kernel_mv", "kernel_grad", "agop")),
    "cuda": Backend("cuda", ("kernel_mv", "kernel_grad", "agop")),
    "naive": Backend("naive", _TILES, takes_budget=False),
}
# The order of backend="auto" per device type, stated once. CPU: the compiled pass where the extension is built
# (faster than the torch pass in every measured case, benchmarks/results/cpp_vs_torch.csv), else torch; KeOps was
# slower than torch in all 36 measured CPU cases (benchmarks/results/keops_crossover.csv). CUDA: Triton, else
# torch; the cuda and keops backends stay out of auto until a GPU run has measured them (benchmarks/gpu_check.py).
AUTO_ORDER: dict[str, tuple] = {"cpu": ("cpp", "torch"), "cuda": ("triton", "torch")}


def available_backends(device: Any = "cpu") -> list[str]:
    """The backend names usable on ``device`` ("cpu" or "cuda") in this installation for float32 inputs, with
    "auto" first: those whose probe accepts a float32 call there (the compiled extension built, the optional
    library installed). A backend listed can still decline a particular call; :func:`backends_for` says why."""
    import types

    import torch

    probe = types.SimpleNamespace(device=torch.device(device), dtype=torch.float32)
    names = ["auto"]
    for name, backend in REGISTRY.items():
        if any(backend.reason(op, probe) is None for op in backend.ops):
            names.append(name)
    return names


def _automatic(op: str, problem: Problem) -> tuple[Backend, str]:
    declined = []
    for name in AUTO_ORDER.get(problem.device.type, ("torch",)):
        backend = REGISTRY[name]
        reason = backend.reason(op, problem)
        if reason is None:
            reason = backend.declines(op, problem)
            if reason is None:
                return backend, f"first of auto's {problem.device.type} order {AUTO_ORDER[problem.device.type]}" + (
                    f" that runs it ({'; '.join(declined)})" if declined else "")
        declined.append(f"{name}: {reason}")
    torch_reason = REGISTRY["torch"].reason(op, problem)
    raise RuntimeError(f"no backend can run {op} here: {torch_reason}")


def choose(op: str, problem: Problem, backend: str) -> Backend:
    """The backend that runs ``op`` on ``problem``: the named one (or its routing), or the automatic choice."""
    chosen, why = explain(op, problem, backend)
    LOG.debug("%s on %s %s: backend %s (%s)", op, problem.device.type, str(problem.dtype).replace("torch.", ""),
              chosen.name, why)
    return chosen


def explain(op: str, problem: Problem, backend: str) -> tuple[Backend, str]:
    """(backend, why) for a call, without running it."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    name = backend.strip().lower()
    source = "backend"
    if name == "auto":
        override = backend_override()
        if override is not None and override != "auto":
            name, source = override, BACKEND_ENV
    if name == "auto":
        return _automatic(op, problem)
    if name not in REGISTRY:
        raise ValueError(f"{source} must be one of {['auto', *REGISTRY]}, got {name!r}")
    chosen = REGISTRY[name]
    if op not in chosen.ops:
        routed, why = _automatic(op, problem)
        return routed, f"{source}={name!r} does not implement {op}; routed to the automatic choice: {why}"
    reason = chosen.reason(op, problem)
    if reason is not None:
        raise RuntimeError(f"{source}={name!r} cannot run {op} here: {reason}")
    return chosen, f"named by {source}"


def backends_for(op: str, x: Any, centers: Any = None, alpha: Any = None, *, M: Any = None, kernel: str = "laplace",
                 bandwidth: float = 1.0, backend: str = "auto") -> dict:
    """Which backends can run ``op`` on these inputs here, and which one a call with ``backend`` would use.

    Returns {"chosen": name, "why": text, "backends": [{"name", "implements", "runs", "reason", "auto_wants"}]},
    where "reason" says why a backend cannot run the call (None when it can) and "auto_wants" whether
    ``backend="auto"`` would take it. Nothing is computed.
    """
    from ._validation import prepare

    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    centers = x if centers is None else centers
    need_alpha = op != "kernel_matrix"
    if need_alpha and alpha is None:
        import numpy as np

        alpha = np.zeros(len(centers), dtype=np.float32) if not hasattr(centers, "new_zeros") else \
            centers.new_zeros(centers.shape[0])
    problem = prepare(x, centers, alpha if need_alpha else None, M, kernel, bandwidth, need_alpha=need_alpha,
                      allow_half=True)
    rows = []
    for name, entry in REGISTRY.items():
        reason = entry.reason(op, problem)
        wants = reason is None and name in AUTO_ORDER.get(problem.device.type, ()) and \
            entry.declines(op, problem) is None
        rows.append({"name": name, "implements": op in entry.ops, "runs": reason is None, "reason": reason,
                     "auto_wants": wants})
    chosen, why = explain(op, problem, backend)
    return {"chosen": chosen.name, "why": why, "backends": rows}
