"""A population of seeds trained as one program: every member's state stacked along a leading
axis and the train step ``jax.vmap``-ed over it (the Flax guide's ensembling).

Member ``m`` is the network ``build(spec, seed=seeds[m])`` would give, trained on its own
batches with its own dropout stream (the key from its seed and the step, as a single run's):
the same computation as ``--seed seeds[m]`` alone, with the members' matrix products batched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lenet_jax.model import build, get_weights
from lenet_jax.trainer import compile_steps, make_step, split_for_training
from lenet_spec import Spec


def stack(trees: Sequence[Any]) -> Any:
    """Trees of the same structure as one tree of arrays with a leading member axis."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def member(tree: Any, m: int) -> Any:
    """Member ``m`` of a stacked tree."""
    return jax.tree.map(lambda leaf: leaf[m], tree)


class Population:
    """The stacked state of ``len(seeds)`` networks of ``spec`` and their compiled steps.

    ``state`` is (params, batch statistics, optimizer state), each leaf of shape (P, …);
    ``rest`` the other variables, stacked too. The train steps take (P, batch) indices (one
    batch per member) and return (P,) losses and correct counts."""

    def __init__(self, spec: Spec, seeds: Sequence[int], tx: optax.GradientTransformation,
                 loss, on_logits: bool = True, kernels: str = "auto") -> None:
        if not seeds:
            raise ValueError("a population needs at least one seed")
        self.spec, self.seeds = spec, [int(s) for s in seeds]
        splits = [split_for_training(build(spec, seed=s, kernels=kernels)) for s in self.seeds]
        self.graphdef, self.eval_graphdef = splits[0][0], splits[0][1]
        params = stack([s[2] for s in splits])
        stats = stack([s[3] for s in splits])
        self.rest = stack([s[4] for s in splits])
        self.state = (params, stats, jax.vmap(tx.init)(params))
        self.seed_args = jnp.asarray(np.array(self.seeds, dtype=np.uint32))
        step = jax.vmap(make_step(self.graphdef, tx, loss, on_logits),
                        in_axes=(0, 0, None, None, 0, None, 0))

        def evaluate(params, stats, rest, x, y):
            logits = nnx.merge(self.eval_graphdef, params, stats, rest)(x, logits=on_logits)
            return loss(logits, y) * len(y), jnp.sum(jnp.argmax(logits, -1) == y)

        self._one, self._many = compile_steps(step)
        self._eval = jax.jit(jax.vmap(evaluate, in_axes=(0, 0, 0, None, None)))

    def __len__(self) -> int:
        return len(self.seeds)

    def train_step(self, images: jax.Array, labels: jax.Array, idx: Any, i: int):
        """One optimizer step of every member, member m on ``images[idx[m]]``; returns the
        (P,) losses and correct counts as device values."""
        self.state, values, correct = self._one(self.state, self.rest, images, labels, idx,
                                                np.int32(i), self.seed_args)
        return values, correct

    def train_steps(self, images: jax.Array, labels: jax.Array, idxs: Any, first: int):
        """``len(idxs)`` steps in one dispatch (``lax.scan``); ``idxs`` is (K, P, batch).
        Returns the (P, K) losses and the (P,) correct counts summed over the K steps."""
        self.state, values, correct = self._many(self.state, self.rest, images, labels, idxs,
                                                 np.int32(first), self.seed_args)
        return values.T, correct

    def evaluate(self, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Every member's summed loss and correct count on the batch (x, y)."""
        params, stats, _ = self.state
        return self._eval(params, stats, self.rest, x, y)

    def network(self, m: int) -> nnx.Module:
        """Member ``m`` as a network of its own (a copy of its current state)."""
        params, stats, _ = self.state
        return nnx.merge(self.graphdef, member(params, m), member(stats, m),
                         member(self.rest, m))

    def weights(self, m: int) -> dict[str, np.ndarray]:
        """Member ``m``'s weights in canonical names and layouts."""
        return get_weights(self.network(m))
