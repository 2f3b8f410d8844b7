"""``python -m lenet_torch.train``: train a spec'd LeNet on MNIST with PyTorch.

CUDA when present, else CPU; ``--compile`` wraps the model in ``torch.compile``. Writes
WORKDIR/metrics.jsonl (one record per epoch), weights.safetensors and a checkpoint that
``--resume`` continues from.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from lenet_spec import save_weights
from lenet_spec.cli import parser
from lenet_spec.data import epoch_order
from lenet_spec.run import WEIGHTS, Run, fail, setup
from lenet_torch.loss import loss_fn
from lenet_torch.model import build, get_weights, set_weights
from lenet_torch.optim import make_optimizer

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


def save_run_checkpoint(run: Run, net, opt, epoch: int, step: int) -> None:
    tensors, groups = optimizer_tensors(opt)
    run.save_checkpoint("torch", get_weights(net), tensors, epoch, step, param_groups=groups)


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
    start_epoch, step = 0, 0
    if args.resume:
        weights, optimizer, meta = run.load_checkpoint("torch")
        set_weights(net, weights)
        try:
            load_optimizer_tensors(opt, optimizer, meta["param_groups"])
        except (KeyError, ValueError, RuntimeError) as e:
            fail(f"{run.workdir}: optimizer state does not fit --optimizer {args.optimizer}: {e}")
        start_epoch, step = meta["epoch"] + 1, meta["step"]
    model = torch.compile(net) if compile_model else net
    loss = loss_fn(args.loss)
    lrs = run.lr_table()
    train_x, train_y = (torch.from_numpy(a).to(device) for a in (run.train_x, run.train_y))
    test_x, test_y = (torch.from_numpy(a).to(device) for a in (run.test_x, run.test_y))
    record: dict = {}
    for epoch in range(start_epoch, args.epochs):
        if step >= run.total_steps:
            break
        order = torch.from_numpy(epoch_order(len(train_x), args.batch_size, args.seed, epoch))
        order = order[: run.total_steps - step].to(device)
        t0 = time.perf_counter()
        losses, correct = [], torch.zeros((), dtype=torch.long, device=device)
        bar = log.bar(len(order), epoch)
        for i, idx in enumerate(order):
            x, y = train_x[idx], train_y[idx]
            for group in opt.param_groups:  # the shared schedule, looked up by step
                group["lr"] = float(lrs[step])
            opt.zero_grad(set_to_none=True)
            logits = model(x)
            value = loss(logits, y)
            value.backward()
            opt.step()
            step += 1
            losses.append(value.detach())
            correct += (logits.detach().argmax(1) == y).sum()
            if (i + 1) % 50 == 0 or i + 1 == len(order):
                seen = (i + 1) * args.batch_size
                bar.set_postfix(loss=f"{losses[-1].item():.4f}",
                                acc=f"{correct.item() / seen:.4f}",
                                img_s=f"{seen / (time.perf_counter() - t0):,.0f}")
                bar.update(i + 1 - bar.n)
        bar.close()
        step_losses = torch.stack(losses).cpu().numpy().astype(float)
        if device.type == "cuda":
            torch.cuda.synchronize()
        epoch_s = time.perf_counter() - t0
        if args.log_steps:
            log.steps(step - len(order), step_losses.tolist())
        test = evaluate(model, test_x, test_y, loss)
        train_metrics = (float(step_losses.mean()), correct.item() / (len(order) * args.batch_size))
        record = run.record(epoch, step, train_metrics, test, epoch_s, len(order) * args.batch_size)
        log.epoch(record)
        save_run_checkpoint(run, net, opt, epoch, step)
    save_weights(run.workdir / WEIGHTS, get_weights(net), run.spec)
    log.say(f"weights: {run.workdir / WEIGHTS}")
    return record


def main(argv: list[str] | None = None) -> int:
    p = parser("python -m lenet_torch.train", "PyTorch")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run = setup(args, "torch")
    run.log.say(f"torch {torch.__version__} on {device}"
                + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else
                   f", {torch.get_num_threads()} threads")
                + f"; {run.spec.name}, {run.total_steps} steps; workdir {run.workdir}")
    train(run, device, args.compile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
