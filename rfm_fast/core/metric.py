"""The Mahalanobis matrix as a factor M = F F^T of the rank float precision can see, and the PSD square root.

With F of shape (d, r): ||u||_M = ||u F||, M (z - x) = F F^T (z - x), so every distance and gradient can be formed
in the r-dimensional coordinates t F, and mapped back as J = J' F^T, AGOP = F A' F^T (docs/maths.md, "A metric of
low rank"). Eigenvalues of M below eps^2 * e_max (eps of the working dtype; 1.4e-14 for float32) are dropped:
each changes a kernel value or a pair's gradient term by less than the rounding of the result, except for a
vanishing share of pairs. Larger ones are kept, however small: a learned near-rank-1 M has real eigenvalues at
1e-8 .. 1e-11 of its largest, and dropping those at eps * e_max changed the AGOP by up to 9% (float32, RFM on a
one-direction target), because the pairs that are close along the top direction are then measured only by them.

Forms: ``identity`` (M None: F = I, r = d), ``diagonal`` (M (d,): the coordinates with m_k > eps^2 * max m, scaled by
sqrt(m_k)), ``dense`` (M (d, d): F = V_r diag(sqrt(e_r)) from eigh in float64). The factor may be rotated by an
orthogonal r x r matrix (``rotated``) without changing M, which the geometry does to put the data's leading
directions first.
"""

from __future__ import annotations

import math
import threading
import weakref
from typing import Optional

import torch

# Factors of the last few dense M tensors, keyed by the tensor itself (a weak reference: the same object, its
# version counter unchanged by in-place writes) and the working dtype and device: an RFM iteration uses one M for
# its solve, its AGOP and its predictions, and each eigendecomposition is O(d^3) (~0.3 ms at d = 64, 0.2-0.3 s at
# d = 1024 on 2 cores).
DENSE_FACTOR_CACHE = 4
_DENSE_FACTORS: dict = {}
_DENSE_LOCK = threading.Lock()


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float64).eps


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are computed in float32 (the backends that take them promote)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def psd_sqrt(M: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric (d, d) matrix (eigh in float64, negative eigenvalues clipped to 0),
    in M's dtype and device. The one square root the models and the neural-network measures use."""
    M64 = M.to(torch.float64)
    evals, evecs = torch.linalg.eigh(0.5 * (M64 + M64.T))
    root = (evecs * evals.clamp_min(0).sqrt()) @ evecs.T
    return (0.5 * (root + root.T)).to(M.dtype)


class MetricFactor:
    """M = F F^T restricted to its numerically visible rank r.

    ``dense`` is F (d, r) in float64 (dense form and every rotated form), ``keep``/``root`` the kept coordinates
    and sqrt(m_keep) of a diagonal M, None for the identity."""

    def __init__(self, kind: str, d: int, r: int, dense: Optional[torch.Tensor] = None,
                 keep: Optional[torch.Tensor] = None, root: Optional[torch.Tensor] = None,
                 source: Optional[torch.Tensor] = None):
        self.kind, self.d, self.r = kind, d, r
        self.dense, self.keep, self.root = dense, keep, root
        self.source = source  # the caller's (d, r) factor S when the metric was given as M = S S^T
        # results derived from this factor and a set of centres, kept with it (``geometry._hybrid_of``)
        self.memo: dict = {}

    @classmethod
    def from_factor(cls, S: torch.Tensor, dtype: torch.dtype, device: torch.device) -> "MetricFactor":
        """The factor of M = S S^T for a caller's S (d, k), without forming M: the thin SVD S = U diag(sv) V^T in
        float64 gives F = U_r diag(sv_r) for the singular values above eps * sv_max (eigenvalues of M above
        eps^2 * e_max, the cut of :meth:`from_matrix`). O(d k^2)."""
        d = S.shape[0]
        S64 = S.detach().to(device=device, dtype=torch.float64)
        if S64.numel() == 0:
            return cls("dense", d, 0, dense=S64.new_zeros(d, 0), source=S)
        U, sv, _ = torch.linalg.svd(S64, full_matrices=False)
        top = float(sv.max())
        kept = torch.nonzero(sv > _eps(_work_dtype(dtype)) * top).flatten() if top > 0 else sv.new_zeros(
            0, dtype=torch.long)
        return cls("dense", d, int(kept.numel()), dense=U[:, kept] * sv[kept], source=S)

    @classmethod
    def from_matrix(cls, M: Optional[torch.Tensor], d: int, dtype: torch.dtype,
                    device: torch.device) -> "MetricFactor":
        """The factor of M (None, (d,) or (d, d) symmetric PSD) for work in ``dtype``. Raises ValueError when a
        dense M has an eigenvalue below zero by more than rounding."""
        if M is None:
            return cls("identity", d, d)
        if isinstance(M, MetricFactor):
            return M
        if M.ndim == 2:
            key = (M._version, dtype, torch.device(device), d)
            hit = _DENSE_FACTORS.get(id(M))
            if hit is not None and hit[0]() is M and hit[1] == key:
                return hit[2]
            factor = cls._from_dense(M, dtype, device)
            with _DENSE_LOCK:
                _DENSE_FACTORS.pop(id(M), None)
                while len(_DENSE_FACTORS) >= DENSE_FACTOR_CACHE:
                    _DENSE_FACTORS.pop(next(iter(_DENSE_FACTORS)))
                # The entry goes with its tensor (the callback runs before the id can be reused).
                ref = weakref.ref(M, lambda _, k=id(M): _DENSE_FACTORS.pop(k, None))
                _DENSE_FACTORS[id(M)] = (ref, key, factor)
            return factor
        eps = _eps(dtype) ** 2
        M64 = M.to(device=device, dtype=torch.float64)
        if M.ndim == 1:
            top = float(M64.max()) if M64.numel() else 0.0
            keep = torch.nonzero(M64 > eps * top).flatten() if top > 0 else M64.new_zeros(0, dtype=torch.long)
            if keep.numel() == d:
                return cls("diagonal", d, d, keep=None, root=M64.sqrt())
            return cls("diagonal", d, int(keep.numel()), keep=keep, root=M64[keep].sqrt())
        raise ValueError(f"M must be None, (d,) or (d, d); got shape {tuple(M.shape)}")

    @classmethod
    def _from_dense(cls, M: torch.Tensor, dtype: torch.dtype, device: torch.device) -> "MetricFactor":
        d = M.shape[0]
        eps = _eps(dtype) ** 2
        M64 = M.detach().to(device=device, dtype=torch.float64)
        evals, evecs = torch.linalg.eigh(0.5 * (M64 + M64.T))
        top = float(evals.abs().max()) if evals.numel() else 0.0
        if top > 0 and float(evals.min()) < -math.sqrt(_eps(M.dtype)) * top:
            raise ValueError(f"M must be positive semi-definite: smallest eigenvalue {float(evals.min()):.3g} "
                             f"against largest {top:.3g}")
        kept = torch.nonzero(evals > eps * top).flatten().flip(0) if top > 0 else evals.new_zeros(0, dtype=torch.long)
        F = evecs[:, kept] * evals[kept].sqrt()
        return cls("dense", d, int(kept.numel()), dense=F)

    def as_dense(self, device: Optional[torch.device] = None) -> torch.Tensor:
        """F as a (d, r) float64 matrix (on ``device``, default where the factor lives)."""
        if self.kind == "dense":
            return self.dense if device is None else self.dense.to(device)
        if self.kind == "identity":
            return torch.eye(self.d, dtype=torch.float64, device=device)
        F = torch.zeros(self.d, self.r, dtype=torch.float64, device=device or self.root.device)
        idx = torch.arange(self.d, device=F.device) if self.keep is None else self.keep.to(F.device)
        F[idx, torch.arange(self.r, device=F.device)] = self.root.to(F.device)
        return F

    def rotated(self, R: torch.Tensor) -> "MetricFactor":
        """The factor F R for an orthogonal (r, r) float64 R (the same M)."""
        return MetricFactor("dense", self.d, self.r, dense=self.as_dense(R.device) @ R)

    def transform(self, t: torch.Tensor, scale: float) -> torch.Tensor:
        """(k, d) rows -> (k, r) rows t F * scale, in t's dtype (the factor rounded to it once)."""
        if self.kind == "identity":
            return t * scale
        if self.kind == "diagonal":
            part = t if self.keep is None else t.index_select(1, self.keep.to(t.device))
            return part * (self.root * scale).to(device=t.device, dtype=t.dtype)
        return t @ (self.dense * scale).to(device=t.device, dtype=t.dtype)

    def to_input(self, G: torch.Tensor) -> torch.Tensor:
        """(..., r) -> (..., d): G F^T (gradients back in the input coordinates)."""
        if self.kind == "identity":
            return G
        if self.kind == "diagonal":
            root = self.root.to(device=G.device, dtype=G.dtype)
            if self.keep is None:
                return G * root
            out = G.new_zeros(*G.shape[:-1], self.d)
            out[..., self.keep.to(G.device)] = G * root
            return out
        return G @ self.dense.T.to(device=G.device, dtype=G.dtype)

    def agop_to_input(self, A: torch.Tensor) -> torch.Tensor:
        """(r, r) -> (d, d): F A F^T, in A's dtype (float64 in the ops)."""
        if self.kind == "identity":
            return A
        if self.kind == "diagonal":
            root = self.root.to(device=A.device, dtype=A.dtype)
            inner = A * root[:, None] * root[None, :]
            if self.keep is None:
                return inner
            out = A.new_zeros(self.d, self.d)
            keep = self.keep.to(A.device)
            out[keep[:, None], keep[None, :]] = inner
            return out
        F = self.dense.to(device=A.device, dtype=A.dtype)
        return F @ A @ F.T
