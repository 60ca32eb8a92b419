"""What the benchmark scripts share: writing their rows to a results CSV."""

from __future__ import annotations

import csv
import pathlib


def write_csv(rows: list[dict], path) -> None:
    """rows (dicts with the same keys, in column order) -> a CSV file at path (folders created)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
