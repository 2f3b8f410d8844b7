"""The image shapes of the datasets the training programs read, and which of them a spec can
take: framework-free facts, so that ``python -m lenet_spec show`` can say which fit."""

from __future__ import annotations

from lenet_spec.layers import Shape

SHAPES: dict[str, Shape] = {
    "mnist": (1, 28, 28),
    "fashion_mnist": (1, 28, 28),
    "kmnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
}
"""Each dataset's images as (C, H, W)."""


def misfit(input_shape: Shape, dataset: str) -> str | None:
    """Why a spec of ``input_shape`` cannot take ``dataset``'s images, or None when it can
    (the same channels; images no larger than the input, which they are padded to)."""
    c, h, w = SHAPES[dataset]
    sc, sh, sw = input_shape
    if sc != c:
        return f"takes {sc} input channel{'s' if sc != 1 else ''}; {dataset} has {c}"
    if sh < h or sw < w:
        return f"takes {sh}×{sw} inputs, smaller than {dataset}'s {h}×{w}"
    return None


def fitting(input_shape: Shape) -> list[str]:
    """The datasets whose images a spec of ``input_shape`` takes."""
    return [name for name in SHAPES if misfit(input_shape, name) is None]
