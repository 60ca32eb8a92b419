// Plain definitions shared by the CPU and CUDA code (no torch headers: nvcc device code includes it too).
#pragma once

namespace rfm_fast {

// Form of S = M^{1/2} handed to the ops: the identity, a diagonal (d,), or a symmetric dense (d, d).
enum class MetricKind : int { Identity = 0, Diagonal = 1, Dense = 2 };

}  // namespace rfm_fast
