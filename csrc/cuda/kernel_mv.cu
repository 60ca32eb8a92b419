// CUDA implementation of rfm_fast::kernel_mv (schema and conventions: ../ops.cpp): the fused tile kernel in
// value mode writes f = K(z, x) @ alpha directly, one launch for all rows.
#include "host_args.cuh"

namespace rfm_fast::cuda {
namespace {

at::Tensor kernel_mv_cuda(const at::Tensor& zc, const at::Tensor& xc, const at::Tensor& alpha, const at::Tensor& z,
                          const at::Tensor& x, const std::optional<at::Tensor>& S, const std::string& kernel,
                          double scale, double rtol, bool direct, int64_t tile_rows, int64_t tile_cols) {
  const c10::cuda::CUDAGuard guard(zc.device());
  const Prepared p = prepare(zc, xc, alpha, z, x, S, kernel, tile_rows);
  const int64_t m = zc.size(0), c = alpha.size(1);
  at::Tensor out = at::empty({m, c}, zc.options());
  if (xc.size(0) == 0) return out.zero_();
  AT_DISPATCH_FLOATING_TYPES(zc.scalar_type(), "rfm_fast_kernel_mv_cuda", [&] {
    TileArgs<scalar_t> a = tile_args<scalar_t>(p, zc, xc, alpha, z, x, S, direct, scale, rtol, c);
    a.rows = m;
    a.out = out.data_ptr<scalar_t>();
    launch<scalar_t, false>(a, p.laplace);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rfm_fast, CUDA, m) { m.impl("kernel_mv", &kernel_mv_cuda); }

}  // namespace rfm_fast::cuda
