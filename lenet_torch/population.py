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
from collections.abc import Sequence

import numpy as np
import torch
from torch.func import functional_call, stack_module_state, vmap

from lenet_spec import Spec
from lenet_torch.model import build
from lenet_torch.optim import make_optimizer


class Population:
    """The stacked state of ``len(seeds)`` networks of ``spec`` (torch's own layers), its
    optimizer and its steps. A step takes (P, batch) indices (one batch per member) and returns
    (P,) losses and correct counts."""

    def __init__(self, spec: Spec, seeds: Sequence[int], loss, on_logits: bool = True,
                 optimizer: str = "sgd", lr: float = 0.01, momentum: float = 0.0,
                 weight_decay: float = 0.0, device: torch.device | str = "cpu") -> None:
        if not seeds:
            raise ValueError("a population needs at least one seed")
        self.spec, self.seeds = spec, [int(s) for s in seeds]
        nets = [build(spec, seed=s, kernels="stock").to(device) for s in self.seeds]
        self.params, self.buffers = stack_module_state(nets)
        self.base = copy.deepcopy(nets[0]).to("meta")
        self.opt = make_optimizer(self.params.values(), optimizer, lr, momentum, weight_decay)
        self.loss, self.on_logits = loss, on_logits

        def member_loss(params, buffers, x, y):
            out = functional_call(self.base, (params, buffers), (x,), {"logits": on_logits})
            return loss(out, y), (out.argmax(1) == y).sum()

        def member_eval(params, buffers, x, y):
            out = functional_call(self.base, (params, buffers), (x,), {"logits": on_logits})
            return loss(out, y) * len(y), (out.argmax(1) == y).sum()

        self._train = vmap(member_loss, randomness="different")
        self._eval = vmap(member_eval, in_dims=(0, 0, None, None))

    def __len__(self) -> int:
        return len(self.seeds)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor,
                   lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step of every member, member m on ``images[idx[m]]`` at learning rate
        ``lr``; returns the (P,) losses and correct counts (detached)."""
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.base.train()
        self.opt.zero_grad(set_to_none=True)
        values, correct = self._train(self.params, self.buffers, images[idx], labels[idx])
        values.sum().backward()
        self.opt.step()
        return values.detach(), correct

    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every member's summed loss and correct count on the batch (x, y)."""
        self.base.eval()
        with torch.no_grad():
            out = self._eval(self.params, self.buffers, x, y)
        self.base.train()
        return out

    def weights(self, m: int) -> dict[str, np.ndarray]:
        """Member ``m``'s weights in canonical names and layouts (torch's state_dict names)."""
        return {k: v[m].detach().cpu().numpy().copy()
                for k, v in {**self.params, **self.buffers}.items()}
