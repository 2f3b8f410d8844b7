"""The torch.nn port: ``build(spec) -> LeNet``, an ``nn.Module`` in the tutorial's style.

Parameterised layers are submodules named as in the spec (``net.conv1``); activations,
pooling and flatten are applied functionally in ``forward``, as in the PyTorch tutorial.
Input NCHW float32, output logits (N, classes), or log-probabilities or probabilities when the
spec ends in log_softmax or softmax (``net(x, logits=True)`` stops before). Parameters are
already in canonical layout.
``kernels="stock"`` computes every layer with torch's own layers, ``"fused"`` with the tuned
formulations of :mod:`lenet_torch.kernels` (the JAX port's); ``"auto"`` picks the faster.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lenet_kernels.precision import check_precision
from lenet_spec import (
    ELU,
    GELU,
    INITS,
    AdaptiveAvgPool,
    AdaptiveMaxPool,
    AvgPool,
    BatchNorm,
    Conv,
    Dropout,
    Dropout2d,
    Flatten,
    LeakyReLU,
    Linear,
    LogSoftmax,
    MaxPool,
    ReLU,
    Scale,
    Sigmoid,
    SiLU,
    Softmax,
    Spec,
    Tanh,
    canonical_dtype,
    check_weights,
    load_spec,
)
from lenet_torch import kernels as fused

ACTIVATIONS = {
    ReLU: lambda layer, x: F.relu(x),
    Tanh: lambda layer, x: torch.tanh(x),
    Sigmoid: lambda layer, x: torch.sigmoid(x),
    GELU: lambda layer, x: F.gelu(x, approximate=layer.approximate),
    LeakyReLU: lambda layer, x: F.leaky_relu(x, layer.negative_slope),
    ELU: lambda layer, x: F.elu(x, layer.alpha),
    SiLU: lambda layer, x: F.silu(x),
}
"""The spec's activation layers, with torch's defaults (GELU: exact, erf)."""


# The std of a normal truncated to ±2σ is this fraction of σ; lecun_normal divides it out.
_TRUNC_STD = 0.87962566103423978


class LeNet(nn.Module):
    """A network built from a :class:`~lenet_spec.Spec`."""

    def __init__(self, spec: Spec, kernels: str = "auto", precision: str = "float32") -> None:
        super().__init__()
        check_precision(precision)
        self.spec = spec
        self.kernels = fused.resolve(kernels)
        if precision == "bfloat16" and self.kernels == "fused":
            raise ValueError("precision bfloat16: torch's fused kernels compute in float32 only "
                             "(torch.autocast does not reach inside them); use kernels 'stock' "
                             "or 'auto'")
        self.precision = precision
        for info in spec.infos:
            layer, channels = info.layer, info.in_shape[0]
            if isinstance(layer, Conv):
                module = nn.Conv2d(channels, layer.out_channels, layer.kernel_size,
                                   stride=layer.stride, padding=layer.padding,
                                   dilation=layer.dilation, groups=layer.groups, bias=layer.bias)
            elif isinstance(layer, Linear):
                module = nn.Linear(channels, layer.out_features, bias=layer.bias)
            elif isinstance(layer, BatchNorm):
                norm = nn.BatchNorm2d if len(info.in_shape) == 3 else nn.BatchNorm1d
                module = norm(channels, eps=layer.eps, momentum=layer.momentum,
                              affine=layer.affine)
            else:
                continue
            setattr(self, layer.name, module)

    def forward(self, x: torch.Tensor, logits: bool = False) -> torch.Tensor:
        """What the spec's network returns for NCHW ``x``; with ``logits``, what it returns
        before a final log_softmax or softmax."""
        x = check_input(self.spec, x)
        end = self.spec.logits_end if logits else len(self.spec.layers)
        if self.kernels == "fused":
            return fused.forward(self, x, end)
        if self.precision == "bfloat16":  # lenet_kernels.precision's rules
            with torch.autocast(x.device.type, torch.bfloat16):
                for layer in self.spec.layers[:end]:
                    x = self.apply_layer(layer, x)
            return _wide(x)
        for layer in self.spec.layers[:end]:
            x = self.apply_layer(layer, x)
        return x

    def apply_layer(self, layer: object, x: torch.Tensor) -> torch.Tensor:
        """One layer of the spec applied to ``x`` by torch's own layers."""
        if isinstance(layer, (Conv, Linear, BatchNorm)):
            return getattr(self, layer.name)(x)
        if type(layer) in ACTIVATIONS:
            return ACTIVATIONS[type(layer)](layer, x)
        if isinstance(layer, Dropout):
            return F.dropout(x, layer.p, self.training)
        if isinstance(layer, Dropout2d):
            return F.dropout2d(x, layer.p, self.training)
        if isinstance(layer, MaxPool):
            return F.max_pool2d(x, layer.kernel_size, layer.stride, layer.padding,
                                ceil_mode=layer.ceil_mode)
        if isinstance(layer, AvgPool):
            return F.avg_pool2d(x, layer.kernel_size, layer.stride, layer.padding,
                                layer.ceil_mode, layer.count_include_pad)
        if isinstance(layer, Scale):
            return x * _per_channel(layer.scale, x) + _per_channel(layer.shift, x)
        if isinstance(layer, AdaptiveMaxPool):
            return F.adaptive_max_pool2d(x, layer.output_size)
        if isinstance(layer, AdaptiveAvgPool):
            return F.adaptive_avg_pool2d(x, layer.output_size)
        if isinstance(layer, Flatten):
            return torch.flatten(x, 1)
        if isinstance(layer, LogSoftmax):
            return F.log_softmax(_wide(x), dim=1)
        if isinstance(layer, Softmax):
            return F.softmax(_wide(x), dim=1)
        raise TypeError(f"unknown layer {layer!r}")


def _wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or as it is when wider (a float64 reference)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _per_channel(value: float | tuple[float, ...], x: torch.Tensor) -> float | torch.Tensor:
    """A scale layer's number, or its per-channel values shaped to broadcast over NCHW (or
    (N, F)) ``x``."""
    if not isinstance(value, tuple):
        return value
    shape = (1, len(value)) + (1,) * (x.dim() - 2)
    return torch.tensor(value, dtype=x.dtype, device=x.device).reshape(shape)


def check_input(spec: Spec, x: torch.Tensor) -> torch.Tensor:
    """``x`` as an (N, C, H, W) batch (a spec fed NHW also takes (N, H, W) and adds the one
    channel; one fed NHWC also takes (N, H, W, C) and moves the channels first), or
    ``ValueError`` naming the expected shape."""
    want = tuple(spec.input_shape)
    if spec.fed == "NHW" and x.ndim == 3 and tuple(x.shape[1:]) == want[1:]:
        return x.unsqueeze(1)
    if tuple(x.shape[1:]) == want and x.ndim == 4:
        return x
    if spec.fed == "NHWC" and x.ndim == 4 and tuple(x.shape[1:]) == (*want[1:], want[0]):
        return x.permute(0, 3, 1, 2)
    expected = f"(N, {', '.join(map(str, want))}) (NCHW)"
    hint = ""
    if tuple(x.shape) == want:
        hint = "; for a single image add the batch axis: x.unsqueeze(0)"
    raise ValueError(f"{spec.name}: expected input of shape {expected}, got {tuple(x.shape)}{hint}")


def init_weights(net: LeNet, seed: int = 0, init: str = "torch") -> None:
    """(Re)initialise every parameter from ``seed``.

    ``"torch"``: PyTorch's default, weights and biases U(-1/√fan_in, 1/√fan_in).
    ``"lecun_normal"``: weights N(0, 1/fan_in) truncated at ±2σ (variance preserved), zero
    biases, as ``jax.nn.initializers.lecun_normal``. batch_norm: scale 1, shift 0, running
    mean 0, variance 1, either way.
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; expected one of {', '.join(INITS)}")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for info in net.spec.infos:
            if not info.params:
                continue
            if isinstance(info.layer, BatchNorm):
                continue  # scale 1, shift 0: torch's default, the same in both ports
            module = getattr(net, info.label)
            if init == "torch":
                bound = 1 / math.sqrt(info.fan_in)
                nn.init.uniform_(module.weight, -bound, bound, generator=g)
                if module.bias is not None:
                    nn.init.uniform_(module.bias, -bound, bound, generator=g)
            else:
                std = 1 / math.sqrt(info.fan_in) / _TRUNC_STD
                nn.init.trunc_normal_(module.weight, 0.0, std, -2 * std, 2 * std, generator=g)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)


def build(spec: Spec | str, seed: int = 0, init: str = "torch", kernels: str = "auto",
          precision: str = "float32") -> LeNet:
    """The torch model of ``spec`` (a Spec, preset name or JSON path), initialised from ``seed``,
    computed with ``kernels`` ("stock", "fused" or "auto") at ``precision`` ("float32",
    "bfloat16" under ``torch.autocast``, or "tf32": :mod:`lenet_kernels.precision`; the
    parameters are float32 at every precision). On a GPU, float32 and tf32 are torch's global
    switches: :func:`pin_precision` sets them."""
    net = LeNet(load_spec(spec), kernels, precision)
    init_weights(net, seed, init)
    return net


def pin_precision(precision: str) -> None:
    """Set torch's global TF32 switches for ``precision`` (CUDA's matrix products and cuDNN's
    convolutions: TF32 with "tf32", full float32 otherwise; cuDNN's default is TF32); they
    change nothing on a CPU."""
    check_precision(precision)
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def layer_outputs(net: LeNet, x: torch.Tensor) -> list[torch.Tensor]:
    """The output of every layer of the spec, in order, for input ``x``."""
    x = check_input(net.spec, x)
    outputs = []
    for layer in net.spec.layers:
        x = net.apply_layer(layer, x)
        outputs.append(x)
    return outputs


def layer_param_counts(net: LeNet) -> dict[str, int]:
    """Parameters of each layer that has any, counted by torch."""
    counts = {name: sum(p.numel() for p in module.parameters())
              for name, module in net.named_children()}
    return {name: n for name, n in counts.items() if n}


def get_weights(net: LeNet) -> dict[str, np.ndarray]:
    """The canonical weights, parameters and buffers (torch's ``state_dict`` is already
    canonical)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in net.state_dict().items()}


def set_weights(net: LeNet, weights: Mapping[str, np.ndarray]) -> None:
    """Load canonical ``weights``; a mismatch names the first tensor and both shapes."""
    check_weights(net.spec, weights)
    state = {k: torch.tensor(np.asarray(v, dtype=canonical_dtype(k))) for k, v in weights.items()}
    net.load_state_dict(state)
