// CPU implementation of rfm_fast::tile_pass_ (schema: ../ops.cpp): the elementwise half of a kernel or gradient
// tile in one pass over memory, for the tile schedules of the kernel core (rfm_fast/core/tiles.py,
// ElementwisePass), used by the cpp backend.
//
// The tile arrives holding sign * s from the core's distance fill. Per entry, in cache and vectorised: s, the near
// test s <= bz[j] + bx[i], and the kernel value or gradient weight. A near pair's (row, col) is returned so that
// the core recomputes it from the exact difference; its entry is left at 0. The torch pass needs four to six
// passes over the tile for the same work (row minima, sqrt, exp, multiply, reciprocal).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "tile_math.h"

namespace rfm_fast::cpu {
namespace {

// Rows r0 .. r1 of the tile. Values and weights are >= 0, so a near entry is first marked -1 inside the vectorised
// loop and collected by a scalar scan of the (rare) rows that have one.
template <typename T, bool Laplace, bool Gradient>
void pass_rows(T* tile, const T* bz, const T* bx, int64_t r0, int64_t r1, int64_t C, int64_t ld, T sign,
               std::vector<int64_t>& near_out) {
  const T tiny = std::numeric_limits<T>::min();
  for (int64_t j = r0; j < r1; ++j) {
    T* row = tile + j * ld;
    const T bj = bz[j];
    int any_near = 0;
#pragma omp simd reduction(| : any_near)
    for (int64_t i = 0; i < C; ++i) {
      const T s = sign * row[i];
      const bool near = s <= bj + bx[i];
      const T v = Gradient ? gradient_weight(s > tiny ? s : tiny, Laplace)
                           : kernel_value(s > T(0) ? s : T(0), Laplace);
      row[i] = near ? T(-1) : v;
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

template <typename T, bool Laplace>
void pass_range(T* tile, const T* bz, const T* bx, int64_t r0, int64_t r1, int64_t C, int64_t ld, T sign,
                bool gradient, std::vector<int64_t>& near_out) {
  if (gradient) {
    pass_rows<T, Laplace, true>(tile, bz, bx, r0, r1, C, ld, sign, near_out);
  } else {
    pass_rows<T, Laplace, false>(tile, bz, bx, r0, r1, C, ld, sign, near_out);
  }
}

at::Tensor tile_pass_cpu(at::Tensor tile, const at::Tensor& bz, const at::Tensor& bx, double sign, bool laplace,
                         bool gradient) {
  TORCH_CHECK(tile.device().is_cpu(), "rfm_fast: tile_pass_ got a tile on ", tile.device());
  TORCH_CHECK(tile.scalar_type() == at::kFloat || tile.scalar_type() == at::kDouble,
              "rfm_fast: tile_pass_ takes float32 or float64 tiles, got ", tile.scalar_type());
  TORCH_CHECK(tile.dim() == 2 && tile.stride(1) == 1, "rfm_fast: the tile must be 2-D with unit column stride");
  TORCH_CHECK(bz.dim() == 1 && bz.size(0) == tile.size(0) && bz.is_contiguous(),
              "rfm_fast: bz must be contiguous with one entry per tile row");
  TORCH_CHECK(bx.dim() == 1 && bx.size(0) == tile.size(1) && bx.is_contiguous(),
              "rfm_fast: bx must be contiguous with one entry per tile column");
  TORCH_CHECK(bz.scalar_type() == tile.scalar_type() && bx.scalar_type() == tile.scalar_type(),
              "rfm_fast: bz and bx must have the tile's dtype");
  TORCH_CHECK(sign == 1.0 || sign == -1.0, "rfm_fast: sign must be +1 or -1");
  const int64_t R = tile.size(0), C = tile.size(1), ld = tile.stride(0);
  const int threads = at::get_num_threads();
  std::vector<std::vector<int64_t>> found(static_cast<size_t>(std::max(1, threads)));
  AT_DISPATCH_FLOATING_TYPES(tile.scalar_type(), "rfm_fast_tile_pass_cpu", [&] {
    scalar_t* tp = tile.data_ptr<scalar_t>();
    const scalar_t* bzp = bz.data_ptr<scalar_t>();
    const scalar_t* bxp = bx.data_ptr<scalar_t>();
    const auto sg = static_cast<scalar_t>(sign);
    // Grain: a few rows of work per task keeps both cores busy on one strip of a tile.
    at::parallel_for(0, R, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, C)), [&](int64_t r0, int64_t r1) {
      auto& mine = found[static_cast<size_t>(at::get_thread_num()) % found.size()];
      if (laplace) {
        pass_range<scalar_t, true>(tp, bzp, bxp, r0, r1, C, ld, sg, gradient, mine);
      } else {
        pass_range<scalar_t, false>(tp, bzp, bxp, r0, r1, C, ld, sg, gradient, mine);
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

}  // namespace

TORCH_LIBRARY_IMPL(rfm_fast, CPU, m) { m.impl("tile_pass_", &tile_pass_cpu); }

}  // namespace rfm_fast::cpu
