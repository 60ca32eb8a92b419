// Host-side helpers shared by the CUDA ops: argument checks, the kernel's argument block, and the dispatch over
// dtype and kernel of launch_fused_tiles.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include "../checks.h"
#include "fused_tiles.cuh"

namespace rfm_fast::cuda {

struct Prepared {
  at::Tensor zn, xn;
  MetricKind kind;
  bool laplace;
};

inline Prepared prepare(const at::Tensor& zc, const at::Tensor& xc, const at::Tensor& alpha, const at::Tensor& z,
                        const at::Tensor& x, const std::optional<at::Tensor>& S, const std::string& kernel,
                        int64_t tile_rows) {
  TORCH_CHECK(zc.is_cuda(), "rfm_fast: the CUDA op got tensors on ", zc.device());
  const MetricKind kind = check_pair_args(zc, xc, alpha, z, x, S);
  TORCH_CHECK(tile_rows > 0, "rfm_fast: tile_rows must be positive");
  return {(zc * zc).sum(1), (xc * xc).sum(1), kind, is_laplace(kernel)};
}

template <typename T>
TileArgs<T> tile_args(const Prepared& p, const at::Tensor& zc, const at::Tensor& xc, const at::Tensor& alpha,
                      const at::Tensor& z, const at::Tensor& x, const std::optional<at::Tensor>& S, bool direct,
                      double scale, double rtol, int64_t width) {
  TileArgs<T> a;
  a.zc = zc.data_ptr<T>();
  a.xc = xc.data_ptr<T>();
  a.zn = p.zn.data_ptr<T>();
  a.xn = p.xn.data_ptr<T>();
  a.z = z.data_ptr<T>();
  a.x = x.data_ptr<T>();
  a.S = S.has_value() ? S->data_ptr<T>() : nullptr;
  a.alpha = alpha.data_ptr<T>();
  a.kind = p.kind;
  a.direct = direct;
  a.row0 = 0;
  a.rows = 0;
  a.n = xc.size(0);
  a.d = zc.size(1);
  a.c = alpha.size(1);
  a.width = width;
  a.scale = static_cast<T>(scale);
  a.rtol = static_cast<T>(rtol);
  a.out = nullptr;
  return a;
}

template <typename T, bool Gradient>
void launch(const TileArgs<T>& a, bool laplace) {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (laplace) {
    launch_fused_tiles<T, true, Gradient>(a, stream);
  } else {
    launch_fused_tiles<T, false, Gradient>(a, stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace rfm_fast::cuda
