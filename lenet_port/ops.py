"""Stage 3, map to layers: a leaf module or a functional/ATen node as the spec's layer, with the
tensors it holds. Modules are looked up by type in :data:`MODULES`; functional and ATen ops
by name in :data:`OPS` (the same name for ``F.relu``, ``torch.relu``, ``x.relu()`` and
``aten.relu``). Reshapes, identities and indexing are read by :mod:`lenet_port.chain`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from lenet_port.args import bind_args, conv_padding, pair, pool_layer, state_path
from lenet_port.errors import SUPPORTED, PortError
from lenet_port.trace import op_key, op_name
from lenet_spec import (
    ELU,
    GELU,
    AdaptiveAvgPool,
    AdaptiveMaxPool,
    AvgPool,
    BatchNorm,
    Conv,
    Dropout,
    Dropout2d,
    Layer,
    LeakyReLU,
    Linear,
    LogSoftmax,
    MaxPool,
    ReLU,
    Sigmoid,
    SiLU,
    Softmax,
    Tanh,
)

RESHAPES = {"view", "reshape", "flatten", "_unsafe_view", "squeeze", "squeeze_", "unsqueeze",
            "unsqueeze_", "unflatten", "view_as", "reshape_as"}
"""Ops that rearrange a tensor's axes, read by the shapes they give: a flatten, or the
identity (adding or removing size-1 axes)."""
IDENTITIES = {"contiguous", "clone", "alias", "detach", "identity"}
CONVERSIONS = {"to", "float", "double", "half", "bfloat16", "type_as", "cpu", "cuda", "type",
               "_to_copy", "to_copy", "_assert_tensor_metadata"}
"""Ops that convert a tensor's dtype or device: the identity where they change neither."""
METADATA_OF_OTHER = {"type_as", "to", "view_as", "reshape_as"}
"""Ops whose second tensor gives only a dtype, device or shape, not values: no branch."""
ARITHMETIC = {"mul", "mul_", "div", "div_", "truediv", "true_divide", "add", "add_", "sub",
              "sub_", "rsub", "neg", "neg_"}
"""Elementwise arithmetic, read as the spec's scale where the other operand is a constant
(a number, or one value per channel)."""
PERMUTES = {"permute", "movedim", "moveaxis"}
"""Ops that reorder axes: a spec holds one, channels-last images moved channels first at the
input (the spec is then fed NHWC)."""
INDEXING = {"getitem", "slice", "select", "index", "narrow", "setitem"}
DROPOUTS = {"dropout", "dropout_", "feature_dropout", "feature_dropout_", "dropout2d"}


def batch_norm_layer(owner: nn.Module | None, momentum: float, eps: float, affine: bool,
                      where: str) -> BatchNorm:
    if isinstance(owner, nn.modules.batchnorm._BatchNorm):
        if owner.momentum is None:
            raise PortError(f"{where}: momentum=None (a cumulative average of the batch "
                            "statistics); the spec's batch_norm uses an exponential average")
        momentum = owner.momentum
    return BatchNorm(momentum=momentum, eps=eps, affine=affine)


Held = tuple[Layer | None, dict[str, Any]]
"""A module read as a spec layer (None: the identity) and the tensors it holds."""


def _conv(sub: nn.Conv2d, where: str) -> Held:
    if sub.padding_mode != "zeros":
        raise PortError(f"{where}: padding_mode={sub.padding_mode!r}; the spec's conv pads "
                        "with zeros")
    padding = conv_padding(sub.padding, sub.kernel_size, sub.dilation, where)
    layer = Conv(sub.out_channels, sub.kernel_size, sub.stride, padding, sub.dilation,
                 sub.groups, sub.bias is not None)
    return layer, {"weight": sub.weight, "bias": sub.bias}


def _linear(sub: nn.Linear, where: str) -> Held:
    return Linear(sub.out_features, sub.bias is not None), {"weight": sub.weight,
                                                            "bias": sub.bias}


def _batch_norm_module(sub: nn.modules.batchnorm._BatchNorm, where: str) -> Held:
    if not sub.track_running_stats:
        raise PortError(f"{where}: track_running_stats=False normalises by the batch's "
                        "statistics in evaluation too; the spec's batch_norm keeps running "
                        "statistics")
    layer = batch_norm_layer(sub, 0.1, sub.eps, sub.affine, where)
    return layer, {"weight": sub.weight, "bias": sub.bias, "running_mean": sub.running_mean,
                   "running_var": sub.running_var, "num_batches_tracked": sub.num_batches_tracked}


def _max_pool_module(sub: nn.MaxPool2d, where: str) -> Held:
    return pool_layer(MaxPool, sub.kernel_size, sub.stride, sub.padding, where,
                      dilation=sub.dilation, ceil_mode=sub.ceil_mode,
                      extra={"return_indices": (sub.return_indices, False)}), {}


def _avg_pool_module(sub: nn.AvgPool2d, where: str) -> Held:
    return pool_layer(AvgPool, sub.kernel_size, sub.stride, sub.padding, where,
                      ceil_mode=sub.ceil_mode, count_include_pad=bool(sub.count_include_pad),
                      extra={"divisor_override": (sub.divisor_override, None)}), {}


def _softmax_dim(dim: Any, where: str, kind: type[Layer]) -> Layer:
    """A softmax over dim 1 of the (N, classes) logits as the spec's output layer."""
    if dim not in (1, -1, None):  # None: torch's implicit dim, 1 for an (N, K) tensor
        raise PortError(f"{where}: {kind.type} over dim {dim}; the spec's {kind.type} is over "
                        "the classes, dim 1 of the (N, classes) logits")
    return kind()


def _adaptive_module(sub: nn.Module, where: str, out_shape: tuple[int, ...]) -> Held:
    kind = AdaptiveMaxPool if isinstance(sub, nn.AdaptiveMaxPool2d) else AdaptiveAvgPool
    if getattr(sub, "return_indices", False):
        raise PortError(f"{where}: return_indices=True returns the indices too; {SUPPORTED}")
    return kind(out_shape[-2:]), {}  # as seen: output_size with None keeps that size


MODULES: dict[type[nn.Module], Callable[[Any, str], Held]] = {
    nn.ReLU: lambda m, where: (ReLU(), {}),
    nn.Tanh: lambda m, where: (Tanh(), {}),
    nn.Sigmoid: lambda m, where: (Sigmoid(), {}),
    nn.GELU: lambda m, where: (GELU(m.approximate), {}),
    nn.LeakyReLU: lambda m, where: (LeakyReLU(m.negative_slope), {}),
    nn.ELU: lambda m, where: (ELU(m.alpha), {}),
    nn.SiLU: lambda m, where: (SiLU(), {}),
    nn.Identity: lambda m, where: (None, {}),
    nn.Conv2d: _conv,
    nn.Linear: _linear,
    nn.BatchNorm1d: _batch_norm_module,
    nn.BatchNorm2d: _batch_norm_module,
    nn.Dropout: lambda m, where: (Dropout(m.p), {}),
    nn.Dropout2d: lambda m, where: (Dropout2d(m.p), {}),
    nn.MaxPool2d: _max_pool_module,
    nn.AvgPool2d: _avg_pool_module,
    nn.LogSoftmax: lambda m, where: (_softmax_dim(m.dim, where, LogSoftmax), {}),
    nn.Softmax: lambda m, where: (_softmax_dim(m.dim, where, Softmax), {}),
}
"""The leaf modules a spec holds, by exact type (a subclass may compute something else)."""


def from_module(sub: nn.Module, path: str, where: str, out_shape: tuple[int, ...]) -> Held:
    """The spec layer of a leaf module that gave ``out_shape`` and the tensors it holds (None:
    the identity)."""
    if type(sub) in (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d):
        return _adaptive_module(sub, where, out_shape)
    if type(sub) is nn.Dropout2d and len(out_shape) == 2:
        return Dropout(sub.p), {}  # on an (N, F) vector torch drops single elements (and warns)
    read = MODULES.get(type(sub))
    if read is None:
        if isinstance(sub, nn.Identity):
            return None, {}
        raise PortError(f"{where}: {type(sub).__name__} is not supported; {SUPPORTED}")
    return read(sub, where)


def submodule(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


@dataclass
class Found:
    """A node read as a spec layer (None: the identity), its tensors by canonical suffix, the
    state_dict prefix that owns them, and (functional dropout) the training flag it was given."""

    layer: Layer | None
    state: dict[str, Any]
    owner: str | None = None
    flag: bool | None = None


@dataclass
class Call:
    """A functional or ATen node, with what reading it needs."""

    node: fx.Node
    env: dict
    module: nn.Module
    where: str

    @property
    def aten(self) -> bool:
        return isinstance(self.node.target, torch._ops.OpOverload)

    def bind(self, names: Sequence[str], defaults: dict[str, Any]) -> dict[str, Any]:
        return bind_args(self.node, self.env, names, defaults, self.where)

    def raw(self, names: Sequence[str]) -> dict[str, Any]:
        """The arguments as written (graph nodes, not values)."""
        return dict(zip(names, self.node.args[1:], strict=False)) | dict(self.node.kwargs)


def _plain(kind: type[Layer]) -> Callable[[Call], Found]:
    def read(call: Call) -> Found:
        call.bind(["inplace"], {})
        return Found(kind(), {})
    return read


def _gelu(call: Call) -> Found:
    return Found(GELU(call.bind(["approximate"], {"approximate": "none"})["approximate"]), {})


def _leaky_relu(call: Call) -> Found:
    a = call.bind(["negative_slope", "inplace"], {"negative_slope": 0.01})
    return Found(LeakyReLU(float(a["negative_slope"])), {})


def _elu(call: Call) -> Found:
    names = ["alpha", "scale", "input_scale"] if call.aten else ["alpha", "inplace"]
    a = call.bind(names, {"alpha": 1.0, "scale": 1, "input_scale": 1})
    if a["scale"] != 1 or a["input_scale"] != 1:
        raise PortError(f"{call.where}: a scaled ELU (SELU-like) is not supported; {SUPPORTED}")
    return Found(ELU(float(a["alpha"])), {})


def _dropout(call: Call) -> Found:
    flag = "train" if call.aten else "training"  # ATen's flag is named train, F's training
    a = call.bind(["p", flag, "inplace"], {"p": 0.5, flag: True})
    key = op_key(call.node)
    kind = Dropout if key.startswith("dropout") and key != "dropout2d" else Dropout2d
    if kind is Dropout2d and call.env[call.node].dim() == 2:
        kind = Dropout  # on an (N, F) vector torch drops single elements (and warns)
    return Found(kind(float(a["p"])), {}, flag=bool(a[flag]))


def _max_pool(call: Call) -> Found:
    if call.aten:
        a = call.bind(["kernel_size", "stride", "padding", "dilation", "ceil_mode"],
                      {"stride": [], "padding": 0, "dilation": 1, "ceil_mode": False})
    else:
        a = call.bind(["kernel_size", "stride", "padding", "dilation", "ceil_mode",
                       "return_indices"], {"stride": None, "padding": 0, "dilation": 1,
                                           "ceil_mode": False, "return_indices": False})
    extra = {"return_indices": (a.get("return_indices", False), False)}
    return Found(pool_layer(MaxPool, a["kernel_size"], a["stride"], a["padding"], call.where,
                            dilation=a["dilation"], ceil_mode=a["ceil_mode"], extra=extra), {})


def _avg_pool(call: Call) -> Found:
    a = call.bind(["kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                   "divisor_override"], {"stride": None, "padding": 0, "ceil_mode": False,
                                         "count_include_pad": True, "divisor_override": None})
    return Found(pool_layer(AvgPool, a["kernel_size"], a["stride"], a["padding"], call.where,
                            ceil_mode=a["ceil_mode"],
                            count_include_pad=bool(a["count_include_pad"]),
                            extra={"divisor_override": (a["divisor_override"], None)}), {})


def _adaptive_pool(call: Call) -> Found:
    a = call.bind(["output_size", "return_indices"], {"return_indices": False})
    if a["return_indices"]:
        raise PortError(f"{call.where}: return_indices=True returns the indices too; "
                        f"{SUPPORTED}")
    kind = AdaptiveMaxPool if "max" in op_key(call.node) else AdaptiveAvgPool
    out = call.env[call.node]
    out = out[0] if isinstance(out, (tuple, list)) else out
    return Found(kind(tuple(out.shape[-2:])), {})  # as seen: a None in output_size keeps a size


def _softmax(call: Call) -> Found:
    key = op_key(call.node)
    kind = LogSoftmax if "log" in key else Softmax
    names = ["dim", "half_to_float"] if key.startswith("_") else ["dim", "_stacklevel", "dtype"]
    a = call.bind(names, {"dim": None, "_stacklevel": 3, "dtype": None, "half_to_float": False})
    if a.get("dtype") is not None:
        raise PortError(f"{call.where}: {kind.type} in dtype {a['dtype']}; the spec's network "
                        "computes in float32")
    return Found(_softmax_dim(a["dim"], call.where, kind), {})


def _conv_or_linear(call: Call) -> Found:
    names = ["weight", "bias", "stride", "padding", "dilation", "groups"]
    a = call.bind(names, {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1})
    raw = call.raw(names)
    w_ref = state_path(call.node, raw.get("weight"), "weight", call.where)
    state_path(call.node, raw.get("bias"), "bias", call.where)
    weight, bias = a["weight"], a["bias"]
    if op_key(call.node) == "linear":
        layer: Layer = Linear(int(weight.shape[0]), bias is not None)
    else:
        dilation = pair(a["dilation"])
        kernel = (int(weight.shape[2]), int(weight.shape[3]))
        padding = conv_padding(a["padding"], kernel, dilation, call.where)
        layer = Conv(int(weight.shape[0]), kernel, pair(a["stride"]), padding, dilation,
                     int(a["groups"]), bias is not None)
    return Found(layer, {"weight": weight, "bias": bias}, w_ref.removesuffix(".weight"))


def _batch_norm(call: Call) -> Found:
    where = call.where
    if op_key(call.node) == "batch_norm" and not call.aten:  # F.batch_norm
        names = ["running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"]
    elif op_key(call.node) == "batch_norm":
        names = ["weight", "bias", "running_mean", "running_var", "training", "momentum", "eps",
                 "cudnn_enabled"]
    else:
        names = ["weight", "bias", "running_mean", "running_var", "momentum", "eps"]
    a = call.bind(names, {"weight": None, "bias": None, "training": False, "momentum": 0.1,
                          "eps": 1e-5})
    raw = call.raw(names)
    if a["training"] or a["running_mean"] is None:
        raise PortError(f"{where}: batch norm by the batch's statistics in evaluation "
                        "(track_running_stats=False or training=True); the spec's "
                        "batch_norm keeps running statistics")
    mean_ref = state_path(call.node, raw.get("running_mean"), "running mean", where)
    state_path(call.node, raw.get("running_var"), "running variance", where)
    state_path(call.node, raw.get("weight"), "scale", where)
    prefix = mean_ref.removesuffix(".running_mean")
    owner = submodule(call.module, prefix)
    if (a["weight"] is None) != (a["bias"] is None):
        raise PortError(f"{where}: batch norm with a scale but no shift (or the reverse); "
                        "the spec's batch_norm has both or neither")
    layer = batch_norm_layer(owner, float(a["momentum"]), float(a["eps"]),
                             a["weight"] is not None, where)
    count = getattr(owner, "num_batches_tracked", None)
    state = {"weight": a["weight"], "bias": a["bias"], "running_mean": a["running_mean"],
             "running_var": a["running_var"],
             "num_batches_tracked": count if count is not None else torch.tensor(0)}
    return Found(layer, state, prefix)


OPS: dict[str, Callable[[Call], Found]] = {
    **{name + tail: _plain(kind) for name, kind in (("relu", ReLU), ("tanh", Tanh),
                                                     ("sigmoid", Sigmoid), ("silu", SiLU))
       for tail in ("", "_")},
    "gelu": _gelu,
    "leaky_relu": _leaky_relu, "leaky_relu_": _leaky_relu,
    "elu": _elu, "elu_": _elu,
    **dict.fromkeys(DROPOUTS, _dropout),
    "max_pool2d": _max_pool,
    "avg_pool2d": _avg_pool,
    **dict.fromkeys(("adaptive_avg_pool2d", "_adaptive_avg_pool2d", "adaptive_max_pool2d"),
                    _adaptive_pool),
    **dict.fromkeys(("softmax", "_softmax", "log_softmax", "_log_softmax"), _softmax),
    "conv2d": _conv_or_linear, "linear": _conv_or_linear,
    "batch_norm": _batch_norm, "_native_batch_norm_legit_no_training": _batch_norm,
}
"""The functional and ATen ops a spec holds, by :func:`~lenet_port.trace.op_key`."""


def from_call(call: Call) -> Found:
    """The spec layer of a functional or ATen node."""
    read = OPS.get(op_key(call.node))
    if read is None:
        raise PortError(f"{call.where}: {op_name(call.node)} is not supported; {SUPPORTED}")
    return read(call)
