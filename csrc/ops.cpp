// The schema of every rfm_fast op, in one place; implementations register per device in cpu/ and cuda/.
//
// All ops work in Euclidean coordinates prepared by the Python bindings (rfm_fast/_ext.py): with S = M^{1/2},
// zc = z S - mu and xc = x S - mu (mu the centres' mean), so ||z - x||_M = ||zc - xc||. The original points z, x
// and S are passed too: pairs whose expanded squared distance ||zc||^2 + ||xc||^2 - 2 zc.xc is within
// rtol * (||zc||^2 + ||xc||^2) of zero are recomputed exactly as u = (z - x) S (see rfm_fast/ops/common.py).
// `scale` multiplies squared distances: 1/L^2 (laplace) or 1/(2 L^2) (gaussian). `direct` forms every pair from
// the exact difference (small d, where that is as cheap as the GEMM). tile_rows x tile_cols bounds the working
// tile of each thread (CPU) or of each launch chunk (CUDA).
//
//   kernel_mv   -> (m, c):    f_j = sum_i alpha_i k(z_j, x_i)
//   kernel_grad -> (m, c, d): G_j = sum_i w_ji alpha_i (x) (zc_j - xc_i), the Euclidean gradient up to -1/L^2
//                             (laplace w = e^{-r'}/r', r' = r/L, 0 at r = 0; gaussian w = e^{-r^2/(2L^2)})
//   agop        -> (sum_j G_j^T G_j (d, d), sum_j G_j (c, d)), both float64
//   gradient_weights_ (CPU) -> in place on a tile holding sign * scale * ||zc_j - xc_i||^2: the gradient weights
//                             above, near pairs (the rtol test) set to 0 and returned as (k, 2) int64 (row, col)
//   kernel_values_ (CPU)    -> in place on a finished distance tile (sign * scale * ||z - x||^2, near pairs exact):
//                             the kernel values e^{-sqrt s} (laplace) or e^{-s} (gaussian)
// `coeffs` (optional) is V = [alpha | alpha (x) xc] (n, c + c d), built once by the caller when it fits its
// memory budget; without it each tile builds its slice.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(rfm_fast, m) {
  m.def(
      "kernel_mv(Tensor zc, Tensor xc, Tensor alpha, Tensor z, Tensor x, Tensor? S, str kernel, float scale, "
      "float rtol, bool direct, int tile_rows, int tile_cols) -> Tensor");
  m.def(
      "kernel_grad(Tensor zc, Tensor xc, Tensor alpha, Tensor? coeffs, Tensor z, Tensor x, Tensor? S, str kernel, "
      "float scale, float rtol, bool direct, int tile_rows, int tile_cols) -> Tensor");
  m.def(
      "agop(Tensor zc, Tensor xc, Tensor alpha, Tensor? coeffs, Tensor z, Tensor x, Tensor? S, str kernel, "
      "float scale, float rtol, bool direct, int tile_rows, int tile_cols) -> (Tensor, Tensor)");
  m.def("gradient_weights_(Tensor(a!) tile, Tensor zn, Tensor xn, str kernel, float sign, float scale, float rtol) "
        "-> Tensor");
  m.def("kernel_values_(Tensor(a!) tile, str kernel, float sign) -> ()");
}

// An importable module (rfm_fast._C) whose loading runs the registrations above; it exposes nothing itself.
static PyModuleDef rfm_fast_c_module = {PyModuleDef_HEAD_INIT, "rfm_fast._C", "rfm_fast compiled ops (torch.ops.rfm_fast)",
                                        -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&rfm_fast_c_module); }
