// The schema of every rfm_fast compiled op, in one place; implementations register per device in cpu/ and cuda/.
//
// The ops work on the kernel core's prepared arrays (rfm_fast/core/geometry.py): scaled coordinates, so that a
// pair's kernel argument is s = ||u_z - u_x||^2, and per-point near bound terms bz, bx: a pair is near when its
// computed s <= bz[j] + bx[i]. Tiles hold sign * s (sign +1 laplace, -1 gaussian). The kernel's formulas are
//   laplace:  value e^{-sqrt s},  gradient weight e^{-sqrt s} / sqrt s  (0 for a near pair)
//   gaussian: value e^{-s},       gradient weight e^{-s}
// and every constant (sign, the bound terms, the coordinate scale) arrives as an argument.
//
//   tile_pass_ (CPU) -> in place on a tile holding sign * s: the near test and the values (gradient = false) or
//                      the gradient weights (gradient = true, near entries set to 0); returns the near pairs as
//                      (k, 2) int64 local (row, col) indices. With zh (R, k), xh (k, C) (k <= 4 directly formed
//                      coordinates' high parts) it first adds sum (zh - xh)^2 to s, and a gradient pass writes
//                      w (zh - xh) into dout (k, R, C), or, for one output, accumulates acc_rows (k, R) +=
//                      (w o (zh - xh)) alpha_cols and, mirrored, acc_cols (k, C) -= (w o (zh - xh))^T alpha_rows.
//   kernel_mv (CUDA)   -> (m, c):  f_j = sum_i alpha_i k(z_j, x_i)
//   kernel_grad (CUDA) -> (m, c + c r): per row [sum_i w alpha_i | sum_i w alpha_i (x) u_x,i - near field], the
//                      accumulator from which the core forms G~ = acc_alpha (x) u_z - acc_V (rfm_fast/core/gradient.py)
// The CUDA ops take ue (m, r), xe (n, r) expansion coordinates with squared norms zn, xn and bounds bz, bx, the
// original points z (m, d), x (n, d) and the scaled factor F (d, r) (None: the identity times `sigma`) to recompute
// near pairs exactly as u = (z - x) F; `direct` recomputes every pair that way (small r).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(rfm_fast, m) {
  m.def(
      "tile_pass_(Tensor(a!) tile, Tensor bz, Tensor bx, float sign, bool laplace, bool gradient, Tensor? zh=None, "
      "Tensor? xh=None, Tensor(b!)? dout=None, Tensor? alpha_cols=None, Tensor? alpha_rows=None, "
      "Tensor(c!)? acc_rows=None, Tensor(d!)? acc_cols=None) -> Tensor");
  m.def(
      "kernel_mv(Tensor ze, Tensor xe, Tensor zn, Tensor xn, Tensor bz, Tensor bx, Tensor alpha, Tensor z, "
      "Tensor x, Tensor? F, float sigma, bool laplace, bool direct, int tile_rows) -> Tensor");
  m.def(
      "kernel_grad(Tensor ze, Tensor xe, Tensor zn, Tensor xn, Tensor bz, Tensor bx, Tensor alpha, Tensor z, "
      "Tensor x, Tensor? F, float sigma, bool laplace, bool direct, int tile_rows) -> Tensor");
}

// An importable module (rfm_fast._C) whose loading runs the registrations above; it exposes nothing itself.
static PyModuleDef rfm_fast_c_module = {PyModuleDef_HEAD_INIT, "rfm_fast._C", "rfm_fast compiled ops (torch.ops.rfm_fast)",
                                        -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&rfm_fast_c_module); }
