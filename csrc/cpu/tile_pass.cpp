// CPU implementation of rfm_fast::tile_pass_ (schema: ../ops.cpp): the elementwise half of a kernel or gradient
// tile in one pass over memory, for the tile schedules of the kernel core (rfm_fast/core/tiles.py,
// ElementwisePass), used by the cpp backend. Directly formed coordinates (zh, xh: their high parts; the core's GEMM
// carries the compensation terms) are added to s in the same pass, and a gradient pass writes w * (hi_z - hi_x)
// to dout for the core's direct products.
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

#ifdef _OPENMP
#include <omp.h>
#endif

namespace rfm_fast::cpu {
namespace {

// Directly formed coordinates handled inside the pass: dhi = hi_z - hi_x for each of k coordinates adds dhi^2 to
// s, and a gradient pass writes w * dhi to out[q] (the (k, R, ld) buffers the core multiplies by alpha).
template <typename T>
struct Direct {
  const T* zh = nullptr;  // (R, k) rows' high parts
  const T* xh = nullptr;  // (k, C) columns' high parts, one contiguous row per coordinate
  T* out = nullptr;       // (k, R, C_ld) weighted differences, or nullptr
  int64_t k = 0, plane = 0, ld = 0, cols = 0;
};

// Rows r0 .. r1 of the tile. Values and weights are >= 0, so a near entry is first marked -1 inside the vectorised
// loop and collected by a scalar scan of the (rare) rows that have one.
template <typename T, bool Laplace, bool Gradient, int K>
void pass_rows(T* tile, const T* bz, const T* bx, int64_t r0, int64_t r1, int64_t C, int64_t ld, T sign,
               const Direct<T>& dir, std::vector<int64_t>& near_out) {
  const T tiny = std::numeric_limits<T>::min();
  for (int64_t j = r0; j < r1; ++j) {
    T* row = tile + j * ld;
    const T bj = bz[j];
    // Up to four coordinates, unrolled by hand so the loop below only sees scalars and contiguous loads.
    const T z0 = K > 0 ? dir.zh[j * K] : T(0), z1 = K > 1 ? dir.zh[j * K + 1] : T(0);
    const T z2 = K > 2 ? dir.zh[j * K + 2] : T(0), z3 = K > 3 ? dir.zh[j * K + 3] : T(0);
    const T* x0 = dir.xh;
    const T* x1 = dir.xh + dir.cols;
    const T* x2 = dir.xh + 2 * dir.cols;
    const T* x3 = dir.xh + 3 * dir.cols;
    T* d0 = (K > 0 && Gradient) ? dir.out + j * dir.ld : nullptr;
    T* d1 = d0 + dir.plane;
    T* d2 = d1 + dir.plane;
    T* d3 = d2 + dir.plane;
    int any_near = 0;
#pragma omp simd reduction(| : any_near)
    for (int64_t i = 0; i < C; ++i) {
      T s = sign * row[i];
      const T e0 = K > 0 ? z0 - x0[i] : T(0), e1 = K > 1 ? z1 - x1[i] : T(0);
      const T e2 = K > 2 ? z2 - x2[i] : T(0), e3 = K > 3 ? z3 - x3[i] : T(0);
      s += e0 * e0 + e1 * e1 + e2 * e2 + e3 * e3;
      const bool near = s <= bj + bx[i];
      const T v = Gradient ? gradient_weight(s > tiny ? s : tiny, Laplace)
                           : kernel_value(s > T(0) ? s : T(0), Laplace);
      if (Gradient && K > 0) {
        const T w = near ? T(0) : v;
        d0[i] = w * e0;
        if (K > 1) d1[i] = w * e1;
        if (K > 2) d2[i] = w * e2;
        if (K > 3) d3[i] = w * e3;
      }
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

template <typename T, bool Laplace, bool Gradient>
void pass_k(T* tile, const T* bz, const T* bx, int64_t r0, int64_t r1, int64_t C, int64_t ld, T sign,
            const Direct<T>& dir, std::vector<int64_t>& near_out) {
  switch (dir.k) {
    case 0: return pass_rows<T, Laplace, Gradient, 0>(tile, bz, bx, r0, r1, C, ld, sign, dir, near_out);
    case 1: return pass_rows<T, Laplace, Gradient, 1>(tile, bz, bx, r0, r1, C, ld, sign, dir, near_out);
    case 2: return pass_rows<T, Laplace, Gradient, 2>(tile, bz, bx, r0, r1, C, ld, sign, dir, near_out);
    case 3: return pass_rows<T, Laplace, Gradient, 3>(tile, bz, bx, r0, r1, C, ld, sign, dir, near_out);
    default: return pass_rows<T, Laplace, Gradient, 4>(tile, bz, bx, r0, r1, C, ld, sign, dir, near_out);
  }
}

template <typename T, bool Laplace>
void pass_range(T* tile, const T* bz, const T* bx, int64_t r0, int64_t r1, int64_t C, int64_t ld, T sign,
                bool gradient, const Direct<T>& dir, std::vector<int64_t>& near_out) {
  if (gradient) {
    pass_k<T, Laplace, true>(tile, bz, bx, r0, r1, C, ld, sign, dir, near_out);
  } else {
    pass_k<T, Laplace, false>(tile, bz, bx, r0, r1, C, ld, sign, dir, near_out);
  }
}

at::Tensor tile_pass_cpu(at::Tensor tile, const at::Tensor& bz, const at::Tensor& bx, double sign, bool laplace,
                         bool gradient, const std::optional<at::Tensor>& zh, const std::optional<at::Tensor>& xh,
                         const std::optional<at::Tensor>& dout) {
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
  const int64_t k = zh.has_value() ? zh->size(1) : 0;
  TORCH_CHECK(zh.has_value() == xh.has_value(), "rfm_fast: zh and xh come together");
  if (k > 0) {
    TORCH_CHECK(k <= 4, "rfm_fast: at most 4 directly formed coordinates");
    TORCH_CHECK(zh->dim() == 2 && zh->size(0) == R && zh->is_contiguous() && zh->scalar_type() == tile.scalar_type(),
                "rfm_fast: zh must be a contiguous (rows, k) tensor of the tile's dtype");
    TORCH_CHECK(xh->dim() == 2 && xh->size(0) == k && xh->size(1) == C && xh->is_contiguous() &&
                    xh->scalar_type() == tile.scalar_type(),
                "rfm_fast: xh must be a contiguous (k, cols) tensor of the tile's dtype");
  }
  if (gradient && k > 0) {
    TORCH_CHECK(dout.has_value() && dout->dim() == 3 && dout->size(0) == k && dout->size(1) == R &&
                    dout->size(2) == C && dout->stride(2) == 1 && dout->scalar_type() == tile.scalar_type(),
                "rfm_fast: a gradient pass with direct coordinates needs dout (k, rows, cols)");
  }
  const int threads = at::get_num_threads();
  std::vector<std::vector<int64_t>> found(static_cast<size_t>(std::max(1, threads)));
  AT_DISPATCH_FLOATING_TYPES(tile.scalar_type(), "rfm_fast_tile_pass_cpu", [&] {
    scalar_t* tp = tile.data_ptr<scalar_t>();
    const scalar_t* bzp = bz.data_ptr<scalar_t>();
    const scalar_t* bxp = bx.data_ptr<scalar_t>();
    const auto sg = static_cast<scalar_t>(sign);
    Direct<scalar_t> dir;
    if (k > 0) {
      dir.k = k;
      dir.zh = zh->data_ptr<scalar_t>();
      dir.xh = xh->data_ptr<scalar_t>();
      dir.cols = C;
      if (gradient) {
        dir.out = dout->data_ptr<scalar_t>();
        dir.plane = dout->stride(0);
        dir.ld = dout->stride(1);
      }
    }
#ifdef _OPENMP
    // This extension links the compiler's OpenMP runtime, not torch's bundled one: its team follows torch's count.
    if (omp_get_max_threads() != threads) omp_set_num_threads(threads);
#endif
    // Grain: a few rows of work per task keeps both cores busy on one strip of a tile.
    at::parallel_for(0, R, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, C * (1 + k))), [&](int64_t r0,
                                                                                                   int64_t r1) {
      auto& mine = found[static_cast<size_t>(at::get_thread_num()) % found.size()];
      if (laplace) {
        pass_range<scalar_t, true>(tp, bzp, bxp, r0, r1, C, ld, sg, gradient, dir, mine);
      } else {
        pass_range<scalar_t, false>(tp, bzp, bxp, r0, r1, C, ld, sg, gradient, dir, mine);
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
