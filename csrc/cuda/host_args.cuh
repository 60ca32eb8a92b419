// Host-side helpers shared by the CUDA ops: the kernel's argument block and the dispatch over kernel of
// launch_fused_tiles.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "../checks.h"
#include "fused_tiles.cuh"

namespace rfm_fast::cuda {

template <typename T>
TileArgs<T> tile_args(const at::Tensor& ze, const at::Tensor& xe, const at::Tensor& zn, const at::Tensor& xn,
                      const at::Tensor& bz, const at::Tensor& bx, const at::Tensor& alpha, const at::Tensor& z,
                      const at::Tensor& x, const std::optional<at::Tensor>& F, double sigma, bool direct,
                      int64_t width) {
  TileArgs<T> a;
  a.ze = ze.data_ptr<T>();
  a.xe = xe.data_ptr<T>();
  a.zn = zn.data_ptr<T>();
  a.xn = xn.data_ptr<T>();
  a.bz = bz.data_ptr<T>();
  a.bx = bx.data_ptr<T>();
  a.z = z.data_ptr<T>();
  a.x = x.data_ptr<T>();
  a.F = F.has_value() ? F->data_ptr<T>() : nullptr;
  a.alpha = alpha.data_ptr<T>();
  a.direct = direct;
  a.row0 = 0;
  a.rows = 0;
  a.n = xe.size(0);
  a.d = z.size(1);
  a.r = ze.size(1);
  a.c = alpha.size(1);
  a.width = width;
  a.sigma = static_cast<T>(sigma);
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
