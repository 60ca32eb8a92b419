"""PNG figures of a Deep RFM run: neural-collapse metrics per layer and class-sorted Gram matrices.

Rendered with matplotlib's Agg canvas directly (no pyplot, no global backend switch), so the figures can be made
on a headless machine and from inside an interactive session without side effects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

POINTS = (("input", r"$X_l$ (layer input)"), ("projected", r"$X_l M_l^{1/2}$ (after the projection)"),
          ("features", r"$\Phi(X_l M_l^{1/2})$ (after feature map)"))
COLORS = {"input": "#1f77b4", "projected": "#d62728", "features": "#2ca02c"}
MARKERS = {"input": "o", "projected": "s", "features": "^"}


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def centred_gram(X: torch.Tensor | np.ndarray) -> np.ndarray:
    """G = U U^T with U the rows of X centred by the sample mean and scaled to unit norm (values in [-1, 1])."""
    U = torch.as_tensor(X).to(torch.float64)
    U = U - U.mean(0, keepdim=True)
    norms = U.norm(dim=1, keepdim=True)
    U = U / torch.where(norms > 0, norms, torch.ones_like(norms))
    return (U @ U.T).cpu().numpy()


def gram_subset(y: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """Indices of up to ``per_class`` rows of each class, sorted by class (the block structure of the plots)."""
    rng = np.random.default_rng(seed)
    picks = []
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        picks.append(np.sort(rng.choice(rows, size=min(per_class, len(rows)), replace=False)))
    return np.concatenate(picks)


def short_name(dataset: str) -> str:
    """A dataset's name for a plot title: the file name without its folder and suffix for a path."""
    name = str(dataset)
    return Path(name).stem if (name.endswith(".npz") or "/" in name or "\\" in name) else name


def plot_collapse(runs: dict[str, Sequence[dict]], path: str | Path, *, title: Optional[str] = None) -> Path:
    """NC1 (top row) and NC2 (bottom row) per layer at the three points of each layer, log scale.

    runs: {"panel title": metrics list (DeepRFM.metrics_)}, one column each (e.g. the AGOP run and the identity
    control); the y axes of a row are shared so the columns compare directly. Returns the written path.
    """
    path = Path(path)
    columns = list(runs.items())
    fig = _figure(4.6 * len(columns) + 0.6, 7.0)
    axes = fig.subplots(2, len(columns), squeeze=False, sharey="row")
    for col, (name, metrics) in enumerate(columns):
        layers = np.arange(1, len(metrics) + 1)
        for row, metric in enumerate(("nc1", "nc2")):
            ax = axes[row, col]
            inputs = np.array([m[f"{metric}_input"] for m in metrics], dtype=float)
            projected = np.array([m[f"{metric}_projected"] for m in metrics], dtype=float)
            # The identity control has no projection (X_l M^1/2 = X_l): its line would only hide the input's.
            identity = np.allclose(inputs, projected, rtol=1e-6, equal_nan=True)
            for point, label in POINTS:
                if point == "projected" and identity:
                    continue
                values = np.array([m[f"{metric}_{point}"] for m in metrics], dtype=float)
                ax.semilogy(layers, values, marker=MARKERS[point], color=COLORS[point], label=label, lw=1.8,
                            ms=5)
            if identity and row == 0:
                ax.text(0.02, 0.02, r"no projection: $X_l M_l^{1/2} = X_l$", transform=ax.transAxes, fontsize=8,
                        color="0.35")
            ax.set_xticks(layers)
            ax.grid(True, which="major", alpha=0.4)
            ax.grid(True, which="minor", alpha=0.12)
            ax.set_xlabel("layer")
            if row == 0:
                ax.set_title(name, fontsize=11)
            if col == 0:
                ax.set_ylabel(r"NC1 = tr$(\Sigma_W)$ / tr$(\Sigma_B)$" if metric == "nc1"
                              else r"NC2 = mean$(\tilde\mu\tilde\mu^\top - E_{\mathrm{ETF}})^2$")
    # The legend from the panel with the most lines (a control panel leaves out the projected one).
    handles, labels = max((ax.get_legend_handles_labels() for ax in axes[0]), key=lambda hl: len(hl[1]))
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=9, frameon=False)
    if title:
        fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97 if title else 1))
    fig.savefig(path)
    return path


def plot_grams(rows: dict[str, Sequence[tuple[str, np.ndarray]]], path: str | Path, *,
               class_sizes: Optional[Sequence[int]] = None, title: Optional[str] = None) -> Path:
    """Centred, row-normalised Gram matrices (the seed paper's Figure 1): one row of panels per run.

    rows: {"row label": [(panel title, (s, s) Gram matrix), ...]}, all rows the same length; the samples are
    sorted by class, and ``class_sizes`` (samples per class, in order) draws the class boundaries.
    """
    path = Path(path)
    entries = list(rows.items())
    ncols = max(len(panels) for _, panels in entries)
    fig = _figure(2.6 * ncols + 1.2, 2.9 * len(entries) + 0.5)
    axes = fig.subplots(len(entries), ncols, squeeze=False)
    image = None
    for r, (label, panels) in enumerate(entries):
        for c in range(ncols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(panels):
                ax.set_axis_off()
                continue
            name, G = panels[c]
            image = ax.imshow(G, cmap="RdBu_r", vmin=-1.0, vmax=1.0, interpolation="nearest")
            if class_sizes is not None:
                for edge in np.cumsum(class_sizes)[:-1]:
                    ax.axhline(edge - 0.5, color="k", lw=0.3, alpha=0.5)
                    ax.axvline(edge - 0.5, color="k", lw=0.3, alpha=0.5)
            ax.set_title(name, fontsize=10)
            if c == 0:
                ax.set_ylabel(label, fontsize=10)
    if title:
        fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, 0, 0.92, 0.95 if title else 1), h_pad=1.6)
    if image is not None:
        cax = fig.add_axes((0.935, 0.15, 0.015, 0.7))
        fig.colorbar(image, cax=cax)
    fig.savefig(path)
    return path
