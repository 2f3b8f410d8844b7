"""Optimizers, with torch.optim's semantics (which the JAX port reproduces with optax).

- ``sgd``: weight decay added to the gradient (L2), then heavy-ball momentum.
- ``adam``: weight decay added to the gradient (L2), then Adam.
- ``adamw``: Adam with decoupled weight decay, w ← w − lr·wd·w.
"""

from __future__ import annotations

import numpy as np
import torch

from lenet_train.options import OPTIMIZERS


def make_optimizer(
    net: torch.nn.Module,
    name: str = "sgd",
    lr: float = 0.01,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """A torch.optim optimizer over all of ``net``'s parameters."""
    params = net.parameters()
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, np.ndarray], list]:
    """The optimizer's state as flat named arrays plus its JSON-able param groups."""
    state = opt.state_dict()
    tensors = {
        f"{i}.{k}": v.detach().cpu().numpy()
        for i, per_param in state["state"].items() for k, v in per_param.items()
    }
    return tensors, state["param_groups"]


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, np.ndarray],
                           groups: list) -> None:
    """Restore what :func:`optimizer_tensors` saved (``ValueError`` / ``RuntimeError`` when it
    does not fit ``opt``)."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = torch.from_numpy(value.copy())
    opt.load_state_dict({"state": state, "param_groups": groups})
