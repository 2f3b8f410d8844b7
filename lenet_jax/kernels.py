"""The JAX port's tuned formulations (``build(..., kernels="fused")``), each computing what Flax's
own layers compute, to float32 rounding, faster on XLA:CPU (README, benchmark):

- a stride-1 conv, any batch_norm and activations, and a non-overlapping max- or avg-pool as
  ONE matrix product over the pool's phases, the layers between applied to every phase and the
  pool a reduction over them (:func:`conv_pool`; with a monotone activation or none before a
  max-pool, the maximum is taken first: :func:`conv_max_pool`);
- a one-channel conv as a shift-and-add with a GEMM backward pass (:func:`conv_one_channel`);
- a non-overlapping pool as a reshape and a reduction (:func:`pool`).

Every max here sends its gradient to the first maximum of a window, as torch's max-pool and
XLA's ``reduce_window`` do (``jnp.max``'s own rule splits it among ties, which the zero
background of MNIST makes common). The tests hold each function to XLA's conv, the activation
and ``reduce_window`` pooling: values and the gradients of input, kernel and bias.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from lenet_kernels import check_kernels, fusion_plan, phase_scatter, window_slices
from lenet_spec import Pair


def resolve(kernels: str) -> str:
    """``"stock"`` or ``"fused"``: ``"auto"`` is the faster on this backend (measured: fused on
    XLA:CPU; stock elsewhere until a GPU or TPU measurement says otherwise)."""
    check_kernels(kernels)
    if kernels == "auto":
        return "fused" if jax.default_backend() == "cpu" else "stock"
    return kernels


def forward(net: Any, x: jax.Array, rngs: Any = None, end: int | None = None) -> jax.Array:
    """``net``'s output for NHWC ``x`` (its first ``end`` layers) by the shared fusion plan
    (:func:`lenet_kernels.fusion_plan`): fused where a formulation applies, else by ``net``'s
    own layers (dropout drawing from ``rngs``)."""
    infos = net.spec.infos[:end]
    for step in fusion_plan(infos):
        layer = infos[step.start].layer
        if step.kind == "conv_pool":  # conv, the layers between, pool: computed together
            x, kernel, bias = _operands(net, getattr(net, layer.name), x)
            between = [lambda y, b=infos[k].layer: net.apply_layer(b, y) for k in step.between]
            x = conv_pool(x, kernel, bias, layer.padding,
                          infos[step.stop - 1].layer.kernel_size, between, step.take_max,
                          step.commutes, net.matmul_precision)
        elif step.kind == "conv_one_channel":
            x, kernel, bias = _operands(net, getattr(net, layer.name), x)
            x = conv_one_channel(x, kernel, bias, layer.stride, layer.padding)
        elif step.kind == "pool":
            x = pool(x, layer.kernel_size, "max" if step.take_max else "mean")
        else:
            x = net.apply_layer(layer, x, rngs)
    return x


def _operands(net: Any, module: Any, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A conv's input, kernel and bias in the dtype the net computes products in (as
    ``nnx.Conv`` casts them)."""
    dtype = net.compute_dtype or x.dtype
    return x.astype(dtype), module.kernel[...].astype(dtype), _bias(module).astype(dtype)


def _bias(module: Any) -> jax.Array:
    """A conv's bias, or zeros (which add nothing) when it has none."""
    if module.bias is None:
        return jnp.zeros(module.out_features, module.kernel[...].dtype)
    return module.bias[...]


def pool(x: jax.Array, window: tuple[int, int], reduce: str) -> jax.Array:
    """Non-overlapping pooling of NHWC ``x`` ("max" or "mean") as a reshape and a reduction
    (floor mode: a ragged edge is dropped, as torch does). XLA:CPU differentiates
    ``reduce_window`` slowly."""
    n, h, w, c = x.shape
    (kh, kw), ho, wo = window, h // window[0], w // window[1]
    x = x[:, : ho * kh, : wo * kw, :].reshape(n, ho, kh, wo, kw, c)
    if reduce == "mean":
        return x.mean(axis=(2, 4))
    return _phase_max(x.transpose(0, 1, 3, 2, 4, 5).reshape(n, ho, wo, kh * kw, c))


def conv_pool(x: jax.Array, kernel: jax.Array, bias: jax.Array, padding: Pair, pool: Pair,
              between: list, take_max: bool, commutes: bool = False,
              precision: str = "highest") -> jax.Array:
    """pool(between(conv(x) + bias)) for an NHWC ``x``, an HWIO ``kernel`` of stride 1 and
    non-overlapping ``pool`` windows (max if ``take_max``, else mean), ``between`` a list of
    functions applied in turn to the conv's output (batch_norm, activations): the conv as one
    matrix product over the pool's phases (:func:`conv_max_pool`), ``between`` applied to
    every phase, the pool a reduction over the phases. With ``commutes`` (``between`` is a
    monotone activation or nothing) a max-pool is taken before the bias and ``between``. The
    product at ``precision`` (``jax.lax.Precision``'s name)."""
    if take_max and commutes:
        y = _phase_max(_phase_product(x, kernel, padding, pool, precision)) + bias
        for f in between:
            y = f(y)
        return y
    y = _phase_product(x, kernel, padding, pool, precision) + bias
    for f in between:
        y = f(y)
    return _phase_max(y) if take_max else y.mean(axis=3)


def conv_max_pool(x: jax.Array, kernel: jax.Array, bias: jax.Array, padding: Pair, pool: Pair,
                  activation=None) -> jax.Array:
    """max-pool(activation(conv(x) + bias)) for an NHWC ``x``, an HWIO ``kernel`` of stride 1,
    non-overlapping ``pool`` windows and a monotone ``activation`` (or none), as one matrix
    product.

    The convolution is evaluated at the pool's ph·pw phases at once: the input is rearranged
    space-to-depth by the pool's shape, so that every phase of the output is a convolution of
    that input with a kernel scattered from ``kernel`` (zeros elsewhere, which add nothing to
    a float sum); the phases' maximum is the pool, and the bias and a monotone activation
    commute with it.
    """
    return conv_pool(x, kernel, bias, padding, pool, [activation] if activation else [], True,
                     True)


def _phase_product(x: jax.Array, kernel: jax.Array, padding: Pair, pool: Pair,
                   precision: str = "highest") -> jax.Array:
    """conv(x) (no bias) at the pool's phases: (N, Ho, Wo, ph·pw, Cout), Ho, Wo pooled, the
    phases in the window's row-major order; a ragged edge the pool drops is not computed."""
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
    taps = jnp.einsum("PRqrabyx,yxio->PRqriabo", phase_scatter(kernel.shape[:2], pool),
                      kernel).reshape(kp * kq * ph * pw * cin, ph * pw * cout)
    patches = jnp.concatenate([x[:, p : p + ho, r : r + wo] for p in range(kp)
                               for r in range(kq)], axis=-1)
    return jnp.matmul(patches.reshape(-1, taps.shape[0]), taps,
                      precision=precision).reshape(n, ho, wo, ph * pw, cout)


def _phase_max(y: jax.Array) -> jax.Array:
    """The maximum over axis 3 (the pool's phases, in the window's row-major order).

    Its gradient goes to the first maximal phase, as torch's max-pool sends it to the first
    maximum of a window (JAX's own rule splits it among ties, which the zero background of
    MNIST makes common). The forward pass records which phase won and the backward pass routes
    the gradient by that record, never by comparing values again: XLA may recompute ``y`` for
    the backward pass with another rounding (a batch_norm before the pool, say), and a
    comparison would then find no maximum and drop the window's gradient.
    """
    return _routed_max(y, y.shape[3])


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _routed_max(y: jax.Array, phases: int) -> jax.Array:
    return _first_max(y, phases)[0]


def _first_max(y: jax.Array, phases: int) -> tuple[jax.Array, jax.Array]:
    """The maximum over axis 3 and the index of its first occurrence."""
    index = jnp.int8 if phases <= 127 else jnp.int32
    top, won = y[:, :, :, 0], jnp.zeros(y.shape[:3] + y.shape[4:], index)
    for k in range(1, phases):
        better = y[:, :, :, k] > top
        top = jnp.where(better, y[:, :, :, k], top)
        won = jnp.where(better, index(k), won)
    return top, won


def _routed_max_bwd(phases: int, won: jax.Array, g: jax.Array):
    return (jnp.stack([jnp.where(won == k, g, 0.0) for k in range(phases)], axis=3),)


_routed_max.defvjp(_first_max, _routed_max_bwd)


def _windows(x: jax.Array, kernel: Pair, stride: Pair, out: Pair) -> list[jax.Array]:
    """The kernel's kh·kw shifted, strided views of NHWC ``x``, each (N, Ho, Wo, C)."""
    return [x[:, rows, cols, :] for rows, cols in window_slices(kernel, stride, out)]


def conv_one_channel(x: jax.Array, kernel: jax.Array, bias: jax.Array, stride: Pair,
                     padding: Pair) -> jax.Array:
    """The convolution of a one-channel NHWC ``x`` with an HWIO ``kernel``: what nnx.Conv
    computes, to float32 rounding, faster in the whole train step on XLA:CPU (the README's
    benchmark says by how much). bfloat16 operands are multiplied and summed in float32 and the
    sum rounded once, as a bfloat16 convolution accumulates."""
    (ph, pw), (kh, kw) = padding, kernel.shape[:2]
    if ph or pw:
        x = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    out = ((x.shape[1] - kh) // stride[0] + 1, (x.shape[2] - kw) // stride[1] + 1)
    wide = jnp.promote_types(x.dtype, jnp.float32)
    y = _shift_and_add(x.astype(wide), kernel.astype(wide), bias.astype(wide), stride, out)
    return y.astype(x.dtype)


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
    dkernel = jnp.matmul(windows.reshape(kh * kw, -1), dy.reshape(-1, cout),
                         precision="highest").reshape(kernel.shape)
    # the input's gradient; XLA drops it when only the parameters are differentiated
    _, vjp = jax.vjp(lambda x: jax.lax.conv_general_dilated(
        x, kernel, stride, "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision="highest"), x)
    return vjp(dy)[0], dkernel, dy.sum((0, 1, 2))


_shift_and_add.defvjp(_shift_and_add_fwd, _shift_and_add_bwd)

