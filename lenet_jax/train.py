"""``python -m lenet_jax.train``: train a spec'd LeNet on MNIST with JAX and Flax NNX.

The model is split once into a graph definition and its parameters; the train step is a pure
function of (params, optimizer state, batch indices) compiled with ``jax.jit``, with the
parameters and optimizer state donated and the whole data set put on the device once. The same
code runs on CPU, GPU and TPU. ``--steps-per-call K`` runs K steps per dispatch with
``lax.scan``. Writes WORKDIR/metrics.jsonl, weights.safetensors and a checkpoint.
"""

from __future__ import annotations

import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lenet_jax.loss import loss_fn
from lenet_jax.model import build, get_weights, set_weights
from lenet_jax.optim import make_tx
from lenet_spec import save_weights
from lenet_spec.cli import parser
from lenet_spec.data import epoch_order
from lenet_spec.run import WEIGHTS, Run, fail, setup

EVAL_BATCH = 1000


def optimizer_tensors(opt_state) -> dict[str, np.ndarray]:
    """The optimizer's state as flat arrays named by their path in the pytree."""
    leaves = jax.tree_util.tree_flatten_with_path(opt_state)[0]
    return {jax.tree_util.keystr(path): np.asarray(v) for path, v in leaves}


def load_optimizer_tensors(template, tensors: dict[str, np.ndarray]):
    """An optimizer state shaped like ``template`` holding what :func:`optimizer_tensors` saved."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    restored = []
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        if name not in tensors or tensors[name].shape != np.shape(leaf):
            raise ValueError(f"optimizer state {name!r} is missing or has another shape")
        restored.append(jnp.asarray(tensors[name], dtype=jnp.asarray(leaf).dtype))
    return jax.tree_util.tree_unflatten(treedef, restored)


def save_run_checkpoint(run: Run, graphdef, params, opt_state, epoch: int, step: int) -> None:
    weights = get_weights(nnx.merge(graphdef, params))
    run.save_checkpoint("jax", weights, optimizer_tensors(opt_state), epoch, step)


def make_steps(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, loss):
    """The jitted train step, its ``lax.scan`` over several batches, and the eval step."""

    def loss_and_logits(params, x, y):
        logits = nnx.merge(graphdef, params)(x)
        return loss(logits, y), logits

    def step(params, opt_state, images, labels, idx):
        x, y = images[idx], labels[idx]
        (value, logits), grads = jax.value_and_grad(loss_and_logits, has_aux=True)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, value, jnp.sum(jnp.argmax(logits, -1) == y)

    @partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, opt_state, images, labels, idx):
        return step(params, opt_state, images, labels, idx)

    @partial(jax.jit, donate_argnums=(0, 1))
    def train_steps(params, opt_state, images, labels, idxs):
        def body(carry, idx):
            params, opt_state = carry
            params, opt_state, value, correct = step(params, opt_state, images, labels, idx)
            return (params, opt_state), (value, correct)

        (params, opt_state), (values, corrects) = jax.lax.scan(body, (params, opt_state), idxs)
        return params, opt_state, values, jnp.sum(corrects)

    @jax.jit
    def eval_step(params, x, y):
        value, logits = loss_and_logits(params, x, y)
        return value * len(y), jnp.sum(jnp.argmax(logits, -1) == y)

    return train_step, train_steps, eval_step


def evaluate(eval_step, params, x: jax.Array, y: jax.Array) -> tuple[float, float]:
    """Mean loss and accuracy over a whole split."""
    sums = [eval_step(params, x[i : i + EVAL_BATCH], y[i : i + EVAL_BATCH])
            for i in range(0, len(x), EVAL_BATCH)]
    total_loss, correct = (float(sum(s[k] for s in sums)) for k in (0, 1))
    return total_loss / len(x), correct / len(x)


def train(run: Run, steps_per_call: int = 1) -> dict:
    """Train for the run's epochs and steps; returns the last epoch's metrics."""
    args, log = run.args, run.log
    net = build(run.spec, seed=args.seed)
    if run.init_weights:
        set_weights(net, run.init_weights)
    lrs = jnp.asarray(run.lr_table(), dtype=jnp.float32)
    schedule = lambda count: lrs[jnp.minimum(count, len(lrs) - 1)]  # noqa: E731
    tx = make_tx(args.optimizer, schedule, args.momentum, args.weight_decay)
    start_epoch, step = 0, 0
    if args.resume:
        weights, optimizer, meta = run.load_checkpoint("jax")
        set_weights(net, weights)
    graphdef, params = nnx.split(net)
    opt_state = tx.init(params)
    if args.resume:
        try:
            opt_state = load_optimizer_tensors(opt_state, optimizer)
        except ValueError as e:
            fail(f"{run.workdir}: optimizer state does not fit --optimizer {args.optimizer}: {e}")
        start_epoch, step = meta["epoch"] + 1, meta["step"]
    train_step, train_steps, eval_step = make_steps(graphdef, tx, loss_fn(args.loss))
    # NCHW -> NHWC once, then the data lives on the device for the whole run
    train_x = jax.device_put(run.train_x.transpose(0, 2, 3, 1))
    test_x = jax.device_put(run.test_x.transpose(0, 2, 3, 1))
    train_y = jax.device_put(run.train_y.astype(np.int32))
    test_y = jax.device_put(run.test_y.astype(np.int32))
    record: dict = {}
    for epoch in range(start_epoch, args.epochs):
        if step >= run.total_steps:
            break
        order = epoch_order(len(train_x), args.batch_size, args.seed, epoch)
        order = order[: run.total_steps - step].astype(np.int32)
        t0 = time.perf_counter()
        losses, corrects = [], []  # device values; fetched only when reported
        correct, counted = 0, 0
        bar = log.bar(len(order), epoch)
        i = 0
        while i < len(order):
            k = min(steps_per_call, len(order) - i)
            if k > 1:
                params, opt_state, values, n_correct = train_steps(
                    params, opt_state, train_x, train_y, order[i : i + k])
                losses.append(values)
            else:
                params, opt_state, value, n_correct = train_step(
                    params, opt_state, train_x, train_y, order[i])
                losses.append(value[None])
            corrects.append(n_correct)
            i += k
            step += k
            if i // 50 != (i - k) // 50 or i == len(order):
                correct += int(jnp.sum(jnp.stack(corrects[counted:])))
                counted = len(corrects)
                seen = i * args.batch_size
                bar.set_postfix(loss=f"{float(losses[-1][-1]):.4f}", acc=f"{correct / seen:.4f}",
                                img_s=f"{seen / (time.perf_counter() - t0):,.0f}")
                bar.update(i - bar.n)
        bar.close()
        step_losses = np.asarray(jnp.concatenate(losses), dtype=float)
        epoch_s = time.perf_counter() - t0
        if args.log_steps:
            log.steps(step - len(order), step_losses.tolist())
        test = evaluate(eval_step, params, test_x, test_y)
        train_metrics = (float(step_losses.mean()), correct / (len(order) * args.batch_size))
        record = run.record(epoch, step, train_metrics, test, epoch_s, len(order) * args.batch_size)
        log.epoch(record)
        save_run_checkpoint(run, graphdef, params, opt_state, epoch, step)
    save_weights(run.workdir / WEIGHTS, get_weights(nnx.merge(graphdef, params)), run.spec)
    log.say(f"weights: {run.workdir / WEIGHTS}")
    return record


def main(argv: list[str] | None = None) -> int:
    p = parser("python -m lenet_jax.train", "JAX / Flax NNX")
    p.add_argument("--steps-per-call", type=int, default=1,
                   help="optimizer steps per dispatch (lax.scan over batches)")
    args = p.parse_args(argv)
    if args.steps_per_call < 1:
        p.error("--steps-per-call must be at least 1")
    run = setup(args, "jax")
    devices = ", ".join(str(d) for d in jax.devices())
    run.log.say(f"jax {jax.__version__} on {jax.default_backend()} ({devices}); "
                f"{run.spec.name}, {run.total_steps} steps; workdir {run.workdir}")
    train(run, args.steps_per_call)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
