"""The JAX / Flax NNX side of the shared training loop (``python -m lenet_jax.train`` runs it).

The model is split once into a graph definition and its parameters; the train step is a pure
function of (params, optimizer state, batch indices) compiled with ``jax.jit``, parameters and
optimizer state donated, the whole data set on the devices once. Data parallel over every
device of every process: a 1-D mesh splits each global batch's indices, everything else is
replicated and XLA inserts the gradient all-reduce. ``--steps-per-call K`` runs K steps per
dispatch with ``lax.scan``. The loop, checkpoints and logs are ``lenet_train``'s.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lenet_jax import distributed
from lenet_jax.kernels import resolve
from lenet_jax.loss import loss_fn
from lenet_jax.model import build, get_weights, set_weights
from lenet_jax.optim import load_optimizer_tensors, make_tx, optimizer_tensors
from lenet_train.config import Config
from lenet_train.errors import ConfigError, StateError
from lenet_train.options import EVAL_BATCH, loss_on_logits
from lenet_train.paths import cache_root
from lenet_train.run import Run
from lenet_train.state import State

DROPOUT_STREAM = 1
"""Dropout's keys are ``fold_in(fold_in(key(seed), DROPOUT_STREAM), step)``: a function of the
seed and the step alone, so a resumed run draws the same masks, and (JAX's random bits being
partitionable) any device layout draws the same mask for each example of the global batch."""


def split_for_training(net: nnx.Module):
    """(train graph, eval graph, parameters, batch statistics, the rest) of ``net``: the
    parameters are differentiated, the statistics threaded through each step, and the two
    graph definitions differ only in ``train()`` / ``eval()`` mode."""
    net.eval()
    eval_graphdef = nnx.graphdef(net)
    net.train()
    graphdef, params, stats, rest = nnx.split(net, nnx.Param, nnx.BatchStat, ...)
    return graphdef, eval_graphdef, params, stats, rest


def make_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, loss,
              on_logits: bool = True):
    """The train step on one batch as a pure function (not compiled): ((params, stats,
    optimizer state), the rest, images, labels, batch indices, step, seed, lr) -> (the new
    state, loss, correct count); ``loss`` of the logits before a final log_softmax/softmax if
    ``on_logits``, else of the network's output. Dropout's key comes from (seed, step). The
    updates ``tx`` returns are multiplied by ``lr``: the run's ``tx`` has a unit learning rate
    and takes the schedule's value of each step this way (no table of every step's rate); a
    ``tx`` with its own learning rate is given ``lr`` 1 (exact)."""

    def loss_and_aux(params, stats, rest, x, y, step, seed):
        # copy: fresh Variables of this trace level, which batch_norm may update
        model = nnx.merge(graphdef, params, stats, rest, copy=True)
        base = jax.random.fold_in(jax.random.key(seed), DROPOUT_STREAM)
        logits = model(x, rngs=nnx.Rngs(dropout=jax.random.fold_in(base, step)),
                       logits=on_logits)
        return loss(logits, y), (logits, nnx.state(model, nnx.BatchStat))

    def step(state, rest, images, labels, idx, i, seed, lr):
        params, stats, opt_state = state
        x, y = images[idx], labels[idx]
        (value, (logits, stats)), grads = jax.value_and_grad(loss_and_aux, has_aux=True)(
            params, stats, rest, x, y, i, seed)
        updates, opt_state = tx.update(grads, opt_state, params)
        updates = jax.tree.map(lambda u: u * lr, updates)
        params = optax.apply_updates(params, updates)
        return (params, stats, opt_state), value, jnp.sum(jnp.argmax(logits, -1) == y)

    return step


def compile_steps(step):
    """A pure train step (:func:`make_step`'s signature, or a ``vmap`` of it) jitted twice,
    the state donated: one step per call, and ``lax.scan`` over a leading axis of batch
    indices, which returns the per-step values stacked along that axis and the correct counts
    summed over it."""

    @partial(jax.jit, donate_argnums=(0,))
    def one_step(state, rest, images, labels, idx, i, seed, lr):
        return step(state, rest, images, labels, idx, i, seed, lr)

    @partial(jax.jit, donate_argnums=(0,))
    def many_steps(state, rest, images, labels, idxs, first, seed, lrs):
        def body(state, k_idx_lr):
            k, idx, lr = k_idx_lr
            state, value, correct = step(state, rest, images, labels, idx, first + k, seed, lr)
            return state, (value, correct)

        state, (values, corrects) = jax.lax.scan(
            body, state, (jnp.arange(len(idxs), dtype=jnp.int32), idxs, lrs))
        return state, values, jnp.sum(corrects, axis=0)

    return one_step, many_steps


def make_steps(graphdef: nnx.GraphDef, eval_graphdef: nnx.GraphDef,
               tx: optax.GradientTransformation, loss, seed: int = 0, on_logits: bool = True):
    """The jitted train step on one batch (:func:`make_step`), its ``lax.scan`` over several,
    and the eval step.

    A train step maps ((params, stats, optimizer state), the rest, data, batch indices, step,
    learning rate) to (the new state, loss, correct count); the state is donated; a scan of K
    steps takes K learning rates (default: 1, for a ``tx`` with its own). The seed enters the
    compiled steps as an argument, not a constant, so one compiled program (and JAX's
    persistent cache entry) serves every seed."""
    seed_arg = np.uint32(seed)
    one_step, many_steps = compile_steps(make_step(graphdef, tx, loss, on_logits))

    def train_step(state, rest, images, labels, idx, i, lr=1.0):
        return one_step(state, rest, images, labels, idx, i, seed_arg, np.float32(lr))

    def train_steps(state, rest, images, labels, idxs, first, lrs=None):
        lrs = np.ones(len(idxs), np.float32) if lrs is None else np.asarray(lrs, np.float32)
        return many_steps(state, rest, images, labels, idxs, first, seed_arg, lrs)

    @jax.jit
    def eval_step(params, stats, rest, x, y):
        logits = nnx.merge(eval_graphdef, params, stats, rest)(x, logits=on_logits)
        return loss(logits, y) * len(y), jnp.sum(jnp.argmax(logits, -1) == y)

    return train_step, train_steps, eval_step


def run_tx(run: Run) -> optax.GradientTransformation:
    """The run's optimizer (optimizer, momentum, weight_decay) at a unit learning rate: the
    steps multiply its updates by each step's rate (:func:`make_step`)."""
    c = run.config
    return make_tx(c.optimizer, 1.0, c.momentum, c.weight_decay)


def use_compilation_cache() -> None:
    """Keep every compiled program, small ones too, in JAX's persistent cache
    (``$JAX_COMPILATION_CACHE_DIR``, else the cache folder's ``lenet/jax``): a later run loads
    the initialisers and the train and eval steps instead of compiling them."""
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(cache_root() / "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def check_tf32() -> None:
    """Raise :class:`ConfigError` unless every device is an NVIDIA GPU with TensorFloat-32
    (compute capability 8.0 or newer)."""
    devices = jax.devices()
    capable = [float(getattr(d, "compute_capability", 0) or 0) >= 8.0 for d in devices]
    if jax.default_backend() != "gpu" or not all(capable):
        raise ConfigError(f"--precision tf32: needs NVIDIA GPUs with TensorFloat-32 (compute "
                          f"capability 8.0 or newer); JAX computes on {devices[0].device_kind} "
                          f"({jax.default_backend()}); use float32 or bfloat16")


class JaxBackend(distributed.Processes):
    """The JAX side of ``lenet_train.loop.fit`` (see :class:`lenet_train.program.Backend`)."""

    framework = "jax"
    steps_per_call = 1

    def configure(self, config: Config) -> None:
        self.steps_per_call, self.kernels = config.steps_per_call, config.kernels
        self.precision = config.precision
        if config.precision == "tf32":
            check_tf32()
        if not config.no_compile_cache:
            use_compilation_cache()

    def describe(self) -> str:
        processes = (f"; {self.layout.process_count} processes" if self.layout.distributed
                     else "")
        devices = ", ".join(str(d) for d in jax.devices())
        return (f"jax {jax.__version__} on {jax.default_backend()} ({devices}{processes}), "
                f"{resolve(self.kernels)} kernels, {self.precision}")

    def start(self, run: Run, restore: State | None) -> None:
        c = run.config
        net = build(run.spec, seed=c.seed, kernels=c.kernels, precision=c.precision)
        weights = restore.weights if restore else run.init_weights
        if weights:
            set_weights(net, weights)
        tx = run_tx(run)
        self.graphdef, eval_graphdef, params, stats, rest = split_for_training(net)
        opt_state = tx.init(params)
        if restore:
            try:
                opt_state = load_optimizer_tensors(opt_state, restore.optimizer, net,
                                                   int(restore.meta["step"]))
            except (KeyError, ValueError, TypeError) as e:
                raise StateError(f"optimizer state does not fit --optimizer {c.optimizer}: "
                                 f"{e}") from None
        self.train_step, self.train_steps, self.eval_step = make_steps(
            self.graphdef, eval_graphdef, tx, loss_fn(c.loss), c.seed, loss_on_logits(c.loss))
        self.lr = run.lr
        replicated, self.split = distributed.shardings(c.batch_size)
        self.replicated = replicated
        self.train_state, self.rest = distributed.replicate(((params, stats, opt_state), rest),
                                                            replicated)
        # NCHW -> NHWC once; the data then stays on the devices for the whole run
        self.train_x, self.test_x = (jax.device_put(x.transpose(0, 2, 3, 1), replicated)
                                     for x in (run.train_x, run.test_x))
        self.train_y, self.test_y = (jax.device_put(y.astype(np.int32), replicated)
                                     for y in (run.train_y, run.test_y))

    def begin_epoch(self, order: np.ndarray, images: np.ndarray | None = None) -> None:
        self.order = order.astype(np.int32)
        if images is not None:
            self.train_x = jax.device_put(images.transpose(0, 2, 3, 1), self.replicated)

    def train(self, first: int, count: int, step: int):
        if count > 1:
            idx = jax.device_put(self.order[first : first + count], self.split[2])
            self.train_state, values, correct = self.train_steps(
                self.train_state, self.rest, self.train_x, self.train_y, idx, np.int32(step),
                [self.lr(s) for s in range(step, step + count)])
        else:
            idx = jax.device_put(self.order[first], self.split[1])
            self.train_state, values, correct = self.train_step(
                self.train_state, self.rest, self.train_x, self.train_y, idx, np.int32(step),
                self.lr(step))
        return values, correct

    def fetch(self, pending) -> tuple[np.ndarray, int]:
        return (np.concatenate([np.ravel(v) for v, _ in pending]),
                int(sum(np.asarray(c) for _, c in pending)))

    def evaluate(self) -> tuple[float, float]:
        x, y = self.test_x, self.test_y
        params, stats, _ = self.train_state
        sums = [self.eval_step(params, stats, self.rest, x[i : i + EVAL_BATCH],
                               y[i : i + EVAL_BATCH]) for i in range(0, len(x), EVAL_BATCH)]
        total_loss, correct = (float(sum(s[k] for s in sums)) for k in (0, 1))
        return total_loss / len(x), correct / len(x)

    def state(self) -> State:
        params, stats, opt_state = self.train_state
        net = nnx.merge(self.graphdef, params, stats, self.rest)
        return State(get_weights(net), optimizer_tensors(opt_state, net))

    def model(self) -> nnx.Module:
        params, stats, _ = self.train_state
        net = nnx.merge(self.graphdef, params, stats, self.rest)
        net.eval()
        return net
