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
  // One output (c = 1), instead of ``out``: acc_rows[q * rows_plane + j] += sum_i w dhi_q alpha_cols[i] and, with
  // alpha_rows, the mirrored side's col_acc[q * C + i] -= sum_j w dhi_q alpha_rows[j] (per thread, summed after).
  const T* alpha_cols = nullptr;
  const T* alpha_rows = nullptr;
  T* acc_rows = nullptr;
  int64_t rows_plane = 0;
};

// One gradient row with the direct part summed in the pass (one output): acc_rows[q][j] += sum_i w dhi_q alpha_i
// and, ``Mirror``, col_acc[q][i] -= w dhi_q alpha_j. Returns whether the row has a near entry (marked -1).
template <typename T, bool Laplace, int K, bool Mirror>
int sum_row(T* row, T bj, const T* bx, int64_t C, T sign, T z0, T z1, T z2, T z3, const T* x0, const T* x1,
            const T* x2, const T* x3, const Direct<T>& dir, int64_t j, T* col_acc) {
  const T tiny = std::numeric_limits<T>::min();
  const T* ac = dir.alpha_cols;
  const T aj = Mirror ? dir.alpha_rows[j] : T(0);
  T* c0 = col_acc;
  T* c1 = Mirror ? col_acc + C : nullptr;
  T* c2 = Mirror ? col_acc + 2 * C : nullptr;
  T* c3 = Mirror ? col_acc + 3 * C : nullptr;
  T a0 = T(0), a1 = T(0), a2 = T(0), a3 = T(0);
  int any_near = 0;
#pragma omp simd reduction(| : any_near) reduction(+ : a0, a1, a2, a3)
  for (int64_t i = 0; i < C; ++i) {
    T s = sign * row[i];
    const T e0 = z0 - x0[i], e1 = K > 1 ? z1 - x1[i] : T(0);
    const T e2 = K > 2 ? z2 - x2[i] : T(0), e3 = K > 3 ? z3 - x3[i] : T(0);
    s += e0 * e0 + e1 * e1 + e2 * e2 + e3 * e3;
    const bool near = s <= bj + bx[i];
    const T v = gradient_weight(s > tiny ? s : tiny, Laplace);
    const T w = near ? T(0) : v;
    const T wa = w * ac[i];
    a0 += wa * e0;
    if (K > 1) a1 += wa * e1;
    if (K > 2) a2 += wa * e2;
    if (K > 3) a3 += wa * e3;
    if (Mirror) {
      const T wj = w * aj;
      c0[i] -= wj * e0;
      if (K > 1) c1[i] -= wj * e1;
      if (K > 2) c2[i] -= wj * e2;
      if (K > 3) c3[i] -= wj * e3;
    }
    row[i] = near ? T(-1) : v;
    any_near |= near ? 1 : 0;
  }
  T* ar = dir.acc_rows + j;
  ar[0] += a0;
  if (K > 1) ar[dir.rows_plane] += a1;
  if (K > 2) ar[2 * dir.rows_plane] += a2;
  if (K > 3) ar[3 * dir.rows_plane] += a3;
  return any_near;
}

// Rows r0 .. r1 of the tile. Values and weights are >= 0, so a near entry is first marked -1 inside the vectorised
// loop and collected by a scalar scan of the (rare) rows that have one.
template <typename T, bool Laplace, bool Gradient, int K>
void pass_rows(T* tile, const T* bz, const T* bx, int64_t r0, int64_t r1, int64_t C, int64_t ld, T sign,
               const Direct<T>& dir, std::vector<int64_t>& near_out, T* col_acc) {
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
    const bool accumulate = Gradient && K > 0 && dir.acc_rows != nullptr;
    T* d0 = (K > 0 && Gradient && !accumulate) ? dir.out + j * dir.ld : nullptr;
    T* d1 = d0 + dir.plane;
    T* d2 = d1 + dir.plane;
    T* d3 = d2 + dir.plane;
    int any_near = 0;
    if (accumulate) {
      if (col_acc != nullptr) {
        any_near = sum_row<T, Laplace, K, true>(row, bj, bx, C, sign, z0, z1, z2, z3, x0, x1, x2, x3, dir, j, col_acc);
      } else {
        any_near = sum_row<T, Laplace, K, false>(row, bj, bx, C, sign, z0, z1, z2, z3, x0, x1, x2, x3, dir, j, col_acc);
      }
    } else {
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
            const Direct<T>& dir, std::vector<int64_t>& near_out, T* col_acc) {
  switch (dir.k) {
    case 0: return pass_rows<T, Laplace, Gradient, 0>(tile, bz, bx, r0, r1, C, ld, sign, dir, near_out, col_acc);
    case 1: return pass_rows<T, Laplace, Gradient, 1>(tile, bz, bx, r0, r1, C, ld, sign, dir, near_out, col_acc);
    case 2: return pass_rows<T, Laplace, Gradient, 2>(tile, bz, bx, r0, r1, C, ld, sign, dir, near_out, col_acc);
    case 3: return pass_rows<T, Laplace, Gradient, 3>(tile, bz, bx, r0, r1, C, ld, sign, dir, near_out, col_acc);
    default: return pass_rows<T, Laplace, Gradient, 4>(tile, bz, bx, r0, r1, C, ld, sign, dir, near_out, col_acc);
  }
}

template <typename T, bool Laplace>
void pass_range(T* tile, const T* bz, const T* bx, int64_t r0, int64_t r1, int64_t C, int64_t ld, T sign,
                bool gradient, const Direct<T>& dir, std::vector<int64_t>& near_out, T* col_acc) {
  if (gradient) {
    pass_k<T, Laplace, true>(tile, bz, bx, r0, r1, C, ld, sign, dir, near_out, col_acc);
  } else {
    pass_k<T, Laplace, false>(tile, bz, bx, r0, r1, C, ld, sign, dir, near_out, col_acc);
  }
}

at::Tensor tile_pass_cpu(at::Tensor tile, const at::Tensor& bz, const at::Tensor& bx, double sign, bool laplace,
                         bool gradient, const std::optional<at::Tensor>& zh, const std::optional<at::Tensor>& xh,
                         const std::optional<at::Tensor>& dout, const std::optional<at::Tensor>& alpha_cols,
                         const std::optional<at::Tensor>& alpha_rows, const std::optional<at::Tensor>& acc_rows,
                         const std::optional<at::Tensor>& acc_cols) {
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
  const bool accumulate = gradient && k > 0 && acc_rows.has_value();
  const bool mirrored = accumulate && acc_cols.has_value();
  if (accumulate) {
    TORCH_CHECK(alpha_cols.has_value() && alpha_cols->dim() == 1 && alpha_cols->size(0) == C &&
                    alpha_cols->is_contiguous() && alpha_cols->scalar_type() == tile.scalar_type(),
                "rfm_fast: acc_rows needs alpha_cols, contiguous (cols,) of the tile's dtype");
    TORCH_CHECK(acc_rows->dim() == 2 && acc_rows->size(0) == k && acc_rows->size(1) == R && acc_rows->stride(1) == 1 &&
                    acc_rows->scalar_type() == tile.scalar_type(),
                "rfm_fast: acc_rows must be (k, rows) with unit row stride");
    if (mirrored) {
      TORCH_CHECK(alpha_rows.has_value() && alpha_rows->dim() == 1 && alpha_rows->size(0) == R &&
                      alpha_rows->is_contiguous() && alpha_rows->scalar_type() == tile.scalar_type(),
                  "rfm_fast: acc_cols needs alpha_rows, contiguous (rows,) of the tile's dtype");
      TORCH_CHECK(acc_cols->dim() == 2 && acc_cols->size(0) == k && acc_cols->size(1) == C &&
                      acc_cols->stride(1) == 1 && acc_cols->scalar_type() == tile.scalar_type(),
                  "rfm_fast: acc_cols must be (k, cols) with unit row stride");
    }
  } else if (gradient && k > 0) {
    TORCH_CHECK(dout.has_value() && dout->dim() == 3 && dout->size(0) == k && dout->size(1) == R &&
                    dout->size(2) == C && dout->stride(2) == 1 && dout->scalar_type() == tile.scalar_type(),
                "rfm_fast: a gradient pass with direct coordinates needs dout (k, rows, cols) or acc_rows");
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
      if (accumulate) {
        dir.alpha_cols = alpha_cols->data_ptr<scalar_t>();
        dir.acc_rows = acc_rows->data_ptr<scalar_t>();
        dir.rows_plane = acc_rows->stride(0);
        if (mirrored) dir.alpha_rows = alpha_rows->data_ptr<scalar_t>();
      } else if (gradient) {
        dir.out = dout->data_ptr<scalar_t>();
        dir.plane = dout->stride(0);
        dir.ld = dout->stride(1);
      }
    }
    // The mirrored side's sums, one (k, C) buffer per thread (rows are split between threads), added at the end.
    std::vector<std::vector<scalar_t>> col_sums(mirrored ? found.size() : 0);
    for (auto& b : col_sums) b.assign(static_cast<size_t>(k * C), scalar_t(0));
#ifdef _OPENMP
    // This extension links the compiler's OpenMP runtime, not torch's bundled one: its team follows torch's count.
    if (omp_get_max_threads() != threads) omp_set_num_threads(threads);
#endif
    // Grain: a few rows of work per task keeps both cores busy on one strip of a tile.
    at::parallel_for(0, R, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, C * (1 + k))), [&](int64_t r0,
                                                                                                   int64_t r1) {
      const size_t me = static_cast<size_t>(at::get_thread_num()) % found.size();
      auto& mine = found[me];
      scalar_t* col_acc = mirrored ? col_sums[me].data() : nullptr;
      if (laplace) {
        pass_range<scalar_t, true>(tp, bzp, bxp, r0, r1, C, ld, sg, gradient, dir, mine, col_acc);
      } else {
        pass_range<scalar_t, false>(tp, bzp, bxp, r0, r1, C, ld, sg, gradient, dir, mine, col_acc);
      }
    });
    if (mirrored) {
      scalar_t* ac = acc_cols->data_ptr<scalar_t>();
      const int64_t plane = acc_cols->stride(0);
      for (const auto& b : col_sums) {
        for (int64_t q = 0; q < k; ++q) {
          for (int64_t i = 0; i < C; ++i) ac[q * plane + i] += b[static_cast<size_t>(q * C + i)];
        }
      }
    }
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
