"""``python -m lenet_torch.train``: the PyTorch step of the shared training loop.

The model and optimizer are torch's own; the train step is eager autograd (``--compile``:
``torch.compile`` of the model), the whole data set on the device once. CUDA when present,
else CPU. Under ``torchrun --nproc-per-node N`` it trains with DistributedDataParallel, each rank
on its slice of every global batch. The loop, checkpoints and logs are ``lenet_train``'s.
"""

from __future__ import annotations

import numpy as np
import torch

from lenet_torch import distributed
from lenet_torch.kernels import resolve
from lenet_torch.loss import loss_fn
from lenet_torch.model import build, get_weights, pin_precision, set_weights
from lenet_torch.optim import load_optimizer_tensors, make_optimizer, optimizer_tensors
from lenet_train.config import Config
from lenet_train.errors import ConfigError, StateError
from lenet_train.options import EVAL_BATCH, loss_on_logits
from lenet_train.run import Run
from lenet_train.state import State


def make_step(model: torch.nn.Module, opt: torch.optim.Optimizer, loss, on_logits: bool = True):
    """The train step: one optimizer step on (x, y) at learning rate ``lr``; returns the loss
    (of the logits before a final log_softmax/softmax if ``on_logits``, else of the network's
    output) and the correct count as device tensors."""

    def step(x: torch.Tensor, y: torch.Tensor, lr: float):
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        logits = model(x, logits=on_logits)
        value = loss(logits, y)
        value.backward()
        opt.step()
        return value.detach(), (logits.detach().argmax(1) == y).sum()

    return step


def check_tf32(device: torch.device) -> None:
    """Raise :class:`ConfigError` unless ``device`` is an NVIDIA GPU with TensorFloat-32
    (compute capability 8.0 or newer)."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 0):
        what = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        raise ConfigError(f"--precision tf32: needs an NVIDIA GPU with TensorFloat-32 (compute "
                          f"capability 8.0 or newer); torch computes on {what}; use float32 or "
                          "bfloat16")


class TorchBackend(distributed.Processes):
    """The torch side of ``lenet_train.loop.fit`` (see :class:`lenet_train.program.Backend`)."""

    framework = "torch"
    steps_per_call = 1

    def configure(self, config: Config) -> None:
        torch.manual_seed(config.seed)
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.compile, self.kernels = config.compile, config.kernels
        self.precision = config.precision
        if config.precision == "tf32":
            check_tf32(self.device)
        pin_precision(config.precision)

    def describe(self) -> str:
        where = (f" ({torch.cuda.get_device_name()})" if self.device.type == "cuda"
                 else f", {torch.get_num_threads()} threads")
        ranks = f", {self.layout.process_count} ranks" if self.layout.distributed else ""
        slow = (" (this CPU has no oneDNN bfloat16: torch's slow reference convolutions)"
                if self.precision == "bfloat16" and self.device.type == "cpu"
                and not torch.ops.mkldnn._is_mkldnn_bf16_supported() else "")
        return (f"torch {torch.__version__} on {self.device}{where}{ranks}, "
                f"{resolve(self.kernels)} kernels, {self.precision}{slow}")

    @staticmethod
    def _restore_rng(restore: State, device: torch.device) -> None:
        """torch's generators as the checkpoint saved them: dropout draws from the CPU's, and
        on CUDA from the device's."""
        for name in ("torch_cpu", "torch_cuda") if device.type == "cuda" else ("torch_cpu",):
            rng = restore.rng.get(name)
            if rng is None or rng.dtype != np.uint8 or rng.ndim != 1:
                raise StateError(f"its random generator state rng.{name} is missing or not a "
                                 "uint8 vector")
            try:
                (torch.set_rng_state if name == "torch_cpu" else torch.cuda.set_rng_state)(
                    torch.from_numpy(rng.copy()))
            except (RuntimeError, ValueError) as e:
                raise StateError(f"its random generator state rng.{name} is invalid: "
                                 f"{e}") from None

    @classmethod
    def _restore_generators(cls, restore: State, seed: int, device: torch.device) -> None:
        """torch's generators as a torch checkpoint saved them; after a JAX checkpoint, which
        holds none, seeded from (seed, step)."""
        if restore.meta.get("framework") == "torch":
            cls._restore_rng(restore, device)
        else:
            torch.manual_seed((seed << 32 | int(restore.meta["step"])) % 2**63)

    def start(self, run: Run, restore: State | None) -> None:
        c, device = run.config, self.device
        self.net = net = build(run.spec, seed=c.seed, kernels=c.kernels,
                               precision=c.precision).to(device)
        weights = restore.weights if restore else run.init_weights
        if weights:
            set_weights(net, weights)
        self.opt = make_optimizer(net, c.optimizer, c.lr, c.momentum, c.weight_decay)
        if restore:
            try:
                load_optimizer_tensors(self.opt, restore.optimizer, net, c.optimizer,
                                       int(restore.meta["step"]),
                                       restore.meta.get("param_groups"))
            except (KeyError, ValueError, RuntimeError, TypeError) as e:
                raise StateError(f"optimizer state does not fit --optimizer {c.optimizer}: "
                                 f"{e}") from None
            self._restore_generators(restore, c.seed, device)
        self.mine = distributed.shard(c.batch_size, self.layout)
        model = distributed.wrap(net, self.layout, device)
        self.runner = torch.compile(model) if self.compile else model
        self.loss = loss_fn(c.loss)
        self.on_logits = loss_on_logits(c.loss)
        self.step = make_step(self.runner, self.opt, self.loss, self.on_logits)
        self.lr = run.lr
        self.train_x, self.train_y, self.test_x, self.test_y = (
            torch.from_numpy(a).to(device)
            for a in (run.train_x, run.train_y, run.test_x, run.test_y))

    def begin_epoch(self, order: np.ndarray, images: np.ndarray | None = None) -> None:
        self.order = torch.from_numpy(order[:, self.mine]).to(self.device)
        if images is not None:
            self.train_x = torch.from_numpy(images).to(self.device)

    def train(self, first: int, count: int, step: int):
        idx = self.order[first]
        return self.step(self.train_x[idx], self.train_y[idx], self.lr(step))

    def fetch(self, pending) -> tuple[np.ndarray, int]:
        losses, correct = distributed.reduce_metrics(torch.stack([v for v, _ in pending]),
                                                     torch.stack([c for _, c in pending]).sum())
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return losses.cpu().numpy(), int(correct.item())

    def evaluate(self) -> tuple[float, float]:
        self.runner.eval()
        total_loss, correct = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(self.test_x), EVAL_BATCH):
                logits = self.runner(self.test_x[i : i + EVAL_BATCH], logits=self.on_logits)
                labels = self.test_y[i : i + EVAL_BATCH]
                total_loss += self.loss(logits, labels).item() * len(labels)
                correct += (logits.argmax(1) == labels).sum().item()
        self.runner.train()
        return total_loss / len(self.test_x), correct / len(self.test_x)

    def state(self) -> State:
        tensors = optimizer_tensors(self.opt, self.net)
        rng = {"torch_cpu": torch.get_rng_state().numpy()}
        if self.device.type == "cuda":
            rng["torch_cuda"] = torch.cuda.get_rng_state().numpy()
        return State(get_weights(self.net), tensors, rng)

    def model(self) -> torch.nn.Module:
        return self.net.eval()
