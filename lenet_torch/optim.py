"""Optimizers, with torch.optim's semantics (which the JAX port reproduces with optax).

- ``sgd``: weight decay added to the gradient (L2), then heavy-ball momentum.
- ``adam``: weight decay added to the gradient (L2), then Adam.
- ``adamw``: Adam with decoupled weight decay, w ← w − lr·wd·w.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch

from lenet_train.options import OPTIMIZERS


def make_optimizer(
    net: torch.nn.Module | Iterable[torch.Tensor],
    name: str = "sgd",
    lr: float = 0.01,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """A torch.optim optimizer over all of ``net``'s parameters (or over the given tensors)."""
    params = net.parameters() if isinstance(net, torch.nn.Module) else list(net)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")


SLOTS = {"sgd": ("momentum_buffer",), "adam": ("exp_avg", "exp_avg_sq"),
         "adamw": ("exp_avg", "exp_avg_sq")}
"""torch.optim's per-parameter state of each optimizer (SGD's only with momentum): the
canonical, framework-neutral names, saved as ``{parameter}.{slot}``."""


def _named(net: torch.nn.Module | Mapping[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """``net``'s parameters by name, in the order an optimizer over them holds them."""
    return list(net.named_parameters() if isinstance(net, torch.nn.Module) else net.items())


def optimizer_tensors(opt: torch.optim.Optimizer,
                      net: torch.nn.Module | Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The optimizer's per-parameter state in canonical names (``{parameter}.{slot}``; the
    parameters, ``net``'s or the named tensors it was made over, are already in canonical
    layout). Step counts are the checkpoint's position."""
    names = [k for k, _ in _named(net)]
    return {f"{names[i]}.{slot}": v.detach().cpu().numpy().copy()
            for i, per_param in opt.state_dict()["state"].items()
            for slot, v in per_param.items() if slot != "step" and v is not None}


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, np.ndarray],
                           net: torch.nn.Module | Mapping[str, torch.Tensor], name: str, step: int,
                           legacy_groups: list | None = None) -> None:
    """Restore the canonical ``tensors`` (saved by either framework) of optimizer ``name`` after
    ``step`` steps; ``ValueError`` naming the first one missing or of another shape."""
    groups = opt.state_dict()["param_groups"]
    if tensors and all(k.split(".", 1)[0].isdigit() for k in tensors) and legacy_groups:
        # an earlier lenet version's: the tensors by index; the settings are the run's own
        return _load_by_index(opt, tensors, groups, _named(net), name)
    slots = SLOTS[name]
    if name == "sgd" and not groups[0]["momentum"]:
        slots = ()
    state: dict[int, dict[str, torch.Tensor]] = {}
    if step > 0:
        for i, (pname, p) in enumerate(_named(net)):
            per_param: dict[str, torch.Tensor] = {}
            for slot in slots:
                key = f"{pname}.{slot}"
                if key not in tensors or tuple(tensors[key].shape) != tuple(p.shape):
                    raise ValueError(f"optimizer state {key!r} is missing or has another shape")
                per_param[slot] = torch.from_numpy(np.array(tensors[key], np.float32))
            if name != "sgd":
                per_param["step"] = torch.tensor(float(step))
            if per_param:
                state[i] = per_param
    opt.load_state_dict({"state": state, "param_groups": groups})


def _load_by_index(opt: torch.optim.Optimizer, tensors: dict[str, np.ndarray], groups: list,
                   params: list[tuple[str, torch.Tensor]], name: str) -> None:
    """Optimizer state saved by parameter index (checkpoints before the canonical names),
    under the run's own settings (``groups``: a checkpoint's stored learning rate or weight
    decay never replaces the run's); ``ValueError`` for an index, slot or shape that is not
    this optimizer's."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, slot = key.split(".", 1)
        i = int(index)
        if i >= len(params) or slot not in (*SLOTS[name], "step"):
            raise ValueError(f"optimizer state {key!r} is not one of --optimizer {name}'s")
        want = () if slot == "step" else tuple(params[i][1].shape)
        if tuple(np.shape(value)) != want or not np.issubdtype(value.dtype, np.floating):
            raise ValueError(f"optimizer state {key!r} has shape {tuple(np.shape(value))} "
                             f"and dtype {value.dtype}, not float {want}")
        state.setdefault(i, {})[slot] = torch.from_numpy(np.array(value, np.float32))
    opt.load_state_dict({"state": state, "param_groups": groups})
