"""Where each layer of a trained network collapses its features, and how its weights relate to its AGOP.

For a linear layer with weight W (p_out, p_in), thin SVD W = U S V^T (rank r = min(p_out, p_in)), input features
Phi(X) (N, p_in) and the nonlinearity sigma that follows it, ``collapse_by_layer`` measures three points:

    input:  Phi(X)
    right:  S V^T Phi(X)                 (the right singular vectors and values applied: (N, r))
    output: sigma(U S V^T Phi(X) + b)    (= sigma(W Phi(X) + b): the next layer's input)

and at each the deep neural collapse metrics NC1 and NC2 of rfm_fast.metrics. U has orthonormal columns, so the
"right" point has the NC1 and NC2 of the pre-activation W Phi(X): the left singular vectors cannot change them, and
the layer's collapse splits exactly into the right-singular step and the nonlinearity.

Share of the layer's NC1 drop done by the right-singular step (on a log scale, since NC1 spans decades):

    right_share = (log NC1(input) - log NC1(right)) / (log NC1(input) - log NC1(output))

1 means the nonlinearity added nothing, 0 that the right-singular step did nothing; values above 1 (the
nonlinearity undid some of the collapse) or below 0 (the right step spread the classes and the nonlinearity more
than made up for it) are reported as they are, not clipped. It is NaN when the layer did not reduce NC1 at all
(denominator <= 0: there is no drop to share) or when one of the three NC1 values is 0, infinite or NaN.

Neural feature ansatz: the Pearson correlation of the entries of W^T W (p_in, p_in) with the entries of the AGOP of
the network output with respect to the layer input, and with AGOP^{1/2} (symmetric square root, negative
eigenvalues clipped to 0). The AGOP is the mean over the evaluated samples (the scale does not change a
correlation). A correlation is NaN when either matrix has constant entries.

Models handed in (``model`` argument):
- an ``nn.Sequential``: every top-level ``nn.Linear`` is a layer; its input features are model[:i](X), the
  sub-network to the output is model[i:], and its nonlinearity is whatever modules stand between it and the next
  ``nn.Linear`` (for the last one: up to the end of the model, often nothing).
- a sequence of ``nn.Linear`` modules, consecutive layers of an MLP: ``activation`` (default ReLU) is applied
  between them, not after the last.
- a sequence of :class:`LinearLayer` for any other model: the weight, a callable (or the tensor) giving the layer
  input Phi(X), a callable from the layer input to the network output (or None to skip the feature ansatz), and
  the nonlinearity after the layer (None for none). E.g. for the classifier of a CNN:
  ``LinearLayer(fc.weight, lambda x: backbone(x).flatten(1), head=fc, activation=None)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from .. import metrics
from ..core.metric import psd_sqrt
from .agop import batched_apply, layer_agop, linear_indices

Tensorish = Any


@dataclass
class LinearLayer:
    """A linear layer of any model, as ``collapse_by_layer`` needs it.

    weight: (p_out, p_in). features: a callable X -> Phi(X) (N, p_in), or the (N, p_in) tensor Phi(X) itself.
    head: a callable from the layer input (b, p_in) to the network output (b, c), for the AGOP; None skips the
    feature ansatz. activation: the nonlinearity applied to W Phi + b (a callable on (b, p_out)), None for the
    identity. bias: (p_out,) or None.
    """

    weight: torch.Tensor
    features: Callable[[torch.Tensor], torch.Tensor] | torch.Tensor
    head: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    activation: Optional[Callable[[torch.Tensor], torch.Tensor]] = field(default=torch.relu)
    bias: Optional[torch.Tensor] = None
    name: str = ""


@dataclass
class LayerCollapse:
    """The measures of one layer (see the module docstring for the definitions)."""

    name: str
    shape: tuple[int, int]
    nc1_input: float
    nc1_right: float
    nc1_output: float
    nc2_input: float
    nc2_right: float
    nc2_output: float
    right_share: float
    nfa_agop: float
    nfa_agop_sqrt: float

    def as_dict(self) -> dict:
        out = asdict(self)
        out["shape"] = list(self.shape)
        return out


class _Activation(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def layers_of(model: nn.Sequential | Sequence[nn.Linear] | Sequence[LinearLayer], *,
              activation: Callable[[torch.Tensor], torch.Tensor] = torch.relu) -> list[LinearLayer]:
    """The :class:`LinearLayer` list for a model handed in any of the three ways of the module docstring.

    Raises TypeError for anything else, ValueError for an empty sequence or a Sequential without nn.Linear.
    """
    if isinstance(model, nn.Sequential):
        indices = linear_indices(model)
        layers = []
        for k, i in enumerate(indices):
            stop = indices[k + 1] if k + 1 < len(indices) else len(model)
            between = model[i + 1:stop]
            layers.append(LinearLayer(
                weight=model[i].weight, features=model[:i], head=model[i:],
                activation=between if len(between) else None, bias=model[i].bias, name=f"{i}"))
        return layers
    if isinstance(model, nn.Module) or not isinstance(model, Sequence) or isinstance(model, (str, bytes)):
        raise TypeError("model must be an nn.Sequential, a sequence of nn.Linear or a sequence of LinearLayer, "
                        f"got {type(model).__name__}")
    if len(model) == 0:
        raise ValueError("model is an empty sequence")
    if all(isinstance(m, LinearLayer) for m in model):
        return list(model)
    if all(isinstance(m, nn.Linear) for m in model):
        modules: list[nn.Module] = []
        for k, linear in enumerate(model):
            modules.append(linear)
            if k + 1 < len(model):
                modules.append(_Activation(activation))
        layers = layers_of(nn.Sequential(*modules))
        for k, layer in enumerate(layers):
            layer.name = str(k)
        return layers
    raise TypeError("a sequence model must hold only nn.Linear or only LinearLayer items")


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of the entries of two same-shape tensors (float64); NaN when one is constant."""
    a = a.detach().reshape(-1).to(torch.float64)
    b = b.detach().reshape(-1).to(a.device, torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    a = a - a.mean()
    b = b - b.mean()
    denom = float(a.norm() * b.norm())
    return float(a @ b) / denom if denom > 0 else float("nan")


def right_singular_share(nc1_input: float, nc1_right: float, nc1_output: float) -> float:
    """(log NC1(input) - log NC1(right)) / (log NC1(input) - log NC1(output)); NaN in the degenerate cases
    (a value that is not finite and positive, or no NC1 drop across the layer)."""
    values = (nc1_input, nc1_right, nc1_output)
    if not all(math.isfinite(v) and v > 0 for v in values):
        return float("nan")
    total = math.log(nc1_input) - math.log(nc1_output)
    if total <= 0:
        return float("nan")
    return (math.log(nc1_input) - math.log(nc1_right)) / total


def _safe(metric: Callable[[Any, Any], float], Z: torch.Tensor, y: torch.Tensor) -> float:
    # NC2 is undefined when a class mean sits at the global mean (e.g. a layer that maps everything to 0).
    try:
        return metric(Z, y)
    except ValueError:
        return float("nan")


def _layer_input(layer: LinearLayer, X: torch.Tensor, batch_size: int) -> torch.Tensor:
    if isinstance(layer.features, torch.Tensor):
        return layer.features.detach()
    return batched_apply(layer.features, X, batch_size=batch_size)


def _select(layers: list[LinearLayer], which: str | Sequence[int]) -> list[LinearLayer]:
    if which == "hidden":
        return [layer for layer in layers if layer.activation is not None]
    if which == "all":
        return layers
    if isinstance(which, str):
        raise ValueError(f"layers must be 'hidden', 'all' or a list of positions, got {which!r}")
    return [layers[i] for i in which]


def collapse_by_layer(model: nn.Sequential | Sequence[nn.Linear] | Sequence[LinearLayer], X: Tensorish,
                      y: Tensorish, *, layers: str | Sequence[int] = "hidden",
                      activation: Callable[[torch.Tensor], torch.Tensor] = torch.relu, nfa: bool = True,
                      agop_samples: Optional[int] = None, agop_batch_size: Optional[int] = None,
                      batch_size: int = 4096, seed: int = 0) -> list[LayerCollapse]:
    """Per-layer NC1 / NC2 at the layer input, after the right-singular step and after the nonlinearity; the
    right-singular share of the NC1 drop; the neural feature ansatz correlations (module docstring).

    model: an nn.Sequential, a sequence of nn.Linear (``activation`` between them) or a sequence of LinearLayer.
    X: (N, ...) network inputs (numpy or torch; cast to the model's dtype and device batch by batch).
    y: (N,) integer labels, at least 2 classes.
    layers: "hidden" (default: the layers followed by a nonlinearity; for an MLP all but the output layer, whose
        measures are trivial: no nonlinearity, and its AGOP is exactly W^T W), "all", or positions in the layer list.
    nfa: compute the feature ansatz correlations (else they are NaN).
    agop_samples: evaluate the AGOP on this many samples (a seeded random subset), default all N.
    agop_batch_size: samples per Jacobian batch (see layer_agop). batch_size: samples per forward batch.

    Runs under no_grad and leaves the model untouched. Returns one LayerCollapse per selected layer, in order.
    Raises ValueError / TypeError for malformed model, X or y (see layers_of and rfm_fast.metrics).
    """
    all_layers = layers_of(model, activation=activation)
    chosen = _select(all_layers, layers)
    X = torch.as_tensor(X)
    y = torch.as_tensor(y).reshape(-1).cpu()
    if X.shape[0] != y.shape[0]:
        raise ValueError(f"X has {X.shape[0]} samples but y has {y.shape[0]} labels")
    subset = None
    if agop_samples is not None and agop_samples < X.shape[0]:
        generator = torch.Generator().manual_seed(seed)
        subset = torch.randperm(X.shape[0], generator=generator)[:agop_samples]

    results = []
    for layer in chosen:
        W = layer.weight.detach()
        Phi = _layer_input(layer, X, batch_size)
        if Phi.ndim != 2 or Phi.shape[1] != W.shape[1]:
            raise ValueError(f"layer {layer.name!r}: input features of shape {tuple(Phi.shape)} do not match "
                             f"the weight's {tuple(W.shape)}")
        _, S, Vh = torch.linalg.svd(W.to(torch.float64), full_matrices=False)
        right = (Phi.to(device=W.device, dtype=torch.float64) @ Vh.T) * S
        with torch.no_grad():
            pre = Phi.to(W.device, W.dtype) @ W.T
            if layer.bias is not None:
                pre = pre + layer.bias.detach()
            post = layer.activation(pre) if layer.activation is not None else pre
        nc1s = [metrics.nc1(Z, y.to(Z.device)) for Z in (Phi, right, post)]
        nc2s = [_safe(metrics.nc2, Z, y.to(Z.device)) for Z in (Phi, right, post)]

        corr = corr_sqrt = float("nan")
        if nfa and layer.head is not None:
            points = Phi if subset is None else Phi[subset.to(Phi.device)]
            G = layer_agop(layer.head, points, batch_size=agop_batch_size, mean=True)
            gram = W.to(torch.float64).T @ W.to(torch.float64)
            corr = pearson(gram, G)
            corr_sqrt = pearson(gram, psd_sqrt(G.to(torch.float64)))
        results.append(LayerCollapse(
            name=layer.name, shape=(int(W.shape[0]), int(W.shape[1])),
            nc1_input=nc1s[0], nc1_right=nc1s[1], nc1_output=nc1s[2],
            nc2_input=nc2s[0], nc2_right=nc2s[1], nc2_output=nc2s[2],
            right_share=right_singular_share(*nc1s), nfa_agop=corr, nfa_agop_sqrt=corr_sqrt))
    return results


def format_table(results: Sequence[LayerCollapse]) -> str:
    """A plain-text table of the measures, one row per layer."""
    header = ("layer", "shape", "NC1 Phi", "NC1 SV^T Phi", "NC1 act(W Phi)", "right share",
              "NC2 Phi", "NC2 act", "corr AGOP", "corr AGOP^1/2")
    rows = [header]
    for r in results:
        rows.append((r.name, f"{r.shape[0]}x{r.shape[1]}", f"{r.nc1_input:.4g}", f"{r.nc1_right:.4g}",
                     f"{r.nc1_output:.4g}", f"{r.right_share:.3f}", f"{r.nc2_input:.3g}", f"{r.nc2_output:.3g}",
                     f"{r.nfa_agop:.3f}", f"{r.nfa_agop_sqrt:.3f}"))
    widths = [max(len(row[k]) for row in rows) for k in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
