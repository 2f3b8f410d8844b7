"""Stage 2, read nodes: a node's arguments by name, and the settings they spell (pairs,
pooling, conv padding), each refusal naming the node."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx

from lenet_port.errors import SUPPORTED, PortError
from lenet_spec import Layer, SpecError


def bind_args(node: fx.Node, env: dict, names: Sequence[str], defaults: dict[str, Any],
          where: str) -> dict[str, Any]:
    """The node's arguments by name, evaluated (nodes replaced by their values), with
    ``defaults``; the input tensor is skipped (it is the chain's head)."""
    args = list(node.args[1:])
    if len(args) > len(names):
        raise PortError(f"{where}: unexpected arguments {args[len(names):]!r}; {SUPPORTED}")
    out = dict(defaults)
    out.update(zip(names, args, strict=False))
    out.update(node.kwargs)
    return {k: env[v] if isinstance(v, fx.Node) else v for k, v in out.items()}


def state_path(node: fx.Node, arg: Any, what: str, where: str) -> str | None:
    """The state_dict path of a parameter or buffer passed to a functional op."""
    if arg is None:
        return None
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        return str(arg.target)
    raise PortError(f"{where}: its {what} is computed in forward, not a parameter or buffer of "
                    f"the module; a spec's layers hold their own weights")


def pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (list, tuple, torch.Size)):
        return (int(value[0]), int(value[-1])) if len(value) in (1, 2) else (-1, -1)
    return (int(value), int(value))


def pool_layer(kind: type, k: Any, stride: Any, padding: Any, where: str, *, dilation: Any = 1,
               ceil_mode: bool = False, extra: dict[str, Any] | None = None,
               **fields: Any) -> Layer:
    """The spec's pool of these settings (padding, ceil_mode and ``fields`` such as
    count_include_pad as torch's)."""
    if pair(dilation) != (1, 1):
        raise PortError(f"{where}: pooling with dilation {dilation!r}; the spec's pools have none")
    for key, (value, ok) in (extra or {}).items():
        if value != ok:
            raise PortError(f"{where}: {key}={value!r} is not supported (the spec's "
                            f"{kind.type} has {key}={ok!r})")
    stride = None if stride is None or (isinstance(stride, (list, tuple)) and not stride) \
        else pair(stride)
    try:
        return kind(pair(k), stride, pair(padding), bool(ceil_mode), **fields)
    except SpecError as e:
        raise PortError(f"{where}: {e}") from None


def conv_padding(padding: Any, kernel: tuple[int, int], dilation: tuple[int, int],
                  where: str) -> tuple[int, int]:
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        total = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
        if any(t % 2 for t in total):
            raise PortError(f"{where}: padding='same' with an even kernel pads unequally; the "
                            "spec's conv pads both sides equally")
        return (total[0] // 2, total[1] // 2)
    return pair(padding)
