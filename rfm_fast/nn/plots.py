"""PNG figures for ``rfm-fast nn-collapse``. Uses matplotlib's object API with the Agg canvas, so no global
backend is switched and nothing needs a display."""

from __future__ import annotations

import math
import pathlib
from typing import Sequence

from .collapse import LayerCollapse


def _figure(width: float, height: float, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols)
    return fig, axes


def plot_nc1_by_layer(results: Sequence[LayerCollapse], path: str | pathlib.Path, *, title: str = "") -> None:
    """Grouped bars per layer: NC1 of Phi(X), of S V^T Phi(X) and of act(W Phi(X)) (log scale), with the
    right-singular share written above each group."""
    fig, ax = _figure(max(6.0, 1.3 * len(results) + 2), 4.2)
    labels = [("Phi(X)", "nc1_input", "#4c72b0"), ("S V^T Phi(X)", "nc1_right", "#dd8452"),
              ("ReLU(U S V^T Phi(X))", "nc1_output", "#55a868")]
    width = 0.27
    for k, (label, attr, color) in enumerate(labels):
        xs = [i + (k - 1) * width for i in range(len(results))]
        ax.bar(xs, [getattr(r, attr) for r in results], width, label=label, color=color)
    top = max(max(r.nc1_input, r.nc1_right, r.nc1_output) for r in results)
    for i, r in enumerate(results):
        share = "n/a" if math.isnan(r.right_share) else f"{r.right_share:.2f}"
        ax.text(i, top * 1.6, f"share {share}", ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylim(top=top * 4)
    ax.set_xticks(range(len(results)), [f"layer {k + 1}\n({r.shape[0]}x{r.shape[1]})" for k, r in
                                        enumerate(results)])
    ax.set_ylabel("NC1 = tr(Sigma_W) / tr(Sigma_B)")
    ax.set_title(title or "NC1 at each layer: input, after the right singular step, after the nonlinearity")
    # Below the axes, so that no bar is covered.
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, frameon=False)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def plot_over_training(epochs: Sequence[int], per_layer: Sequence[Sequence[float]], path: str | pathlib.Path, *,
                       ylabel: str, title: str, log: bool = False,
                       dashed: Sequence[Sequence[float]] | None = None, dashed_label: str = "",
                       solid_label: str = "") -> None:
    """One line per layer over the recorded epochs (optionally a dashed companion series per layer)."""
    fig, ax = _figure(6.4, 4.2)
    colors = [f"C{k}" for k in range(10)]
    for k, values in enumerate(per_layer):
        ax.plot(epochs, values, color=colors[k % 10], marker="o", markersize=3, label=f"layer {k + 1}")
        if dashed is not None:
            ax.plot(epochs, dashed[k], color=colors[k % 10], linestyle="--", linewidth=1)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    subtitle = f"\nsolid: {solid_label}, dashed: {dashed_label}" if dashed is not None else ""
    ax.set_title(title + subtitle, fontsize=10)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
