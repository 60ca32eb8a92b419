#!/usr/bin/env bash
# Build check for the CUDA sources on a machine without a GPU (or with a CPU-only torch): compiles every
# csrc/cuda/*.cu to an object file with the local nvcc for sm_90 against the installed torch's headers. It links
# nothing and runs nothing; it proves the kernels and host code compile. Usage:
#   csrc/check_cuda_build.sh [arch]        (arch default: sm_90; NVCC, PYTHON override the tools)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
arch="${1:-sm_90}"
nvcc="${NVCC:-nvcc}"
python="${PYTHON:-python}"
torch_dir="$("$python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
py_include="$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
# A CPU-only torch ships c10/cuda headers without the one CMake generates for CUDA builds; supply it (it only
# says that c10_cuda is a shared library, as in every CUDA wheel). With a CUDA torch the real one is found first.
mkdir -p "$out/stub/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$out/stub/c10/cuda/impl/cuda_cmake_macros.h"
"$nvcc" --version | tail -n 1
for src in "$here"/cuda/*.cu; do
  echo "nvcc -arch=$arch -c $(basename "$src")"
  "$nvcc" -arch="$arch" -std=c++20 -O3 -lineinfo -Xcompiler -fPIC \
    -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H \
    -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
    -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr \
    -I"$torch_dir/include" -I"$torch_dir/include/torch/csrc/api/include" -I"$py_include" -Xcompiler -idirafter -Xcompiler "$out/stub" \
    -c "$src" -o "$out/$(basename "$src" .cu).o"
  cuobjdump --list-elf "$out/$(basename "$src" .cu).o" 2>/dev/null | sed 's/^/  /' || true
done
echo "all CUDA sources compiled for $arch"
