"""Optimizers, with torch.optim's semantics reproduced by optax chains.

- ``sgd``: weight decay added to the gradient (L2), then heavy-ball momentum.
- ``adam``: weight decay added to the gradient (L2), then Adam.
- ``adamw``: Adam with decoupled weight decay, w ← w − lr·wd·w.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lenet_train.options import OPTIMIZERS


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


def optimizer_tensors(opt_state: optax.OptState) -> dict[str, np.ndarray]:
    """The optimizer's state as flat arrays named by their path in the pytree."""
    leaves = jax.tree_util.tree_flatten_with_path(opt_state)[0]
    return {jax.tree_util.keystr(path): np.asarray(v) for path, v in leaves}


def load_optimizer_tensors(template: optax.OptState,
                           tensors: dict[str, np.ndarray]) -> optax.OptState:
    """An optimizer state shaped like ``template`` holding what :func:`optimizer_tensors` saved;
    ``ValueError`` naming the first tensor that is missing or has another shape."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    restored = []
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        if name not in tensors or tensors[name].shape != np.shape(leaf):
            raise ValueError(f"optimizer state {name!r} is missing or has another shape")
        restored.append(jnp.asarray(tensors[name], dtype=jnp.asarray(leaf).dtype))
    return jax.tree_util.tree_unflatten(treedef, restored)
