"""``python -m lenet_torch.train``: train a spec'd LeNet on MNIST with PyTorch.

CUDA when present, else CPU; ``--compile`` wraps the model in ``torch.compile``. Under
``torchrun --nproc-per-node N`` it trains with DistributedDataParallel, each rank on its slice
of every global batch. Writes WORKDIR/metrics.jsonl (one record per epoch),
weights.safetensors and a checkpoint that ``--resume`` continues from (rank 0 alone writes).
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from lenet_spec import save_weights
from lenet_torch import distributed
from lenet_torch.loss import loss_fn
from lenet_torch.model import build, get_weights, set_weights
from lenet_torch.optim import make_optimizer
from lenet_train.cli import parser
from lenet_train.distributed import peers_guard
from lenet_train.run import WEIGHTS, Position, Run, fail, interruptible, setup

EVAL_BATCH = 1000


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, np.ndarray], list]:
    """The optimizer's state as flat named arrays plus its JSON-able param groups."""
    state = opt.state_dict()
    tensors = {
        f"{i}.{k}": v.detach().cpu().numpy()
        for i, per_param in state["state"].items() for k, v in per_param.items()
    }
    return tensors, state["param_groups"]


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict, groups: list) -> None:
    """Restore what :func:`optimizer_tensors` saved."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = torch.from_numpy(value.copy())
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_run_checkpoint(run: Run, net, opt, pos: Position, hold: bool = False) -> None:
    """Checkpoint the run now, or (``hold``) once the next step's loss confirms it."""
    tensors, groups = optimizer_tensors(opt)
    save = run.hold_checkpoint if hold else run.save_checkpoint
    save(get_weights(net), tensors, pos, rng={"torch_cpu": torch.get_rng_state().numpy()},
         param_groups=groups)


def evaluate(net, x: torch.Tensor, y: torch.Tensor, loss) -> tuple[float, float]:
    """Mean loss and accuracy over a whole split."""
    net.eval()
    total_loss, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(x), EVAL_BATCH):
            logits = net(x[i : i + EVAL_BATCH])
            labels = y[i : i + EVAL_BATCH]
            total_loss += loss(logits, labels).item() * len(labels)
            correct += (logits.argmax(1) == labels).sum().item()
    net.train()
    return total_loss / len(x), correct / len(x)


def train(run: Run, device: torch.device, compile_model: bool = False) -> dict:
    """Train for the run's epochs and steps; returns the last epoch's metrics."""
    args, log = run.args, run.log
    net = build(run.spec, seed=args.seed).to(device)
    if run.init_weights:
        set_weights(net, run.init_weights)
    opt = make_optimizer(net, args.optimizer, args.lr, args.momentum, args.weight_decay)
    pos = Position()
    if args.resume:
        ckpt = run.load_checkpoint()
        set_weights(net, ckpt.weights)
        try:
            load_optimizer_tensors(opt, ckpt.optimizer, ckpt.meta["param_groups"])
            torch.set_rng_state(torch.from_numpy(ckpt.rng["torch_cpu"].copy()))
        except (KeyError, ValueError, RuntimeError) as e:
            fail(f"{run.workdir}: optimizer state does not fit --optimizer {args.optimizer}: {e}")
        pos = ckpt.position
    # data parallel over the ranks: each takes its slice of every global batch and DDP
    # averages the gradients (one rank: the plain module)
    layout = run.layout
    if args.batch_size % layout.process_count:
        fail(f"--batch-size {args.batch_size} does not split evenly over "
             f"{layout.process_count} ranks", everyone=True)
    shard = args.batch_size // layout.process_count
    mine = slice(layout.process_index * shard, (layout.process_index + 1) * shard)
    model = net
    if layout.distributed:
        model = DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)
    model = torch.compile(model) if compile_model else model
    loss = loss_fn(args.loss)
    lrs = run.lr_table()
    train_x, train_y = (torch.from_numpy(a).to(device) for a in (run.train_x, run.train_y))
    test_x, test_y = (torch.from_numpy(a).to(device) for a in (run.test_x, run.test_y))
    run.watch_signals()
    record: dict = {}
    for epoch in range(pos.epoch, args.epochs):
        order = torch.from_numpy(run.epoch_batches(pos)[:, mine]).to(device)
        if len(order) == 0:
            break
        pending, correct = [], torch.zeros((), dtype=torch.long, device=device)
        t0, before = time.perf_counter(), pos.epoch_s
        bar = log.bar(len(order), epoch, initial=pos.done)
        while pos.done < len(order):
            i = pos.done
            x, y = train_x[order[i]], train_y[order[i]]
            for group in opt.param_groups:  # the shared schedule, looked up by step
                group["lr"] = float(lrs[pos.step])
            opt.zero_grad(set_to_none=True)
            logits = model(x)
            value = loss(logits, y)
            value.backward()
            opt.step()
            pending.append(value.detach())
            correct += (logits.detach().argmax(1) == y).sum()
            pos.done, pos.step = i + 1, pos.step + 1
            due = run.checkpoint_due(pos.step - 1, pos.step) and pos.done < len(order)
            report = i // 50 != pos.done // 50 or pos.done == len(order) or due
            stop = run.stop_requested(report)
            if report or run.held or stop:
                losses, n_correct = distributed.reduce_metrics(torch.stack(pending), correct)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                run.account(pos, losses.cpu().numpy(), int(n_correct.item()),
                            before + time.perf_counter() - t0, bar)
                pending, correct = [], torch.zeros_like(correct)
            if stop:
                bar.close()
                save_run_checkpoint(run, net, opt, pos)
                run.stop_interrupted(pos)
            if due:
                save_run_checkpoint(run, net, opt, pos, hold=True)
        bar.close()
        record = run.end_epoch(pos, evaluate(model, test_x, test_y, loss))
        pos = Position(epoch + 1, 0, pos.step)
        save_run_checkpoint(run, net, opt, pos)
    if layout.writer:
        save_weights(run.workdir / WEIGHTS, get_weights(net), run.spec)
        log.say(f"weights: {run.workdir / WEIGHTS}")
    return record


def main(argv: list[str] | None = None) -> int:
    p = parser("python -m lenet_torch.train", "PyTorch")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        with interruptible():
            layout = distributed.init(args, device)
            if device.type == "cuda":
                device = torch.device("cuda", torch.cuda.current_device())
            run = setup(args, "torch", argv, layout)
            run.any_process = distributed.any_process
            run.log.say(f"torch {torch.__version__} on {device}"
                        + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else
                           f", {torch.get_num_threads()} threads")
                        + (f", {layout.process_count} ranks" if layout.distributed else "")
                        + f"; {run.spec.name}, {run.total_steps} steps; workdir {run.workdir}")
            # a collective whose peer has gone fails with a RuntimeError (gloo, NCCL)
            with peers_guard(layout, (RuntimeError,)):
                train(run, device, args.compile)
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
