"""Centring frames for clustered data: gap-certified components of the centres, each with its own centre.

Why. The expanded distance ||u_z||^2 + ||u_x||^2 - 2 u_z.u_x carries an error of about eps * (||u_z||^2 +
||u_x||^2) about the centring point, so pairs much closer than the data's radius R are *near* and must be
recomputed exactly. Deep RFM makes exactly such data (its classes collapse onto tight clusters on the unit sphere:
the share of near pairs grew from 0.15% at layer 1 to 20% at layer 8 on digits). Measured about a cluster's own
centre instead, a pair inside the cluster has norms of the cluster's size, and is no longer near.

What. The centres are split recursively along a direction (the line through the two means of a 2-means split of
the node, else its top principal direction) wherever the projections leave a *gap* of at least tau =
sqrt(8 near_rtol) R_node (R_node the node's radius about its mean): any two points on different sides of a gap
are at least tau apart, so at the top level every pair across components passes the near test in the global
frame (s >= tau^2 >= 4 near_rtol (||u_z||^2 + ||u_x||^2)) with room to spare; deeper splits (the partly collapsed
classes inside one wide component) are certified at their node's scale, and their cross pairs are evaluated in
the global frame, near or not, as they would be without the split. Only gaps with at least MIN_FRAMED points on
each side count, and a node whose pairs would all fail the global near test is not split (its cross pairs would
all be exact recomputations). The leaves are the components; those with at least MIN_FRAMED points, a sample of
whose pairs shows at least FRAME_SHARE failing the global near test (or known to, for such tight nodes), get a
frame of their own: distances of pairs of one framed component are evaluated in coordinates about its centre
(``Geometry.segments``), and the gradient products in the mixed coordinates of ``rfm_fast.core.gradient``.
Points are ordered by component, so a component is a contiguous range and a tile's distances split into at most
three rectangles per component. Evaluation points that are not the centres are
assigned by the same splits (at the gap's midpoint); their cross-component pairs are at least tau / 2 apart.

Correctness never depends on the components: every pair still passes the near test of the frame it is evaluated
in, so a poor split only costs exact recomputations, never accuracy.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

MIN_FRAMED = 16
# A component gets a frame when its points' squared norms about their own centre are at most FRAME_GAIN of those
# about the global centre (the expansion's error shrinks by that factor), and the global frame costs something:
# at least FRAME_SHARE of a sample of its pairs fails the global near test (exact recomputations the frame
# saves), or the pairs' absolute error in s, ~eps (||u_z||^2 + ||u_x||^2), reaches eps * NORM_LIMIT / near_rtol
# on average (2^-18 in float32: a Gaussian kernel value carries that relative error however far the pair is).
FRAME_GAIN = 1.0 / 16.0
FRAME_SHARE = 2.0**-6
NORM_LIMIT = 0.25
FRAME_SAMPLE = 128
SEARCH_SAMPLE = 256
MAX_COMPONENTS = 256
LLOYD_STEPS = 2
# A 2-means split without a gap is taken when its halves keep at most this share of the node's spread.
SPLIT_GAIN = 0.25
# The search runs on the centres' SKETCH_DIM leading principal coordinates when r is larger than twice that.
SKETCH_DIM = 32
# ... found from the subspace of SKETCH_ROWS evenly spaced centres (the sketch itself covers all of them).
SKETCH_ROWS = 512


@dataclass
class _Node:
    index: torch.Tensor  # centres of this node (original order)
    direction: Optional[torch.Tensor] = None  # split: go left when u . direction < threshold
    threshold: float = 0.0
    children: tuple = ()
    label: int = -1


def _largest_gap(p: torch.Tensor):
    """(gap, threshold) of the projections p: the widest gap between consecutive sorted values that leaves at
    least MIN_FRAMED points on each side (a gap that only cuts off a few outliers makes no useful frame), and its
    midpoint."""
    values = torch.sort(p).values
    gaps = values[MIN_FRAMED:values.numel() - MIN_FRAMED + 1] - values[MIN_FRAMED - 1:values.numel() - MIN_FRAMED]
    i = int(torch.argmax(gaps))
    j = i + MIN_FRAMED - 1
    return float(gaps[i]), float(0.5 * (values[j] + values[j + 1]))


def _two_means(P: torch.Tensor):
    """A 2-means split of the points P (k, r) (farthest-point start, up to LLOYD_STEPS Lloyd steps, stopped once
    the halves no longer change; distances by expansion, which is accurate enough to split, so no (k, r)
    temporaries): (unit axis w, the boundary's projection on w, the points' projections, a function giving the
    share of P's spread about its mean that the two halves keep about theirs), or None when P does not split."""
    k = P.shape[0]
    norms = (P * P).sum(1)
    mean = P.mean(0)
    c1 = P[torch.argmax(norms - 2.0 * (P @ mean))]  # the farthest point from the mean (|mean|^2 is common)
    c2 = P[torch.argmax(norms - 2.0 * (P @ c1))]
    left, count = None, 0
    for _ in range(LLOYD_STEPS + 1):
        side = (P @ (c2 - c1)) * 2.0 <= float(c2 @ c2 - c1 @ c1)
        if left is not None and torch.equal(side, left):
            break
        left = side
        count = int(left.sum())
        if count in (0, k):
            return None
        c1, c2 = P[left].mean(0), P[~left].mean(0)
    w = c2 - c1
    norm = float(w.norm())
    if not norm > 0:
        return None
    w = w / norm

    def kept() -> float:
        spread = float(norms.mean() - mean @ mean)
        inside = float((norms[left].mean() - c1 @ c1) * (count / k) + (norms[~left].mean() - c2 @ c2) * (1 - count / k))
        return inside / spread if spread > 0 else 1.0

    return w, float(0.5 * ((c1 + c2) @ w)), P @ w, kept


def _principal(P: torch.Tensor) -> Optional[torch.Tensor]:
    """P's top principal direction (a few power steps), or None."""
    k = P.shape[0]
    mean = P.mean(0)
    v = P[torch.argmax(((P - mean) ** 2).sum(1))] - mean if k <= 4096 else P[0] - mean
    for _ in range(2):
        v = P.T @ (P @ v) - k * mean * float(mean @ v)
        norm = float(v.norm())
        if not norm > 0:
            return None
        v = v / norm
    return v


def _sketch(u: torch.Tensor, sq: torch.Tensor):
    """(S, rho, Q): the coordinates S = u Q (n, q) of u in its q = SKETCH_DIM leading principal directions Q (r, q)
    (two steps of randomized subspace iteration on SKETCH_ROWS evenly spaced points, fixed seed), and rho (n,),
    each point's norm outside them (``sq``: the squared norms of u); or (u, 0, None) when r <= 2 q. Projections on
    a unit w of the sketch are projections of u on the unit Q w, so a gap seen in the sketch is a gap of the data;
    only distances need rho (see ``Components``). A direction the sample misses only leaves splits unfound."""
    n, r = u.shape
    if r <= 2 * SKETCH_DIM:
        return u, torch.zeros(n, dtype=u.dtype, device=u.device), None
    gen = torch.Generator(device="cpu").manual_seed(0)
    Q = torch.randn(r, SKETCH_DIM, generator=gen, dtype=u.dtype).to(u.device)
    sample = u if n <= SKETCH_ROWS else u[torch.linspace(0, n - 1, SKETCH_ROWS, device=u.device).long()]
    for _ in range(2):
        Q, _ = torch.linalg.qr(sample.T @ (sample @ Q))
    S = u @ Q
    rho = (sq - (S * S).sum(1)).clamp_min(0).sqrt()
    return S.contiguous(), rho, Q


def _split(P: torch.Tensor, tau: float, near_rtol: float, mean_sq: float):
    """(direction, threshold, left mask) for a node's points P, or None. A gap of at least tau along the 2-means
    axis or the top principal direction certifies the split (module docstring); failing that, a 2-means split
    whose halves keep at most SPLIT_GAIN of the spread about their own means (clusters that touch or overlap:
    the partly collapsed classes of a Deep RFM layer) is taken too: pairs across it are evaluated in the global
    frame, and the few of them that are near are recomputed exactly, as without the split. Such a split needs its
    halves' means apart by more than the global frame's near radius, sqrt(8 near_rtol) times the points' rms
    distance from the global centre: splitting one tight cluster would only make near cross pairs. ``mean_sq``:
    the mean squared norm of the node's points (in the full coordinates, when P is a sketch)."""
    found = _two_means(P)
    if found is not None:
        w, boundary, projection, kept = found
        gap, threshold = _largest_gap(projection)
        if gap >= tau:
            return w, threshold, projection < threshold
        left = projection < boundary
        count = int(left.sum())
        separation = float(projection[left].mean() - projection[~left].mean()) if 0 < count < P.shape[0] else 0.0
        wide = separation**2 >= 8.0 * near_rtol * mean_sq
        if wide and MIN_FRAMED <= count <= P.shape[0] - MIN_FRAMED and kept() <= SPLIT_GAIN:
            return w, boundary, left
    v = _principal(P)
    if v is not None:
        projection = P @ v
        gap, threshold = _largest_gap(projection)
        if gap >= tau:
            return v, threshold, projection < threshold
    return None


class Components:
    """Gap-certified components of the centres (see the module docstring).

    The search works on a sketch of the centres (their leading principal coordinates, ``_sketch``), so its cost
    does not grow with r: split directions lie in the sketch (stored lifted back, Q w, for ``assign``), and a
    node's radius is bounded from above with the norms rho outside it, ||u_i - mean|| <= ||S_i - mean_S|| +
    rho_i + mean(rho) (the mean's outside part is at most the mean of the outside norms), so a gap still
    certifies at least tau."""

    def __init__(self, u: torch.Tensor, near_rtol: float):
        n = u.shape[0]
        full_sq = (u * u).sum(1)
        S, rho, Q = _sketch(u, full_sq)
        self.root = _Node(torch.arange(n, device=u.device))
        leaves, stack, tight_leaves = [], [self.root], []
        while stack:
            node = stack.pop()
            split = None
            tight = False
            if node.index.numel() >= 2 * MIN_FRAMED and len(leaves) + len(stack) + 1 < MAX_COMPONENTS:
                whole = node.index.numel() == n
                P = S if whole else S[node.index]
                out = rho if whole else rho[node.index]
                mean = P.mean(0)
                inside = ((P * P).sum(1) - 2.0 * (P @ mean) + (mean * mean).sum()).clamp_min(0)
                radius = float((inside.sqrt() + out + out.mean()).max())
                sq = full_sq if whole else full_sq[node.index]
                # Every pair of a tight node fails the global near test (s <= (2 radius)^2 <= near_rtol
                # (||u_z||^2 + ||u_x||^2)): a split would only send its cross pairs to the exact path.
                tight = 4.0 * radius * radius <= 2.0 * near_rtol * float(sq.min())
                if not tight:
                    split = _split(P, gap_threshold(near_rtol, radius), near_rtol, float(sq.mean()))
            if split is None:
                node.label = len(leaves)
                leaves.append(node)
                tight_leaves.append(tight)
                continue
            node.direction, node.threshold, left = split
            if Q is not None:
                node.direction = Q @ node.direction
            node.children = (_Node(node.index[left]), _Node(node.index[~left]))
            stack.extend(node.children[::-1])
        self.count = len(leaves)
        # (count,) bool: the leaves found tight (every pair of one fails the global near test).
        self.tight = torch.tensor(tight_leaves, dtype=torch.bool, device=u.device)
        self.labels = torch.empty(n, dtype=torch.long, device=u.device)
        for leaf in leaves:
            self.labels[leaf.index] = leaf.label

    def assign(self, u: torch.Tensor) -> torch.Tensor:
        """Component of each point u (k, r) by the splits of the tree (the side of each gap's midpoint)."""
        labels = torch.empty(u.shape[0], dtype=torch.long, device=u.device)
        stack = [(self.root, torch.arange(u.shape[0], device=u.device))]
        while stack:
            node, index = stack.pop()
            if not node.children:
                labels[index] = node.label
                continue
            left = (u[index] @ node.direction.to(u.dtype)) < node.threshold
            stack.append((node.children[0], index[left]))
            stack.append((node.children[1], index[~left]))
        return labels


@dataclass
class Layout:
    """Where the components sit in the permuted orders: ``z_ranges`` sorted (start, stop, component) of the
    evaluation points, ``x_ranges`` component -> (start, stop) of the centres, and the framed components."""

    z_ranges: list
    x_ranges: dict
    framed: frozenset
    _starts: list = field(init=False)

    def __post_init__(self):
        self._starts = [r[0] for r in self.z_ranges]

    def segments(self, rows: slice, cols: slice, segment_type) -> list:
        out = []
        plain_start = None
        k = max(0, bisect.bisect_right(self._starts, rows.start) - 1)
        for start, stop, comp in self.z_ranges[k:]:
            if start >= rows.stop:
                break
            r0, r1 = max(start, rows.start), min(stop, rows.stop)
            if r0 >= r1:
                continue
            own = self.x_ranges.get(comp) if comp in self.framed else None
            c0 = c1 = None
            if own is not None:
                c0, c1 = max(own[0], cols.start), min(own[1], cols.stop)
            if own is None or c0 >= c1:
                if plain_start is None:
                    plain_start = r0
                plain_stop = r1
                continue
            if plain_start is not None:
                out.append(segment_type(slice(plain_start, plain_stop), cols, 0))
                plain_start = None
            sub = slice(r0, r1)
            if c0 > cols.start:
                out.append(segment_type(sub, slice(cols.start, c0), 0))
            out.append(segment_type(sub, slice(c0, c1), 1))
            if c1 < cols.stop:
                out.append(segment_type(sub, slice(c1, cols.stop), 0))
        if plain_start is not None:
            out.append(segment_type(slice(plain_start, plain_stop), cols, 0))
        return out


def ranges(sorted_labels: torch.Tensor) -> list:
    """(start, stop, label) runs of a sorted label vector."""
    if sorted_labels.numel() == 0:
        return []
    values, counts = torch.unique_consecutive(sorted_labels, return_counts=True)
    out, start = [], 0
    for v, c in zip(values.tolist(), counts.tolist()):
        out.append((start, start + c, v))
        start += c
    return out


def gap_threshold(near_rtol: float, radius: float) -> float:
    """tau: the gap that certifies cross-component pairs for the global frame's near test."""
    return math.sqrt(8.0 * near_rtol) * radius


def worth_searching(u: torch.Tensor, near_rtol: float) -> bool:
    """Whether the global frame costs enough to look for components: among all pairs of a sample of SEARCH_SAMPLE
    centres (evenly spaced in their order), at least FRAME_SHARE / 8 fail the near test, or the mean absolute
    error reaches NORM_LIMIT (see FRAME_GAIN). Random data pass neither and skip the search. The sample's
    distances come from one Gram matrix: accurate enough to tell a pair near the bound from one far above it."""
    n, r = u.shape
    k = min(n, SEARCH_SAMPLE)
    P = u[torch.linspace(0, n - 1, k, device=u.device).long()]
    norms = (P * P).sum(1)
    if near_rtol * 2.0 * float(norms.mean()) >= NORM_LIMIT:
        return True
    # One product gives s_ij - rtol (|p_i|^2 + |p_j|^2) = (1 - rtol)(|p_i|^2 + |p_j|^2) - 2 p_i.p_j, flagged when
    # <= 0: three passes over the sample's k x k pairs (product, comparison, count) instead of five.
    keep = norms * (1.0 - near_rtol)
    a = torch.empty(k, r + 2, dtype=u.dtype, device=u.device)
    b = torch.empty(k, r + 2, dtype=u.dtype, device=u.device)
    a[:, :r], a[:, r], a[:, r + 1] = P, keep, 1.0
    torch.mul(P, -2.0, out=b[:, :r])
    b[:, r], b[:, r + 1] = 1.0, keep
    # off-diagonal pairs only: every diagonal entry (-2 rtol |p_i|^2, to rounding far below it) is flagged
    count = int(torch.count_nonzero(a @ b.T <= 0)) - k
    pairs = k * (k - 1)
    return count / max(1, pairs) >= FRAME_SHARE / 8


def framed_components(u: torch.Tensor, labels: torch.Tensor, count: int, near_rtol: float,
                      tight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(count,) bool: the components that get a frame (see FRAME_GAIN), from per-component means of the squared
    norms about the global and the own centre, and FRAME_SAMPLE random pairs of each component (fixed seed).
    ``tight`` (count,) bool: components known to fail the global near test for every pair
    (``Components.tight``), which need no sample."""
    device = u.device
    sizes = torch.bincount(labels, minlength=count)
    weight = 1.0 / sizes.clamp_min(1).to(u.dtype)
    norms = (u * u).sum(1)
    global_norm = torch.zeros(count, dtype=u.dtype, device=device).index_add_(0, labels, norms) * weight
    means = torch.zeros(count, u.shape[1], dtype=u.dtype, device=device).index_add_(0, labels, u) * weight[:, None]
    local_norm = (global_norm - (means * means).sum(1)).clamp_min(0)  # mean of |u - mean|^2, to rounding
    candidate = (sizes >= MIN_FRAMED) & (local_norm <= FRAME_GAIN * global_norm)
    framed = candidate & (near_rtol * 2.0 * global_norm >= NORM_LIMIT)
    if tight is not None:
        framed |= candidate & tight
    rest = torch.nonzero(candidate & ~framed).flatten()
    if rest.numel() == 0:
        return framed
    order = torch.sort(labels, stable=True).indices
    starts = torch.cumsum(sizes, 0) - sizes
    gen = torch.Generator(device="cpu").manual_seed(0)
    draw = torch.rand(2, rest.numel(), FRAME_SAMPLE, generator=gen).to(device)
    picks = starts[rest][None, :, None] + (draw * sizes[rest][None, :, None]).long()
    a, b = u[order[picks[0]]], u[order[picks[1]]]  # (components, FRAME_SAMPLE, r)
    s = ((a - b) ** 2).sum(-1)
    bound = near_rtol * ((a * a).sum(-1) + (b * b).sum(-1))
    distinct = s > 0
    share = (distinct & (s <= bound)).sum(1).to(u.dtype) / distinct.sum(1).clamp_min(1).to(u.dtype)
    framed[rest] = share >= FRAME_SHARE
    return framed
