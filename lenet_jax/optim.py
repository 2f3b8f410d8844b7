"""Optimizers, with torch.optim's semantics reproduced by optax chains.

- ``sgd``: weight decay added to the gradient (L2), then heavy-ball momentum.
- ``adam``: weight decay added to the gradient (L2), then Adam.
- ``adamw``: Adam with decoupled weight decay, w ← w − lr·wd·w.
"""

from __future__ import annotations

import optax
from flax import nnx

OPTIMIZERS = ("sgd", "adam", "adamw")


def make_tx(
    name: str = "sgd",
    lr: float | optax.Schedule = 0.01,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """The optax transformation equivalent to the torch.optim optimizer ``name``."""
    if name == "sgd":
        return optax.chain(
            optax.add_decayed_weights(weight_decay),
            optax.sgd(lr, momentum=momentum or None),
        )
    if name == "adam":
        return optax.chain(
            optax.add_decayed_weights(weight_decay),
            optax.adam(lr, b1=betas[0], b2=betas[1], eps=eps),
        )
    if name == "adamw":
        return optax.adamw(lr, b1=betas[0], b2=betas[1], eps=eps, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")


def make_optimizer(
    net: nnx.Module,
    name: str = "sgd",
    lr: float | optax.Schedule = 0.01,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> nnx.Optimizer:
    """An ``nnx.Optimizer`` over all of ``net``'s parameters."""
    return nnx.Optimizer(net, make_tx(name, lr, momentum, weight_decay, betas, eps), wrt=nnx.Param)
