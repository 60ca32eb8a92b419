// CPU implementations of rfm_fast::kernel_grad and rfm_fast::agop (schema and conventions: ../ops.cpp).
//
// Parallelism: the blocks of evaluation points are split into one contiguous range per thread (ATen's
// parallel_for, OpenMP in the torch builds we target); GEMMs inside a thread run single-threaded, so a thread
// owns its tiles end to end. For the AGOP each thread keeps its own float64 partial sums and the partials are
// added in thread order at the end: the result does not depend on scheduling for a given thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "../checks.h"
#include "gradient_tiles.h"
#include "serial_blas.h"

namespace rfm_fast::cpu {
namespace {

struct Prepared {
  at::Tensor zn, xn;
  MetricKind kind;
  bool laplace;
};

Prepared prepare(const at::Tensor& zc, const at::Tensor& xc, const at::Tensor& alpha,
                 const std::optional<at::Tensor>& coeffs, const at::Tensor& z, const at::Tensor& x,
                 const std::optional<at::Tensor>& S, const std::string& kernel, int64_t tile_rows,
                 int64_t tile_cols) {
  TORCH_CHECK(zc.device().is_cpu(), "rfm_fast: the CPU op got tensors on ", zc.device());
  const MetricKind kind = check_pair_args(zc, xc, alpha, z, x, S);
  check_coeffs(coeffs, xc, alpha);
  TORCH_CHECK(tile_rows > 0 && tile_cols > 0, "rfm_fast: tile sizes must be positive");
  return {(zc * zc).sum(1), (xc * xc).sum(1), kind, is_laplace(kernel)};
}

template <typename T>
Geometry<T> geometry(const Prepared& p, const at::Tensor& zc, const at::Tensor& xc, const at::Tensor& alpha,
                     const at::Tensor& z, const at::Tensor& x, const std::optional<at::Tensor>& S, double scale,
                     double rtol) {
  return {zc.data_ptr<T>(), xc.data_ptr<T>(), p.zn.data_ptr<T>(), p.xn.data_ptr<T>(), z.data_ptr<T>(),
          x.data_ptr<T>(), S.has_value() ? S->data_ptr<T>() : nullptr, alpha.data_ptr<T>(), p.kind,
          zc.size(0), xc.size(0), zc.size(1), alpha.size(1), static_cast<T>(scale), static_cast<T>(rtol)};
}

// Runs `body(part, r0, r1, workspace)` over blocks of tile_rows evaluation points: one contiguous range of
// blocks per part, parts <= threads, one workspace per part.
template <typename T, typename Body>
void for_row_blocks(const Geometry<T>& g, const at::Tensor& like, bool need_coeff_tile, bool need_gram,
                    int64_t tile_rows, int64_t tile_cols, int64_t parts, Body body) {
  const int64_t blocks = (g.m + tile_rows - 1) / tile_rows;
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    const SerialBlasScope serial_blas(at::in_parallel_region());
    for (int64_t p = begin; p < end; ++p) {
      Workspace ws(like, std::min(tile_rows, g.m), std::max<int64_t>(1, std::min(tile_cols, g.n)), g.c, g.d,
                   need_coeff_tile, need_gram);
      for (int64_t b = p * blocks / parts; b < (p + 1) * blocks / parts; ++b) {
        body(p, b * tile_rows, std::min(g.m, (b + 1) * tile_rows), ws);
      }
    }
  });
}

template <typename T, bool Laplace>
void gradient_block(const Geometry<T>& g, const at::Tensor& zc, const at::Tensor& xc,
                    const std::optional<at::Tensor>& coeffs, bool direct, int64_t r0, int64_t r1,
                    int64_t tile_cols, Workspace& ws, T* G) {
  if (direct) {
    gradient_rows_direct<T, Laplace>(g, r0, r1, ws, G);
  } else {
    gradient_rows<T, Laplace>(g, zc, xc, coeffs, r0, r1, tile_cols, ws, G);
  }
}

int64_t part_count(int64_t m, int64_t tile_rows) {
  const int64_t blocks = (m + tile_rows - 1) / tile_rows;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks));
}

at::Tensor kernel_grad_cpu(const at::Tensor& zc, const at::Tensor& xc, const at::Tensor& alpha,
                           const std::optional<at::Tensor>& coeffs, const at::Tensor& z, const at::Tensor& x,
                           const std::optional<at::Tensor>& S, const std::string& kernel, double scale, double rtol,
                           bool direct, int64_t tile_rows, int64_t tile_cols) {
  const Prepared prep = prepare(zc, xc, alpha, coeffs, z, x, S, kernel, tile_rows, tile_cols);
  const int64_t m = zc.size(0), d = zc.size(1), c = alpha.size(1);
  at::Tensor out = at::empty({m, c, d}, zc.options());
  if (m == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(zc.scalar_type(), "rfm_fast_kernel_grad_cpu", [&] {
    const Geometry<scalar_t> g = geometry<scalar_t>(prep, zc, xc, alpha, z, x, S, scale, rtol);
    scalar_t* outp = out.data_ptr<scalar_t>();
    for_row_blocks(g, zc, !coeffs.has_value() && !direct, false, tile_rows, tile_cols, part_count(m, tile_rows),
                   [&](int64_t, int64_t r0, int64_t r1, Workspace& ws) {
                     scalar_t* G = outp + r0 * c * d;
                     if (prep.laplace) {
                       gradient_block<scalar_t, true>(g, zc, xc, coeffs, direct, r0, r1, tile_cols, ws, G);
                     } else {
                       gradient_block<scalar_t, false>(g, zc, xc, coeffs, direct, r0, r1, tile_cols, ws, G);
                     }
                   });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> agop_cpu(const at::Tensor& zc, const at::Tensor& xc, const at::Tensor& alpha,
                                            const std::optional<at::Tensor>& coeffs, const at::Tensor& z,
                                            const at::Tensor& x, const std::optional<at::Tensor>& S,
                                            const std::string& kernel, double scale, double rtol, bool direct,
                                            int64_t tile_rows, int64_t tile_cols) {
  const Prepared prep = prepare(zc, xc, alpha, coeffs, z, x, S, kernel, tile_rows, tile_cols);
  const int64_t m = zc.size(0), d = zc.size(1), c = alpha.size(1);
  const int64_t parts = part_count(m, tile_rows);
  const auto f64 = zc.options().dtype(at::kDouble);
  at::Tensor outer_parts = at::zeros({parts, d, d}, f64);
  at::Tensor sum_parts = at::zeros({parts, c, d}, f64);
  if (m > 0) {
    AT_DISPATCH_FLOATING_TYPES(zc.scalar_type(), "rfm_fast_agop_cpu", [&] {
      const Geometry<scalar_t> g = geometry<scalar_t>(prep, zc, xc, alpha, z, x, S, scale, rtol);
      double* outer_all = outer_parts.data_ptr<double>();
      double* sum_all = sum_parts.data_ptr<double>();
      for_row_blocks(g, zc, !coeffs.has_value() && !direct, true, tile_rows, tile_cols, parts,
                     [&](int64_t p, int64_t r0, int64_t r1, Workspace& ws) {
                       const int64_t R = r1 - r0;
                       at::Tensor G = ws.grad.narrow(0, 0, R * c);
                       at::Tensor& gram = ws.gram;
                       scalar_t* Gp = G.data_ptr<scalar_t>();
                       if (prep.laplace) {
                         gradient_block<scalar_t, true>(g, zc, xc, coeffs, direct, r0, r1, tile_cols, ws, Gp);
                       } else {
                         gradient_block<scalar_t, false>(g, zc, xc, coeffs, direct, r0, r1, tile_cols, ws, Gp);
                       }
                       // The block's Gram matrix in the working dtype (a sum over R * c rows), added in float64.
                       at::mm_out(gram, G.t(), G);
                       const scalar_t* gp = gram.data_ptr<scalar_t>();
                       double* outer = outer_all + p * d * d;
                       for (int64_t e = 0; e < d * d; ++e) outer[e] += static_cast<double>(gp[e]);
                       double* sums = sum_all + p * c * d;
                       for (int64_t jj = 0; jj < R; ++jj) {
                         for (int64_t e = 0; e < c * d; ++e) sums[e] += static_cast<double>(Gp[jj * c * d + e]);
                       }
                     });
    });
  }
  at::Tensor outer = outer_parts[0].clone();
  at::Tensor sums = sum_parts[0].clone();
  for (int64_t p = 1; p < parts; ++p) {
    outer.add_(outer_parts[p]);
    sums.add_(sum_parts[p]);
  }
  return {outer, sums};
}

}  // namespace

TORCH_LIBRARY_IMPL(rfm_fast, CPU, m) {
  m.impl("kernel_grad", &kernel_grad_cpu);
  m.impl("agop", &agop_cpu);
}

}  // namespace rfm_fast::cpu
