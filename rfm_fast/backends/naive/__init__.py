"""The "naive" backend: the formulas of rfm_fast/ops/<op>/naive.py, materialised whole (the tests' reference;
float64-capable, any device, never picked by auto)."""

from __future__ import annotations

from typing import Optional

from .. import full_precision_only

OPS = ("kernel_matrix", "kernel_mv", "kernel_grad", "agop")


check = full_precision_only


def prefers(op: str, problem) -> Optional[str]:
    return "the naive backend is a reference, never an automatic choice"
