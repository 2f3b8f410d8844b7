"""The Flax NNX port: ``build(spec) -> LeNet``, an ``nnx.Module`` that owns its parameters.

Parameterised layers are submodules named as in the spec (``net.conv1``); activations,
pooling and flatten are applied functionally in ``__call__``. Input NHWC float32, output
logits (N, classes).

``kernels="stock"`` computes every layer with Flax's own layers (``nnx.Conv``, ``nnx.max_pool``,
…), the line-by-line translation of the torch port; ``"fused"`` computes it with the tuned
formulations of :mod:`lenet_jax.kernels`; ``"auto"`` picks the faster for the backend.

Layouts differ from torch's in exactly one place, the conversion in ``get_weights`` /
``set_weights``: conv kernels are HWIO here and OIHW canonically, linear kernels are
(in, out) here and (out, in) canonically, and because this model flattens NHWC activations in
H, W, C order, the rows of the first linear layer after a flatten are permuted from the
canonical C, H, W order.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lenet_jax import kernels as fused
from lenet_spec import Spec, check_weights, load_spec
from lenet_spec.spec import AvgPool, Conv, Flatten, LayerInfo, Linear, MaxPool, ReLU, Sigmoid, Tanh

INITS = ("torch", "lecun_normal")
ACTIVATIONS = {ReLU: jax.nn.relu, Tanh: jnp.tanh, Sigmoid: jax.nn.sigmoid}
"""The spec's activation layers."""


def _uniform(bound: float) -> nnx.Initializer:
    def init(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def initializers(fan_in: int, init: str = "torch") -> tuple[nnx.Initializer, nnx.Initializer]:
    """Kernel and bias initialisers of a layer with ``fan_in`` inputs.

    ``"torch"``: PyTorch's default, weights and biases U(-1/√fan_in, 1/√fan_in).
    ``"lecun_normal"``: weights N(0, 1/fan_in) truncated at ±2σ (variance preserved), zero
    biases.
    """
    if init == "torch":
        bound = 1 / math.sqrt(fan_in)
        return _uniform(bound), _uniform(bound)
    if init == "lecun_normal":
        return nnx.initializers.lecun_normal(), nnx.initializers.zeros
    raise ValueError(f"unknown init {init!r}; expected one of {', '.join(INITS)}")


class LeNet(nnx.Module):
    """A network built from a :class:`~lenet_spec.Spec`."""

    def __init__(self, spec: Spec, *, init: str = "torch", kernels: str = "auto",
                 rngs: nnx.Rngs) -> None:
        self.spec = spec
        self.kernels = fused.resolve(kernels)
        for info in spec.infos:
            layer = info.layer
            if not info.params:
                continue
            kernel_init, bias_init = initializers(info.fan_in, init)
            if isinstance(layer, Conv):
                (ph, pw) = layer.padding
                module = nnx.Conv(info.in_shape[0], layer.out_channels, layer.kernel_size,
                                  strides=layer.stride, padding=((ph, ph), (pw, pw)),
                                  kernel_init=kernel_init, bias_init=bias_init, rngs=rngs)
            else:
                module = nnx.Linear(info.in_shape[0], layer.out_features,
                                    kernel_init=kernel_init, bias_init=bias_init, rngs=rngs)
            setattr(self, layer.name, module)

    def __call__(self, x: jax.Array) -> jax.Array:
        check_input(self.spec, x)
        if self.kernels == "fused":
            return fused.forward(self, x)
        for layer in self.spec.layers:
            x = self.apply_layer(layer, x)
        return x

    def apply_layer(self, layer: object, x: jax.Array) -> jax.Array:
        """One layer of the spec applied to ``x`` by Flax's own layers."""
        if isinstance(layer, (Conv, Linear)):
            return getattr(self, layer.name)(x)
        if type(layer) in ACTIVATIONS:
            return ACTIVATIONS[type(layer)](x)
        if isinstance(layer, MaxPool):
            return nnx.max_pool(x, layer.kernel_size, layer.stride)
        if isinstance(layer, AvgPool):
            return nnx.avg_pool(x, layer.kernel_size, layer.stride)
        if isinstance(layer, Flatten):
            return x.reshape(x.shape[0], -1)
        raise TypeError(f"unknown layer {layer!r}")


def check_input(spec: Spec, x: jax.Array) -> None:
    """Raise ``ValueError`` naming the expected (N, H, W, C) shape unless ``x`` has it."""
    c, h, w = spec.input_shape
    want = (h, w, c)
    if tuple(x.shape[1:]) == want and x.ndim == 4:
        return
    expected = f"(N, {h}, {w}, {c}) (NHWC)"
    hint = ""
    if tuple(x.shape) == want:
        hint = "; for a single image add the batch axis: x[None]"
    raise ValueError(f"{spec.name}: expected input of shape {expected}, got {tuple(x.shape)}{hint}")


def build(spec: Spec | str, seed: int = 0, init: str = "torch", kernels: str = "auto") -> LeNet:
    """The Flax model of ``spec`` (a Spec, preset name or JSON path), initialised from ``seed``,
    computed with ``kernels`` ("stock", "fused" or "auto")."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; expected one of {', '.join(INITS)}")
    return _constructor(load_spec(spec), init, fused.resolve(kernels))(jax.random.key(seed))


@functools.lru_cache(maxsize=64)
def _constructor(spec: Spec, init: str, kernels: str):
    """``LeNet(spec, …)`` as one compiled function of the seed. Initialising op by op compiles
    every parameter's random draw separately (2.3 s for lenet5 on this CPU); one program draws
    the same values (tested bit for bit), and JAX's persistent cache keeps it across runs."""
    return nnx.jit(lambda key: LeNet(spec, init=init, kernels=kernels, rngs=nnx.Rngs(key)))


def layer_outputs(net: LeNet, x: jax.Array) -> list[jax.Array]:
    """The output of every layer of the spec, in order, for input ``x``."""
    check_input(net.spec, x)
    outputs = []
    for layer in net.spec.layers:
        x = net.apply_layer(layer, x)
        outputs.append(x)
    return outputs


def layer_param_counts(net: LeNet) -> dict[str, int]:
    """Parameters of each parameterised layer, counted by Flax."""
    return {
        info.label: sum(
            p.size for p in jax.tree.leaves(nnx.state(getattr(net, info.label), nnx.Param))
        )
        for info in net.spec.infos
        if info.params
    }


def _to_canonical(info: LayerInfo, kernel: np.ndarray) -> np.ndarray:
    if isinstance(info.layer, Conv):
        return kernel.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    if info.flattened_from is not None:
        c, h, w = info.flattened_from
        kernel = kernel.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(c * h * w, -1)
    return kernel.T  # (in, out) -> (out, in)


def _from_canonical(info: LayerInfo, weight: np.ndarray) -> np.ndarray:
    if isinstance(info.layer, Conv):
        return weight.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    kernel = weight.T
    if info.flattened_from is not None:
        c, h, w = info.flattened_from
        kernel = kernel.reshape(c, h, w, -1).transpose(1, 2, 0, 3).reshape(h * w * c, -1)
    return kernel


def get_weights(net: LeNet) -> dict[str, np.ndarray]:
    """The canonical weights: torch's names and layouts."""
    weights = {}
    for info in net.spec.infos:
        if info.params:
            module = getattr(net, info.label)
            kernel = np.asarray(module.kernel[...])
            weights[f"{info.label}.weight"] = np.ascontiguousarray(_to_canonical(info, kernel))
            weights[f"{info.label}.bias"] = np.array(module.bias[...])
    return weights


def set_weights(net: LeNet, weights: Mapping[str, np.ndarray]) -> None:
    """Load canonical ``weights``; a mismatch names the first tensor and both shapes."""
    check_weights(net.spec, weights)
    for info in net.spec.infos:
        if info.params:
            module = getattr(net, info.label)
            weight = np.asarray(weights[f"{info.label}.weight"], dtype=np.float32)
            module.kernel[...] = jnp.asarray(_from_canonical(info, weight))
            module.bias[...] = jnp.asarray(np.asarray(weights[f"{info.label}.bias"], np.float32))
