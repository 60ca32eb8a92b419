// CUDA implementations of rfm_fast::kernel_grad and rfm_fast::agop (schema and conventions: ../ops.cpp).
//
// Evaluation points are processed in chunks of tile_rows: the fused kernel (fused_tiles.cuh) fills the chunk's
// (rows, c + c d) accumulator, G = acc_alpha (x) zc - acc_V follows elementwise, and for the AGOP one GEMM
// G^T G per chunk is added in float64. `coeffs` is accepted for schema parity with the CPU op and not used: the
// kernel forms alpha (x) xc on the fly.
#include <tuple>

#include "host_args.cuh"

namespace rfm_fast::cuda {
namespace {

// G (rows, c, d) from the accumulator (rows, c + c d) and the chunk's centred points (rows, d).
at::Tensor gradient_from_accumulator(const at::Tensor& acc, const at::Tensor& zc_rows, int64_t c, int64_t d) {
  const int64_t rows = acc.size(0);
  return acc.narrow(1, 0, c).unsqueeze(2) * zc_rows.unsqueeze(1) - acc.narrow(1, c, c * d).view({rows, c, d});
}

template <typename Fn>
void for_chunks(const at::Tensor& zc, const at::Tensor& xc, const at::Tensor& alpha, const at::Tensor& z,
                const at::Tensor& x, const std::optional<at::Tensor>& S, const Prepared& p, bool direct,
                double scale, double rtol, int64_t tile_rows, Fn consume) {
  const int64_t m = zc.size(0), d = zc.size(1), c = alpha.size(1), width = c + c * d;
  at::Tensor acc = at::empty({std::min(tile_rows, m), width}, zc.options());
  AT_DISPATCH_FLOATING_TYPES(zc.scalar_type(), "rfm_fast_gradient_cuda", [&] {
    TileArgs<scalar_t> a = tile_args<scalar_t>(p, zc, xc, alpha, z, x, S, direct, scale, rtol, width);
    for (int64_t r0 = 0; r0 < m; r0 += tile_rows) {
      const int64_t rows = std::min(tile_rows, m - r0);
      at::Tensor chunk = acc.narrow(0, 0, rows);
      a.row0 = r0;
      a.rows = rows;
      a.out = chunk.data_ptr<scalar_t>();
      launch<scalar_t, true>(a, p.laplace);
      consume(r0, gradient_from_accumulator(chunk, zc.narrow(0, r0, rows), c, d));
    }
  });
}

at::Tensor kernel_grad_cuda(const at::Tensor& zc, const at::Tensor& xc, const at::Tensor& alpha,
                            const std::optional<at::Tensor>& coeffs, const at::Tensor& z, const at::Tensor& x,
                            const std::optional<at::Tensor>& S, const std::string& kernel, double scale, double rtol,
                            bool direct, int64_t tile_rows, int64_t tile_cols) {
  const c10::cuda::CUDAGuard guard(zc.device());
  const Prepared p = prepare(zc, xc, alpha, z, x, S, kernel, tile_rows);
  check_coeffs(coeffs, xc, alpha);
  at::Tensor out = at::empty({zc.size(0), alpha.size(1), zc.size(1)}, zc.options());
  for_chunks(zc, xc, alpha, z, x, S, p, direct, scale, rtol, tile_rows,
             [&](int64_t r0, const at::Tensor& G) { out.narrow(0, r0, G.size(0)).copy_(G); });
  return out;
}

std::tuple<at::Tensor, at::Tensor> agop_cuda(const at::Tensor& zc, const at::Tensor& xc, const at::Tensor& alpha,
                                             const std::optional<at::Tensor>& coeffs, const at::Tensor& z,
                                             const at::Tensor& x, const std::optional<at::Tensor>& S,
                                             const std::string& kernel, double scale, double rtol, bool direct,
                                             int64_t tile_rows, int64_t tile_cols) {
  const c10::cuda::CUDAGuard guard(zc.device());
  const Prepared p = prepare(zc, xc, alpha, z, x, S, kernel, tile_rows);
  check_coeffs(coeffs, xc, alpha);
  const int64_t d = zc.size(1), c = alpha.size(1);
  const auto f64 = zc.options().dtype(at::kDouble);
  at::Tensor outer = at::zeros({d, d}, f64);
  at::Tensor sums = at::zeros({c, d}, f64);
  for_chunks(zc, xc, alpha, z, x, S, p, direct, scale, rtol, tile_rows, [&](int64_t, const at::Tensor& G) {
    const at::Tensor flat = G.reshape({-1, d});
    outer.add_(at::mm(flat.t(), flat).to(at::kDouble));
    sums.add_(G.sum(0).to(at::kDouble));
  });
  return {outer, sums};
}

}  // namespace

TORCH_LIBRARY_IMPL(rfm_fast, CUDA, m) {
  m.impl("kernel_grad", &kernel_grad_cuda);
  m.impl("agop", &agop_cuda);
}

}  // namespace rfm_fast::cuda
