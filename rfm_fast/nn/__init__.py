"""The seed paper's neural-network side: layer AGOPs of trained networks, the neural feature ansatz, and where
each layer's within-class variability collapses (right singular vectors vs the nonlinearity).

- :func:`layer_agop`: sum_i J_i^T J_i of a (sub-)network with respect to its input, with torch.func in batches.
- :func:`collapse_by_layer`: per-layer NC1 / NC2 at Phi(X), S V^T Phi(X) and ReLU(W Phi(X)), the right-singular
  share of the NC1 drop, and the correlation of W^T W with the AGOP and AGOP^{1/2}.
- :func:`paper_mlp`, :func:`train_mlp`: the paper's MLP and its training loop (used by ``rfm-fast nn-collapse``).
"""

from .agop import batched_apply, features_before, head_from, layer_agop, linear_indices
from .collapse import (LayerCollapse, LinearLayer, collapse_by_layer, format_table, layers_of, pearson, psd_sqrt,
                       right_singular_share)
from .mlp import EpochStats, accuracy, paper_mlp, pm_one_targets, train_mlp

__all__ = [
    "layer_agop", "linear_indices", "features_before", "head_from", "batched_apply",
    "collapse_by_layer", "layers_of", "LinearLayer", "LayerCollapse", "format_table", "pearson", "psd_sqrt",
    "right_singular_share", "paper_mlp", "pm_one_targets", "train_mlp", "accuracy", "EpochStats",
]
