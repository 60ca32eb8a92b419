// Gradient tiles on the CPU, shared by the agop and kernel_grad ops (gradient.cpp).
//
// For a block of evaluation points (rows) and a block of centres (cols):
//   1. one GEMM gives the dot products zc_j . xc_i of the tile;
//   2. one fused pass per row turns them into the squared distance, the near test and the gradient weight, in
//      cache, writing the weight over the dot product (near pairs get a negative marker);
//   3. marked pairs are recomputed exactly (u = (z - x) S) and their contribution w alpha_i (x) u goes straight
//      into the accumulator; their tile entry becomes 0;
//   4. one GEMM acc += W_tile @ [alpha | alpha (x) xc]_tile.
// After the last block of centres, G_j = acc_alpha,j (x) zc_j - acc_V,j. Nothing of size m x n is stored.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <vector>

#include "tile_math.h"

namespace rfm_fast::cpu {

template <typename T>
struct Geometry {
  const T* zc;
  const T* xc;
  const T* zn;  // ||zc_j||^2
  const T* xn;  // ||xc_i||^2
  const T* z;
  const T* x;
  const T* S;
  const T* alpha;
  MetricKind kind;
  int64_t m, n, d, c;
  T scale, rtol;
};

// One thread's buffers: a rows x cols tile, the (rows, c + c d) accumulator, an optional coefficient tile, room
// for one exact difference, and (AGOP) a (rows, c, d) gradient block and its d x d Gram matrix.
struct Workspace {
  at::Tensor tile, acc, coeff_tile, grad, gram;
  std::vector<char> u_bytes;

  Workspace(const at::Tensor& like, int64_t rows, int64_t cols, int64_t c, int64_t d, bool need_coeff_tile,
            bool need_gram)
      : tile(at::empty({rows * cols}, like.options())),
        acc(at::empty({rows, c + c * d}, like.options())),
        u_bytes(static_cast<size_t>(d) * like.element_size()) {
    if (need_coeff_tile) coeff_tile = at::empty({cols, c + c * d}, like.options());
    if (need_gram) {
      grad = at::empty({rows * c, d}, like.options());
      gram = at::empty({d, d}, like.options());
    }
  }
};

// [alpha_i | alpha_i (x) xc_i] for centres c0 .. c0 + C into `out` (C, c + c d).
template <typename T>
void build_coefficients(const Geometry<T>& g, int64_t c0, int64_t C, T* out) {
  const int64_t c = g.c, d = g.d, width = c + c * d;
  for (int64_t i = 0; i < C; ++i) {
    const T* a = g.alpha + (c0 + i) * c;
    const T* xi = g.xc + (c0 + i) * d;
    T* row = out + i * width;
    for (int64_t k = 0; k < c; ++k) {
      row[k] = a[k];
      T* block = row + c + k * d;
#pragma omp simd
      for (int64_t l = 0; l < d; ++l) block[l] = a[k] * xi[l];
    }
  }
}

// Exact contribution of one near pair (j, i): acc_V,j -= w alpha_i (x) u, so that G_j gains + w alpha_i (x) u.
template <typename T, bool Laplace>
inline void add_near_pair(const Geometry<T>& g, int64_t j, int64_t i, T* acc_v, T* u) {
  const T sq = exact_difference(g.z + j * g.d, g.x + i * g.d, g.S, g.kind, g.d, u);
  const T s = sq * g.scale;
  if (!(s > T(0))) return;  // a pair at distance 0 contributes 0
  const T w = gradient_weight(s, Laplace);
  const T* a = g.alpha + i * g.c;
  for (int64_t k = 0; k < g.c; ++k) {
    const T coef = w * a[k];
    T* block = acc_v + k * g.d;
#pragma omp simd
    for (int64_t l = 0; l < g.d; ++l) block[l] -= coef * u[l];
  }
}

// G for rows r0 .. r1 into G_out ((r1 - r0), c, d), by the tiled expansion described above.
template <typename T, bool Laplace>
void gradient_rows(const Geometry<T>& g, const at::Tensor& zc, const at::Tensor& xc,
                   const std::optional<at::Tensor>& coeffs, int64_t r0, int64_t r1, int64_t tile_cols,
                   Workspace& ws, T* G_out) {
  const int64_t R = r1 - r0, c = g.c, d = g.d, width = c + c * d;
  at::Tensor acc = ws.acc.narrow(0, 0, R);
  acc.zero_();
  T* accp = acc.data_ptr<T>();
  T* u = reinterpret_cast<T*>(ws.u_bytes.data());
  const at::Tensor zrows = zc.narrow(0, r0, R);
  const T rtol = g.rtol, scale = g.scale, tiny = std::numeric_limits<T>::min();
  for (int64_t c0 = 0; c0 < g.n; c0 += tile_cols) {
    const int64_t C = std::min(tile_cols, g.n - c0);
    at::Tensor tile = ws.tile.narrow(0, 0, R * C).view({R, C});
    at::mm_out(tile, zrows, xc.narrow(0, c0, C).t());
    T* tp = tile.data_ptr<T>();
    const T* xn = g.xn + c0;
    for (int64_t jj = 0; jj < R; ++jj) {
      T* row = tp + jj * C;
      const T znj = g.zn[r0 + jj];
      int any_near = 0;
#pragma omp simd reduction(| : any_near)
      for (int64_t ii = 0; ii < C; ++ii) {
        const T norms = znj + xn[ii];
        const T sq = norms - T(2) * row[ii];
        const bool near = sq <= rtol * norms;
        T s = sq * scale;
        s = s > tiny ? s : tiny;
        const T w = gradient_weight(s, Laplace);
        row[ii] = near ? T(-1) : w;
        any_near |= near ? 1 : 0;
      }
      if (any_near) {
        T* acc_v = accp + jj * width + c;
        for (int64_t ii = 0; ii < C; ++ii) {
          if (row[ii] < T(0)) {
            row[ii] = T(0);
            add_near_pair<T, Laplace>(g, r0 + jj, c0 + ii, acc_v, u);
          }
        }
      }
    }
    at::Tensor rhs;
    if (coeffs.has_value()) {
      rhs = coeffs->narrow(0, c0, C);
    } else {
      rhs = ws.coeff_tile.narrow(0, 0, C);
      build_coefficients(g, c0, C, rhs.data_ptr<T>());
    }
    acc.addmm_(tile, rhs);
  }
  for (int64_t jj = 0; jj < R; ++jj) {
    const T* a = accp + jj * width;
    const T* zj = g.zc + (r0 + jj) * d;
    for (int64_t k = 0; k < c; ++k) {
      const T ak = a[k];
      const T* v = a + c + k * d;
      T* out = G_out + (jj * c + k) * d;
#pragma omp simd
      for (int64_t l = 0; l < d; ++l) out[l] = ak * zj[l] - v[l];
    }
  }
}

// Small d: every pair from its exact difference (as cheap as the GEMM there, and exact for any pair).
template <typename T, bool Laplace>
void gradient_rows_direct(const Geometry<T>& g, int64_t r0, int64_t r1, Workspace& ws, T* G_out) {
  const int64_t c = g.c, d = g.d;
  T* u = reinterpret_cast<T*>(ws.u_bytes.data());
  std::fill(G_out, G_out + (r1 - r0) * c * d, T(0));
  for (int64_t j = r0; j < r1; ++j) {
    T* Gj = G_out + (j - r0) * c * d;
    for (int64_t i = 0; i < g.n; ++i) {
      const T s = exact_difference(g.z + j * d, g.x + i * d, g.S, g.kind, d, u) * g.scale;
      if (!(s > T(0))) continue;
      const T w = gradient_weight(s, Laplace);
      for (int64_t k = 0; k < c; ++k) {
        const T coef = w * g.alpha[i * c + k];
        for (int64_t l = 0; l < d; ++l) Gj[k * d + l] += coef * u[l];
      }
    }
  }
}

}  // namespace rfm_fast::cpu
