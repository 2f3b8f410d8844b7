"""A population of seeds trained as one program: every member's state stacked along a leading
axis and the train step ``jax.vmap``-ed over it (the Flax guide's ensembling).

Member ``m`` is the network ``build(spec, seed=seeds[m])`` would give, trained on its own
batches with its own dropout stream (the key from its seed and the step, as a single run's):
the same computation as ``--seed seeds[m]`` alone, with the members' matrix products batched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lenet_jax.loss import loss_fn
from lenet_jax.model import build, get_weights, set_weights
from lenet_jax.optim import load_optimizer_tensors, make_tx, optimizer_tensors
from lenet_jax.trainer import JaxBackend, compile_steps, make_step, split_for_training
from lenet_spec import Spec
from lenet_train.config import Config
from lenet_train.errors import StateError
from lenet_train.options import EVAL_BATCH, loss_on_logits
from lenet_train.run import Run
from lenet_train.state import State


def stack(trees: Sequence[Any]) -> Any:
    """Trees of the same structure as one tree of arrays with a leading member axis."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def member(tree: Any, m: int) -> Any:
    """Member ``m`` of a stacked tree."""
    return jax.tree.map(lambda leaf: leaf[m], tree)


class Population:
    """The stacked state of ``len(seeds)`` networks of ``spec`` and their compiled steps (the
    same API as ``lenet_torch.population.Population``).

    Member m starts as ``build(spec, seed=seeds[m], kernels=kernels)``; it trains with
    ``optimizer`` at learning rate ``lr`` (a number, or a function of the step) on ``loss``.
    ``state`` is (params, batch statistics, optimizer state), each leaf of shape (P, …);
    ``rest`` the other variables, stacked too. The train steps take (P, batch) indices (one
    batch per member) and return (P,) losses and correct counts."""

    def __init__(self, spec: Spec, seeds: Sequence[int], *, optimizer: str = "sgd",
                 lr: float | Callable[[int], float] = 0.01, momentum: float = 0.0,
                 weight_decay: float = 0.0, loss: str = "ce", kernels: str = "auto",
                 precision: str = "float32", device: Any = None) -> None:
        if not seeds:
            raise ValueError("a population needs at least one seed")
        self.spec, self.seeds = spec, [int(s) for s in seeds]
        self.tx = tx = make_tx(optimizer, 1.0, momentum, weight_decay)  # the step scales by lr
        self.lr = lr if callable(lr) else (lambda step: lr)
        self.device = device or jax.devices()[0]
        on_logits, loss_of = loss_on_logits(loss), loss_fn(loss)
        splits = [split_for_training(build(spec, seed=s, kernels=kernels, precision=precision))
                  for s in self.seeds]
        self.graphdef, self.eval_graphdef = splits[0][0], splits[0][1]
        params = stack([s[2] for s in splits])
        stats = stack([s[3] for s in splits])
        self.state, self.rest = jax.device_put(((params, stats, jax.vmap(tx.init)(params)),
                                                stack([s[4] for s in splits])), self.device)
        self.seed_args = jax.device_put(np.array(self.seeds, dtype=np.uint32), self.device)
        step = jax.vmap(make_step(self.graphdef, tx, loss_of, on_logits),
                        in_axes=(0, 0, None, None, 0, None, 0, None))

        def evaluate(params, stats, rest, x, y):
            logits = nnx.merge(self.eval_graphdef, params, stats, rest)(x, logits=on_logits)
            return loss_of(logits, y) * len(y), jnp.sum(jnp.argmax(logits, -1) == y)

        self._one, self._many = compile_steps(step)
        self._eval = jax.jit(jax.vmap(evaluate, in_axes=(0, 0, 0, None, None)))

    def __len__(self) -> int:
        return len(self.seeds)

    def train_step(self, images: jax.Array, labels: jax.Array, idx: Any, step: int):
        """Optimizer step ``step`` of every member, member m on ``images[idx[m]]``; returns
        the (P,) losses and correct counts as device values."""
        self.state, values, correct = self._one(self.state, self.rest, images, labels, idx,
                                                np.int32(step), self.seed_args,
                                                np.float32(self.lr(step)))
        return values, correct

    def train_steps(self, images: jax.Array, labels: jax.Array, idxs: Any, first: int):
        """``len(idxs)`` steps from step ``first`` in one dispatch (``lax.scan``); ``idxs`` is
        (K, P, batch). Returns the (P, K) losses and the (P,) correct counts summed over the K
        steps."""
        lrs = np.array([self.lr(first + k) for k in range(len(idxs))], np.float32)
        self.state, values, correct = self._many(self.state, self.rest, images, labels, idxs,
                                                 np.int32(first), self.seed_args, lrs)
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

    def stacked_weights(self) -> dict[str, np.ndarray]:
        """Every member's canonical weights, each tensor stacked along a leading member axis."""
        weights = [self.weights(m) for m in range(len(self))]
        return {k: np.stack([w[k] for w in weights]) for k in weights[0]}

    def optimizer_tensors(self) -> dict[str, np.ndarray]:
        """The optimizer's state in canonical names (torch.optim's), each tensor stacked over
        the members."""
        tensors = [optimizer_tensors(member(self.state[2], m), self.network(m))
                   for m in range(len(self))]
        return {k: np.stack([o[k] for o in tensors]) for k in tensors[0]}

    def load(self, weights: dict[str, np.ndarray],
             optimizer: dict[str, np.ndarray] | None = None, step: int = 0) -> None:
        """Set the members' canonical ``weights`` (each tensor stacked over the members) and,
        if given, the optimizer's state after ``step`` steps (else a fresh one);
        ``ValueError`` naming what does not fit."""
        p = len(self)
        for name, tensors in (("weights", weights), ("optimizer", optimizer or {})):
            wrong = [k for k, v in tensors.items() if np.shape(v)[:1] != (p,)]
            if wrong:
                raise ValueError(f"{name} tensor {wrong[0]!r} has shape "
                                 f"{np.shape(tensors[wrong[0]])}, not one per member ({p})")
        states, rests = [], []
        for m in range(p):
            net = self.network(m)
            set_weights(net, {k: v[m] for k, v in weights.items()})
            _, _, params, stats, rest = split_for_training(net)
            opt_state = self.tx.init(params)
            if optimizer is not None:
                opt_state = load_optimizer_tensors(opt_state, {k: v[m] for k, v in
                                                               optimizer.items()}, net, step)
            states.append((params, stats, opt_state))
            rests.append(rest)
        self.state, self.rest = jax.device_put((stack(states), stack(rests)), self.device)


class PopulationBackend(JaxBackend):
    """The JAX side of ``lenet_train.loop.fit`` for a population (``--seeds``): one compiled
    step (or ``lax.scan`` of steps) trains every member, on one device."""

    def configure(self, config: Config) -> None:
        super().configure(config)
        self.seeds = list(config.seeds)

    def describe(self) -> str:
        return f"{super().describe()}; a population of {len(self.seeds)} seeds (vmap)"

    def start(self, run: Run, restore: State | None) -> None:
        c = run.config
        self.pop = Population(run.spec, self.seeds, optimizer=c.optimizer, lr=run.lr,
                              momentum=c.momentum, weight_decay=c.weight_decay, loss=c.loss,
                              kernels=c.kernels, precision=c.precision)
        if restore:
            try:
                self.pop.load(restore.weights, restore.optimizer, int(restore.meta["step"]))
            except (KeyError, ValueError, TypeError, IndexError) as e:
                raise StateError(f"optimizer state does not fit --optimizer {c.optimizer}: "
                                 f"{e}") from None
        elif run.init_weights:
            self.pop.load({k: np.stack([v] * len(self.seeds))
                           for k, v in run.init_weights.items()})
        device = self.pop.device
        self.train_x, self.test_x = (jax.device_put(x.transpose(0, 2, 3, 1), device)
                                     for x in (run.train_x, run.test_x))
        self.train_y, self.test_y = (jax.device_put(y.astype(np.int32), device)
                                     for y in (run.train_y, run.test_y))

    def begin_epoch(self, order: np.ndarray, images: np.ndarray | None = None) -> None:
        self.order = order.astype(np.int32)

    def train(self, first: int, count: int, step: int):
        if count > 1:
            return self.pop.train_steps(self.train_x, self.train_y,
                                        self.order[first : first + count], step)
        return self.pop.train_step(self.train_x, self.train_y, self.order[first], step)

    def fetch(self, pending) -> tuple[np.ndarray, np.ndarray]:
        p = len(self.seeds)
        losses = np.concatenate([np.asarray(v).reshape(p, -1).T for v, _ in pending])
        return losses, sum(np.asarray(c, dtype=np.int64) for _, c in pending)

    def evaluate(self) -> tuple[np.ndarray, np.ndarray]:
        x, y = self.test_x, self.test_y
        sums = [self.pop.evaluate(x[i : i + EVAL_BATCH], y[i : i + EVAL_BATCH])
                for i in range(0, len(x), EVAL_BATCH)]
        total_loss = sum(np.asarray(s[0], dtype=np.float64) for s in sums)
        correct = sum(np.asarray(s[1], dtype=np.int64) for s in sums)
        return total_loss / len(x), correct / len(x)

    def state(self) -> State:
        return State(self.pop.stacked_weights(), self.pop.optimizer_tensors())

    def model(self) -> list[nnx.Module]:
        nets = [self.pop.network(m) for m in range(len(self.seeds))]
        for net in nets:
            net.eval()
        return nets
