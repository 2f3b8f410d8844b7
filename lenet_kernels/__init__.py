"""The plan of the tuned formulations both ports share (``build(..., kernels="fused")``), in
numpy and the spec's terms: which layers each port's ``kernels.py`` computes together
(:func:`fusion_plan`, one plan for both), and the index arithmetic of those formulations. Each
port's ``kernels.py`` holds the framework code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lenet_spec import (
    ACTIVATION_TYPES,
    AvgPool,
    BatchNorm,
    Conv,
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


def conv_pool_block(infos: tuple[LayerInfo, ...], i: int) -> int:
    """How many layers from ``i`` a port's ``conv_pool`` computes at once: a stride-1 conv (no
    dilation, one group), any batch_norm and activation layers, and a non-overlapping max- or
    avg-pool; 0 when there is no such block, or when a batch_norm sees a ragged edge the pool
    drops (its statistics need every output)."""
    conv = infos[i].layer
    if not plain_conv(conv) or conv.stride != (1, 1):
        return 0
    j = i + 1
    while j < len(infos) and isinstance(infos[j].layer, (BatchNorm, *ACTIVATION_TYPES)):
        j += 1
    pool = infos[j].layer if j < len(infos) else None
    if not _plain_pool(pool):
        return 0
    (_, h, w), (ph, pw) = infos[i].out_shape, pool.kernel_size
    ragged = h % ph or w % pw
    if ragged and any(isinstance(info.layer, BatchNorm) for info in infos[i + 1:j]):
        return 0
    return j - i + 1


def _plain_pool(layer: object) -> bool:
    """A max- or avg-pool whose windows tile the input without overlap or padding."""
    return (isinstance(layer, (MaxPool, AvgPool)) and layer.kernel_size == layer.stride
            and getattr(layer, "padding", (0, 0)) == (0, 0)
            and not getattr(layer, "ceil_mode", False))


@dataclass(frozen=True)
class Fused:
    """One step of a fused forward pass: ``layers[start:stop]`` computed as ``kind``.

    - ``"conv_pool"``: conv, the layers between (batch_norm, activations), then a max-pool
      (``take_max``) or avg-pool, as one matrix product over the pool's phases; with
      ``commutes`` (a monotone activation or nothing between) a max is taken before them;
    - ``"conv_one_channel"``: a conv of a one-channel input as a shift-and-add;
    - ``"pool"``: a non-overlapping pool as a reshape and a reduction (``take_max`` or mean);
    - ``"layer"``: the layer by the framework's own module.
    """

    kind: str
    start: int
    stop: int
    take_max: bool = False
    commutes: bool = False

    @property
    def between(self) -> range:
        """The indices of a conv_pool's layers between the conv and the pool."""
        return range(self.start + 1, self.stop - 1) if self.kind == "conv_pool" else range(0)


def fusion_plan(infos: tuple[LayerInfo, ...]) -> list[Fused]:
    """The steps of ``infos``' forward pass with the tuned formulations, the same for both
    ports (each port's ``kernels.py`` computes a step its framework's way)."""
    steps, i = [], 0
    while i < len(infos):
        layer, span = infos[i].layer, conv_pool_block(infos, i)
        if span:
            between = [info.layer for info in infos[i + 1 : i + span - 1]]
            commutes = not between or (len(between) == 1 and is_monotone(between[0])
                                       and isinstance(between[0], ACTIVATION_TYPES))
            steps.append(Fused("conv_pool", i, i + span,
                               isinstance(infos[i + span - 1].layer, MaxPool), commutes))
        elif plain_conv(layer) and infos[i].in_shape[0] == 1:
            steps.append(Fused("conv_one_channel", i, i + 1))
        elif _plain_pool(layer):
            steps.append(Fused("pool", i, i + 1, isinstance(layer, MaxPool)))
        else:
            steps.append(Fused("layer", i, i + 1))
        i = steps[-1].stop
    return steps


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
