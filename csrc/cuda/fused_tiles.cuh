// The fused CUDA tile kernel behind rfm_fast::kernel_mv and kernel_grad on CUDA tensors.
//
// It works on the kernel core's arrays (rfm_fast/core/geometry.py): scaled coordinates ue, xe (the kernel argument
// of a pair is s = ||u_z - u_x||^2), their squared norms and the near bound terms bz, bx. A block owns kRows
// evaluation points and kThreads output columns (one column per thread, kRows accumulators in registers) and
// sweeps all centres in chunks of kCols:
//   1. dot products ue_j . xe_i of the (kRows x kCols) tile, staged through shared memory in kDepth slices;
//   2. each pair's s = ||ue||^2 + ||xe||^2 - 2 ue.xe, its near test s <= bz_j + bx_i, and its weight (gradient) or
//      kernel value (mat-vec), written to a shared tile; near pairs are recomputed exactly from u = (z - x) F;
//   3. acc[r] += tile[r][i] * V[i][o] for the thread's column o, with V[i] = [alpha_i | alpha_i (x) xe_i]
//      formed on the fly (gradient) or V = alpha (mat-vec); near pairs of the gradient add -w alpha_i,k u_l.
// The output is the (rows, width) accumulator; the core turns it into G~_j = acc_alpha,j (x) ue_j - acc_V,j.
// Nothing of size m x n is stored.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace rfm_fast::cuda {

constexpr int kRows = 16;     // evaluation points per block
constexpr int kCols = 64;     // centres per chunk
constexpr int kDepth = 32;    // coordinates per shared-memory slice of the dot products
constexpr int kThreads = 256; // output columns per block
constexpr int kPairRowStep = kThreads / kCols;
constexpr int kPairsPerThread = kRows * kCols / kThreads;

template <typename T>
struct TileArgs {
  const T* ze;     // (m, r) scaled expansion coordinates
  const T* xe;     // (n, r)
  const T* zn;     // (m,) ||ze||^2
  const T* xn;     // (n,)
  const T* bz;     // (m,) near bound terms
  const T* bx;     // (n,)
  const T* z;      // (m, d) original points
  const T* x;      // (n, d)
  const T* F;      // (d, r) scaled factor, or nullptr for the identity times sigma
  const T* alpha;  // (n, c)
  bool direct;     // every pair from its exact difference
  int64_t row0, rows, n, d, r, c, width;
  T sigma;
  T* out;          // (rows, width)
};

// l-th coordinate of u = (z_j - x_i) F (or (z_j - x_i) sigma).
template <typename T>
__device__ __forceinline__ T metric_coordinate(const TileArgs<T>& a, const T* zj, const T* xi, int64_t l) {
  if (a.F != nullptr) {
    T u = T(0);
    for (int64_t k = 0; k < a.d; ++k) u += (zj[k] - xi[k]) * a.F[k * a.r + l];
    return u;
  }
  return (zj[l] - xi[l]) * a.sigma;
}

template <typename T>
__device__ T exact_squared_distance(const TileArgs<T>& a, const T* zj, const T* xi) {
  T sq = T(0);
  for (int64_t l = 0; l < a.r; ++l) {
    const T u = metric_coordinate(a, zj, xi, l);
    sq += u * u;
  }
  return sq;
}

// s > 0. Gradient weight: laplace e^{-sqrt s}/sqrt s, gaussian e^{-s}.
template <typename T, bool Laplace>
__device__ __forceinline__ T gradient_weight(T s) {
  if (Laplace) {
    const T r = sqrt(s);
    return exp(-r) / r;
  }
  return exp(-s);
}

template <typename T, bool Laplace>
__device__ __forceinline__ T kernel_value(T s) {
  return Laplace ? exp(-sqrt(s)) : exp(-s);
}

template <typename T, bool Laplace, bool Gradient>
__global__ void __launch_bounds__(kThreads) fused_tiles_kernel(const TileArgs<T> a) {
  __shared__ T zs[kRows][kDepth + 1];
  __shared__ T xs[kCols][kDepth + 1];  // +1: threads reading consecutive centres hit different banks
  __shared__ T tile[kRows][kCols];
  __shared__ int near_pair[kRows * kCols];
  __shared__ T near_weight[kRows * kCols];
  __shared__ int near_count;

  const int t = threadIdx.x;
  const int64_t r_base = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t o = static_cast<int64_t>(blockIdx.y) * kThreads + t;
  const bool owns = o < a.width;
  // Column o of V: alpha column ak, times coordinate al of xe when al >= 0 (the gradient's alpha (x) xe part).
  int64_t ak = o, al = -1;
  if (Gradient && owns && o >= a.c) {
    ak = (o - a.c) / a.r;
    al = (o - a.c) % a.r;
  }
  T acc[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) acc[r] = T(0);

  const int pair_col = t % kCols;
  const int pair_row = t / kCols;
  for (int64_t i0 = 0; i0 < a.n; i0 += kCols) {
    T dot[kPairsPerThread];
#pragma unroll
    for (int q = 0; q < kPairsPerThread; ++q) dot[q] = T(0);
    if (!a.direct) {
      for (int64_t k0 = 0; k0 < a.r; k0 += kDepth) {
        for (int e = t; e < kRows * kDepth; e += kThreads) {
          const int r = e / kDepth, kk = e % kDepth;
          const int64_t row = r_base + r, col = k0 + kk;
          zs[r][kk] = (row < a.rows && col < a.r) ? a.ze[(a.row0 + row) * a.r + col] : T(0);
        }
        for (int e = t; e < kCols * kDepth; e += kThreads) {
          const int i = e / kDepth, kk = e % kDepth;
          const int64_t ci = i0 + i, col = k0 + kk;
          xs[i][kk] = (ci < a.n && col < a.r) ? a.xe[ci * a.r + col] : T(0);
        }
        __syncthreads();
#pragma unroll 8
        for (int kk = 0; kk < kDepth; ++kk) {
          const T xv = xs[pair_col][kk];
#pragma unroll
          for (int q = 0; q < kPairsPerThread; ++q) dot[q] += zs[pair_row + q * kPairRowStep][kk] * xv;
        }
        __syncthreads();
      }
    }
    if (t == 0) near_count = 0;
    __syncthreads();
#pragma unroll
    for (int q = 0; q < kPairsPerThread; ++q) {
      const int r = pair_row + q * kPairRowStep;
      const int64_t row = r_base + r, ci = i0 + pair_col;
      T value = T(0);
      if (row < a.rows && ci < a.n) {
        const int64_t j = a.row0 + row;
        bool near = a.direct;
        T sq = T(0);
        if (!near) {
          sq = a.zn[j] + a.xn[ci] - T(2) * dot[q];
          near = sq <= a.bz[j] + a.bx[ci];
        }
        if (near) {
          const T s = exact_squared_distance(a, a.z + j * a.d, a.x + ci * a.d);
          if (Gradient) {
            if (s > T(0)) {  // a pair at distance 0 contributes 0
              const int slot = atomicAdd(&near_count, 1);
              near_pair[slot] = r * kCols + pair_col;
              near_weight[slot] = gradient_weight<T, Laplace>(s);
            }
          } else {
            value = kernel_value<T, Laplace>(s);
          }
        } else {
          value = Gradient ? gradient_weight<T, Laplace>(sq) : kernel_value<T, Laplace>(sq);
        }
      }
      tile[r][pair_col] = value;
    }
    __syncthreads();
    if (owns) {
      const int64_t count = a.n - i0 < kCols ? a.n - i0 : kCols;
      for (int i = 0; i < count; ++i) {
        const int64_t ci = i0 + i;
        T v = a.alpha[ci * a.c + ak];
        if (Gradient && al >= 0) v *= a.xe[ci * a.r + al];
#pragma unroll
        for (int r = 0; r < kRows; ++r) acc[r] += tile[r][i] * v;
      }
      if (Gradient && al >= 0) {
        for (int e = 0; e < near_count; ++e) {
          const int r_near = near_pair[e] / kCols;
          const int64_t ci = i0 + near_pair[e] % kCols;
          const int64_t j = a.row0 + r_base + r_near;
          const T u = metric_coordinate(a, a.z + j * a.d, a.x + ci * a.d, al);
          const T contribution = near_weight[e] * a.alpha[ci * a.c + ak] * u;
#pragma unroll
          for (int r = 0; r < kRows; ++r) {
            if (r == r_near) acc[r] -= contribution;  // static register index: acc stays in registers
          }
        }
      }
    }
    __syncthreads();
  }
  if (owns) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (r_base + r < a.rows) a.out[(r_base + r) * a.width + o] = acc[r];
    }
  }
}

// Launches the kernel for rows a.row0 .. a.row0 + a.rows on `stream`.
template <typename T, bool Laplace, bool Gradient>
void launch_fused_tiles(const TileArgs<T>& a, cudaStream_t stream) {
  if (a.rows == 0 || a.width == 0) return;
  const dim3 grid(static_cast<unsigned>((a.rows + kRows - 1) / kRows),
                  static_cast<unsigned>((a.width + kThreads - 1) / kThreads));
  fused_tiles_kernel<T, Laplace, Gradient><<<grid, kThreads, 0, stream>>>(a);
}

}  // namespace rfm_fast::cuda
