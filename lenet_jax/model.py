"""The Flax NNX port: ``build(spec) -> LeNet``, an ``nnx.Module`` that owns its parameters.

Parameterised layers are submodules named as in the spec (``net.conv1``, ``net.bn1``);
activations, dropout, pooling and flatten are applied functionally in ``__call__``. Input NHWC
float32, output logits (N, classes), or log-probabilities or probabilities when the spec ends in
log_softmax or softmax (``net(x, logits=True)`` stops before). ``net.train()`` (the default) /
``net.eval()`` switch batch_norm between batch and running statistics and dropout on and off,
as in Flax; dropout draws from ``rngs`` given to the call, else from the model's own stream.

``kernels="stock"`` computes every layer with Flax's own layers (``nnx.Conv``, ``nnx.max_pool``,
…), the line-by-line translation of the torch port; ``"fused"`` computes it with the tuned
formulations of :mod:`lenet_jax.kernels`; ``"auto"`` picks the faster for the backend.

Layouts differ from torch's in exactly one place, the conversion in ``get_weights`` /
``set_weights``: conv kernels are HWIO here and OIHW canonically, linear kernels are
(in, out) here and (out, in) canonically, and because this model flattens NHWC activations in
H, W, C order, the rows of the first linear layer after a flatten are permuted from the
canonical C, H, W order. batch_norm follows torch's conventions, the canonical ones:
:class:`lenet_jax.batchnorm.CanonicalBatchNorm`, with its hand-written gradient, lives in its
own module, as do the tuned formulations (:mod:`lenet_jax.kernels`).
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
from lenet_jax.batchnorm import CanonicalBatchNorm
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
    LayerInfo,
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
    adaptive_windows,
    check_weights,
    chw_to_hwc,
    hwc_to_chw,
    load_spec,
    pooled_size,
)

ACTIVATIONS = {
    ReLU: lambda layer, x: jax.nn.relu(x),
    Tanh: lambda layer, x: jnp.tanh(x),
    Sigmoid: lambda layer, x: jax.nn.sigmoid(x),
    GELU: lambda layer, x: jax.nn.gelu(x, approximate=layer.approximate == "tanh"),
    # at exactly 0 torch's slope is the negative one, jax.nn.leaky_relu's is 1
    LeakyReLU: lambda layer, x: jnp.where(x > 0, x, layer.negative_slope * x),
    ELU: lambda layer, x: jax.nn.elu(x, layer.alpha),
    SiLU: lambda layer, x: jax.nn.silu(x),
}
"""The spec's activation layers, with the spec's (torch's) defaults: GELU is exact (erf)
unless the spec asks for the tanh approximation, which is Flax's and JAX's default."""

MATMUL_PRECISION = {"float32": "highest", "bfloat16": "default", "tf32": "tensorfloat32"}
"""``jax.lax.Precision`` of the products at each precision (lenet_kernels.precision): XLA's
default for float32 operands on GPUs and TPUs is lower than float32; bfloat16 operands take
the hardware's native bfloat16 products with float32 sums."""


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
                 precision: str = "float32", rngs: nnx.Rngs) -> None:
        check_precision(precision)
        self.spec = spec
        self.kernels = fused.resolve(kernels)
        self.precision = precision
        # what conv and linear layers compute in (lenet_kernels.precision's rules)
        self.compute_dtype = jnp.bfloat16 if precision == "bfloat16" else None
        self.matmul_precision = MATMUL_PRECISION[precision]
        self.deterministic = False  # dropout off when true: net.eval() sets it, net.train() not
        # flattened H, W, C is the canonical C, H, W once the next linear's rows are permuted;
        # with no linear after it (logits straight from a flatten) it flattens C, H, W
        self.flatten_hwc = any(info.flattened_from for info in spec.infos)
        for info in spec.infos:
            layer, channels = info.layer, info.in_shape[0]
            if isinstance(layer, BatchNorm):
                setattr(self, layer.name, CanonicalBatchNorm(channels, layer, rngs=rngs))
                continue
            if not isinstance(layer, (Conv, Linear)):
                continue
            kernel_init, bias_init = initializers(info.fan_in, init)
            if isinstance(layer, Conv):
                (ph, pw) = layer.padding
                module = nnx.Conv(channels, layer.out_channels, layer.kernel_size,
                                  strides=layer.stride, padding=((ph, ph), (pw, pw)),
                                  kernel_dilation=layer.dilation, feature_group_count=layer.groups,
                                  use_bias=layer.bias, kernel_init=kernel_init,
                                  bias_init=bias_init, dtype=self.compute_dtype,
                                  precision=self.matmul_precision, rngs=rngs)
            else:
                module = nnx.Linear(channels, layer.out_features, use_bias=layer.bias,
                                    kernel_init=kernel_init, bias_init=bias_init,
                                    dtype=self.compute_dtype, precision=self.matmul_precision,
                                    rngs=rngs)
            setattr(self, layer.name, module)
        if any(isinstance(layer, (Dropout, Dropout2d)) for layer in spec.layers):
            self.rngs = rngs  # the stream dropout draws from when a call brings none

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None,
                 logits: bool = False) -> jax.Array:
        """What the spec's network returns for NHWC ``x``; with ``logits``, what it returns
        before a final log_softmax or softmax."""
        x = check_input(self.spec, x)
        end = self.spec.logits_end if logits else len(self.spec.layers)
        if self.kernels == "fused":
            x = fused.forward(self, x, rngs, end)
        else:
            for layer in self.spec.layers[:end]:
                x = self.apply_layer(layer, x, rngs)
        return _wide(x)

    def apply_layer(self, layer: object, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        """One layer of the spec applied to ``x`` by Flax's own layers."""
        if isinstance(layer, (Conv, Linear, BatchNorm)):
            return getattr(self, layer.name)(x)
        if type(layer) in ACTIVATIONS:
            return ACTIVATIONS[type(layer)](layer, x)
        if isinstance(layer, (Dropout, Dropout2d)):
            return self.dropout(layer, x, rngs)
        if isinstance(layer, (MaxPool, AvgPool)) and (layer.padding != (0, 0) or layer.ceil_mode):
            return padded_pool(x, layer)
        if isinstance(layer, MaxPool):
            return nnx.max_pool(x, layer.kernel_size, layer.stride)
        if isinstance(layer, AvgPool):
            return nnx.avg_pool(x, layer.kernel_size, layer.stride)
        if isinstance(layer, Scale):
            return x * _per_channel(layer.scale, x) + _per_channel(layer.shift, x)
        if isinstance(layer, (AdaptiveMaxPool, AdaptiveAvgPool)):
            return adaptive_pool(x, layer.output_size, isinstance(layer, AdaptiveMaxPool))
        if isinstance(layer, Flatten):
            return x.reshape(x.shape[0], -1) if self.flatten_hwc else \
                x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)
        if isinstance(layer, LogSoftmax):
            return jax.nn.log_softmax(_wide(x), axis=-1)
        if isinstance(layer, Softmax):
            return jax.nn.softmax(_wide(x), axis=-1)
        raise TypeError(f"unknown layer {layer!r}")

    def dropout(self, layer: Dropout | Dropout2d, x: jax.Array,
                rngs: nnx.Rngs | None = None) -> jax.Array:
        """In training, each element (dropout) or each channel of each image (dropout2d) kept
        with probability 1 − p and scaled by 1 / (1 − p), as ``nnx.Dropout`` does; the identity
        in evaluation."""
        if self.deterministic or layer.p == 0:
            return x
        shape = x.shape if isinstance(layer, Dropout) else (x.shape[0], 1, 1, x.shape[3])
        keep = keep_mask((rngs or self.rngs).dropout(), layer.p, shape)
        return jax.lax.select(jnp.broadcast_to(keep, x.shape), x / (1 - layer.p),
                              jnp.zeros_like(x))


def _wide(x: jax.Array) -> jax.Array:
    """``x`` in float32, or as it is when wider (a float64 reference)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _per_channel(value: float | tuple[float, ...], x: jax.Array) -> float | jax.Array:
    """A scale layer's number, or its per-channel values (the last axis of NHWC or (N, F))."""
    return value if not isinstance(value, tuple) else jnp.asarray(value, x.dtype)


def padded_pool(x: jax.Array, layer: MaxPool | AvgPool) -> jax.Array:
    """A max- or avg-pool of NHWC ``x`` with ``padding`` and ``ceil_mode`` as torch computes
    it: −∞ (max) or zeros (avg) on each side, a last partial window where ``ceil_mode`` adds
    one, and an average's divisor counting the window's part inside the padded input
    (``count_include_pad``) or inside the input alone."""
    _, h, w, _ = x.shape
    (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
    ho = pooled_size(h, kh, sh, ph, layer.ceil_mode)
    wo = pooled_size(w, kw, sw, pw, layer.ceil_mode)
    # right padding to the end of the last window (beyond the padding torch adds: never read
    # as a maximum, never counted in a divisor)
    extra_h = max(0, (ho - 1) * sh + kh - (h + 2 * ph))
    extra_w = max(0, (wo - 1) * sw + kw - (w + 2 * pw))
    pads = ((0, 0), (ph, ph + extra_h), (pw, pw + extra_w), (0, 0))
    window, strides = (1, kh, kw, 1), (1, sh, sw, 1)
    if isinstance(layer, MaxPool):
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, strides, pads)
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pads)
    return total / jnp.asarray(_divisors(h, w, layer, ho, wo), x.dtype)[None, :, :, None]


def _divisors(h: int, w: int, layer: AvgPool, ho: int, wo: int) -> np.ndarray:
    """The (Ho, Wo) divisor of each window of a padded avg-pool, as torch counts it."""
    def along(size: int, k: int, s: int, p: int, out: int) -> np.ndarray:
        start = np.arange(out) * s - p
        end = np.minimum(start + k, size + p)
        if not layer.count_include_pad:
            start, end = np.maximum(start, 0), np.minimum(end, size)
        return (end - start).astype(np.float64)

    (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
    return np.outer(along(h, kh, sh, ph, ho), along(w, kw, sw, pw, wo))


def adaptive_pool(x: jax.Array, size: tuple[int, int], take_max: bool) -> jax.Array:
    """Adaptive max- or average-pooling of NHWC ``x`` to ``size`` over torch's windows
    (:func:`~lenet_spec.adaptive_windows`), windows of unequal size included. A max sends its
    gradient to the first maximum of its window in row-major order, as torch's does."""
    n, h, w, c = x.shape
    (rows, row_ok), (cols, col_ok) = _window_index(h, size[0]), _window_index(w, size[1])
    # (n, out_h, k_h, out_w, k_w, c): every window padded to the largest, the padding masked
    win = x[:, rows][:, :, :, cols]
    ok = (row_ok[:, :, None, None] & col_ok[None, None, :, :])[None, ..., None]
    (oh, kh), (ow, kw) = rows.shape, cols.shape
    win = win.transpose(0, 1, 3, 2, 4, 5).reshape(n, oh, ow, kh * kw, c)
    ok = ok.transpose(0, 1, 3, 2, 4, 5).reshape(1, oh, ow, kh * kw, 1)
    if take_max:
        win = jnp.where(ok, win, -jnp.inf)
        first = jnp.argmax(win, axis=3, keepdims=True)
        return jnp.take_along_axis(win, first, axis=3)[:, :, :, 0]
    count = ok.sum(axis=3).astype(x.dtype)
    return jnp.where(ok, win, 0).sum(axis=3) / count


def _window_index(size: int, out: int) -> tuple[np.ndarray, np.ndarray]:
    """Per window: the indices it covers, padded with its last to the longest window's length,
    and which of them are real."""
    windows = adaptive_windows(size, out)
    k = max(end - start for start, end in windows)
    index = np.array([[min(start + j, end - 1) for j in range(k)] for start, end in windows])
    real = np.array([[start + j < end for j in range(k)] for start, end in windows])
    return index, real


def keep_mask(key: jax.Array, p: float, shape: tuple[int, ...]) -> jax.Array:
    """Which elements dropout keeps: each independently with probability 1 − p."""
    return jax.random.bernoulli(key, 1 - p, shape)


def check_input(spec: Spec, x: jax.Array) -> jax.Array:
    """``x`` as an (N, H, W, C) batch (a spec fed NHW also takes (N, H, W) and adds the one
    channel; one fed NHWC is taken as it comes), or ``ValueError`` naming the expected
    shape."""
    c, h, w = spec.input_shape
    want = (h, w, c)
    if spec.fed == "NHW" and x.ndim == 3 and tuple(x.shape[1:]) == (h, w):
        return x[..., None]
    if tuple(x.shape[1:]) == want and x.ndim == 4:
        return x
    expected = f"(N, {h}, {w}, {c}) (NHWC)"
    hint = ""
    if tuple(x.shape) == want:
        hint = "; for a single image add the batch axis: x[None]"
    raise ValueError(f"{spec.name}: expected input of shape {expected}, got {tuple(x.shape)}{hint}")


def build(spec: Spec | str, seed: int = 0, init: str = "torch", kernels: str = "auto",
          precision: str = "float32") -> LeNet:
    """The Flax model of ``spec`` (a Spec, preset name or JSON path), initialised from ``seed``,
    computed with ``kernels`` ("stock", "fused" or "auto") at ``precision`` ("float32",
    "bfloat16" or "tf32": :mod:`lenet_kernels.precision`; the parameters are float32 at
    every precision)."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; expected one of {', '.join(INITS)}")
    check_precision(precision)
    return _constructor(load_spec(spec), init, fused.resolve(kernels),
                        precision)(jax.random.key(seed))


@functools.lru_cache(maxsize=64)
def _constructor(spec: Spec, init: str, kernels: str, precision: str):
    """``LeNet(spec, …)`` as one compiled function of the seed: initialising op by op would
    compile every parameter's random draw separately; one program draws the same values
    (tested bit for bit), and JAX's persistent cache keeps it across runs."""
    return nnx.jit(lambda key: LeNet(spec, init=init, kernels=kernels, precision=precision,
                                     rngs=nnx.Rngs(key)))


def layer_outputs(net: LeNet, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> list[jax.Array]:
    """The output of every layer of the spec, in order, for input ``x`` (in the net's mode)."""
    x = check_input(net.spec, x)
    outputs = []
    for layer in net.spec.layers:
        x = net.apply_layer(layer, x, rngs)
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


BN_NAMES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var",
            "num_batches_tracked": "num_batches_tracked"}
"""Canonical (torch's) names of a batch_norm's tensors -> the JAX module's attributes."""


def _to_canonical(info: LayerInfo, kernel: np.ndarray) -> np.ndarray:
    if isinstance(info.layer, Conv):
        return kernel.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    if info.flattened_from is not None:
        kernel = hwc_to_chw(kernel, info.flattened_from, axis=0)
    return kernel.T  # (in, out) -> (out, in)


def _from_canonical(info: LayerInfo, weight: np.ndarray) -> np.ndarray:
    if isinstance(info.layer, Conv):
        return weight.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    kernel = weight.T
    if info.flattened_from is not None:
        kernel = chw_to_hwc(kernel, info.flattened_from, axis=0)
    return kernel


def get_weights(net: LeNet) -> dict[str, np.ndarray]:
    """The canonical weights, parameters and buffers: torch's names, layouts and dtypes."""
    weights = {}
    for info in net.spec.infos:
        module = getattr(net, info.label, None) if info.params or info.buffers else None
        if isinstance(info.layer, BatchNorm):
            for name in (*info.params, *info.buffers):
                value = np.array(getattr(module, BN_NAMES[name.rsplit(".", 1)[1]])[...])
                weights[name] = value.astype(np.int64) if value.dtype.kind == "i" else value
        elif module is not None:
            kernel = np.array(module.kernel[...])  # a copy: the caller owns what it gets
            weights[f"{info.label}.weight"] = np.ascontiguousarray(_to_canonical(info, kernel))
            if module.bias is not None:
                weights[f"{info.label}.bias"] = np.array(module.bias[...])
    return weights


def set_weights(net: LeNet, weights: Mapping[str, np.ndarray]) -> None:
    """Load canonical ``weights``; a mismatch names the first tensor and both shapes."""
    check_weights(net.spec, weights)
    for info in net.spec.infos:
        module = getattr(net, info.label, None) if info.params or info.buffers else None
        if isinstance(info.layer, BatchNorm):
            for name in (*info.params, *info.buffers):
                target = getattr(module, BN_NAMES[name.rsplit(".", 1)[1]])
                target[...] = jnp.asarray(np.asarray(weights[name]), dtype=target[...].dtype)
        elif module is not None:
            weight = np.asarray(weights[f"{info.label}.weight"], dtype=np.float32)
            module.kernel[...] = jnp.asarray(_from_canonical(info, weight))
            if module.bias is not None:
                module.bias[...] = jnp.asarray(np.asarray(weights[f"{info.label}.bias"],
                                                          np.float32))
