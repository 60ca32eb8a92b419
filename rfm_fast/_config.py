"""Run-time settings read from the environment (never at import: each getter reads when called)."""

from __future__ import annotations

import os
import re
from typing import Optional

BACKEND_ENV = "RFM_FAST_BACKEND"
MEMORY_BUDGET_ENV = "RFM_FAST_MEMORY_BUDGET"
DEFAULT_MEMORY_BUDGET = 128 * 2**20

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30}


def parse_bytes(text: str | int, *, name: str = "memory_budget") -> int:
    """Parse ``1048576``, ``"64MB"``, ``"1.5GiB"`` into a byte count (binary units)."""
    if isinstance(text, bool):
        raise TypeError(f"{name} must be a byte count or a string like '256MB', got a bool")
    if isinstance(text, int):
        value = text
    elif isinstance(text, float) and text.is_integer():
        value = int(text)
    elif isinstance(text, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(f"{name} must look like '256MB' or a byte count, got {text!r}")
        value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    else:
        raise TypeError(f"{name} must be a byte count or a string like '256MB', got {type(text).__name__}")
    if value < 2**20:
        raise ValueError(f"{name} must be at least 1 MiB, got {value} bytes")
    return value


def memory_budget(explicit: Optional[int | str] = None) -> int:
    """The working-memory budget in bytes: the argument, else $RFM_FAST_MEMORY_BUDGET, else 128 MiB."""
    if explicit is not None:
        return parse_bytes(explicit)
    env = os.environ.get(MEMORY_BUDGET_ENV)
    if env:
        return parse_bytes(env, name=MEMORY_BUDGET_ENV)
    return DEFAULT_MEMORY_BUDGET


def backend_override() -> Optional[str]:
    value = os.environ.get(BACKEND_ENV, "").strip().lower()
    return value or None
