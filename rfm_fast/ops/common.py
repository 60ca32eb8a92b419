"""Tile helpers shared by the fast paths: the metric transform, squared-distance tiles with exact zero handling,
and tile planning under a memory budget.

The fast paths work in Euclidean coordinates: with S = M^{1/2} (symmetric square root), ||u||_M = ||S u||, so
z' = z S and x' = x S turn every Mahalanobis kernel into a plain Euclidean one, and the gradient and the AGOP
map back as J = J' S and AGOP = S AGOP' S (see CONVENTIONS.md: M (z - x) = S (S (z - x))).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

# A squared distance below RECHECK_RTOL * (||z||^2 + ||x||^2) (centred norms) is recomputed exactly from the
# difference z - x: there the GEMM expansion has lost most of its digits. fp32: relative error at the boundary
# ~1e-4 in r^2 at d = 64; fp64: ~1e-10 (2^-26 left 1.8e-10 on a near-duplicate in the Triton tests). Exact
# duplicates come out as exactly 0.
RECHECK_RTOL = {torch.float16: 2.0**-4, torch.bfloat16: 2.0**-4, torch.float32: 2.0**-8, torch.float64: 2.0**-16}
# At or below this dimension, distances are formed directly from differences: as cheap as the GEMM and exact.
DIRECT_DISTANCE_MAX_D = 4
# Gathered differences for the exact recheck are formed this many elements at a time (bounded working memory).
RECHECK_CHUNK_ELEMS = 2**20


def metric_sqrt(M: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """S = M^{1/2}: None for the identity, a (d,) vector for a diagonal M, a symmetric (d, d) matrix otherwise.

    Computed in float64 (eigh for a dense M); eigenvalues below zero by more than rounding raise ValueError,
    those within rounding are clipped to 0.
    """
    if M is None:
        return None
    M64 = M.to(torch.float64)
    if M.ndim == 1:
        return M64.clamp_min(0).sqrt().to(dtype)
    evals, evecs = torch.linalg.eigh(0.5 * (M64 + M64.T))
    top = float(evals.abs().max()) if evals.numel() else 0.0
    eps = torch.finfo(M.dtype).eps if M.dtype.is_floating_point else torch.finfo(torch.float64).eps
    if top > 0 and float(evals.min()) < -math.sqrt(eps) * top:
        raise ValueError(f"M must be positive semi-definite: smallest eigenvalue {float(evals.min()):.3g} "
                         f"against largest {top:.3g}")
    root = (evecs * evals.clamp_min(0).sqrt()) @ evecs.T
    return (0.5 * (root + root.T)).to(dtype)


def apply_metric(t: torch.Tensor, S: Optional[torch.Tensor]) -> torch.Tensor:
    """Rows of t mapped by S (t S); S is None, (d,) or (d, d) symmetric."""
    if S is None:
        return t
    return t * S if S.ndim == 1 else t @ S


def agop_from_euclidean(A: torch.Tensor, S: Optional[torch.Tensor]) -> torch.Tensor:
    """AGOP = S A' S for the AGOP A' computed in Euclidean coordinates."""
    if S is None:
        return A
    if S.ndim == 1:
        return A * S[:, None] * S[None, :]
    return S @ A @ S


def exact_sq_dist(z: torch.Tensor, x: torch.Tensor, M: Optional[torch.Tensor]) -> torch.Tensor:
    """Row-wise (z_k - x_k)^T M (z_k - x_k) from the differences themselves: exactly 0 for equal rows."""
    diff = z - x
    if M is None:
        return (diff * diff).sum(-1)
    if M.ndim == 1:
        return (diff * diff * M).sum(-1)
    return ((diff @ M) * diff).sum(-1)


def same_points(z: torch.Tensor, x: torch.Tensor) -> bool:
    """z and x hold the same rows, bit for bit (the same tensor, or an equal copy: O(n d), once per call)."""
    if z.shape != x.shape or z.dtype != x.dtype or z.device != x.device:
        return False
    if z.data_ptr() == x.data_ptr() and z.stride() == x.stride():
        return True
    return bool(torch.equal(z, x))


class NearPairs(NamedTuple):
    """Pairs of a tile whose distance was recomputed exactly: local row and column indices, and s * ||z - x||_M^2
    (unsigned, scaled like the tile). Exactly-zero pairs are among them with ``scaled_sq == 0``."""

    rows: torch.Tensor
    cols: torch.Tensor
    scaled_sq: torch.Tensor


class DistanceTiles:
    """Scaled squared distances ``sign * scale * ||z_j - x_i||_M^2`` tile by tile.

    Built once per call: centred, metric-transformed copies of the points, their squared norms, and augmented
    factors so that one GEMM gives a whole tile, norms included:
        [z', ||z'||^2, 1] @ [-2 s x', s, s ||x'||^2]^T = s (||z'||^2 + ||x'||^2 - 2 z'.x') = s ||z - x||_M^2.
    Pairs where that expansion is within rounding of zero are recomputed exactly from the original points and M,
    so a point equal to a centre has distance exactly 0 and near-duplicates keep their true distance.

    ``sign = -1`` yields negated distances (the Gaussian exponent directly, saving a pass).
    """

    def __init__(self, z: torch.Tensor, x: torch.Tensor, M: Optional[torch.Tensor], S: Optional[torch.Tensor],
                 scale: float, sign: float = 1.0):
        self.z, self.x, self.M = z, x, M
        self.scale, self.sign = scale, sign
        self.d = z.shape[1]
        self.direct = self.d <= DIRECT_DISTANCE_MAX_D
        self.rtol = RECHECK_RTOL[z.dtype]
        # z equal to x (the AGOP at the training points, every kernel solve): one transformed copy serves both, so
        # tile (I, J) is exactly the transpose of tile (J, I) and the symmetric schedules below may use it twice.
        self.symmetric = same_points(z, x)
        xt = apply_metric(x, S)
        zt = xt if self.symmetric else apply_metric(z, S)
        # Centring at the centres' mean keeps the expansion's cancellation error proportional to the spread of the
        # data rather than its offset from the origin; distances and z - x are unchanged by it.
        shift = xt.mean(0, keepdim=True)
        self.xc = xt - shift
        self.zc = self.xc if self.symmetric else zt - shift
        if self.direct:
            return
        self.xn = (self.xc * self.xc).sum(1)
        self.zn = self.xn if self.symmetric else (self.zc * self.zc).sum(1)
        ones_z = torch.ones_like(self.zn)
        self.z_aug = torch.cat([self.zc, self.zn[:, None], ones_z[:, None]], dim=1)
        s = sign * scale
        self.x_aug_t = torch.cat([(-2.0 * s) * self.xc, torch.full_like(self.xn, s)[:, None],
                                  (s * self.xn)[:, None]], dim=1).T.contiguous()

    def fill(self, rows: slice, cols: slice, out: torch.Tensor) -> Optional[NearPairs]:
        """Write the (rows, cols) tile into ``out`` (shape (len rows, len cols)).

        Returns the pairs whose distance was recomputed exactly (GEMM mode: near-zero pairs; direct mode: exact
        zeros), or None. Gradient code treats them apart: their expanded contribution w (z - x) would cancel
        catastrophically, so it is zeroed in the tile and added back from the exact difference."""
        if self.direct:
            return self._fill_direct(rows, cols, out)
        torch.mm(self.z_aug[rows], self.x_aug_t[:, cols], out=out)
        # Rows that may hold a near-zero pair: a cheap per-row test with the tile's largest centre norm.
        bound = (self.rtol * self.scale) * (self.zn[rows] + self.xn[cols].max())
        extreme = out.amin(1) if self.sign > 0 else -out.amax(1)
        suspect = torch.nonzero(extreme <= bound).flatten()
        if suspect.numel() == 0:
            return None
        return self._recheck(rows, cols, out, suspect, bound)

    def _recheck(self, rows, cols, out, suspect, bound):
        # Within the suspect rows, every pair under the row's conservative bound is recomputed exactly (a few more
        # than strictly needed, never fewer; exact recomputation is always correct).
        sub = out[suspect]
        row_bound = bound[suspect, None]
        local = torch.nonzero(sub <= row_bound if self.sign > 0 else sub >= -row_bound)
        if local.numel() == 0:
            return None
        near = self.exact_pairs(rows, cols, suspect[local[:, 0]], local[:, 1])
        out[near.rows, near.cols] = self.sign * near.scaled_sq
        return near

    def raw_fill(self, rows: slice, cols: slice, out: torch.Tensor) -> None:
        """The tile from the augmented GEMM alone (no near test): for callers that test and weigh in one fused
        pass of their own (the compiled gradient_weights_ op)."""
        torch.mm(self.z_aug[rows], self.x_aug_t[:, cols], out=out)

    def exact_pairs(self, rows: slice, cols: slice, r_idx: torch.Tensor, c_idx: torch.Tensor) -> NearPairs:
        """The pairs (r_idx, c_idx) of tile (rows, cols), local indices, with their exactly recomputed scaled
        squared distances (0 for equal points)."""
        z, x = self.z[rows], self.x[cols]
        exact = torch.empty(r_idx.shape[0], dtype=z.dtype, device=z.device)
        step = max(1, RECHECK_CHUNK_ELEMS // self.d)
        for start in range(0, r_idx.shape[0], step):
            part = slice(start, start + step)
            exact[part] = exact_sq_dist(z[r_idx[part]], x[c_idx[part]], self.M)
        exact.mul_(self.scale)
        return NearPairs(r_idx, c_idx, exact)

    def _fill_direct(self, rows, cols, out):
        # Small d: sum the metric-weighted products of the coordinate differences of the original points. Exact for
        # equal rows (every difference is 0), so zeros need no recheck.
        z, x, M = self.z[rows], self.x[cols], self.M
        out.zero_()
        for k in range(self.d):
            dk = z[:, k, None] - x[None, :, k]
            if M is None:
                out.addcmul_(dk, dk)
            elif M.ndim == 1:
                out.addcmul_(dk, dk, value=float(M[k]))
            else:
                out.addcmul_(dk, dk, value=float(M[k, k]))
                for j in range(k + 1, self.d):
                    out.addcmul_(dk, z[:, j, None] - x[None, :, j], value=2.0 * float(M[k, j]))
        if M is not None and M.ndim == 2:
            out.clamp_min_(0)
        out.mul_(self.sign * self.scale)
        zero = torch.nonzero(out == 0)
        if zero.numel() == 0:
            return None
        return NearPairs(zero[:, 0], zero[:, 1], out.new_zeros(zero.shape[0]))

    def fill_block(self, rows: slice, cols: slice, out: torch.Tensor, strip: int, fill_strip) -> Optional[NearPairs]:
        """A large (rows, cols) block, ``strip`` rows at a time: ``fill_strip(part, cols, view)`` fills one strip
        and finishes it while it is still in cache (the elementwise kernel or weight pass), returning its near
        pairs. Near pairs come back with row indices local to the block."""
        found = []
        for start in range(rows.start, rows.stop, strip):
            part = slice(start, min(rows.stop, start + strip))
            view = out[part.start - rows.start:part.stop - rows.start]
            near = fill_strip(part, cols, view)
            if near is not None:
                found.append(near._replace(rows=near.rows + (part.start - rows.start)))
        if not found:
            return None
        if len(found) == 1:
            return found[0]
        return NearPairs(*(torch.cat(parts) for parts in zip(*found)))


@dataclass
class TilePlan:
    rows: int  # evaluation points per tile
    cols: int  # centres per tile

    def row_blocks(self, m: int):
        for start in range(0, m, self.rows):
            yield slice(start, min(start + self.rows, m))

    def col_blocks(self, n: int):
        for start in range(0, n, self.cols):
            yield slice(start, min(start + self.cols, n))


# CPU: tiles of ~256 x 2048 fp32 keep two of them within the 2 MiB L2 of each core for the elementwise passes,
# while the GEMMs they feed stay large enough to run near peak. GPU: the elementwise passes go through device
# memory anyway, so tiles are as large as the budget allows, to amortise launches and fill the machine.
PREFERRED_ROWS = 256
PREFERRED_COLS = 2048
PREFERRED_GPU_ROWS = 4096
PREFERRED_GPU_COLS = 8192


@dataclass
class SymmetricPlan:
    """Schedule for z equal to x: square blocks of ``block`` points, and groups of ``group`` blocks whose
    accumulators are held at once. Within a group each unordered pair of blocks is computed once and used twice
    (tile W_IJ feeds rows I, and its transpose feeds rows J), so distances and the elementwise work are halved
    when everything fits in one group; pairs across groups are computed once from each side."""

    block: int
    group: int

    def blocks(self, n: int) -> list:
        return [slice(s, min(n, s + self.block)) for s in range(0, n, self.block)]

    def groups(self, count: int):
        for start in range(0, count, self.group):
            yield range(start, min(count, start + self.group))

    @staticmethod
    def pairs(group: range, count: int):
        """(I, J, mirrored) for the row blocks I of ``group`` against every column block J: a pair of blocks of
        the group appears once (I <= J), with ``mirrored`` when its transpose must also be applied (I < J)."""
        for J in range(count):
            inside = J in group
            for I in group:
                if inside and I > J:
                    continue
                yield I, J, inside and I < J


# Square blocks of the symmetric schedule: 1024 keeps both of its GEMMs (W V and W^T V) near the machine's GEMM
# rate on CPU while the elementwise work runs in strips of PREFERRED_ROWS rows that stay in cache.
SYMMETRIC_BLOCK = 1024
SYMMETRIC_GPU_BLOCK = 4096


def plan_symmetric(n: int, itemsize: int, budget: int, *, row_bytes: int, block_bytes: int,
                   device: Optional[torch.device] = None) -> Optional[SymmetricPlan]:
    """The largest block (from the preferred size down to 64) whose fixed buffers (one block x block tile,
    ``block_bytes`` per unit of block size) plus one block of accumulator rows (``row_bytes`` each) fit in the
    budget, and as many blocks per group as the rest allows; None when even the smallest does not fit."""
    gpu = device is not None and device.type != "cpu"
    block = min(n, SYMMETRIC_GPU_BLOCK if gpu else SYMMETRIC_BLOCK)
    while block >= min(n, 64):
        fixed = block * block * itemsize + block * block_bytes
        left = budget - fixed
        if left >= block * row_bytes:
            group = max(1, left // max(1, block * row_bytes))
            return SymmetricPlan(block=block, group=int(group))
        if block <= 64:
            break
        block //= 2
    return None


def strip_rows(device: torch.device) -> int:
    """Rows of a tile strip whose elementwise passes run while it is in cache (CPU), or as large a launch as
    the symmetric schedules use (GPU)."""
    return PREFERRED_GPU_ROWS if device.type != "cpu" else PREFERRED_ROWS


def coefficients_fit(n: int, width: int, itemsize: int, budget: int) -> bool:
    """Whether the (n, width) coefficient matrix [alpha | alpha (x) x] is built once, whole: when it takes at
    most half the memory budget (otherwise every tile builds its slice)."""
    return n * width * itemsize <= budget // 2


def plan_tiles(m: int, n: int, itemsize: int, budget: int, *, tile_buffers: int, row_bytes: int,
               col_bytes: int = 0, device: Optional[torch.device] = None) -> TilePlan:
    """Choose tile sizes so that ``tile_buffers`` (rows x cols) buffers plus ``row_bytes`` per tile row and
    ``col_bytes`` per tile column fit in ``budget`` bytes."""
    gpu = device is not None and device.type != "cpu"
    cols = max(1, min(n, PREFERRED_GPU_COLS if gpu else PREFERRED_COLS))
    rows = max(1, min(m, PREFERRED_GPU_ROWS if gpu else PREFERRED_ROWS))

    def cost(r, c):
        return tile_buffers * r * c * itemsize + r * row_bytes + c * col_bytes

    while cost(rows, cols) > budget and rows > 8:
        rows //= 2
    while cost(rows, cols) > budget and cols > 64:
        cols //= 2
    return TilePlan(rows=max(1, rows), cols=max(1, cols))
