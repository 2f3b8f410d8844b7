"""A population of seeds trained as one program: every member's parameters and buffers stacked
along a leading axis (``torch.func.stack_module_state``), the network applied to all members by
``torch.func.vmap`` of ``functional_call``, one backward pass for the whole population and
torch's own optimizer on the stacked tensors (SGD, Adam and AdamW act element by element, so
they step each member exactly as they would step it alone).

Member ``m`` starts as ``build(spec, seed=seeds[m])`` and trains on its own batches; batch_norm
keeps its running statistics per member. Dropout draws a different mask for every member
(``randomness="different"``), not the masks a single run at that seed would draw: torch's
generator is shared by the population.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.func import functional_call, stack_module_state, vmap

from lenet_spec import Spec
from lenet_torch.loss import loss_fn
from lenet_torch.model import build, set_weights
from lenet_torch.optim import load_optimizer_tensors, make_optimizer, optimizer_tensors
from lenet_torch.trainer import TorchBackend
from lenet_train.config import Config
from lenet_train.errors import StateError
from lenet_train.options import EVAL_BATCH, loss_on_logits
from lenet_train.run import Run
from lenet_train.state import State


class Population:
    """The stacked state of ``len(seeds)`` networks of ``spec`` (torch's own layers), its
    optimizer and its steps (the same API as ``lenet_jax.population.Population``).

    Member m starts as ``build(spec, seed=seeds[m])``; it trains with ``optimizer`` at
    learning rate ``lr`` (a number, or a function of the step) on ``loss``. A step takes (P, batch)
    indices (one batch per member) and returns (P,) losses and correct counts."""

    def __init__(self, spec: Spec, seeds: Sequence[int], *, optimizer: str = "sgd",
                 lr: float | Callable[[int], float] = 0.01, momentum: float = 0.0,
                 weight_decay: float = 0.0, loss: str = "ce", kernels: str = "auto",
                 precision: str = "float32", device: torch.device | str | None = None) -> None:
        if not seeds:
            raise ValueError("a population needs at least one seed")
        if kernels == "fused":
            raise ValueError("a torch population trains torch's own layers (kernels stock)")
        self.spec, self.seeds = spec, [int(s) for s in seeds]
        self.device = torch.device(device or "cpu")
        self.lr = lr if callable(lr) else (lambda step: lr)
        self.precision = precision
        nets = [build(spec, seed=s, kernels="stock", precision=precision).to(self.device)
                for s in self.seeds]
        self.params, self.buffers = stack_module_state(nets)
        self.base = copy.deepcopy(nets[0]).to("meta")
        self.opt = make_optimizer(self.params.values(), optimizer, float(self.lr(0)), momentum,
                                  weight_decay)
        self.optimizer_name = optimizer
        on_logits, loss_of = loss_on_logits(loss), loss_fn(loss)

        def member_loss(params, buffers, x, y):
            out = functional_call(self.base, (params, buffers), (x,), {"logits": on_logits})
            return loss_of(out, y), (out.argmax(1) == y).sum()

        def member_eval(params, buffers, x, y):
            out = functional_call(self.base, (params, buffers), (x,), {"logits": on_logits})
            return loss_of(out, y) * len(y), (out.argmax(1) == y).sum()

        self._train = vmap(member_loss, randomness="different")
        self._eval = vmap(member_eval, in_dims=(0, 0, None, None))

    def __len__(self) -> int:
        return len(self.seeds)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor,
                   step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Optimizer step ``step`` of every member, member m on ``images[idx[m]]``; returns
        the (P,) losses and correct counts (detached)."""
        for group in self.opt.param_groups:
            group["lr"] = float(self.lr(step))
        self.base.train()
        self.opt.zero_grad(set_to_none=True)
        values, correct = self._train(self.params, self.buffers, images[idx], labels[idx])
        values.sum().backward()
        self.opt.step()
        return values.detach(), correct

    def train_steps(self, images: torch.Tensor, labels: torch.Tensor, idxs: torch.Tensor,
                    first: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``len(idxs)`` steps from step ``first``, one after the other; ``idxs`` is (K, P,
        batch). Returns the (P, K) losses and the (P,) correct counts summed over the K
        steps."""
        out = [self.train_step(images, labels, idx, first + k) for k, idx in enumerate(idxs)]
        return (torch.stack([v for v, _ in out], dim=1),
                torch.stack([c for _, c in out]).sum(0))

    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every member's summed loss and correct count on the batch (x, y)."""
        self.base.eval()
        with torch.no_grad():
            out = self._eval(self.params, self.buffers, x, y)
        self.base.train()
        return out

    def network(self, m: int) -> torch.nn.Module:
        """Member ``m`` as a network of its own (a copy of its current state)."""
        net = build(self.spec, kernels="stock", precision=self.precision).to(self.device)
        set_weights(net, self.weights(m))
        return net

    def weights(self, m: int) -> dict[str, np.ndarray]:
        """Member ``m``'s weights in canonical names and layouts (torch's state_dict names)."""
        return {k: v[m].detach().cpu().numpy().copy()
                for k, v in {**self.params, **self.buffers}.items()}

    def stacked_weights(self) -> dict[str, np.ndarray]:
        """Every member's canonical weights, each tensor stacked along a leading member axis."""
        return {k: v.detach().cpu().numpy().copy()
                for k, v in {**self.params, **self.buffers}.items()}

    def optimizer_tensors(self) -> dict[str, np.ndarray]:
        """The optimizer's state in canonical names, each tensor stacked over the members."""
        return optimizer_tensors(self.opt, self.params)

    def load(self, weights: dict[str, np.ndarray], optimizer: dict[str, np.ndarray] | None = None,
             step: int = 0) -> None:
        """Set the members' canonical ``weights`` (each tensor stacked over the members) and,
        if given, the optimizer's state after ``step`` steps; ``ValueError`` naming the first
        tensor that is missing or of another shape."""
        with torch.no_grad():
            for k, t in {**self.params, **self.buffers}.items():
                if k not in weights or tuple(np.shape(weights[k])) != tuple(t.shape):
                    raise ValueError(f"tensor {k!r} is missing or has another shape")
                t.copy_(torch.from_numpy(np.asarray(weights[k])))
        if optimizer is not None:
            load_optimizer_tensors(self.opt, optimizer, self.params, self.optimizer_name, step)


class PopulationBackend(TorchBackend):
    """The torch side of ``lenet_train.loop.fit`` for a population (``--seeds``): every
    member's step in one vmapped forward and backward pass, torch.optim on the stacked
    parameters."""

    def configure(self, config: Config) -> None:
        super().configure(config)
        self.seeds = list(config.seeds)

    def describe(self) -> str:
        return f"{super().describe()}; a population of {len(self.seeds)} seeds (torch.func.vmap)"

    def start(self, run: Run, restore: State | None) -> None:
        c, device = run.config, self.device
        self.pop = Population(run.spec, self.seeds, optimizer=c.optimizer, lr=run.lr,
                              momentum=c.momentum, weight_decay=c.weight_decay, loss=c.loss,
                              precision=c.precision, device=device)
        if restore:
            try:
                self.pop.load(restore.weights, restore.optimizer, int(restore.meta["step"]))
            except (KeyError, ValueError, RuntimeError, TypeError) as e:
                raise StateError(f"optimizer state does not fit --optimizer {c.optimizer}: "
                                 f"{e}") from None
            self._restore_generators(restore, c.seed, device)
        elif run.init_weights:
            p = len(self.seeds)
            self.pop.load({k: np.stack([v] * p) for k, v in run.init_weights.items()})
        self.train_x, self.train_y, self.test_x, self.test_y = (
            torch.from_numpy(a).to(device)
            for a in (run.train_x, run.train_y, run.test_x, run.test_y))

    def begin_epoch(self, order: np.ndarray, images: np.ndarray | None = None) -> None:
        self.order = torch.from_numpy(order).to(self.device)

    def train(self, first: int, count: int, step: int):
        return self.pop.train_step(self.train_x, self.train_y, self.order[first], step)

    def fetch(self, pending) -> tuple[np.ndarray, np.ndarray]:
        losses = torch.stack([v for v, _ in pending]).cpu().numpy()
        correct = torch.stack([c for _, c in pending]).sum(0).cpu().numpy().astype(np.int64)
        return losses, correct

    def evaluate(self) -> tuple[np.ndarray, np.ndarray]:
        total_loss = np.zeros(len(self.seeds))
        correct = np.zeros(len(self.seeds), np.int64)
        for i in range(0, len(self.test_x), EVAL_BATCH):
            loss, right = self.pop.evaluate(self.test_x[i : i + EVAL_BATCH],
                                            self.test_y[i : i + EVAL_BATCH])
            total_loss += loss.cpu().numpy()
            correct += right.cpu().numpy()
        return total_loss / len(self.test_x), correct / len(self.test_x)

    def state(self) -> State:
        rng = {"torch_cpu": torch.get_rng_state().numpy()}
        if self.device.type == "cuda":
            rng["torch_cuda"] = torch.cuda.get_rng_state().numpy()
        return State(self.pop.stacked_weights(), self.pop.optimizer_tensors(), rng)

    def model(self) -> list[torch.nn.Module]:
        return [self.pop.network(m).eval() for m in range(len(self.seeds))]
