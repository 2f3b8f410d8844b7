"""The plan of the tuned formulations both ports share (``build(..., kernels="fused")``), in
numpy and the spec's terms: which layers each port's ``kernels.py`` computes together, and the
index arithmetic of those formulations. Each port's ``kernels.py`` holds the framework code.
"""

from __future__ import annotations

import numpy as np

from lenet_spec import (
    ACTIVATION_TYPES,
    AvgPool,
    BatchNorm,
    Conv,
    Layer,
    LayerInfo,
    MaxPool,
    Pair,
    is_monotone,
)

KERNELS = ("auto", "stock", "fused")
"""The ``kernels=`` choices: the framework's own layers, the tuned formulations, or the faster."""


def check_kernels(kernels: str) -> None:
    """Raise one ValueError naming the choices when ``kernels`` is not one of KERNELS."""
    if kernels not in KERNELS:
        raise ValueError(f"unknown kernels {kernels!r}; expected one of {', '.join(KERNELS)}")


def plain_conv(layer: object) -> bool:
    """A conv the fused formulations compute: no dilation, one group (bias or not)."""
    return isinstance(layer, Conv) and layer.dilation == (1, 1) and layer.groups == 1


def conv_pool_span(layers: tuple[Layer, ...], i: int) -> int:
    """How many layers from ``i`` each port's fused ``conv_max_pool`` (``kernels.py``) computes
    at once: 3 for conv, monotone activation, max-pool; 2 for conv, max-pool; 0 if anything
    else stands between them (batch_norm, dropout, a non-monotone activation such as gelu), the
    conv is strided, dilated or grouped, or the pool's windows overlap."""
    conv = layers[i]
    if not plain_conv(conv) or conv.stride != (1, 1):
        return 0
    nxt = layers[i + 1] if i + 1 < len(layers) else None
    if isinstance(nxt, ACTIVATION_TYPES) and not is_monotone(nxt):
        return 0
    span = 3 if isinstance(nxt, ACTIVATION_TYPES) else 2
    last = layers[i + span - 1] if i + span - 1 < len(layers) else None
    if not isinstance(last, MaxPool) or last.kernel_size != last.stride:
        return 0
    return span


def conv_pool_block(infos: tuple[LayerInfo, ...], i: int) -> int:
    """How many layers from ``i`` the JAX port's ``conv_pool`` computes at once: a stride-1
    conv (no dilation, one group), any batch_norm and activation layers, and a non-overlapping
    max- or avg-pool; 0 when there is no such block, or when a batch_norm sees a ragged edge
    the pool drops (its statistics need every output)."""
    conv = infos[i].layer
    if not plain_conv(conv) or conv.stride != (1, 1):
        return 0
    j = i + 1
    while j < len(infos) and isinstance(infos[j].layer, (BatchNorm, *ACTIVATION_TYPES)):
        j += 1
    pool = infos[j].layer if j < len(infos) else None
    if not isinstance(pool, (MaxPool, AvgPool)) or pool.kernel_size != pool.stride:
        return 0
    (_, h, w), (ph, pw) = infos[i].out_shape, pool.kernel_size
    ragged = h % ph or w % pw
    if ragged and any(isinstance(info.layer, BatchNorm) for info in infos[i + 1:j]):
        return 0
    return j - i + 1


def phase_scatter(kernel: Pair, pool: Pair) -> np.ndarray:
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


def window_slices(kernel: Pair, stride: Pair, out: Pair) -> list[tuple[slice, slice]]:
    """The (rows, columns) slices of the kernel's kh·kw shifted, strided windows of an image,
    each ``out`` in size, in the kernel's row-major tap order."""
    (kh, kw), (sh, sw), (ho, wo) = kernel, stride, out
    return [(slice(i, i + (ho - 1) * sh + 1, sh), slice(j, j + (wo - 1) * sw + 1, sw))
            for i in range(kh) for j in range(kw)]
