"""The "keops" backend: KeOps reductions (``pykeops.torch.Genred``) on the kernel core's metric factor and kernel
description, for CPU and CUDA tensors: kernel_mv, kernel_grad and agop (kernel_matrix, whose output is the m x n
matrix itself, gains nothing from a reduction and is routed to the automatic choice).

Nothing here imports pykeops: the probe answers from ``importlib.util.find_spec`` and the problem's dtype and
device; pykeops is imported by the first reduction that runs. Compile cache: pykeops 2.3 reads
``$KEOPS_CACHE_FOLDER`` once, when ``keopscore`` is imported, and builds its formulas under ``<folder>/<platform
tag>/``; rfm_fast never imports it at ``import rfm_fast`` and never overrides the variable (the test suite points
it at ``<repo>/.cache/keops``, git-ignored).

Auto never picks KeOps: on CPU the torch pass won all 36 measured cases (n in {1000, 5000, 20000}, d in
{8, 64, 256}, c in {1, 10}; KeOps took 1.7x to 67x its time, benchmarks/results/keops_crossover.csv), because
KeOps' CPU map-reduce is a scalar loop per pair while the core runs the d- and c*d-sized work as GEMMs; no GPU run
has measured it yet.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
from typing import Optional

OPS = ("kernel_mv", "kernel_grad", "agop")


@functools.lru_cache(maxsize=None)
def _installed() -> bool:
    return importlib.util.find_spec("pykeops") is not None


@functools.lru_cache(maxsize=None)
def _missing_compiler() -> Optional[str]:
    compiler = os.environ.get("CXX") or "g++"
    if shutil.which(compiler) is None and shutil.which("clang++") is None:
        return f"KeOps compiles its formulas on CPU with a C++ compiler; {compiler!r} was not found"
    return None


def check(problem) -> Optional[str]:
    """Why the keops backend cannot run this call here, or None (environment lookups cached; pykeops imported
    only for CUDA tensors)."""
    if not _installed():
        return "pykeops is not installed (pip install 'rfm_fast[keops]')"
    import torch

    if problem.dtype not in (torch.float32, torch.float64):
        return f"KeOps runs float32 and float64 only, got {problem.dtype}"
    device = problem.device.type
    if device == "cpu":
        return _missing_compiler()
    if device == "cuda":
        try:
            import pykeops.config
        except Exception as exc:  # a broken install must read as "cannot run", not crash auto dispatch
            return f"pykeops failed to import: {exc}"
        if not pykeops.config.gpu_available:
            return "this pykeops installation has no CUDA support"
        return None
    return f"KeOps runs on CPU and CUDA tensors, got device {problem.device}"


def prefers(op: str, problem) -> Optional[str]:
    return (f"the torch path measured faster than KeOps for {op} on {problem.device.type} "
            "(benchmarks/results/keops_crossover.csv)")
