"""Build script for the optional compiled extension in csrc/.

The package itself is pure Python and installs from pyproject.toml alone. The C++/CUDA extension is built only on
explicit opt-in: ``RFM_FAST_BUILD_EXT=1 pip install --no-build-isolation -e .`` (it compiles against the torch
already installed, so build isolation must be off). Nothing is ever compiled at import time.
"""

import os

from setuptools import setup

ext_modules = []
cmdclass = {}

if os.environ.get("RFM_FAST_BUILD_EXT", "").strip().lower() in ("1", "true", "yes", "on"):
    from rfm_fast_build import extension_modules  # noqa: F401  (provided by the csrc issue)

    ext_modules, cmdclass = extension_modules()

setup(ext_modules=ext_modules, cmdclass=cmdclass)
