"""Test configuration shared by every tier.

* Triton runs through its interpreter on CPU: TRITON_INTERPRET must be set before any @triton.jit is decorated,
  hence before rfm_fast (or anything that imports triton) is imported. On a machine with CUDA it is left alone.
* KeOps compiles into a cache folder inside the repository (git-ignored), so a second run reuses the formulas.
* ``torch.empty`` / ``torch.empty_like`` are poisoned with NaN while a test runs (the flash-linear-attention trick):
  a kernel that reads memory it never wrote fails loudly instead of passing by luck on zeroed pages.
"""

from __future__ import annotations

import os
import pathlib

import torch

REPO = pathlib.Path(__file__).resolve().parent.parent
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("KEOPS_CACHE_FOLDER", str(REPO / ".cache" / "keops"))

import pytest  # noqa: E402

import rfm_fast  # noqa: E402,F401

_real_empty = torch.empty
_real_empty_like = torch.empty_like


def _poison(t):
    if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()):
        t.fill_(float("nan"))
    return t


def _nan_empty(*args, **kwargs):
    return _poison(_real_empty(*args, **kwargs))


def _nan_empty_like(*args, **kwargs):
    return _poison(_real_empty_like(*args, **kwargs))


@pytest.fixture(autouse=True)
def nan_poisoned_empty(monkeypatch):
    monkeypatch.setattr(torch, "empty", _nan_empty)
    monkeypatch.setattr(torch, "empty_like", _nan_empty_like)
    yield


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def progress_calls(monkeypatch):
    """install(module): replace ``module.krr_solve`` by a spy; returns the list of the ``progress`` arguments it
    is called with (the models' ``verbose`` tests)."""

    def install(module):
        calls = []
        real = module.krr_solve

        def spy(*args, **kwargs):
            calls.append(kwargs.get("progress"))
            return real(*args, **kwargs)

        monkeypatch.setattr(module, "krr_solve", spy)
        return calls

    return install
