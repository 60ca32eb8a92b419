"""Lazy loader and Python-side argument preparation for the compiled ops (csrc/, ``torch.ops.rfm_fast``).

The extension module ``rfm_fast._C`` exists only after an explicit build:

    RFM_FAST_BUILD_EXT=1 pip install --no-build-isolation -e .

Nothing here compiles or even imports the module at ``import rfm_fast`` time. :func:`load` imports it on first
use; :func:`unavailable_reason` says why it cannot be used (the probes of the "cpp" and "cuda" backends return it,
so ``backend="auto"`` falls back quietly while an explicit request raises it). :func:`build_inplace` compiles the
sources with ``torch.utils.cpp_extension.load`` for machines without pip (e.g. a GPU box with a preinstalled
torch); it is never called implicitly.

The ops work in Euclidean coordinates: :func:`euclidean_problem` applies S = M^{1/2} and centres the points at
the centres' mean in Python (rfm_fast.ops.common helpers), so the C++/CUDA code sees plain Euclidean distances
and receives the original points and S only to recompute near-zero pairs exactly.
"""

from __future__ import annotations

import glob
import importlib
import os
from dataclasses import dataclass
from typing import Optional

BUILD_HINT = "build it with RFM_FAST_BUILD_EXT=1 pip install --no-build-isolation -e ."
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_state: dict = {"loaded": False, "error": None}


def _ops_registered() -> bool:
    import torch

    try:
        torch.ops.rfm_fast.agop  # noqa: B018 (attribute lookup resolves the registered op)
    except (AttributeError, RuntimeError):
        return False
    return True


def load() -> None:
    """Import the compiled module once (registering torch.ops.rfm_fast); raise RuntimeError with the build hint
    when it is missing or broken."""
    if _state["loaded"]:
        return
    if _state["error"] is None:
        try:
            importlib.import_module("rfm_fast._C")
            _state["loaded"] = True
            return
        except ImportError as exc:
            if _ops_registered():  # registered by build_inplace() in this process
                _state["loaded"] = True
                return
            missing = isinstance(exc, ModuleNotFoundError) and exc.name == "rfm_fast._C"
            _state["error"] = ("the compiled extension rfm_fast._C is not built; " if missing else
                               f"the compiled extension rfm_fast._C failed to load ({exc}); ") + BUILD_HINT
    raise RuntimeError(_state["error"])


def unavailable_reason() -> Optional[str]:
    """None when the compiled ops can be called, else the actionable reason."""
    try:
        load()
    except RuntimeError as exc:
        return str(exc)
    return None


def has_cuda_kernels() -> bool:
    """Whether the loaded extension was compiled with its CUDA kernels."""
    import torch

    load()
    return torch._C._dispatch_has_kernel_for_dispatch_key("rfm_fast::agop", "CUDA")


def sources(cuda: bool, root: str = _ROOT, relative: bool = False) -> list[str]:
    """The extension's sources: the schema, the CPU ops, and with ``cuda`` the CUDA ops."""
    base = "" if relative else root
    found = [os.path.join(base, "csrc", "ops.cpp")]
    found += sorted(os.path.join(base, "csrc", "cpu", os.path.basename(f))
                    for f in glob.glob(os.path.join(root, "csrc", "cpu", "*.cpp")))
    if cuda:
        found += sorted(os.path.join(base, "csrc", "cuda", os.path.basename(f))
                        for f in glob.glob(os.path.join(root, "csrc", "cuda", "*.cu")))
    return found


def _cpu_has(*flags: str) -> bool:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return all(f in have for f in flags)
    except OSError:
        pass
    return False


def _compiler_accepts(flags: list[str]) -> bool:
    import subprocess
    import tempfile

    cxx = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as fh:
            fh.write("int main() { return 0; }\n")
        try:
            done = subprocess.run([cxx, *flags, "-c", src, "-o", os.path.join(tmp, "probe.o")],
                                  capture_output=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return done.returncode == 0


# AVX-512 doubles the width of the fused weight loops (measured: 99 us against 178 us per 256 x 1024 Laplace strip
# with AVX2 on a 2-core AMD EPYC, csrc/cpu/weights.cpp); 512-bit vectors are asked for explicitly because GCC
# otherwise prefers 256-bit ones on such targets.
AVX512_FLAGS = ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mprefer-vector-width=512"]


def arch_flags() -> list[str]:
    """The widest vector ISA this CPU reports and the compiler takes: ``-mavx2 -mfma``, plus AVX-512 (F, DQ, VL)
    where present. The extension is built from source on the machine that runs it (explicit opt-in), so it
    targets that CPU; ``$RFM_FAST_ARCH_FLAGS`` replaces the choice (e.g. ``"-mavx2 -mfma"`` for a build shared
    with AVX2-only machines, ``""`` for baseline x86-64). Never ``-march=native``."""
    import platform

    override = os.environ.get("RFM_FAST_ARCH_FLAGS")
    if override is not None:
        return override.split()
    if platform.machine().lower() in ("x86_64", "amd64") and _cpu_has("avx2", "fma"):
        flags = ["-mavx2", "-mfma"]
        if _cpu_has("avx512f", "avx512dq", "avx512vl") and _compiler_accepts(flags + AVX512_FLAGS):
            return flags + AVX512_FLAGS
        if _compiler_accepts(flags):
            return flags
    return []


def cxx_flags() -> list[str]:
    """-O3; -fopenmp-simd so `#pragma omp simd` loops vectorise without linking a second OpenMP runtime (threads
    come from ATen's parallel_for, i.e. torch's own OpenMP); -fno-math-errno and -fno-trapping-math (as torch
    itself is built) so sqrt and comparisons in those loops vectorise; the arch flags above. No -ffast-math: the
    near-zero tests and the exp range checks need IEEE comparisons."""
    return ["-O3", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", *arch_flags()]


def nvcc_flags() -> list[str]:
    return ["-O3", "-lineinfo"]


def build_inplace(verbose: bool = True, cuda: Optional[bool] = None, build_directory: Optional[str] = None) -> None:
    """Compile csrc/ with torch.utils.cpp_extension.load and register the ops in this process (no pip needed).

    cuda: compile the CUDA kernels (default: when torch has CUDA). Needs a source checkout (csrc/ next to the
    package), a C++ compiler, and nvcc for CUDA (CUDA_HOME). The build is cached in ``build_directory`` (default
    <repo>/build/rfm_fast_jit). Explicit only: nothing calls it implicitly.
    """
    import torch
    from torch.utils.cpp_extension import load as jit_load

    if cuda is None:
        cuda = torch.cuda.is_available()
    srcs = sources(cuda)
    if not os.path.exists(srcs[0]):
        raise RuntimeError(f"build_inplace needs the csrc/ sources next to the package (looked in {_ROOT})")
    build_directory = build_directory or os.path.join(_ROOT, "build", "rfm_fast_jit")
    os.makedirs(build_directory, exist_ok=True)
    jit_load(name="rfm_fast_jit", sources=srcs, extra_cflags=cxx_flags(), extra_cuda_cflags=nvcc_flags(),
             build_directory=build_directory, verbose=verbose, is_python_module=False, with_cuda=cuda)
    _state.update(loaded=True, error=None)


# Squared-distance scale per kernel: the ops take s = scale * ||z - x||^2 (laplace s = (r/L)^2, gaussian
# s = r^2/(2 L^2)); both gradient weights then share the factor -1/L^2.
def distance_scale(kernel: str, bandwidth: float) -> float:
    return 1.0 / bandwidth**2 if kernel == "laplace" else 0.5 / bandwidth**2


@dataclass
class EuclideanProblem:
    zc: "torch.Tensor"  # noqa: F821  (m, d) z S - mu
    xc: "torch.Tensor"  # noqa: F821  (n, d) x S - mu
    z: "torch.Tensor"  # noqa: F821  (m, d) original, contiguous
    x: "torch.Tensor"  # noqa: F821  (n, d)
    S: "Optional[torch.Tensor]"  # noqa: F821  None, (d,) or (d, d)
    alpha: "torch.Tensor"  # noqa: F821  (n, c) contiguous
    scale: float
    rtol: float
    direct: bool


def euclidean_problem(z, x, alpha, M, kernel: str, bandwidth: float) -> EuclideanProblem:
    """Metric transform and centring in torch (same rules as rfm_fast.ops.common.DistanceTiles)."""
    import torch

    from .ops.common import DIRECT_DISTANCE_MAX_D, RECHECK_RTOL, apply_metric, metric_sqrt

    S = metric_sqrt(M, z.dtype)
    z, x = z.contiguous(), x.contiguous()
    direct = z.shape[1] <= DIRECT_DISTANCE_MAX_D
    if direct:
        zc, xc = z, x  # unused by the direct path, which works from the exact differences
    else:
        zt, xt = apply_metric(z, S), apply_metric(x, S)
        shift = xt.mean(0, keepdim=True)
        zc, xc = (zt - shift).contiguous(), (xt - shift).contiguous()
    alpha = alpha.contiguous() if alpha is not None else torch.zeros(x.shape[0], 1, dtype=z.dtype, device=z.device)
    return EuclideanProblem(zc, xc, z, x, None if S is None else S.contiguous(), alpha,
                            distance_scale(kernel, bandwidth), RECHECK_RTOL[z.dtype], direct)


# CPU tiles: 256 evaluation points x 1024 centres (1 MiB fp32) keep the weight tile and the 256-row accumulator
# within a core's L2 while the two GEMMs per tile stay large enough for MKL to run near its single-core peak.
CPU_TILE_ROWS = 256
CPU_TILE_COLS = 1024
CUDA_TILE_COLS = 64  # informational: the CUDA kernel's centre chunk is the compile-time kCols


def plan(p: EuclideanProblem, memory_budget: int, *, threads: int, gradient: bool) -> tuple[int, int, bool]:
    """(tile_rows, tile_cols, whole_coeffs): tiles per thread within ``memory_budget`` bytes; whole_coeffs says
    whether the (n, c + c d) coefficient matrix is built once (when it fits in half the budget)."""
    m, n, d = p.zc.shape[0], p.xc.shape[0], p.zc.shape[1]
    c = p.alpha.shape[1]
    item = p.zc.element_size()
    width = c + c * d if gradient else c
    if p.zc.device.type == "cuda":
        # One launch per chunk of rows: its (rows, width) accumulator, the gradients and one temporary.
        rows = max(1, min(m, memory_budget // (3 * width * item))) if gradient else max(1, m)
        return rows, CUDA_TILE_COLS, False
    from .ops.common import coefficients_fit

    whole = gradient and not p.direct and coefficients_fit(n, width, item, memory_budget)
    budget = memory_budget - (n * width * item if whole else 0)
    rows = max(1, min(CPU_TILE_ROWS, -(-m // max(1, threads))))
    cols = max(1, min(CPU_TILE_COLS, n))

    def cost(r, k):
        per_thread = r * k + r * width + (0 if whole or not gradient else k * width) + (2 * r * c * d if gradient
                                                                                         else 0)
        return threads * per_thread * item

    while cost(rows, cols) > budget and cols > 64:
        cols //= 2
    while cost(rows, cols) > budget and rows > 8:
        rows //= 2
    return rows, cols, whole


def stacked_coefficients(p: EuclideanProblem):
    """V = [alpha | alpha (x) xc], (n, c + c d)."""
    import torch

    n, c = p.alpha.shape
    d = p.xc.shape[1]
    out = torch.empty(n, c + c * d, dtype=p.xc.dtype, device=p.xc.device)
    out[:, :c] = p.alpha
    torch.mul(p.alpha[:, :, None], p.xc[:, None, :], out=out[:, c:].view(n, c, d))
    return out
