"""The one tile planner: sizes every tile, strip and block of every schedule under the memory budget.

A schedule describes what it holds at once as bytes: ``fixed`` (independent of the tile), ``per_row`` (per row of
the tile: accumulators, output rows), ``per_col`` (per column: coefficient slices) and ``per_cell`` (per entry of
the rows x cols tile: the tile itself, scratch). The planner starts from the preferred sizes of the device and
halves rows, then columns, down to the minimum; when even the minimum does not fit it raises
:class:`BudgetError` with what was needed, never exceeding the budget silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

# CPU: tiles of ~256 x 2048 keep the elementwise passes of a strip in each core's L2 while the GEMMs they feed
# stay large enough to run near peak. GPU: the passes go through device memory anyway, so tiles are as large as
# the budget allows, to amortise launches.
PREFERRED = {"cpu": (256, 2048), "gpu": (4096, 8192)}
MIN_ROWS, MIN_COLS = 8, 64
# Square blocks of the symmetric schedule: 1024 keeps both of its GEMMs (W V and W^T V) near the machine's GEMM
# rate on CPU while the elementwise work runs in strips of STRIP_ROWS rows that stay in cache.
SYMMETRIC_BLOCK = {"cpu": 1024, "gpu": 4096}
MIN_BLOCK = 64
# Value tiles (mat-vec, kernel matrix, normal product) in strips of 512 rows on CPU (a 2 MB strip, half in each
# core's L2): against 256, the symmetric mat-vec ran 10-17% faster on 2 cores at n = 1280 .. 16000, d = 10 .. 784,
# with M = I and a learned M, torch and cpp alike (a BLAS call and a torch pass each cost a fixed ~10-30 us, paid
# half as often). Gradient tiles keep 256: there the change was mixed (torch AGOP at d = 784 10% slower).
STRIP_ROWS = {"cpu": 512, "gpu": 4096}
GRADIENT_STRIP_ROWS = {"cpu": 256, "gpu": 4096}


class BudgetError(ValueError):
    """The memory budget cannot hold even the smallest tile of a schedule."""


def _kind(device: Optional[torch.device]) -> str:
    return "cpu" if device is None or device.type == "cpu" else "gpu"


def strip_rows(device: Optional[torch.device], gradient: bool = False) -> int:
    """Rows of a tile strip whose elementwise passes run while it is in cache (CPU), or one launch (GPU), for
    value tiles or (``gradient``) gradient tiles."""
    return (GRADIENT_STRIP_ROWS if gradient else STRIP_ROWS)[_kind(device)]


def coefficients_whole(n: int, width: int, itemsize: int, budget: int, copies: int = 1) -> bool:
    """Whether ``copies`` coefficient matrices (n, width) are built once, whole: when they take at most half the
    budget (otherwise every tile builds its slice)."""
    return copies * n * width * itemsize <= budget // 2


@dataclass(frozen=True)
class TilePlan:
    rows: int  # evaluation points per tile
    cols: int  # centres per tile

    def row_blocks(self, m: int):
        for start in range(0, m, self.rows):
            yield slice(start, min(start + self.rows, m))

    def col_blocks(self, n: int):
        for start in range(0, n, self.cols):
            yield slice(start, min(start + self.cols, n))


def plan_tiles(m: int, n: int, budget: int, *, fixed: int = 0, per_row: int = 0, per_col: int = 0,
               per_cell: int = 0, device: Optional[torch.device] = None,
               preferred: Optional[tuple[int, int]] = None, minimum: tuple[int, int] = (MIN_ROWS, MIN_COLS),
               what: str = "a tile") -> TilePlan:
    """Tile sizes (rows <= m, cols <= n) whose bytes ``fixed + rows*per_row + cols*per_col + rows*cols*per_cell``
    fit ``budget``; raises BudgetError when the minimum tile does not."""
    pref_rows, pref_cols = preferred or PREFERRED[_kind(device)]
    rows, cols = max(1, min(m, pref_rows)), max(1, min(n, pref_cols))
    min_rows, min_cols = max(1, min(m, minimum[0])), max(1, min(n, minimum[1]))

    def cost(r: int, c: int) -> int:
        return fixed + r * per_row + c * per_col + r * c * per_cell

    while cost(rows, cols) > budget and rows > min_rows:
        rows = max(min_rows, rows // 2)
    while cost(rows, cols) > budget and cols > min_cols:
        cols = max(min_cols, cols // 2)
    if cost(rows, cols) > budget:
        raise BudgetError(f"memory_budget of {budget / 2**20:.1f} MiB cannot hold {what}: the smallest "
                          f"({rows} x {cols}) needs {cost(rows, cols) / 2**20:.1f} MiB; raise memory_budget")
    return TilePlan(rows=rows, cols=cols)


@dataclass(frozen=True)
class SymmetricPlan:
    """Schedule for evaluation points equal to the centres: square blocks of ``block`` points, and groups of
    ``group`` blocks whose accumulators are held at once. Within a group each unordered pair of blocks is computed
    once and used twice (tile W_IJ feeds rows I, and its transpose feeds rows J); pairs across groups are
    computed once from each side."""

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


def plan_symmetric(n: int, budget: int, *, fixed: int = 0, per_block_cell: int = 0, per_block_row: int = 0,
                   per_acc_row: int = 0, device: Optional[torch.device] = None) -> Optional[SymmetricPlan]:
    """The largest block (preferred size down to MIN_BLOCK) whose buffers, ``fixed + B*B*per_block_cell +
    B*per_block_row``, plus one block of accumulator rows (``per_acc_row`` each) fit the budget, and as many
    blocks per group as the rest allows; None when even the smallest does not fit (the caller then takes the
    one-sided schedule)."""
    block = min(n, SYMMETRIC_BLOCK[_kind(device)])
    while True:
        left = budget - fixed - block * block * per_block_cell - block * per_block_row
        if left >= block * per_acc_row and left >= 0:
            group = left // max(1, block * per_acc_row) if per_acc_row else n
            return SymmetricPlan(block=block, group=max(1, int(group)))
        if block <= min(n, MIN_BLOCK):
            return None
        block = max(min(n, MIN_BLOCK), block // 2)
