"""Port a torch module to a spec: :func:`to_spec` turns an ``nn.Module`` written the way the
PyTorch tutorial writes one into a :class:`~lenet_spec.Spec` and its canonical weights, checked
to give the module's logits.

``python -m lenet_torch.port FILE.py:CLASS --input-shape C,H,W -o SPEC.json`` does it from the
command line and prints the spec's summary table.

The module is traced with ``torch.fx`` where it can be, else with ``torch.export`` (which
also follows Python loops over ``x.size()``); the traced graph is then run on a small batch, so
every node's input and output shapes are known, and read as a chain of the spec's layers. Any
node that is not one of them, or that makes the graph anything but a chain, is one
:class:`PortError` naming the node or module, the operation and the source line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import logging
import math
import operator
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from lenet_spec import (
    ELU,
    GELU,
    AvgPool,
    BatchNorm,
    Conv,
    Dropout,
    Dropout2d,
    Flatten,
    Layer,
    LeakyReLU,
    Linear,
    MaxPool,
    ReLU,
    Sigmoid,
    SiLU,
    Spec,
    SpecError,
    Tanh,
    atomic_write_bytes,
    canonical_dtype,
)

SUPPORTED = (
    "supported: nn.Conv2d, nn.Linear, nn.BatchNorm1d/2d, nn.Dropout, nn.Dropout2d, "
    "nn.MaxPool2d, nn.AvgPool2d, nn.Flatten, nn.Identity, nn.ReLU/Tanh/Sigmoid/GELU/LeakyReLU/"
    "ELU/SiLU and their functional forms (F.relu, torch.relu, x.relu(), F.max_pool2d, "
    "F.avg_pool2d, F.dropout, F.dropout2d, …); flattening to (N, C·H·W) by torch.flatten(x, 1), "
    "x.flatten(1), x.view(…) or x.reshape(…); nn.Sequential, nested modules — one chain of "
    "layers from the input to the logits"
)

CHECK_BATCH = 4
TRACE_BATCH = 3  # differs from CHECK_BATCH: a batch size written into forward fails the check
LOGIT_TOL = 1e-5
"""The check's bound: max |Δ| of the logits, relative to max(1, max |logit|)."""


class PortError(ValueError):
    """A module that cannot be expressed as a spec; the message names the module or graph node
    and the operation, and lists what is supported."""


@dataclass
class Ported:
    """What :func:`port` found: the spec, its canonical weights, the tracer that read the module
    and the check's logit gap."""

    spec: Spec
    weights: dict[str, np.ndarray]
    tracer: str
    gap: float


@dataclass
class _Step:
    layer: Layer
    where: str
    out_shape: tuple[int, ...]
    path: str | None = None  # the module path that owns the weights
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    eval_flag: bool | None = None  # a functional dropout's training flag in evaluation


# --------------------------------------------------------------------------- tracing


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch.export's warnings and logged errors kept off the user's terminal: a failure
    reaches them as one PortError."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _trace(module: nn.Module, x: torch.Tensor) -> tuple[fx.GraphModule, str]:
    """The module's graph: torch.fx's symbolic trace, else torch.export's ATen graph."""
    try:
        tracer = fx.Tracer()
        tracer.record_stack_traces = True
        graph = tracer.trace(module)
        return fx.GraphModule(module, graph), "torch.fx"
    except Exception as e:  # fx raises many types (TraceError, TypeError, …)
        fx_error = _first_line(e)
    try:
        with _quiet():
            program = torch.export.export(module, (x,))
        return program.module(), "torch.export"
    except Exception as e:
        raise PortError(f"{type(module).__name__}: cannot trace it: torch.fx says "
                        f"{fx_error!r}; torch.export says {_first_line(e)!r}") from None


def _run(gm: fx.GraphModule, x: torch.Tensor, name: str) -> dict[fx.Node, Any]:
    """Every node's value on input ``x``."""
    interpreter = fx.Interpreter(gm, garbage_collect_values=False)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            interpreter.run(x)
    except Exception as e:
        raise PortError(f"{name}: running it on a batch of shape {tuple(x.shape)} failed: "
                        f"{_first_line(e)}") from None
    return interpreter.env


# --------------------------------------------------------------------------- naming nodes

_TORCH_DIR = str(Path(torch.__file__).parent)
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in [^\n]*\n\s*([^\n]*)')


def _source(node: fx.Node) -> str:
    """' at FILE:LINE: code' for the last frame of the node's stack outside torch, if known."""
    frames = [m for m in _FRAME.finditer(node.meta.get("stack_trace") or "")
              if not m.group(1).startswith(_TORCH_DIR)]
    if not frames:
        return ""
    file, line, code = frames[-1].groups()
    return f" at {Path(file).name}:{line}: {code.strip()}"


def _op_name(node: fx.Node) -> str:
    target = node.target
    if node.op == "call_method":
        return f"Tensor.{target}"
    if isinstance(target, torch._ops.OpOverload):
        return f"aten.{target._schema.name.split('::')[-1]}"
    name = getattr(target, "__name__", str(target))
    if name == "fn" and hasattr(target, "__wrapped__"):
        name = target.__wrapped__.__name__
    if getattr(F, name, None) is target:
        return f"F.{name}"
    if getattr(torch, name, None) is target:
        return f"torch.{name}"
    if getattr(operator, name, None) is target:
        return f"operator.{name}"
    return name


def _where(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(gm.get_submodule(node.target)).__name__}){_source(node)}"
    return f"node {node.name} ({_op_name(node)}){_source(node)}"


# --------------------------------------------------------------------------- arguments


def _bind(node: fx.Node, env: dict, names: Sequence[str], defaults: dict[str, Any],
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


def _ref(node: fx.Node, arg: Any, what: str, where: str) -> str | None:
    """The state_dict path of a parameter or buffer passed to a functional op."""
    if arg is None:
        return None
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        return str(arg.target)
    raise PortError(f"{where}: its {what} is computed in forward, not a parameter or buffer of "
                    f"the module; a spec's layers hold their own weights")


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (list, tuple, torch.Size)):
        return (int(value[0]), int(value[-1])) if len(value) in (1, 2) else (-1, -1)
    return (int(value), int(value))


def _pool(kind: type, k: Any, stride: Any, padding: Any, where: str, *, dilation: Any = 1,
          extra: dict[str, Any] | None = None) -> Layer:
    """The spec's pool of these settings; ceil_mode is judged later, by the output shape."""
    if _pair(padding) != (0, 0):
        raise PortError(f"{where}: pooling with padding {padding!r}; the spec's pools have none")
    if _pair(dilation) != (1, 1):
        raise PortError(f"{where}: pooling with dilation {dilation!r}; the spec's pools have none")
    for key, (value, ok) in (extra or {}).items():
        if value != ok:
            raise PortError(f"{where}: {key}={value!r} is not supported (the spec's "
                            f"{kind.type} has {key}={ok!r})")
    stride = None if stride is None or (isinstance(stride, (list, tuple)) and not stride) \
        else _pair(stride)
    return kind(_pair(k), stride)


def _conv_padding(padding: Any, kernel: tuple[int, int], dilation: tuple[int, int],
                  where: str) -> tuple[int, int]:
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        total = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
        if any(t % 2 for t in total):
            raise PortError(f"{where}: padding='same' with an even kernel pads unequally; the "
                            "spec's conv pads both sides equally")
        return (total[0] // 2, total[1] // 2)
    return _pair(padding)


# --------------------------------------------------------------------------- layers


ACTIVATION_MODULES: dict[type, Callable[[nn.Module], Layer]] = {
    nn.ReLU: lambda m: ReLU(),
    nn.Tanh: lambda m: Tanh(),
    nn.Sigmoid: lambda m: Sigmoid(),
    nn.GELU: lambda m: GELU(m.approximate),
    nn.LeakyReLU: lambda m: LeakyReLU(m.negative_slope),
    nn.ELU: lambda m: ELU(m.alpha),
    nn.SiLU: lambda m: SiLU(),
}


def _batch_norm_layer(owner: nn.Module | None, momentum: float, eps: float, affine: bool,
                      where: str) -> BatchNorm:
    if isinstance(owner, nn.modules.batchnorm._BatchNorm):
        if owner.momentum is None:
            raise PortError(f"{where}: momentum=None (a cumulative average of the batch "
                            "statistics); the spec's batch_norm uses an exponential average")
        momentum = owner.momentum
    return BatchNorm(momentum=momentum, eps=eps, affine=affine)


def _from_module(sub: nn.Module, path: str, where: str) -> tuple[Layer | None, dict]:
    """The spec layer of a leaf module and the tensors it holds (None: the identity)."""
    if type(sub) in ACTIVATION_MODULES:
        return ACTIVATION_MODULES[type(sub)](sub), {}
    if isinstance(sub, nn.Identity):
        return None, {}
    if type(sub) is nn.Conv2d:
        if sub.padding_mode != "zeros":
            raise PortError(f"{where}: padding_mode={sub.padding_mode!r}; the spec's conv pads "
                            "with zeros")
        padding = _conv_padding(sub.padding, sub.kernel_size, sub.dilation, where)
        layer = Conv(sub.out_channels, sub.kernel_size, sub.stride, padding, sub.dilation,
                     sub.groups, sub.bias is not None)
        return layer, {"weight": sub.weight, "bias": sub.bias}
    if type(sub) is nn.Linear:
        return Linear(sub.out_features, sub.bias is not None), {"weight": sub.weight,
                                                                "bias": sub.bias}
    if type(sub) in (nn.BatchNorm1d, nn.BatchNorm2d):
        if not sub.track_running_stats:
            raise PortError(f"{where}: track_running_stats=False normalises by the batch's "
                            "statistics in evaluation too; the spec's batch_norm keeps running "
                            "statistics")
        layer = _batch_norm_layer(sub, 0.1, sub.eps, sub.affine, where)
        return layer, {"weight": sub.weight, "bias": sub.bias, "running_mean": sub.running_mean,
                       "running_var": sub.running_var,
                       "num_batches_tracked": sub.num_batches_tracked}
    if type(sub) is nn.Dropout:
        return Dropout(sub.p), {}
    if type(sub) is nn.Dropout2d:
        return Dropout2d(sub.p), {}
    if type(sub) is nn.MaxPool2d:
        return _pool(MaxPool, sub.kernel_size, sub.stride, sub.padding, where,
                     dilation=sub.dilation,
                     extra={"return_indices": (sub.return_indices, False)}), {}
    if type(sub) is nn.AvgPool2d:
        return _pool(AvgPool, sub.kernel_size, sub.stride, sub.padding, where,
                     extra={"divisor_override": (sub.divisor_override, None)}), {}
    raise PortError(f"{where}: {type(sub).__name__} is not supported; {SUPPORTED}")


# Functional and ATen forms: (names of the arguments after the input, defaults).
_ACT = {"relu", "relu_", "tanh", "tanh_", "sigmoid", "sigmoid_", "silu", "silu_"}
_RESHAPES = {"view", "reshape", "flatten", "_unsafe_view"}
_IDENTITIES = {"contiguous", "clone", "alias", "detach", "identity"}


def _key(node: fx.Node) -> str:
    """The op's name, the same for F.relu, torch.relu, x.relu() and aten.relu."""
    target = node.target
    if node.op == "call_method":
        return str(target)
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::")[-1]
    if target is F.max_pool2d or target is F.max_pool2d_with_indices:
        return "max_pool2d"
    if target is operator.getitem:
        return "getitem"
    return getattr(target, "__name__", "")


def _functional(node: fx.Node, env: dict, gm: fx.GraphModule, module: nn.Module,
                where: str) -> tuple[Layer | None, dict, str | None, bool | None]:
    """The spec layer of a functional or ATen node, its tensors by canonical suffix, the
    state_dict prefix that owns them, and (functional dropout) the training flag it was given."""
    key = _key(node)
    aten = isinstance(node.target, torch._ops.OpOverload)

    def bind(names: Sequence[str], defaults: dict[str, Any]) -> dict[str, Any]:
        return _bind(node, env, names, defaults, where)

    if key in _ACT:
        bind(["inplace"], {})
        return {"relu": ReLU, "tanh": Tanh, "sigmoid": Sigmoid,
                "silu": SiLU}[key.rstrip("_")](), {}, None, None
    if key == "gelu":
        return GELU(bind(["approximate"], {"approximate": "none"})["approximate"]), {}, None, None
    if key in ("leaky_relu", "leaky_relu_"):
        a = bind(["negative_slope", "inplace"], {"negative_slope": 0.01})
        return LeakyReLU(float(a["negative_slope"])), {}, None, None
    if key in ("elu", "elu_"):
        names = ["alpha", "scale", "input_scale"] if aten else ["alpha", "inplace"]
        a = bind(names, {"alpha": 1.0, "scale": 1, "input_scale": 1})
        if a["scale"] != 1 or a["input_scale"] != 1:
            raise PortError(f"{where}: a scaled ELU (SELU-like) is not supported; {SUPPORTED}")
        return ELU(float(a["alpha"])), {}, None, None
    if key in ("dropout", "dropout_", "feature_dropout", "feature_dropout_", "dropout2d"):
        a = bind(["p", "training" if not aten else "train", "inplace"],
                 {"p": 0.5, "training": True, "train": True})
        flag = bool(a.get("training", a.get("train")))
        kind = Dropout if key.startswith("dropout") and key != "dropout2d" else Dropout2d
        return kind(float(a["p"])), {}, None, flag
    if key == "max_pool2d":
        if aten:
            a = bind(["kernel_size", "stride", "padding", "dilation", "ceil_mode"],
                     {"stride": [], "padding": 0, "dilation": 1, "ceil_mode": False})
        else:
            a = bind(["kernel_size", "stride", "padding", "dilation", "ceil_mode",
                      "return_indices"], {"stride": None, "padding": 0, "dilation": 1,
                                          "ceil_mode": False, "return_indices": False})
        extra = {"return_indices": (a.get("return_indices", False), False)}
        return _pool(MaxPool, a["kernel_size"], a["stride"], a["padding"], where,
                     dilation=a["dilation"], extra=extra), {}, None, None
    if key == "avg_pool2d":
        a = bind(["kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                  "divisor_override"], {"stride": None, "padding": 0, "ceil_mode": False,
                                        "count_include_pad": True, "divisor_override": None})
        return _pool(AvgPool, a["kernel_size"], a["stride"], a["padding"], where,
                     extra={"divisor_override": (a["divisor_override"], None)}), {}, None, None
    if key in ("conv2d", "linear"):
        names = ["weight", "bias", "stride", "padding", "dilation", "groups"]
        a = bind(names, {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1})
        raw = dict(zip(names, node.args[1:], strict=False)) | dict(node.kwargs)
        w_ref = _ref(node, raw.get("weight"), "weight", where)
        _ref(node, raw.get("bias"), "bias", where)
        weight, bias = a["weight"], a["bias"]
        if key == "linear":
            layer: Layer = Linear(int(weight.shape[0]), bias is not None)
        else:
            dilation = _pair(a["dilation"])
            kernel = (int(weight.shape[2]), int(weight.shape[3]))
            padding = _conv_padding(a["padding"], kernel, dilation, where)
            layer = Conv(int(weight.shape[0]), kernel, _pair(a["stride"]), padding, dilation,
                         int(a["groups"]), bias is not None)
        prefix = w_ref.removesuffix(".weight")
        return layer, {"weight": weight, "bias": bias}, prefix, None
    if key in ("batch_norm", "_native_batch_norm_legit_no_training"):
        if key == "batch_norm" and not aten:  # F.batch_norm
            names = ["running_mean", "running_var", "weight", "bias", "training", "momentum",
                     "eps"]
        elif key == "batch_norm":
            names = ["weight", "bias", "running_mean", "running_var", "training", "momentum",
                     "eps", "cudnn_enabled"]
        else:
            names = ["weight", "bias", "running_mean", "running_var", "momentum", "eps"]
        a = bind(names, {"weight": None, "bias": None, "training": False, "momentum": 0.1,
                         "eps": 1e-5})
        raw = dict(zip(names, node.args[1:], strict=False)) | dict(node.kwargs)
        if a["training"] or a["running_mean"] is None:
            raise PortError(f"{where}: batch norm by the batch's statistics in evaluation "
                            "(track_running_stats=False or training=True); the spec's "
                            "batch_norm keeps running statistics")
        mean_ref = _ref(node, raw.get("running_mean"), "running mean", where)
        _ref(node, raw.get("running_var"), "running variance", where)
        _ref(node, raw.get("weight"), "scale", where)
        prefix = mean_ref.removesuffix(".running_mean")
        owner = _submodule(module, prefix)
        if (a["weight"] is None) != (a["bias"] is None):
            raise PortError(f"{where}: batch norm with a scale but no shift (or the reverse); "
                            "the spec's batch_norm has both or neither")
        layer = _batch_norm_layer(owner, float(a["momentum"]), float(a["eps"]),
                                  a["weight"] is not None, where)
        count = getattr(owner, "num_batches_tracked", None)
        state = {"weight": a["weight"], "bias": a["bias"], "running_mean": a["running_mean"],
                 "running_var": a["running_var"],
                 "num_batches_tracked": count if count is not None else torch.tensor(0)}
        return layer, state, prefix, None
    raise PortError(f"{where}: {_op_name(node)} is not supported; {SUPPORTED}")


def _submodule(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _holds_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value)


def _steps(module: nn.Module, gm: fx.GraphModule, env: dict, name: str) -> list[_Step]:
    """The chain of spec layers the graph computes, with the shapes it was seen to produce."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise PortError(f"{name}: forward takes {len(placeholders)} inputs; a spec's network "
                        "takes one (the image batch)")
    head = placeholders[0]
    derived = {head}
    steps: list[_Step] = []
    for node in gm.graph.nodes:
        if node.op == "output":
            out = node.args[0]
            if isinstance(out, (tuple, list)) and len(out) == 1:
                out = out[0]
            if out is not head:
                raise PortError(f"{name}: forward returns {out!r}, not the output of its last "
                                "layer; a spec's network returns its logits alone")
            continue
        chain = [n for n in node.all_input_nodes if n in derived]
        if node.op in ("placeholder", "get_attr") or not chain:
            continue  # parameters, constants, buffer updates
        derived.add(node)
        if not _holds_tensor(env[node]):
            continue  # x.size(), shape arithmetic, guards
        where = _where(node, gm)
        tensors = [n for n in chain if _holds_tensor(env[n])]
        if len(tensors) > 1 or tensors[0] is not head:
            other = tensors[1] if tensors[0] is head else tensors[0]
            raise PortError(
                f"{where}: {_op_name(node) if node.op != 'call_module' else 'this module'} "
                f"takes {'two tensors of the network' if len(tensors) > 1 else 'a tensor'} "
                f"({', '.join(n.name for n in tensors)}), not only the previous layer's output "
                f"({head.name}): a residual or a branch, from {_where(other, gm)}; a spec is one "
                f"chain of layers")
        if not isinstance(env[node], torch.Tensor) and _key(node) not in (
                "_native_batch_norm_legit_no_training",):
            raise PortError(f"{where}: returns {type(env[node]).__name__}, not one tensor "
                            f"(return_indices?); {SUPPORTED}")
        step = _step(node, module, gm, env, head, where)
        head = node
        if step is not None:
            steps.append(step)
    return steps


def _step(node: fx.Node, module: nn.Module, gm: fx.GraphModule, env: dict, head: fx.Node,
          where: str) -> _Step | None:
    """One node as a spec layer (None for the identity)."""
    x, y = env[head], env[node]
    in_shape = tuple(x.shape) if isinstance(x, torch.Tensor) else ()
    out_shape = tuple(y[0].shape if isinstance(y, (tuple, list)) else y.shape)
    key = "" if node.op == "call_module" else _key(node)
    if key in ("getitem", "slice", "select", "index", "narrow", "setitem"):
        if key == "getitem" and isinstance(x, (tuple, list)) and node.args[1] == 0:
            return None  # the output of a batch norm that returns (out, mean, invstd)
        raise PortError(f"{where}: indexing or slicing a tensor of the network is not "
                        f"supported; {SUPPORTED}")
    if key in _IDENTITIES or (node.op == "call_module"
                              and isinstance(gm.get_submodule(node.target), nn.Identity)):
        return None
    if key in _RESHAPES or (node.op == "call_module"
                            and isinstance(gm.get_submodule(node.target), nn.Flatten)):
        if len(in_shape) == 4 and out_shape == (in_shape[0], math.prod(in_shape[1:])):
            return _Step(Flatten(), where, out_shape[1:])
        if len(in_shape) == 2 and out_shape == in_shape:
            return None
        raise PortError(f"{where}: reshapes {in_shape} to {out_shape}; the only reshape a spec "
                        f"holds is flattening (N, C, H, W) to (N, C·H·W) (the batch axis kept); "
                        f"{SUPPORTED}")
    flag = None
    if node.op == "call_module":
        path = str(node.target)
        layer, state = _from_module(gm.get_submodule(path), path, where)
        owner = path
    else:
        layer, state, owner, flag = _functional(node, env, gm, module, where)
    if layer is None:
        return None
    return _Step(layer, where, out_shape[1:], owner,
                 {k: v for k, v in state.items() if v is not None}, flag)


def _dropout_flags(module: nn.Module, x: torch.Tensor, tracer: str) -> list[bool]:
    """The training flag of each functional dropout, in order, traced in training mode."""
    if tracer == "torch.fx":
        t = fx.Tracer()
        gm = fx.GraphModule(module, t.trace(module))
    else:
        with _quiet():
            gm = torch.export.export(module, (x,)).module()
    flags = []
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method") and _key(node) in (
                "dropout", "dropout_", "feature_dropout", "feature_dropout_", "dropout2d"):
            kwargs = dict(node.kwargs)
            args = list(node.args)
            value = kwargs.get("training", kwargs.get("train", args[2] if len(args) > 2 else True))
            flags.append(bool(value))
    return flags


# --------------------------------------------------------------------------- the port


def _valid_name(path: str, prefix: str, taken: set[str]) -> str:
    name = re.sub(r"\W", "_", path)
    if not name or not (name[0].isalpha() or name[0] == "_"):
        name = f"{prefix}_{name}"
    base, n = name, 2
    while name in taken:
        name, n = f"{base}_{n}", n + 1
    taken.add(name)
    return name


def port(module: nn.Module, input_shape: Sequence[int], name: str | None = None) -> Ported:
    """:func:`to_spec`, with the tracer used and the check's logit gap."""
    if not isinstance(module, nn.Module):
        raise PortError(f"to_spec takes an nn.Module, got {type(module).__name__}")
    name = name or type(module).__name__
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise PortError(f"{name}: input_shape must be (C, H, W) of positive ints, got "
                        f"{input_shape!r}")
    first = next(iter(module.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    g = torch.Generator().manual_seed(0)
    x = torch.randn((TRACE_BATCH, *shape), generator=g).to(device, dtype)
    was_training = module.training
    try:
        module.eval()
        try:
            with torch.no_grad(), _quiet():
                module(x)
        except Exception as e:
            raise PortError(f"{name}: running it on a batch of shape {tuple(x.shape)} failed: "
                            f"{_first_line(e)}") from None
        gm, tracer = _trace(module, x)
        steps = _steps(module, gm, _run(gm, x, name), name)
        dropouts = [s for s in steps if s.eval_flag is not None]
        if dropouts:
            module.train()
            flags = _dropout_flags(module, x, tracer)
            module.eval()
            if len(flags) != len(dropouts):
                raise PortError(f"{name}: its graph in training mode has {len(flags)} "
                                f"functional dropouts, in evaluation {len(dropouts)}; a spec's "
                                "network is the same graph in both")
            for step, flag in zip(dropouts, flags, strict=True):
                if step.eval_flag:
                    raise PortError(f"{step.where}: drops in evaluation too (training=True "
                                    "always); pass training=self.training, or use nn.Dropout")
                if not flag:
                    step.layer = None  # training=False in both modes: the identity
            steps = [s for s in steps if s.layer is not None]
        spec, weights = _assemble(name, shape, steps)
        gap = _check(module, spec, weights, shape, device, dtype)
    finally:
        module.train(was_training)
    return Ported(spec, weights, tracer, gap)


def _assemble(name: str, shape: tuple[int, ...],
              steps: list[_Step]) -> tuple[Spec, dict[str, np.ndarray]]:
    taken: set[str] = set()
    owners: dict[str, str] = {}
    layers: list[Layer] = []
    weights: dict[str, np.ndarray] = {}
    for step in steps:
        layer = step.layer
        if isinstance(layer, (Conv, Linear, BatchNorm)):
            if step.path in owners:
                raise PortError(f"{step.where}: {step.path} is applied a second time (its "
                                f"first use: {owners[step.path]}); a spec's layers each hold "
                                "their own weights")
            owners[step.path] = step.where
            layer_name = _valid_name(step.path, layer.prefix, taken)
            layer = type(layer)(**{**_fields(layer), "name": layer_name})
            for suffix, tensor in step.state.items():
                key = f"{layer_name}.{suffix}"
                weights[key] = tensor.detach().cpu().numpy().astype(canonical_dtype(key))
        layers.append(layer)
    try:
        spec = Spec(name, shape, tuple(layers))
    except SpecError as e:
        raise PortError(f"{name}: the layers it computes do not make a spec: {e}") from None
    for info, step in zip(spec.infos, steps, strict=True):
        if info.out_shape != step.out_shape:
            raise PortError(f"{step.where}: gives {step.out_shape} per image where the "
                            f"spec's {info.kind} gives {info.out_shape} (ceil_mode, or an "
                            "input shape the module was not written for?)")
    return spec, weights


def _fields(layer: Layer) -> dict[str, Any]:
    return {f.name: getattr(layer, f.name) for f in dataclasses.fields(layer)}


def _check(module: nn.Module, spec: Spec, weights: dict[str, np.ndarray], shape: tuple,
           device: torch.device, dtype: torch.dtype) -> float:
    """Max |Δ| between the module's logits and those of the torch port built from the spec
    with the weights, on a random batch in evaluation mode; raises beyond :data:`LOGIT_TOL`."""
    from lenet_torch.model import LeNet, set_weights

    net = LeNet(spec, kernels="stock")
    set_weights(net, weights)
    net.eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn((CHECK_BATCH, *shape), generator=g)
    with torch.no_grad():
        try:
            want = module(x.to(device, dtype))
        except Exception as e:
            raise PortError(f"{spec.name}: the module fails on a batch of {CHECK_BATCH}: "
                            f"{_first_line(e)} (a batch size written into forward?)") from None
        got = net(x)
    if not isinstance(want, torch.Tensor) or tuple(want.shape) != tuple(got.shape):
        got_shape = tuple(want.shape) if isinstance(want, torch.Tensor) else type(want).__name__
        raise PortError(f"{spec.name}: the module returns {got_shape} for a batch of "
                        f"{CHECK_BATCH}; the spec's network {tuple(got.shape)}")
    want = want.detach().cpu().float()
    gap = float((want - got).abs().max())
    bound = LOGIT_TOL * max(1.0, float(want.abs().max()))
    if not gap <= bound:
        raise PortError(f"{spec.name}: the spec's network gives logits {gap:.3g} away from the "
                        f"module's (bound {bound:.3g}): the module computes something the "
                        f"graph did not show; {SUPPORTED}")
    return gap


def to_spec(module: nn.Module, input_shape: Sequence[int],
            name: str | None = None) -> tuple[Spec, dict[str, np.ndarray]]:
    """The spec of ``module`` on images of ``input_shape`` (C, H, W), and its canonical
    weights (parameters and buffers from its ``state_dict``), checked: the torch port built
    from them gives the module's logits on a random batch (max |Δ| ≤ 1e-5 · max(1, |logits|)).

    Layer names are the module's attribute paths made valid (``features.0`` →
    ``features_0``); ``name`` names the spec (default: the module's class). Anything a spec
    cannot express raises :class:`PortError` naming the module or graph node.
    """
    result = port(module, input_shape, name)
    return result.spec, result.weights


# --------------------------------------------------------------------------- command line


def _load_class(target: str) -> type[nn.Module]:
    """The class CLASS of FILE.py:CLASS, imported from the file."""
    file, sep, cls_name = target.rpartition(":")
    if not sep or not file or not cls_name:
        raise PortError(f"{target}: expected FILE.py:CLASS")
    path = Path(file)
    if not path.is_file():
        raise PortError(f"{path}: no such file")
    spec = importlib.util.spec_from_file_location(f"_lenet_port_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise PortError(f"{path}: not a Python file")
    source = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.resolve().parent))  # its own imports of neighbouring files
    try:
        spec.loader.exec_module(source)
    except Exception as e:
        raise PortError(f"{path}: importing it failed: {_first_line(e)}") from None
    finally:
        sys.path.pop(0)
    cls = getattr(source, cls_name, None)
    if cls is None:
        found = sorted(k for k, v in vars(source).items()
                       if isinstance(v, type) and issubclass(v, nn.Module)
                       and v.__module__ == source.__name__)
        raise PortError(f"{path}: has no {cls_name!r}; the nn.Module classes it defines: "
                        f"{', '.join(found) or 'none'}")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise PortError(f"{path}: {cls_name} is not an nn.Module class")
    return cls


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict file (names to tensors), read with ``torch.load(weights_only=True)``: no
    code runs; anything else is one :class:`PortError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise PortError(f"{path}: no such state dict file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise PortError(f"{path}: not a state dict torch.load reads with weights_only=True "
                        f"({_first_line(e)})") from None
    if not (isinstance(state, dict)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())):
        keys = f" with keys {sorted(state)[:5]}" if isinstance(state, dict) else ""
        raise PortError(f"{path}: holds a {type(state).__name__}{keys}, not a state dict "
                        "(names to tensors, as module.state_dict() gives)")
    return state


def _load_state_dict(module: nn.Module, path: Path) -> None:
    """Load a state dict file into ``module``."""
    state = read_state_dict(path)
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise PortError(f"{path}: does not fit {type(module).__name__}: {detail}") from None


def _input_shape(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected C,H,W (three positive ints), got {text!r}")
    return shape  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    """``python -m lenet_torch.port FILE.py:CLASS --input-shape C,H,W -o SPEC.json``."""
    parser = argparse.ArgumentParser(
        prog="python -m lenet_torch.port",
        description="Write the spec (and the canonical weights) of a torch module, checked to "
                    "give the module's logits, and print its summary table.")
    parser.add_argument("target", metavar="FILE.py:CLASS",
                        help="the module's class, built with no arguments")
    parser.add_argument("--input-shape", type=_input_shape, required=True, metavar="C,H,W",
                        help="one input image's shape, e.g. 1,32,32")
    parser.add_argument("--state-dict", type=Path, metavar="FILE",
                        help="weights to load first (read with torch.load(weights_only=True))")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="SPEC.json",
                        help="where to write the spec")
    parser.add_argument("--weights", type=Path, metavar="OUT.safetensors",
                        help="where to write the canonical weights (with their spec)")
    parser.add_argument("--name", help="the spec's name (default: the class's name)")
    args = parser.parse_args(argv)
    from lenet_spec import save_weights

    try:
        cls = _load_class(args.target)
        try:
            module = cls()
        except Exception as e:
            raise PortError(f"{args.target}: {cls.__name__}() failed: {_first_line(e)} (the "
                            "class must build with no arguments)") from None
        if args.state_dict is not None:
            _load_state_dict(module, args.state_dict)
        result = port(module, args.input_shape, args.name)
        atomic_write_bytes(args.output, (result.spec.to_json() + "\n").encode())
        if args.weights is not None:
            save_weights(args.weights, result.weights, result.spec)
    except (PortError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result.spec.summary())
    wrote = f"{args.output}" + (f" and {args.weights}" if args.weights is not None else "")
    print(f"ported {args.target} via {result.tracer}: the spec's torch network gives the "
          f"module's logits (max |Δ| {result.gap:.2g}); wrote {wrote}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
