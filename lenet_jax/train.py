"""``python -m lenet_jax.train``: train a spec'd LeNet on MNIST with JAX and Flax NNX.

The model is split once into a graph definition and its parameters; the train step is a pure
function of (params, optimizer state, batch indices) compiled with ``jax.jit``, with the
parameters and optimizer state donated and the whole data set put on the device once. The same
code runs on CPU, GPU and TPU, data parallel over every device of every process (started
together with ``--coordinator``, ``--num-processes`` and ``--process-id``). ``--steps-per-call
K`` runs K steps per dispatch with ``lax.scan``. Writes WORKDIR/metrics.jsonl,
weights.safetensors and a checkpoint (process 0 alone writes).
"""

from __future__ import annotations

import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lenet_jax import distributed
from lenet_jax.loss import loss_fn
from lenet_jax.model import build, get_weights, set_weights
from lenet_jax.optim import make_tx
from lenet_spec import save_weights
from lenet_train.cli import parser
from lenet_train.distributed import peers_guard
from lenet_train.run import WEIGHTS, Position, Run, fail, interruptible, setup

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


def save_run_checkpoint(run: Run, graphdef, params, opt_state, pos: Position,
                        hold: bool = False) -> None:
    """Checkpoint the run now, or (``hold``) once the next step's loss confirms it."""
    save = run.hold_checkpoint if hold else run.save_checkpoint
    save(get_weights(nnx.merge(graphdef, params)), optimizer_tensors(opt_state), pos)


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
    pos = Position()
    if args.resume:
        ckpt = run.load_checkpoint()
        set_weights(net, ckpt.weights)
    graphdef, params = nnx.split(net)
    opt_state = tx.init(params)
    if args.resume:
        try:
            opt_state = load_optimizer_tensors(opt_state, ckpt.optimizer)
        except ValueError as e:
            fail(f"{run.workdir}: optimizer state does not fit --optimizer {args.optimizer}: {e}")
        pos = ckpt.position
    train_step, train_steps, eval_step = make_steps(graphdef, tx, loss_fn(args.loss))
    # data parallel over every device of every process: a 1-D mesh splits each global batch's
    # indices; the data, parameters and optimizer state are replicated, and XLA inserts the
    # gradient all-reduce (on one device this is the plain single-device step). Every process
    # knows the whole batch order; device_put hands each device only its own shard of it.
    mesh = Mesh(np.array(jax.devices()), ("batch",))
    if args.batch_size % mesh.size:
        fail(f"--batch-size {args.batch_size} does not split evenly over {mesh.size} devices",
             everyone=True)
    replicated = NamedSharding(mesh, P())
    split = {1: NamedSharding(mesh, P("batch")), 2: NamedSharding(mesh, P(None, "batch"))}
    params, opt_state = jax.device_put((params, opt_state), replicated)
    # NCHW -> NHWC once, then the data lives on the devices for the whole run
    train_x = jax.device_put(run.train_x.transpose(0, 2, 3, 1), replicated)
    test_x = jax.device_put(run.test_x.transpose(0, 2, 3, 1), replicated)
    train_y = jax.device_put(run.train_y.astype(np.int32), replicated)
    test_y = jax.device_put(run.test_y.astype(np.int32), replicated)
    run.watch_signals()
    record: dict = {}
    for epoch in range(pos.epoch, args.epochs):
        order = run.epoch_batches(pos).astype(np.int32)
        if len(order) == 0:
            break
        pending, pending_correct = [], []  # device values, fetched at report points
        t0, before = time.perf_counter(), pos.epoch_s
        bar = log.bar(len(order), epoch, initial=pos.done)
        while pos.done < len(order):
            i = pos.done
            # chunks start at multiples of K within the epoch, so a resumed run repeats them
            k = min(steps_per_call - i % steps_per_call, len(order) - i)
            if k > 1:
                idx = jax.device_put(order[i : i + k], split[2])
                params, opt_state, values, n_correct = train_steps(
                    params, opt_state, train_x, train_y, idx)
            else:
                idx = jax.device_put(order[i], split[1])
                params, opt_state, values, n_correct = train_step(
                    params, opt_state, train_x, train_y, idx)
            pending.append(values)  # no device op on results here: it would wait for them
            pending_correct.append(n_correct)
            pos.done, pos.step = i + k, pos.step + k
            due = run.checkpoint_due(pos.step - k, pos.step) and pos.done < len(order)
            report = i // 50 != pos.done // 50 or pos.done == len(order) or due
            stop = run.stop_requested(report)
            if report or run.held or stop:
                run.account(pos, np.concatenate([np.ravel(v) for v in pending]),
                            int(sum(np.asarray(c) for c in pending_correct)),
                            before + time.perf_counter() - t0, bar)
                pending, pending_correct = [], []
            if stop:
                bar.close()
                save_run_checkpoint(run, graphdef, params, opt_state, pos)
                run.stop_interrupted(pos)
            if due:
                save_run_checkpoint(run, graphdef, params, opt_state, pos, hold=True)
        bar.close()
        record = run.end_epoch(pos, evaluate(eval_step, params, test_x, test_y))
        pos = Position(epoch + 1, 0, pos.step)
        save_run_checkpoint(run, graphdef, params, opt_state, pos)
    if run.layout.writer:
        save_weights(run.workdir / WEIGHTS, get_weights(nnx.merge(graphdef, params)), run.spec)
        log.say(f"weights: {run.workdir / WEIGHTS}")
    return record


def main(argv: list[str] | None = None) -> int:
    p = parser("python -m lenet_jax.train", "JAX / Flax NNX")
    p.add_argument("--steps-per-call", type=int, default=1,
                   help="optimizer steps per dispatch (lax.scan over batches)")
    distributed.add_flags(p)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    if args.steps_per_call < 1:
        p.error("--steps-per-call must be at least 1")
    distributed.check_flags(p, args)
    try:
        with interruptible():
            layout = distributed.init(args)
            run = setup(args, "jax", argv, layout)
            run.any_process = distributed.any_process
            devices = ", ".join(str(d) for d in jax.devices())
            run.log.say(f"jax {jax.__version__} on {jax.default_backend()} ({devices}"
                        + (f"; {layout.process_count} processes" if layout.distributed else "")
                        + f"); {run.spec.name}, {run.total_steps} steps; workdir {run.workdir}")
            # a collective whose peer has gone fails in XLA's runtime (gloo reports it as a
            # ValueError on CPU)
            with peers_guard(layout, (jax.errors.JaxRuntimeError, ValueError)):
                train(run, args.steps_per_call)
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
