// CPU implementation of rfm_fast::kernel_mv (schema and conventions: ../ops.cpp).
//
// Per block of evaluation points and block of centres: one GEMM for the dot products, one fused pass turning
// them into kernel values in cache (near pairs recomputed exactly from (z - x) S), one GEMM into the output rows.
// Row blocks are split over threads (ATen parallel_for); each thread owns its output rows, so no reduction.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../checks.h"
#include "serial_blas.h"
#include "tile_math.h"

namespace rfm_fast::cpu {
namespace {

template <typename T, bool Laplace>
void kernel_mv_rows(const at::Tensor& zc, const at::Tensor& xc, const at::Tensor& alpha, const T* z, const T* x,
                    const T* S, MetricKind kind, const T* zn, const T* xn, T scale, T rtol, int64_t r0, int64_t r1,
                    int64_t tile_cols, at::Tensor& tile_buf, T* u, at::Tensor& out) {
  const int64_t R = r1 - r0, n = xc.size(0), d = zc.size(1);
  at::Tensor acc = out.narrow(0, r0, R);
  const at::Tensor zrows = zc.narrow(0, r0, R);
  for (int64_t c0 = 0; c0 < n; c0 += tile_cols) {
    const int64_t C = std::min(tile_cols, n - c0);
    at::Tensor tile = tile_buf.narrow(0, 0, R * C).view({R, C});
    at::mm_out(tile, zrows, xc.narrow(0, c0, C).t());
    T* tp = tile.data_ptr<T>();
    for (int64_t jj = 0; jj < R; ++jj) {
      T* row = tp + jj * C;
      const T znj = zn[r0 + jj];
      const T* xnc = xn + c0;
      int any_near = 0;
#pragma omp simd reduction(| : any_near)
      for (int64_t ii = 0; ii < C; ++ii) {
        const T norms = znj + xnc[ii];
        const T sq = norms - T(2) * row[ii];
        const bool near = sq <= rtol * norms;
        T s = sq * scale;
        s = s > T(0) ? s : T(0);
        const T k = kernel_value(s, Laplace);
        row[ii] = near ? T(-1) : k;
        any_near |= near ? 1 : 0;
      }
      if (any_near) {
        for (int64_t ii = 0; ii < C; ++ii) {
          if (row[ii] < T(0)) {
            const T sq = exact_difference(z + (r0 + jj) * d, x + (c0 + ii) * d, S, kind, d, u);
            row[ii] = kernel_value(sq * scale, Laplace);
          }
        }
      }
    }
    acc.addmm_(tile, alpha.narrow(0, c0, C));
  }
}

template <typename T, bool Laplace>
void kernel_mv_rows_direct(const T* z, const T* x, const T* alpha, const T* S, MetricKind kind, int64_t n,
                           int64_t d, int64_t c, T scale, int64_t r0, int64_t r1, T* u, T* out) {
  for (int64_t j = r0; j < r1; ++j) {
    T* oj = out + j * c;
    for (int64_t i = 0; i < n; ++i) {
      const T k = kernel_value(exact_difference(z + j * d, x + i * d, S, kind, d, u) * scale, Laplace);
      for (int64_t q = 0; q < c; ++q) oj[q] += k * alpha[i * c + q];
    }
  }
}

at::Tensor kernel_mv_cpu(const at::Tensor& zc, const at::Tensor& xc, const at::Tensor& alpha, const at::Tensor& z,
                         const at::Tensor& x, const std::optional<at::Tensor>& S, const std::string& kernel,
                         double scale, double rtol, bool direct, int64_t tile_rows, int64_t tile_cols) {
  TORCH_CHECK(zc.device().is_cpu(), "rfm_fast: the CPU op got tensors on ", zc.device());
  const MetricKind kind = check_pair_args(zc, xc, alpha, z, x, S);
  TORCH_CHECK(tile_rows > 0 && tile_cols > 0, "rfm_fast: tile sizes must be positive");
  const bool laplace = is_laplace(kernel);
  const int64_t m = zc.size(0), n = xc.size(0), d = zc.size(1), c = alpha.size(1);
  at::Tensor out = at::zeros({m, c}, zc.options());
  if (m == 0 || n == 0) return out;
  const at::Tensor zn = (zc * zc).sum(1), xn = (xc * xc).sum(1);
  const int64_t blocks = (m + tile_rows - 1) / tile_rows;
  AT_DISPATCH_FLOATING_TYPES(zc.scalar_type(), "rfm_fast_kernel_mv_cpu", [&] {
    using T = scalar_t;
    const T* Sp = S.has_value() ? S->data_ptr<T>() : nullptr;
    const T s = static_cast<T>(scale), rt = static_cast<T>(rtol);
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      const SerialBlasScope serial_blas(at::in_parallel_region());
      at::Tensor tile_buf = at::empty({std::min(tile_rows, m) * std::min(tile_cols, n)}, zc.options());
      std::vector<T> u(d);
      for (int64_t b = begin; b < end; ++b) {
        const int64_t r0 = b * tile_rows, r1 = std::min(m, r0 + tile_rows);
        if (direct) {
          auto run = laplace ? kernel_mv_rows_direct<T, true> : kernel_mv_rows_direct<T, false>;
          run(z.data_ptr<T>(), x.data_ptr<T>(), alpha.data_ptr<T>(), Sp, kind, n, d, c, s, r0, r1, u.data(),
              out.data_ptr<T>());
        } else {
          auto run = laplace ? kernel_mv_rows<T, true> : kernel_mv_rows<T, false>;
          run(zc, xc, alpha, z.data_ptr<T>(), x.data_ptr<T>(), Sp, kind, zn.data_ptr<T>(), xn.data_ptr<T>(), s, rt,
              r0, r1, tile_cols, tile_buf, u.data(), out);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rfm_fast, CPU, m) { m.impl("kernel_mv", &kernel_mv_cpu); }

}  // namespace rfm_fast::cpu
