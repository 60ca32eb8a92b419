"""Lazy loader and Python-side argument preparation for the compiled ops (csrc/, ``torch.ops.rfm_fast``).

The extension module ``rfm_fast._C`` exists only after an explicit build:

    RFM_FAST_BUILD_EXT=1 pip install --no-build-isolation -e .

Nothing here compiles or even imports the module at ``import rfm_fast`` time. :func:`load` imports it on first
use; :func:`unavailable_reason` says why it cannot be used (the probes of the "cpp" and "cuda" backends return it,
so ``backend="auto"`` falls back quietly while an explicit request raises it). :func:`build_inplace` compiles the
sources with ``torch.utils.cpp_extension.load`` for machines without pip (e.g. a GPU box with a preinstalled
torch); it is never called implicitly.

The compiled ops are primitives of the kernel core (rfm_fast/core): they receive the core's prepared arrays and
constants as arguments (csrc/ops.cpp) and re-derive no rule of their own.
"""

from __future__ import annotations

import glob
import importlib
import os
from typing import Optional

BUILD_HINT = "build it with RFM_FAST_BUILD_EXT=1 pip install --no-build-isolation -e ."
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_state: dict = {"loaded": False, "error": None}


def _ops_registered() -> bool:
    import torch

    try:
        torch.ops.rfm_fast.tile_pass_  # noqa: B018 (attribute lookup resolves the registered op)
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
    return torch._C._dispatch_has_kernel_for_dispatch_key("rfm_fast::kernel_grad", "CUDA")


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


def _compiler_accepts(flags: list[str], source: str = "int main() { return 0; }\n", link: bool = False) -> bool:
    """Whether $CXX (default c++) compiles ``source`` with ``flags`` (and links it, with ``link``)."""
    import subprocess
    import tempfile

    cxx = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as fh:
            fh.write(source)
        target = ["-o", os.path.join(tmp, "probe")] if link else ["-c", "-o", os.path.join(tmp, "probe.o")]
        try:
            done = subprocess.run([cxx, *flags, src, *target], capture_output=True, timeout=60)
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


def openmp_flags() -> list[str]:
    """``-fopenmp`` (compile and link) when torch runs its threads on OpenMP and the compiler can build and link
    OpenMP code; ``RFM_FAST_OPENMP=0`` leaves it out. ATen's ``at::parallel_for`` is an inline template that only
    goes parallel in a translation unit compiled with OpenMP: without the flag every compiled pass ran on one
    thread, whatever ``torch.set_num_threads`` said (measured: the Laplace value pass of a 256 x 2048 tile took
    346 us on 2 threads against torch's 129 us; with the flag it follows torch's thread count). The extension then
    carries the compiler's own OpenMP runtime beside torch's bundled one; the pass sets its team to torch's count
    before each parallel region (csrc/cpu/tile_pass.cpp)."""
    if os.environ.get("RFM_FAST_OPENMP", "").strip().lower() in ("0", "false", "no", "off"):
        return []
    try:
        import torch

        if not torch.backends.openmp.is_available():
            return []
    except ImportError:
        return []
    probe = "#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n"
    return ["-fopenmp"] if _compiler_accepts(["-fopenmp"], probe, link=True) else []


def cxx_flags() -> list[str]:
    """-O3; -fopenmp-simd so `#pragma omp simd` loops vectorise; ``openmp_flags()`` so that ATen's parallel_for
    runs the passes on torch's thread count; -fno-math-errno and -fno-trapping-math (as torch itself is built) so
    sqrt and comparisons in those loops vectorise; the arch flags above. No -ffast-math: the near-zero tests and
    the exp range checks need IEEE comparisons."""
    return ["-O3", "-fopenmp-simd", *openmp_flags(), "-fno-math-errno", "-fno-trapping-math", *arch_flags()]


def link_flags() -> list[str]:
    """Linker flags of the C++ extension: the OpenMP runtime when ``openmp_flags()`` compiles with it."""
    return openmp_flags()


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
             extra_ldflags=link_flags(),
             build_directory=build_directory, verbose=verbose, is_python_module=False, with_cuda=cuda)
    _state.update(loaded=True, error=None)
