// CPU implementations of rfm_fast::gradient_weights_ and rfm_fast::kernel_values_ (schema: ../ops.cpp): the
// elementwise half of a gradient or kernel tile in one pass over memory, for tile schedules driven from Python
// (the symmetric schedules of rfm_fast/ops/kernel_grad/torch.py and kernel_mv/torch.py, used by the cpp backend
// when the evaluation points are the centres).
//
// The tile arrives holding sign * scale * ||zc_j - xc_i||^2 from the augmented GEMM (sign -1 for the Gaussian,
// as DistanceTiles writes it). Per entry, in cache and vectorised: the scaled squared distance s, the near test
// s <= scale * rtol * (||zc_j||^2 + ||xc_i||^2), and the gradient weight (laplace e^{-sqrt s}/sqrt s, gaussian
// e^{-s}). A near pair gets weight 0 and its (row, col) is returned, so the caller adds its contribution from the
// exact difference. The torch path needs five passes for the same work (row minima, sqrt, exp, multiply,
// reciprocal).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "../checks.h"
#include "tile_math.h"

namespace rfm_fast::cpu {
namespace {

template <typename T, bool Laplace>
void weight_rows(T* tile, const T* zn, const T* xn, int64_t r0, int64_t r1, int64_t C, int64_t ld, T sign,
                 T bound_scale, std::vector<int64_t>& near_out) {
  const T tiny = std::numeric_limits<T>::min();
  for (int64_t j = r0; j < r1; ++j) {
    T* row = tile + j * ld;
    const T znj = zn[j];
    int any_near = 0;
#pragma omp simd reduction(| : any_near)
    for (int64_t i = 0; i < C; ++i) {
      const T s = sign * row[i];
      const bool near = s <= bound_scale * (znj + xn[i]);
      const T sc = s > tiny ? s : tiny;
      const T w = gradient_weight(sc, Laplace);
      row[i] = near ? T(-1) : w;
      any_near |= near ? 1 : 0;
    }
    if (any_near) {
      for (int64_t i = 0; i < C; ++i) {
        if (row[i] < T(0)) {
          row[i] = T(0);
          near_out.push_back(j);
          near_out.push_back(i);
        }
      }
    }
  }
}

at::Tensor gradient_weights_cpu(at::Tensor tile, const at::Tensor& zn, const at::Tensor& xn,
                                const std::string& kernel, double sign, double scale, double rtol) {
  TORCH_CHECK(tile.device().is_cpu(), "rfm_fast: gradient_weights_ got a tile on ", tile.device());
  TORCH_CHECK(tile.dim() == 2 && tile.stride(1) == 1, "rfm_fast: the tile must be 2-D with unit column stride");
  TORCH_CHECK(zn.dim() == 1 && zn.size(0) == tile.size(0) && zn.is_contiguous(),
              "rfm_fast: zn must be contiguous with one entry per tile row");
  TORCH_CHECK(xn.dim() == 1 && xn.size(0) == tile.size(1) && xn.is_contiguous(),
              "rfm_fast: xn must be contiguous with one entry per tile column");
  TORCH_CHECK(zn.scalar_type() == tile.scalar_type() && xn.scalar_type() == tile.scalar_type(),
              "rfm_fast: zn and xn must have the tile's dtype");
  TORCH_CHECK(sign == 1.0 || sign == -1.0, "rfm_fast: sign must be +1 or -1");
  const bool laplace = is_laplace(kernel);
  const int64_t R = tile.size(0), C = tile.size(1), ld = tile.stride(0);
  const int threads = at::get_num_threads();
  std::vector<std::vector<int64_t>> found(static_cast<size_t>(std::max(1, threads)));
  AT_DISPATCH_FLOATING_TYPES(tile.scalar_type(), "rfm_fast_gradient_weights_cpu", [&] {
    scalar_t* tp = tile.data_ptr<scalar_t>();
    const scalar_t* znp = zn.data_ptr<scalar_t>();
    const scalar_t* xnp = xn.data_ptr<scalar_t>();
    const auto sg = static_cast<scalar_t>(sign);
    const auto bound = static_cast<scalar_t>(scale * rtol);
    // Grain: a few rows of work per task keeps both cores busy on one strip of a tile.
    at::parallel_for(0, R, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, C)), [&](int64_t r0, int64_t r1) {
      auto& mine = found[static_cast<size_t>(at::get_thread_num()) % found.size()];
      if (laplace) {
        weight_rows<scalar_t, true>(tp, znp, xnp, r0, r1, C, ld, sg, bound, mine);
      } else {
        weight_rows<scalar_t, false>(tp, znp, xnp, r0, r1, C, ld, sg, bound, mine);
      }
    });
  });
  size_t total = 0;
  for (const auto& f : found) total += f.size();
  at::Tensor out = at::empty({static_cast<int64_t>(total / 2), 2}, tile.options().dtype(at::kLong));
  int64_t* op = out.data_ptr<int64_t>();
  for (const auto& f : found) {
    std::copy(f.begin(), f.end(), op);
    op += f.size();
  }
  return out;
}

// Kernel values in place on a tile that DistanceTiles.fill already finished (near pairs recomputed exactly):
// v = sign * s -> laplace e^{-sqrt s}, gaussian e^{-s}; s is clamped at 0 against rounding. The torch path needs
// three passes (sqrt, negate, exp) for the same.
template <typename T, bool Laplace>
void value_rows(T* tile, int64_t r0, int64_t r1, int64_t C, int64_t ld, T sign) {
  for (int64_t j = r0; j < r1; ++j) {
    T* row = tile + j * ld;
#pragma omp simd
    for (int64_t i = 0; i < C; ++i) {
      const T s = sign * row[i];
      row[i] = kernel_value(s > T(0) ? s : T(0), Laplace);
    }
  }
}

void kernel_values_cpu(at::Tensor tile, const std::string& kernel, double sign) {
  TORCH_CHECK(tile.device().is_cpu(), "rfm_fast: kernel_values_ got a tile on ", tile.device());
  TORCH_CHECK(tile.dim() == 2 && tile.stride(1) == 1, "rfm_fast: the tile must be 2-D with unit column stride");
  TORCH_CHECK(sign == 1.0 || sign == -1.0, "rfm_fast: sign must be +1 or -1");
  const bool laplace = is_laplace(kernel);
  const int64_t R = tile.size(0), C = tile.size(1), ld = tile.stride(0);
  AT_DISPATCH_FLOATING_TYPES(tile.scalar_type(), "rfm_fast_kernel_values_cpu", [&] {
    scalar_t* tp = tile.data_ptr<scalar_t>();
    const auto sg = static_cast<scalar_t>(sign);
    at::parallel_for(0, R, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, C)), [&](int64_t r0, int64_t r1) {
      if (laplace) {
        value_rows<scalar_t, true>(tp, r0, r1, C, ld, sg);
      } else {
        value_rows<scalar_t, false>(tp, r0, r1, C, ld, sg);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(rfm_fast, CPU, m) {
  m.impl("gradient_weights_", &gradient_weights_cpu);
  m.impl("kernel_values_", &kernel_values_cpu);
}

}  // namespace rfm_fast::cpu
