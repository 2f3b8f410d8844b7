"""Optimizers, with torch.optim's semantics (which the JAX port reproduces with optax).

- ``sgd``: weight decay added to the gradient (L2), then heavy-ball momentum.
- ``adam``: weight decay added to the gradient (L2), then Adam.
- ``adamw``: Adam with decoupled weight decay, w ← w − lr·wd·w.
"""

from __future__ import annotations

import torch

OPTIMIZERS = ("sgd", "adam", "adamw")


def make_optimizer(
    net: torch.nn.Module,
    name: str = "sgd",
    lr: float = 0.01,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """A torch.optim optimizer over all of ``net``'s parameters."""
    params = net.parameters()
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")
