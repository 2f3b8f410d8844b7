"""Several torch processes as one run: ``torch.distributed`` started the way ``torchrun`` sets
it up (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK), gloo on CPU and NCCL on CUDA,
and the collectives the training loop needs beyond DistributedDataParallel's gradient
all-reduce.

Each rank trains on its slice of every global batch; DDP averages the gradients, so a step
sees the global batch's mean gradient whatever the number of ranks.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from lenet_train.config import Config
from lenet_train.distributed import Layout, deadline, did_not_meet
from lenet_train.errors import ConfigError, LostPeer, activate


def init(config: Config, device: torch.device) -> Layout:
    """Join the other ranks when started by torchrun (WORLD_SIZE > 1); this process's place in
    the run. Gives up with one error after --dist-timeout seconds."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Layout()
    rank = int(os.environ.get("RANK", "0"))
    where = (f"rank {rank} of {world}, store {os.environ.get('MASTER_ADDR')}:"
             f"{os.environ.get('MASTER_PORT')}")
    timeout = config.dist_timeout
    message = did_not_meet(where, timeout, "ranks")
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # torch's own timeout (which also bounds every collective) is set past ours: when it
    # expires first it logs native stack traces before raising
    with deadline(timeout, message):
        try:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(seconds=timeout + 60))
        except dist.DistError:
            raise LostPeer(message) from None
    layout = Layout(dist.get_rank(), dist.get_world_size())
    activate(layout.distributed)
    return layout


def shutdown() -> None:
    """Leave the process group (without it, the interpreter's exit can abort in the group's
    threads: "terminate called without an active exception")."""
    if dist.is_initialized():
        dist.destroy_process_group()


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is set in any rank (every rank must call this together)."""
    value = torch.tensor([int(flag)], device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def reduce_metrics(losses: torch.Tensor, correct: torch.Tensor) -> tuple[torch.Tensor,
                                                                         torch.Tensor]:
    """The global batches' mean losses and correct counts from every rank's share of them
    (the ranks' shares are equal, so the global mean is the mean of the ranks' means)."""
    if not dist.is_initialized():
        return losses, correct
    both = torch.cat([losses.double(), correct.double().reshape(1)])
    dist.all_reduce(both)
    return (both[:-1] / dist.get_world_size()).float(), both[-1].round().long()


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard(batch_size: int, layout: Layout) -> slice:
    """This rank's slice of every global batch (DDP then averages the ranks' gradients)."""
    if batch_size % layout.process_count:
        raise ConfigError(f"--batch-size {batch_size} does not split evenly over "
                          f"{layout.process_count} ranks", everyone=True)
    size = batch_size // layout.process_count
    return slice(layout.process_index * size, (layout.process_index + 1) * size)


def wrap(net: torch.nn.Module, layout: Layout, device: torch.device) -> torch.nn.Module:
    """``net`` in DistributedDataParallel when the run has several ranks, its batch_norm layers
    then normalising with the global batch's statistics (torch's SyncBatchNorm on GPUs,
    :class:`GlobalBatchNorm` on CPUs, which SyncBatchNorm refuses); else ``net``."""
    if not layout.distributed:
        return net
    for name, child in list(net.named_children()):
        if isinstance(child, torch.nn.modules.batchnorm._BatchNorm):
            sync = torch.nn.SyncBatchNorm if device.type == "cuda" else GlobalBatchNorm
            replacement = sync(child.num_features, child.eps, child.momentum, child.affine,
                               device=device)
            # the same tensors, not copies: an optimizer made before the wrap keeps them
            for key, tensor in [*child.named_parameters(recurse=False),
                                *child.named_buffers(recurse=False)]:
                setattr(replacement, key, tensor)
            setattr(net, name, replacement)
    return DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)


class GlobalBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """Batch normalisation over the global batch of all ranks, on CPU: in training the
    per-channel sums are all-reduced (the mean, then the squared deviations from it), the
    running statistics updated with the global mean and unbiased variance, and the backward
    pass all-reduces Σdy and Σdy·x̂; in evaluation it is torch's BatchNorm."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in (2, 4):
            raise ValueError(f"expected 2D or 4D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        y, mean, var, n = _GlobalNorm.apply(x, self.weight, self.bias, self.eps)
        with torch.no_grad():
            self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean)
            self.running_var.mul_(1 - self.momentum).add_(self.momentum * var * (n / (n - 1)))
            self.num_batches_tracked.add_(1)
        return y


class _GlobalNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        axes = (0,) if x.dim() == 2 else (0, 2, 3)  # all but the channel axis
        shape = [1, -1] + [1] * (x.dim() - 2)
        n = x.numel() // x.shape[1] * dist.get_world_size()
        total = x.sum(axes)
        dist.all_reduce(total)
        mean = total / n
        squares = torch.square(x - mean.reshape(shape)).sum(axes)
        dist.all_reduce(squares)
        var = squares / n
        invstd = torch.rsqrt(var + eps)
        xhat = (x - mean.reshape(shape)) * invstd.reshape(shape)
        y = xhat if weight is None else xhat * weight.reshape(shape) + bias.reshape(shape)
        ctx.save_for_backward(xhat, invstd, weight)
        ctx.n, ctx.axes, ctx.shape = n, axes, shape
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var, n

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar, _dn):
        xhat, invstd, weight = ctx.saved_tensors
        axes, shape, n = ctx.axes, ctx.shape, ctx.n
        local = torch.stack([dy.sum(axes), (dy * xhat).sum(axes)])
        sums = local.clone()
        dist.all_reduce(sums)
        scale = invstd if weight is None else invstd * weight
        dx = (scale.reshape(shape) / n) * (n * dy - sums[0].reshape(shape)
                                           - xhat * sums[1].reshape(shape))
        if weight is None:
            return dx, None, None, None
        # the parameters' gradients stay this rank's own: DDP averages them over the ranks
        return dx, local[1], local[0], None


class Processes:
    """The backend's part in joining, polling and leaving the run's other ranks."""

    # a collective whose peer has gone fails with a RuntimeError (gloo, NCCL)
    transport_errors = (RuntimeError,)

    def connect(self, config: Config) -> Layout:
        self.layout = init(config, self.device)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
        return self.layout

    def disconnect(self) -> None:
        shutdown()

    def any_process(self, flag: bool) -> bool:
        return any_process(flag)
