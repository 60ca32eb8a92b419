"""The one tolerance table: relative Frobenius error of a fast path against the float64 reference (naive.py run
in float64 on the same inputs), per input dtype. Never loosen it to make a test pass: find the bug.

float32: the issue's target is ~1e-5 relative on data with self pairs and duplicates; half precision inputs
(triton only) are compared after rounding the inputs, with fp32 accumulation.
"""

import torch

REL_FRO = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}


def rel_fro(out, ref) -> float:
    out = torch.as_tensor(out).to(torch.float64).cpu()
    ref = torch.as_tensor(ref).to(torch.float64).cpu()
    denom = ref.norm()
    if denom == 0:
        return float(out.norm())
    return float((out - ref).norm() / denom)
