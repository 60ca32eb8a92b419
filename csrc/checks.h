// Host-side argument checks shared by every implementation of the ops declared in ops.cpp. The Python bindings
// (rfm_fast/ops/<op>/cpp.py) pass validated, contiguous tensors; these checks turn a misuse of the raw torch op
// into a clear error instead of a wild read.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

#include "pair_args.h"

namespace rfm_fast {

inline bool is_laplace(const std::string& kernel) {
  TORCH_CHECK(kernel == "laplace" || kernel == "gaussian", "rfm_fast: kernel must be 'laplace' or 'gaussian', got '",
              kernel, "'");
  return kernel == "laplace";
}

inline void check_matrix(const at::Tensor& t, const char* name, const at::Tensor& like, int64_t cols) {
  TORCH_CHECK(t.dim() == 2, "rfm_fast: ", name, " must be 2-D, got ", t.dim(), "-D");
  TORCH_CHECK(cols < 0 || t.size(1) == cols, "rfm_fast: ", name, " must have ", cols, " columns, got ", t.size(1));
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "rfm_fast: ", name, " must have dtype ", like.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "rfm_fast: ", name, " must be on ", like.device());
  TORCH_CHECK(t.is_contiguous(), "rfm_fast: ", name, " must be contiguous");
}

// Checks the common arguments (zc, xc, alpha, z, x, S) and returns the form of S.
inline MetricKind check_pair_args(const at::Tensor& zc, const at::Tensor& xc, const at::Tensor& alpha,
                                  const at::Tensor& z, const at::Tensor& x, const std::optional<at::Tensor>& S) {
  TORCH_CHECK(zc.scalar_type() == at::kFloat || zc.scalar_type() == at::kDouble,
              "rfm_fast: the compiled ops take float32 or float64, got ", zc.scalar_type());
  const int64_t d = zc.size(1);
  check_matrix(zc, "zc", zc, d);
  check_matrix(xc, "xc", zc, d);
  check_matrix(z, "z", zc, d);
  check_matrix(x, "x", zc, d);
  check_matrix(alpha, "alpha", zc, -1);
  TORCH_CHECK(z.size(0) == zc.size(0), "rfm_fast: z and zc must have the same rows");
  TORCH_CHECK(x.size(0) == xc.size(0) && alpha.size(0) == xc.size(0),
              "rfm_fast: x, xc and alpha must have the same rows");
  if (!S.has_value()) return MetricKind::Identity;
  const at::Tensor& s = *S;
  TORCH_CHECK(s.scalar_type() == zc.scalar_type() && s.device() == zc.device() && s.is_contiguous(),
              "rfm_fast: S must be contiguous, with the dtype and device of zc");
  if (s.dim() == 1) {
    TORCH_CHECK(s.size(0) == d, "rfm_fast: a diagonal S must have ", d, " entries");
    return MetricKind::Diagonal;
  }
  TORCH_CHECK(s.dim() == 2 && s.size(0) == d && s.size(1) == d, "rfm_fast: S must be (", d, ",) or (", d, ", ", d,
              ")");
  return MetricKind::Dense;
}

// The optional stacked coefficients V = [alpha | alpha (x) xc], (n, c + c d).
inline void check_coeffs(const std::optional<at::Tensor>& coeffs, const at::Tensor& xc, const at::Tensor& alpha) {
  if (!coeffs.has_value()) return;
  const int64_t c = alpha.size(1), d = xc.size(1);
  check_matrix(*coeffs, "coeffs", xc, c + c * d);
  TORCH_CHECK(coeffs->size(0) == xc.size(0), "rfm_fast: coeffs must have one row per centre");
}

}  // namespace rfm_fast
