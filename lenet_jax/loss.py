"""Losses on logits and integer labels: cross-entropy, and MSE against one-hot targets."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from lenet_train.options import LOSSES


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of ``logits`` (N, K) against integer ``labels`` (N,)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def mse(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean over all elements of (logits - targets)², as ``nn.MSELoss()``."""
    return jnp.mean((logits - targets) ** 2)


def loss_fn(name: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The training loss ``(logits, integer labels) -> scalar`` called ``name``."""
    if name == "ce":
        return cross_entropy
    if name == "mse":
        return lambda logits, labels: mse(logits, jax.nn.one_hot(labels, logits.shape[-1]))
    raise ValueError(f"unknown loss {name!r}; expected one of {', '.join(LOSSES)}")
