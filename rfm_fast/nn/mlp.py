"""The seed paper's MLP and its training loop: no biases, ReLU, small Xavier-uniform initialisation, MSE on +-1
targets, Adam. Seeded: the same seed, data and settings give the same weights on the same device and thread count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn


def paper_mlp(in_dim: int, n_classes: int, *, width: int = 512, depth: int = 5, init_gain: float = 0.1,
              seed: int = 0, dtype: torch.dtype = torch.float32,
              device: Optional[str | torch.device] = None) -> nn.Sequential:
    """``depth`` hidden layers Linear(., width, bias=False) + ReLU, then Linear(width, n_classes, bias=False).

    Every weight is drawn Xavier-uniform with gain ``init_gain`` (U(-a, a), a = gain sqrt(6 / (fan_in + fan_out)))
    from a generator seeded with ``seed``; the small default gain (0.1) puts training in the feature-learning regime
    the paper studies. Raises ValueError for non-positive sizes or gain.
    """
    if min(in_dim, n_classes, width, depth) < 1:
        raise ValueError(f"in_dim, n_classes, width and depth must be >= 1, got {in_dim}, {n_classes}, {width}, "
                         f"{depth}")
    if not init_gain > 0:
        raise ValueError(f"init_gain must be > 0, got {init_gain}")
    generator = torch.Generator().manual_seed(seed)
    sizes = [in_dim] + [width] * depth + [n_classes]
    modules: list[nn.Module] = []
    for k, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        linear = nn.Linear(fan_in, fan_out, bias=False, dtype=dtype)
        nn.init.xavier_uniform_(linear.weight, gain=init_gain, generator=generator)
        modules.append(linear)
        if k < depth:
            modules.append(nn.ReLU())
    return nn.Sequential(*modules).to(device)


def pm_one_targets(y: torch.Tensor, n_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """2 * onehot(y) - 1: (N,) labels 0..K-1 -> (N, K) targets in {-1, +1}."""
    return 2 * nn.functional.one_hot(y.long(), n_classes).to(dtype) - 1


def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor, *, batch_size: int = 4096) -> float:
    """Fraction of samples whose largest output is the label."""
    device = next(model.parameters()).device
    correct = 0
    with torch.no_grad():
        for start in range(0, X.shape[0], batch_size):
            out = model(X[start:start + batch_size].to(device))
            correct += int((out.argmax(1).cpu() == y[start:start + batch_size].cpu()).sum())
    return correct / X.shape[0]


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    train_acc: float
    test_acc: Optional[float]


def train_mlp(model: nn.Module, X: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float = 1e-3,
              batch_size: int = 128, seed: int = 0, X_test: Optional[torch.Tensor] = None,
              y_test: Optional[torch.Tensor] = None,
              on_epoch: Optional[Callable[[EpochStats], Any]] = None) -> list[EpochStats]:
    """Adam on the mean squared error against 2 * onehot(y) - 1 (mean over samples and outputs).

    X: (N, d) on any device (moved to the model's device once), y: (N,) labels 0..K-1 with K the output width.
    The data order comes from a generator seeded with ``seed``. ``on_epoch(stats)`` runs after each epoch
    (epoch numbers start at 1); it may record measures. Returns the per-epoch statistics.
    """
    if epochs < 0 or batch_size < 1 or not lr > 0:
        raise ValueError(f"need epochs >= 0, batch_size >= 1 and lr > 0, got {epochs}, {batch_size}, {lr}")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    X = torch.as_tensor(X).to(device, dtype)
    y = torch.as_tensor(y).long().to(device)
    n_classes = model(X[:1]).shape[1]
    targets = pm_one_targets(y, n_classes, dtype)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    history = []
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(X.shape[0], generator=generator).to(device)
        total = 0.0
        for start in range(0, X.shape[0], batch_size):
            idx = order[start:start + batch_size]
            loss = nn.functional.mse_loss(model(X[idx]), targets[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * idx.shape[0]
        model.eval()
        test_acc = accuracy(model, X_test, y_test) if X_test is not None and y_test is not None else None
        stats = EpochStats(epoch, total / X.shape[0], accuracy(model, X, y), test_acc)
        history.append(stats)
        if on_epoch is not None:
            on_epoch(stats)
    return history
