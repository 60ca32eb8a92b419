"""Build script for the optional compiled extension in csrc/ (module ``rfm_fast._C``, ops ``torch.ops.rfm_fast``).

The package itself is pure Python and installs from pyproject.toml alone. The extension is built only on explicit
opt-in, against the torch already installed (hence no build isolation):

    RFM_FAST_BUILD_EXT=1 pip install --no-build-isolation -e .

Nothing is compiled at import time. The sources and compiler flags come from rfm_fast/_ext.py (loaded by path,
without importing the package), which also offers ``build_inplace()`` for machines without pip:
- C++: -O3 -fopenmp-simd -fopenmp -fno-math-errno -fno-trapping-math, plus -mavx2 -mfma (and AVX-512 F/DQ/VL)
  only when this CPU and compiler support them (no -march=native; ``RFM_FAST_ARCH_FLAGS`` overrides). -fopenmp
  (compiled and linked) is what makes ATen's parallel_for use threads; ``RFM_FAST_OPENMP=0`` leaves it out. The
  C++ standard is torch's choice.
- CUDA: compiled only when torch has CUDA and ``CUDA_HOME`` is set explicitly; the architectures come from
  ``TORCH_CUDA_ARCH_LIST`` (default here "9.0", i.e. sm_90).
"""

import importlib.util
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _opted_in() -> bool:
    return os.environ.get("RFM_FAST_BUILD_EXT", "").strip().lower() in ("1", "true", "yes", "on")


def _build_config():
    spec = importlib.util.spec_from_file_location("_rfm_fast_ext_config", os.path.join(ROOT, "rfm_fast", "_ext.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)  # stdlib imports only at module level
    return module


def extension_modules():
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    config = _build_config()
    cuda = torch.version.cuda is not None and bool(os.environ.get("CUDA_HOME"))
    sources = config.sources(cuda, ROOT, relative=True)
    if cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        ext = CUDAExtension("rfm_fast._C", sources,
                            extra_compile_args={"cxx": config.cxx_flags(), "nvcc": config.nvcc_flags()},
                            extra_link_args=config.link_flags())
    else:
        ext = CppExtension("rfm_fast._C", sources, extra_compile_args={"cxx": config.cxx_flags()},
                           extra_link_args=config.link_flags())
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extension_modules() if _opted_in() else ([], {})
setup(ext_modules=ext_modules, cmdclass=cmdclass)
