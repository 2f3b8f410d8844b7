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


SLOTS = {"trace": "momentum_buffer", "mu": "exp_avg", "nu": "exp_avg_sq"}
"""optax's per-parameter state -> torch.optim's names for the same quantities (SGD's momentum
buffer, Adam's first and second moments): the canonical, framework-neutral names."""


def optimizer_tensors(opt_state: optax.OptState, net: nnx.Module) -> dict[str, np.ndarray]:
    """The optimizer's per-parameter state in canonical names and layouts,
    ``{parameter}.{momentum_buffer|exp_avg|exp_avg_sq}`` (torch.optim's), as ``net``'s
    ``get_weights`` lays parameters out. Step counts are the checkpoint's position."""
    from lenet_jax.model import get_weights

    out: dict[str, np.ndarray] = {}

    def visit(node: object) -> None:
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            for name in node._fields:
                value = getattr(node, name)
                if name in SLOTS:
                    holder = nnx.clone(net)
                    nnx.update(holder, value)
                    weights = get_weights(holder)
                    out.update({f"{k}.{SLOTS[name]}": weights[k] for k in net.spec.param_shapes})
                elif name != "count":
                    visit(value)
        elif isinstance(node, (tuple, list)):
            for value in node:
                visit(value)

    visit(opt_state)
    return out


def load_optimizer_tensors(template: optax.OptState, tensors: dict[str, np.ndarray],
                           net: nnx.Module, step: int) -> optax.OptState:
    """An optimizer state shaped like ``template`` holding the canonical ``tensors`` (saved by
    either framework) after ``step`` steps; ``ValueError`` naming the first tensor that is
    missing or has another shape."""
    from lenet_jax.model import get_weights, set_weights

    if tensors and all(k.startswith("[") for k in tensors):
        return _load_by_path(template, tensors)  # a checkpoint of an earlier lenet version

    def build(node: object) -> object:
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            values = []
            for name in node._fields:
                value = getattr(node, name)
                if name in SLOTS:
                    canonical = {}
                    for k, shape in net.spec.param_shapes.items():
                        key = f"{k}.{SLOTS[name]}"
                        if key not in tensors or tensors[key].shape != shape:
                            raise ValueError(f"optimizer state {key!r} is missing or has "
                                             "another shape")
                        canonical[k] = tensors[key]
                    holder = nnx.clone(net)
                    set_weights(holder, {**get_weights(holder), **canonical})
                    values.append(nnx.state(holder, nnx.Param))
                elif name == "count":
                    values.append(jnp.asarray(step, dtype=jnp.asarray(value).dtype))
                else:
                    values.append(build(value))
            return type(node)(*values)
        if isinstance(node, (tuple, list)):
            return type(node)(build(value) for value in node)
        return node

    return build(template)


def _load_by_path(template: optax.OptState, tensors: dict[str, np.ndarray]) -> optax.OptState:
    """An optimizer state saved by its pytree paths (checkpoints before the canonical names)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    restored = []
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        if name not in tensors or tensors[name].shape != np.shape(leaf):
            raise ValueError(f"optimizer state {name!r} is missing or has another shape")
        restored.append(jnp.asarray(tensors[name], dtype=jnp.asarray(leaf).dtype))
    return jax.tree_util.tree_unflatten(treedef, restored)
