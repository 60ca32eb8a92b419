// Host-side argument checks of the CUDA ops declared in ops.cpp. The Python binding (rfm_fast/backends/cuda/ops.py)
// passes the kernel core's validated, contiguous arrays; these checks turn a misuse of the raw torch op into a
// clear error instead of a wild read.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace rfm_fast {

inline void check_matrix(const at::Tensor& t, const char* name, const at::Tensor& like, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.dim() == 2, "rfm_fast: ", name, " must be 2-D, got ", t.dim(), "-D");
  TORCH_CHECK(rows < 0 || t.size(0) == rows, "rfm_fast: ", name, " must have ", rows, " rows, got ", t.size(0));
  TORCH_CHECK(cols < 0 || t.size(1) == cols, "rfm_fast: ", name, " must have ", cols, " columns, got ", t.size(1));
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "rfm_fast: ", name, " must have dtype ", like.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "rfm_fast: ", name, " must be on ", like.device());
  TORCH_CHECK(t.is_contiguous(), "rfm_fast: ", name, " must be contiguous");
}

inline void check_vector(const at::Tensor& t, const char* name, const at::Tensor& like, int64_t size) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == size, "rfm_fast: ", name, " must have shape (", size, ",)");
  TORCH_CHECK(t.scalar_type() == like.scalar_type() && t.device() == like.device() && t.is_contiguous(),
              "rfm_fast: ", name, " must be contiguous, with the dtype and device of ze");
}

// Checks the arrays of the CUDA ops: ze (m, r), xe (n, r), norms and bounds, alpha (n, c), z (m, d), x (n, d) and
// the optional scaled factor F (d, r).
inline void check_geometry(const at::Tensor& ze, const at::Tensor& xe, const at::Tensor& zn, const at::Tensor& xn,
                           const at::Tensor& bz, const at::Tensor& bx, const at::Tensor& alpha, const at::Tensor& z,
                           const at::Tensor& x, const std::optional<at::Tensor>& F) {
  TORCH_CHECK(ze.scalar_type() == at::kFloat || ze.scalar_type() == at::kDouble,
              "rfm_fast: the compiled ops take float32 or float64, got ", ze.scalar_type());
  const int64_t m = ze.size(0), n = xe.size(0), r = ze.size(1), d = z.size(1);
  check_matrix(ze, "ze", ze, m, r);
  check_matrix(xe, "xe", ze, n, r);
  check_vector(zn, "zn", ze, m);
  check_vector(xn, "xn", ze, n);
  check_vector(bz, "bz", ze, m);
  check_vector(bx, "bx", ze, n);
  check_matrix(alpha, "alpha", ze, n, -1);
  check_matrix(z, "z", ze, m, d);
  check_matrix(x, "x", ze, n, d);
  if (F.has_value()) {
    check_matrix(*F, "F", ze, d, r);
  } else {
    TORCH_CHECK(d == r, "rfm_fast: without F the coordinates must have d = ", d, " columns");
  }
}

}  // namespace rfm_fast
