"""Losses on logits and integer labels: cross-entropy, and MSE against one-hot targets."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from lenet_train.options import LOSSES


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean softmax cross-entropy of ``logits`` (N, K) against integer ``labels`` (N,)."""
    return F.cross_entropy(logits, labels)


def mse(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over all elements of (logits - targets)², as ``nn.MSELoss()``."""
    return F.mse_loss(logits, targets)


def loss_fn(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training loss ``(logits, integer labels) -> scalar`` called ``name``."""
    if name == "ce":
        return cross_entropy
    if name == "mse":
        return lambda logits, labels: mse(logits, F.one_hot(labels, logits.shape[-1]).float())
    raise ValueError(f"unknown loss {name!r}; expected one of {', '.join(LOSSES)}")
