// Elementwise pieces of the compiled CPU pass: a branch-free exp for non-positive arguments (so the loops
// vectorise without -ffast-math) and the kernel values and gradient weights of s = ||u_z - u_x||^2.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace rfm_fast::cpu {

// exp(x) for x <= 0 in float: Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, a degree-7 Taylor polynomial
// (truncation error < 5e-9 relative, below float rounding) and 2^n built from the exponent bits. Pure arithmetic
// and selects, so `#pragma omp simd` loops vectorise with the plain ISA. Below -87 (where expf is subnormal) the
// result is flushed to 0: the kernels only ever multiply it by bounded factors.
inline float exp_nonpos(float x) {
  const float xs = x < -87.0f ? -87.0f : x;
  const float n = std::floor(xs * 1.44269504088896341f + 0.5f);
  const float r = (xs - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(float));
  return x < -87.0f ? 0.0f : p * two_n;
}

// exp(x) for x <= 0 in double, the same way (the same shape as the float version, not one template with it:
// the two differ in every constant and in the degree): Cody-Waite with fdlibm's split of ln 2 (its high part has trailing
// zero bits, so n * ln2_hi is exact), a degree-13 Taylor polynomial (truncation < 5e-18 relative for
// |r| <= ln2 / 2, below double rounding; a few ulp in all) and 2^n from the exponent bits. libm's exp does not
// vectorise without -ffast-math, which made every float64 compiled op slower than torch's vectorised exp (1.05-2.1x
// before this). Below -708 the result is flushed to 0, as for float.
inline double exp_nonpos(double x) {
  const double xs = x < -708.0 ? -708.0 : x;
  const double n = std::floor(xs * 1.4426950408889634 + 0.5);
  const double r = (xs - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10;
  double p = 1.0 / 6227020800.0;
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  const int64_t bits = (static_cast<int64_t>(n) + 1023) << 52;
  double two_n;
  std::memcpy(&two_n, &bits, sizeof(double));
  return x < -708.0 ? 0.0 : p * two_n;
}

// Gradient weight from s > 0: laplace e^{-sqrt s} / sqrt s, gaussian e^{-s}.
template <typename T>
inline T gradient_weight(T s, bool laplace) {
  if (laplace) {
    const T r = std::sqrt(s);
    return exp_nonpos(-r) / r;
  }
  return exp_nonpos(-s);
}

// Kernel value from s >= 0: laplace e^{-sqrt s}, gaussian e^{-s}.
template <typename T>
inline T kernel_value(T s, bool laplace) {
  return exp_nonpos(laplace ? -std::sqrt(s) : -s);
}

}  // namespace rfm_fast::cpu
