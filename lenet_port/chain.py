"""Stage 3, the chain: the traced graph walked from its input to its output as one chain of
spec layers, each with the shape it was seen to produce; a branch, a residual or a second
output is one error naming both nodes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from lenet_port.errors import SUPPORTED, PortError, batch_shape
from lenet_port.ops import (
    ARITHMETIC,
    CONVERSIONS,
    DROPOUTS,
    IDENTITIES,
    INDEXING,
    METADATA_OF_OTHER,
    PERMUTES,
    RESHAPES,
    Call,
    Found,
    from_call,
    from_module,
)
from lenet_port.trace import describe, op_key, op_name, quiet
from lenet_spec import AdaptiveAvgPool, Flatten, Layer, Scale


@dataclass
class Step:
    """One layer of the chain, with where it was read and the shape it was seen to give."""

    layer: Layer
    where: str
    out_shape: tuple[int, ...]
    path: str | None = None  # the module path that owns the weights
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    eval_flag: bool | None = None  # a functional dropout's training flag in evaluation


def holds_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value)


def read_chain(module: nn.Module, gm: fx.GraphModule, env: dict, name: str,
               output: int | None = None) -> tuple[list[Step], bool]:
    """The chain of spec layers the graph computes, with the shapes it was seen to produce,
    and whether it takes channels-last images (moved channels first at its input); ``output``:
    which element of a forward that returns a tuple holds the logits."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise PortError(f"{name}: forward takes {len(placeholders)} inputs; a spec's network "
                        "takes one (the image batch)")
    head = placeholders[0]
    derived = {head}
    steps: list[Step] = []
    channels_last = False
    needed = _feeding(gm, output) if output is not None else None
    for node in gm.graph.nodes:
        if needed is not None and node.op != "output" and node not in needed \
                and not _in_place(node):
            continue  # computes only another element of the returned tuple
        if node.op == "output":
            out = node.args[0]
            several = isinstance(out, (tuple, list))
            if output is not None:
                if not several or not -len(out) <= output < len(out):
                    count = f"{len(out)} values" if several else "one value"
                    raise PortError(f"{name}: output={output}, but forward returns {count}")
                out = out[output]
            elif several and len(out) == 1:
                out = out[0]
            if out is not head:
                hint = ("; if one of them is the logits, pick it with output=I (--output-index I)"
                        if several and output is None else "")
                raise PortError(f"{name}: forward returns {out!r}, not the output of its last "
                                f"layer; a spec's network returns its logits alone{hint}")
            continue
        chain = [n for n in node.all_input_nodes if n in derived]
        if node.op in ("placeholder", "get_attr") or not chain:
            continue  # parameters, constants, buffer updates
        if (op_key(node) == "getitem" and not node.users and node.args[1] != 0
                and isinstance(env[node.args[0]], (tuple, list))):
            continue  # an unused second result: a max-pool's indices, batch norm's statistics
        derived.add(node)
        if not holds_tensor(env[node]):
            continue  # x.size(), shape arithmetic, guards
        where = describe(node, gm)
        tensors = [n for n in chain if holds_tensor(env[n])]
        if op_key(node) in METADATA_OF_OTHER and node.args and node.args[0] is head:
            tensors = [head]  # x.type_as(y), x.to(y), x.view_as(y): y's dtype or shape only
        if len(tensors) > 1 or tensors[0] is not head:
            other = tensors[1] if tensors[0] is head else tensors[0]
            raise PortError(
                f"{where}: {op_name(node) if node.op != 'call_module' else 'this module'} "
                f"takes {'two tensors of the network' if len(tensors) > 1 else 'a tensor'} "
                f"({', '.join(n.name for n in tensors)}), not only the previous layer's output "
                f"({head.name}): a residual or a branch, from {describe(other, gm)}; a spec is one "
                f"chain of layers")
        if not isinstance(env[node], torch.Tensor) and op_key(node) not in (
                "_native_batch_norm_legit_no_training", "adaptive_max_pool2d"):
            raise PortError(f"{where}: returns {type(env[node]).__name__}, not one tensor "
                            f"(return_indices?); {SUPPORTED}")
        if op_key(node) in PERMUTES:
            _channels_first(env[head], env[node], steps, channels_last, where)
            channels_last = True
        else:
            steps += read_node(node, module, gm, env, head, where)
        head = node
    return steps, channels_last


def _channels_first(x: Any, y: Any, steps: list[Step], already: bool, where: str) -> None:
    """A permute, movedim or moveaxis the spec holds: channels-last (N, H, W, C) images moved
    channels first before any layer but numbers' scale (whose seen shapes are then made the
    spec's C×H×W)."""
    n = len(x) if isinstance(x, torch.Tensor) else 0
    moves = (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dim() == 4
             and y.shape == x.permute(0, 3, 1, 2).shape and torch.equal(y, x.permute(0, 3, 1, 2)))
    early = all(isinstance(s.layer, Scale) and s.layer.channels is None for s in steps)
    if not moves or not early or already:
        shapes = (f"{batch_shape(tuple(x.shape), n)} to {batch_shape(tuple(y.shape), n)}"
                  if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) else "")
        raise PortError(f"{where}: reorders the axes of {shapes}; a spec holds one reordering, "
                        "channels-last images (N, H, W, C) moved channels first at the input "
                        f"(x.permute(0, 3, 1, 2)); {SUPPORTED}")
    for s in steps:
        h, w, c = s.out_shape
        s.out_shape = (c, h, w)


def _feeding(gm: fx.GraphModule, output: int) -> set[fx.Node]:
    """The nodes that element ``output`` of the returned tuple is computed from."""
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    if not isinstance(out, (tuple, list)) or not -len(out) <= output < len(out):
        return set(gm.graph.nodes)  # the refusal is read_chain's
    seen: set[fx.Node] = set()
    todo = [out[output]] if isinstance(out[output], fx.Node) else []
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo += node.all_input_nodes
    return seen


def _in_place(node: fx.Node) -> bool:
    """An op that writes into its input (relu_, inplace=True): it counts even unused."""
    return op_key(node).endswith("_") or node.kwargs.get("inplace") is True


def read_node(node: fx.Node, module: nn.Module, gm: fx.GraphModule, env: dict, head: fx.Node,
          where: str) -> list[Step]:
    """One node as spec layers (none for the identity; a global mean is two)."""
    x, y = env[head], env[node]
    in_shape = tuple(x.shape) if isinstance(x, torch.Tensor) else ()
    out_shape = tuple(y[0].shape if isinstance(y, (tuple, list)) else y.shape)
    key = "" if node.op == "call_module" else op_key(node)
    if key in INDEXING:
        if key == "getitem" and isinstance(x, (tuple, list)) and node.args[1] == 0:
            return []  # the output of an op that returns (out, mean, invstd) or (out, indices)
        raise PortError(f"{where}: indexing or slicing a tensor of the network is not "
                        f"supported; {SUPPORTED}")
    if key in IDENTITIES or (node.op == "call_module"
                              and isinstance(gm.get_submodule(node.target), nn.Identity)):
        return []
    if key in CONVERSIONS:
        if (isinstance(y, torch.Tensor) and isinstance(x, torch.Tensor) and y.dtype == x.dtype
                and y.device == x.device and y.shape == x.shape):
            return []  # a conversion to what the tensor already is
        raise PortError(f"{where}: converts the network's {x.dtype} tensor to {y.dtype} on "
                        f"{y.device}; the spec's network computes in its input's dtype on one "
                        "device")
    if key in RESHAPES or (node.op == "call_module"
                            and isinstance(gm.get_submodule(node.target), nn.Flatten)):
        return _reshape(in_shape, out_shape, where)
    if key in ARITHMETIC:
        return [Step(_scale(node, env, head, x, where), where, out_shape[1:])]
    if key == "mean" and len(in_shape) == 4:
        return _global_mean(Call(node, env, module, where), in_shape, out_shape, where)
    if node.op == "call_module":
        path = str(node.target)
        layer, state = from_module(gm.get_submodule(path), path, where, out_shape)
        found = Found(layer, state, path)
    else:
        found = from_call(Call(node, env, module, where))
    if found.layer is None:
        return []
    return [Step(found.layer, where, out_shape[1:], found.owner,
                 {k: v for k, v in found.state.items() if v is not None}, found.flag)]


def _reshape(in_shape: tuple[int, ...], out_shape: tuple[int, ...], where: str) -> list[Step]:
    """A reshape, view, squeeze, unsqueeze or flatten, read by what it does to the shape: the
    identity when it only adds or removes size-1 axes (the batch axis kept; a (N, H, W) input
    given its channel axis included), a flatten when it flattens a (N, C, H, W) map, or its
    single value per image (a discriminator's (N, 1, 1, 1) squeezed to (N,): the spec's one
    logit)."""
    n = in_shape[0] if in_shape else 0
    if out_shape[:1] == in_shape[:1]:
        core_in = tuple(d for d in in_shape[1:] if d != 1)
        core_out = tuple(d for d in out_shape[1:] if d != 1)
        if len(out_shape) == 2 and len(in_shape) == 4 and out_shape[1] == math.prod(in_shape[1:]):
            return [Step(Flatten(), where, out_shape[1:])]
        if core_in == core_out:
            if len(in_shape) == 4 and len(out_shape) <= 2:
                return [Step(Flatten(), where, (math.prod(in_shape[1:]),))]
            # only axes of size 1 added or removed: the same values in the same order (a
            # (N, H, W) input given its channel axis; a discriminator's (N, 1) squeezed to (N,))
            return []
    raise PortError(f"{where}: reshapes {batch_shape(in_shape, n)} to "
                    f"{batch_shape(out_shape, n)}; a spec holds a reshape that flattens (N, C, "
                    "H, W) to (N, C·H·W) or adds or removes axes of size 1 (the batch axis "
                    f"kept); {SUPPORTED}")


def _constant(value: Any, x: torch.Tensor, where: str) -> float | tuple[float, ...]:
    """An arithmetic op's other operand as the spec's scale takes it: a number, or one value
    per channel of ``x`` (dim 1)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, torch.Tensor) or value.is_complex():
        raise PortError(f"{where}: computes with a {type(value).__name__}; {SUPPORTED}")
    if value.numel() == 1:
        return float(value.reshape(()))
    shape = (1,) * (x.dim() - value.dim()) + tuple(value.shape)
    per_channel = (len(shape) == x.dim() and shape[0] == 1 and shape[1] == x.shape[1]
                   and all(d == 1 for d in shape[2:]))
    if not per_channel:
        raise PortError(f"{where}: computes with a constant of shape {tuple(value.shape)} "
                        f"against the network's {batch_shape(tuple(x.shape), len(x))}; a spec "
                        "holds a number or one value per channel (shape (C, 1, 1) or (1, C, "
                        f"1, 1)); {SUPPORTED}")
    return tuple(float(v) for v in value.detach().reshape(-1).double())


def _scale(node: fx.Node, env: dict, head: fx.Node, x: Any, where: str) -> Scale:
    """x · a, x / a, x ± a, a − x, −x with a constant ``a``: the spec's scale."""
    key = op_key(node)
    args = list(node.args)
    if key in ("neg", "neg_"):
        return Scale(-1.0, 0.0)
    if len(args) < 2 and "other" not in node.kwargs:
        raise PortError(f"{where}: {op_name(node)} with one operand; {SUPPORTED}")
    first, other = (args + [node.kwargs.get("other")])[:2]
    if first is not head:
        first, other = other, first
        if first is not head:
            raise PortError(f"{where}: {op_name(node)} of a tensor that is not the previous "
                            f"layer's output; {SUPPORTED}")
        reversed_ = True
    else:
        reversed_ = False
    alpha = node.kwargs.get("alpha", args[2] if len(args) > 2 else 1)
    if node.kwargs.get("rounding_mode") is not None:
        raise PortError(f"{where}: a division with rounding_mode="
                        f"{node.kwargs['rounding_mode']!r}; {SUPPORTED}")
    if other is head:
        raise PortError(f"{where}: {op_name(node)} is not supported on the network's tensor "
                        f"with itself; a spec's scale takes a number or a constant per channel; "
                        f"{SUPPORTED}")
    value = env[other] if isinstance(other, fx.Node) else other
    if isinstance(value, torch.Tensor) and value.requires_grad:
        raise PortError(f"{where}: {op_name(node)} with the learned parameter {other}; a "
                        f"spec's scale is a constant (it would not train); {SUPPORTED}")
    a = _constant(value, x, where)
    if key in ("mul", "mul_"):
        return Scale(a, 0.0)
    if key in ("div", "div_", "truediv", "true_divide"):
        if reversed_:
            raise PortError(f"{where}: divides a constant by the network's tensor; {SUPPORTED}")
        return Scale(tuple(1 / v for v in a) if isinstance(a, tuple) else 1 / a, 0.0)
    alpha = float(alpha)
    if key == "rsub" or (key in ("sub", "sub_") and reversed_):
        # rsub(x, a, alpha) = a − alpha·x; sub(a, x, alpha) = a − alpha·x
        return Scale(-alpha, a)
    sign = -1.0 if key in ("sub", "sub_") else 1.0
    if reversed_:  # add(a, x, alpha) = a + alpha·x
        return Scale(alpha, a)
    shift = tuple(sign * alpha * v for v in a) if isinstance(a, tuple) else sign * alpha * a
    return Scale(1.0, shift)


def _global_mean(call: Call, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
                 where: str) -> list[Step]:
    """x.mean((2, 3)) of an (N, C, H, W) map: an adaptive average to 1×1, then (unless
    keepdim) a flatten."""
    a = call.bind(["dim", "keepdim", "dtype"], {"dim": None, "keepdim": False, "dtype": None})
    dims = a["dim"] if isinstance(a["dim"], (tuple, list)) else [a["dim"]]
    if sorted(d % 4 for d in dims if d is not None) != [2, 3] or a["dtype"] is not None:
        raise PortError(f"{where}: a mean over {a['dim']}; the spec holds the mean over the "
                        f"spatial dims (2, 3) of an (N, C, H, W) map, a global average pool; "
                        f"{SUPPORTED}")
    pooled = Step(AdaptiveAvgPool(1), where, (in_shape[1], 1, 1))
    return [pooled] if a["keepdim"] else [pooled, Step(Flatten(), where, out_shape[1:])]


def dropout_flags(module: nn.Module, x: torch.Tensor, tracer: str) -> list[bool]:
    """The training flag of each functional dropout, in order, traced in training mode."""
    if tracer == "torch.fx":
        t = fx.Tracer()
        gm = fx.GraphModule(module, t.trace(module))
    else:
        with quiet():
            gm = torch.export.export(module, (x,)).module()
    flags = []
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method") and op_key(node) in DROPOUTS:
            kwargs = dict(node.kwargs)
            args = list(node.args)
            value = kwargs.get("training", kwargs.get("train", args[2] if len(args) > 2 else True))
            flags.append(bool(value))
    return flags
