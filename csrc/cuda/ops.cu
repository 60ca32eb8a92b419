// CUDA implementations of rfm_fast::kernel_mv and rfm_fast::kernel_grad (schema and conventions: ../ops.cpp).
// Both run the fused tile kernel (fused_tiles.cuh) over chunks of tile_rows evaluation points: in value mode it
// writes f = K(z, x) alpha, in gradient mode each row's (c + c r) accumulator, from which the core
// (rfm_fast/backends/cuda/ops.py) forms G~ and folds the AGOP.
#include "host_args.cuh"

namespace rfm_fast::cuda {
namespace {

template <bool Gradient>
at::Tensor run(const at::Tensor& ze, const at::Tensor& xe, const at::Tensor& zn, const at::Tensor& xn,
               const at::Tensor& bz, const at::Tensor& bx, const at::Tensor& alpha, const at::Tensor& z,
               const at::Tensor& x, const std::optional<at::Tensor>& F, double sigma, bool laplace, bool direct,
               int64_t tile_rows) {
  TORCH_CHECK(ze.is_cuda(), "rfm_fast: the CUDA op got tensors on ", ze.device());
  const c10::cuda::CUDAGuard guard(ze.device());
  check_geometry(ze, xe, zn, xn, bz, bx, alpha, z, x, F);
  TORCH_CHECK(tile_rows > 0, "rfm_fast: tile_rows must be positive");
  const int64_t m = ze.size(0), c = alpha.size(1);
  const int64_t width = Gradient ? c * (1 + ze.size(1)) : c;
  at::Tensor out = at::zeros({m, width}, ze.options());
  if (m == 0 || xe.size(0) == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(ze.scalar_type(), "rfm_fast_fused_tiles_cuda", [&] {
    TileArgs<scalar_t> a = tile_args<scalar_t>(ze, xe, zn, xn, bz, bx, alpha, z, x, F, sigma, direct, width);
    for (int64_t r0 = 0; r0 < m; r0 += tile_rows) {
      a.row0 = r0;
      a.rows = std::min(tile_rows, m - r0);
      a.out = out.data_ptr<scalar_t>() + r0 * width;
      launch<scalar_t, Gradient>(a, laplace);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rfm_fast, CUDA, m) {
  m.impl("kernel_mv", &run<false>);
  m.impl("kernel_grad", &run<true>);
}

}  // namespace rfm_fast::cuda
