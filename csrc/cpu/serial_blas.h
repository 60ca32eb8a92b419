// Keeps BLAS single-threaded inside our own parallel region.
//
// Each thread of the CPU ops owns whole tiles and calls GEMMs on them; if MKL started its own team inside every
// worker, 2 workers x 2 MKL threads would oversubscribe the cores and spin in the OpenMP barriers (measured: 5-9x
// slower on 2 cores). torch's x86 builds link MKL statically and export mkl_set_num_threads_local, which sets a
// per-thread count. It is declared weak: on a torch without MKL the pointer is null and nothing is done (other
// BLAS libraries there run sequentially inside an OpenMP parallel region).
#pragma once

extern "C" int mkl_set_num_threads_local(int) __attribute__((weak));

namespace rfm_fast::cpu {

// Active only when `active` (pass at::in_parallel_region()): a single part running on the calling thread keeps
// the multi-threaded BLAS.
class SerialBlasScope {
 public:
  explicit SerialBlasScope(bool active)
      : active_(active && mkl_set_num_threads_local != nullptr),
        previous_(active_ ? mkl_set_num_threads_local(1) : 0) {}
  ~SerialBlasScope() {
    if (active_) mkl_set_num_threads_local(previous_);
  }
  SerialBlasScope(const SerialBlasScope&) = delete;
  SerialBlasScope& operator=(const SerialBlasScope&) = delete;

 private:
  bool active_;
  int previous_;
};

}  // namespace rfm_fast::cpu
