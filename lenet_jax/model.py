"""The Flax NNX port: ``build(spec) -> LeNet``, an ``nnx.Module`` that owns its parameters.

Parameterised layers are submodules named as in the spec (``net.conv1``); activations,
pooling and flatten are applied functionally in ``__call__``. Input NHWC float32, output
logits (N, classes).

Layouts differ from torch's in exactly one place, the conversion in ``get_weights`` /
``set_weights``: conv kernels are HWIO here and OIHW canonically, linear kernels are
(in, out) here and (out, in) canonically, and because this model flattens NHWC activations in
H, W, C order, the rows of the first linear layer after a flatten are permuted from the
canonical C, H, W order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lenet_spec import Spec, check_weights, load_spec
from lenet_spec.spec import AvgPool, Conv, Flatten, LayerInfo, Linear, MaxPool, ReLU, Sigmoid, Tanh

INITS = ("torch", "lecun_normal")
ACTIVATIONS = {ReLU: jax.nn.relu, Tanh: jnp.tanh, Sigmoid: jax.nn.sigmoid}
"""The spec's activation layers; all monotone, so they commute with a max-pool."""


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

    def __init__(self, spec: Spec, *, init: str = "torch", rngs: nnx.Rngs) -> None:
        self.spec = spec
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
        layers, i = self.spec.layers, 0
        while i < len(layers):
            span = self.conv_pool_span(i)
            if span:  # conv [+ activation] + max-pool, computed together
                module, act = getattr(self, layers[i].name), ACTIVATIONS.get(type(layers[i + 1]))
                x = conv_max_pool(x, module.kernel[...], module.bias[...], layers[i].padding,
                                  layers[i + span - 1].kernel_size, act)
            else:
                x = self.apply_layer(layers[i], x)
            i += span or 1
        return x

    def conv_pool_span(self, i: int) -> int:
        """How many layers from ``i`` :func:`conv_max_pool` computes at once: 3 for conv,
        monotone activation, max-pool; 2 for conv, max-pool; 0 if the layers differ, the conv
        is strided, or the pool's windows overlap."""
        layers = self.spec.layers
        conv = layers[i]
        if not isinstance(conv, Conv) or conv.stride != (1, 1):
            return 0
        span = 3 if i + 1 < len(layers) and type(layers[i + 1]) in ACTIVATIONS else 2
        pool = layers[i + span - 1] if i + span - 1 < len(layers) else None
        if not isinstance(pool, MaxPool) or pool.kernel_size != pool.stride:
            return 0
        return span

    def apply_layer(self, layer: object, x: jax.Array) -> jax.Array:
        """One layer of the spec applied to ``x``."""
        if isinstance(layer, (Conv, Linear)):
            module = getattr(self, layer.name)
            if isinstance(layer, Conv) and module.in_features == 1:  # XLA's conv is slow here
                return conv_one_channel(x, module.kernel[...], module.bias[...], layer.stride,
                                        layer.padding)
            return module(x)
        if type(layer) in ACTIVATIONS:
            return ACTIVATIONS[type(layer)](x)
        if isinstance(layer, MaxPool):
            return _pool(x, layer.kernel_size, layer.stride, jnp.max, nnx.max_pool)
        if isinstance(layer, AvgPool):
            return _pool(x, layer.kernel_size, layer.stride, jnp.mean, nnx.avg_pool)
        if isinstance(layer, Flatten):
            return x.reshape(x.shape[0], -1)
        raise TypeError(f"unknown layer {layer!r}")


def _pool(x: jax.Array, kernel: tuple[int, int], stride: tuple[int, int], reduce, windowed):
    """Pooling of NHWC ``x``; non-overlapping windows as a reshape and a reduction.

    XLA:CPU differentiates ``reduce_window`` slowly; for stride == kernel the reshape form
    computes the same values (floor mode: a ragged edge is dropped, as torch does).
    """
    if stride != kernel:
        return windowed(x, kernel, stride)
    n, h, w, c = x.shape
    (kh, kw), ho, wo = kernel, h // kernel[0], w // kernel[1]
    x = x[:, : ho * kh, : wo * kw, :].reshape(n, ho, kh, wo, kw, c)
    return reduce(x, axis=(2, 4))


Pair = tuple[int, int]


def conv_max_pool(x: jax.Array, kernel: jax.Array, bias: jax.Array, padding: Pair, pool: Pair,
                  activation=None) -> jax.Array:
    """max-pool(activation(conv(x) + bias)) for an NHWC ``x``, an HWIO ``kernel`` of stride 1
    and non-overlapping ``pool`` windows, as one matrix product.

    The convolution is evaluated at the pool's ph·pw phases at once: the input is rearranged
    space-to-depth by the pool's shape, so that every phase of the output is a convolution of
    that input with a kernel scattered from ``kernel`` (zeros elsewhere, which add nothing to
    a float sum); the phases' maximum is the pool, and the bias and a monotone activation
    commute with it. XLA:CPU runs this matrix product ≈ 2× faster in the whole train step than
    its convolution plus pool (README, benchmark).
    """
    (ph, pw), (kh, kw, cin, cout) = pool, kernel.shape
    (pad_h, pad_w) = padding
    if pad_h or pad_w:
        x = jnp.pad(x, ((0, 0), (pad_h, pad_h), (pad_w, pad_w), (0, 0)))
    n, h, w, _ = x.shape
    ho, wo = (h - kh + 1) // ph, (w - kw + 1) // pw  # pooled output; a ragged edge is dropped
    kp, kq = (ph + kh - 2) // ph + 1, (pw + kw - 2) // pw + 1  # taps of the phase kernel
    hs, ws = ho + kp - 1, wo + kq - 1
    # rows/columns past the input are read by zero taps only
    x = jnp.pad(x, ((0, 0), (0, max(hs * ph - h, 0)), (0, max(ws * pw - w, 0)), (0, 0)))
    x = x[:, : hs * ph, : ws * pw]
    x = x.reshape(n, hs, ph, ws, pw, cin).transpose(0, 1, 3, 2, 4, 5).reshape(n, hs, ws, -1)
    taps = jnp.einsum("PRqrabyx,yxio->PRqriabo", _phase_scatter(kernel.shape[:2], pool),
                      kernel).reshape(kp * kq * ph * pw * cin, ph * pw * cout)
    patches = jnp.concatenate([x[:, p : p + ho, r : r + wo] for p in range(kp)
                               for r in range(kq)], axis=-1)
    y = (patches.reshape(-1, taps.shape[0]) @ taps).reshape(n, ho, wo, ph * pw, cout)
    y = _phase_max(y) + bias
    return activation(y) if activation else y


@jax.custom_vjp
def _phase_max(y: jax.Array) -> jax.Array:
    """The maximum over axis 3 (the pool's phases, in the window's row-major order).

    Its gradient goes to the first maximal phase, as torch's max-pool sends it to the first
    maximum of a window (JAX's own rule splits it among ties, which the zero background of
    MNIST makes common); one pass of selects, ≈ 10% faster in the train step than that rule.
    """
    return jnp.max(y, axis=3)


def _phase_max_fwd(y):
    top = jnp.max(y, axis=3)
    return top, (y, top)


def _phase_max_bwd(residuals, g):
    y, top = residuals
    taken = jnp.zeros(top.shape, bool)
    parts = []
    for k in range(y.shape[3]):
        hit = (y[:, :, :, k] == top) & ~taken
        parts.append(jnp.where(hit, g, 0.0))
        taken = taken | hit
    return (jnp.stack(parts, axis=3),)


_phase_max.defvjp(_phase_max_fwd, _phase_max_bwd)


def _phase_scatter(kernel: Pair, pool: Pair) -> np.ndarray:
    """0/1 array S[P, R, q, r, a, b, dy, dx]: tap (dy, dx) of the kernel, for output phase
    (a, b), reads space-to-depth position (P, R), sub-pixel (q, r)."""
    (kh, kw), (ph, pw) = kernel, pool
    kp, kq = (ph + kh - 2) // ph + 1, (pw + kw - 2) // pw + 1
    s = np.zeros((kp, kq, ph, pw, ph, pw, kh, kw), np.float32)
    for a in range(ph):
        for b in range(pw):
            for dy in range(kh):
                for dx in range(kw):
                    (p, q), (r, t) = divmod(a + dy, ph), divmod(b + dx, pw)
                    s[p, r, q, t, a, b, dy, dx] = 1
    return s


def _windows(x: jax.Array, kernel: Pair, stride: Pair, out: Pair) -> list[jax.Array]:
    """The kernel's kh·kw shifted, strided views of NHWC ``x``, each (N, Ho, Wo, C)."""
    (kh, kw), (sh, sw), (ho, wo) = kernel, stride, out
    return [x[:, i : i + (ho - 1) * sh + 1 : sh, j : j + (wo - 1) * sw + 1 : sw, :]
            for i in range(kh) for j in range(kw)]


def conv_one_channel(x: jax.Array, kernel: jax.Array, bias: jax.Array, stride: Pair,
                     padding: Pair) -> jax.Array:
    """The convolution of a one-channel NHWC ``x`` with an HWIO ``kernel``: what nnx.Conv
    computes, to float32 rounding, about 1.3× faster in the whole train step on XLA:CPU
    (README, benchmark)."""
    (ph, pw), (kh, kw) = padding, kernel.shape[:2]
    if ph or pw:
        x = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    out = ((x.shape[1] - kh) // stride[0] + 1, (x.shape[2] - kw) // stride[1] + 1)
    return _shift_and_add(x, kernel, bias, stride, out)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _shift_and_add(x, kernel, bias, stride: Pair, out: Pair) -> jax.Array:
    """Σ over kernel taps of shifted image × tap, which XLA fuses into one pass.

    Autodiff of this sum would reduce over the batch once per tap for the kernel's gradient;
    the backward pass below makes it one matrix product of the stacked windows instead.
    """
    kh, kw, _, cout = kernel.shape
    taps = kernel.reshape(kh * kw, cout)
    y = bias
    for t, window in enumerate(_windows(x, (kh, kw), stride, out)):
        y = y + window * taps[t]
    return jnp.broadcast_to(y, (x.shape[0], *out, cout))


def _shift_and_add_fwd(x, kernel, bias, stride, out):
    return _shift_and_add(x, kernel, bias, stride, out), (x, kernel)


def _shift_and_add_bwd(stride, out, residuals, dy):
    x, kernel = residuals
    kh, kw, _, cout = kernel.shape
    windows = jnp.stack([w[..., 0] for w in _windows(x, (kh, kw), stride, out)])
    dkernel = (windows.reshape(kh * kw, -1) @ dy.reshape(-1, cout)).reshape(kernel.shape)
    # the input's gradient; XLA drops it when only the parameters are differentiated
    _, vjp = jax.vjp(lambda x: jax.lax.conv_general_dilated(
        x, kernel, stride, "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")), x)
    return vjp(dy)[0], dkernel, dy.sum((0, 1, 2))


_shift_and_add.defvjp(_shift_and_add_fwd, _shift_and_add_bwd)


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


def build(spec: Spec | str, seed: int = 0, init: str = "torch") -> LeNet:
    """The Flax model of ``spec`` (a Spec, preset name or JSON path), initialised from ``seed``."""
    return LeNet(load_spec(spec), init=init, rngs=nnx.Rngs(seed))


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
