"""The input pipeline both trainers share: padding and normalisation to what a spec takes,
augmentation, and the batch order, each a function of (seed, epoch) alone."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lenet_spec import Spec, misfit
from lenet_train.data.catalog import DATASETS, DataError

MEAN, STD = 0.1307, 0.3081
"""MNIST's training set mean and std (of pixels / 255) to 4 decimals, as
:func:`lenet_train.data.channel_stats` computes them (the tests check)."""


def prepare(images: np.ndarray, spec: Spec, mean: Sequence[float] = (MEAN,),
            std: Sequence[float] = (STD,), dataset: str = "mnist") -> np.ndarray:
    """uint8 (N, C, h, w) (or (N, h, w)) -> float32 (N, C, H, W): padded with background to
    the spec's input size (centred, as LeCun et al. 1998), scaled to [0, 1], normalised with
    the per-channel ``mean`` and ``std`` (of the training set)."""
    if images.ndim == 3:
        images = images[:, None]
    n, c, ih, iw = images.shape
    sc, h, w = spec.input_shape
    if dataset in DATASETS:
        why = misfit(spec.input_shape, dataset)
        if why:
            raise DataError(f"spec {spec.name} {why}")
    elif sc != c or h < ih or w < iw:
        raise DataError(f"spec {spec.name} takes {sc}×{h}×{w} inputs; the images are "
                        f"{c}×{ih}×{iw}")
    top, left = (h - ih) // 2, (w - iw) // 2
    out = np.zeros((n, c, h, w), np.float32)
    out[:, :, top : top + ih, left : left + iw] = images
    out *= np.float32(1 / 255)
    out -= np.asarray(mean, np.float32).reshape(1, c, 1, 1)
    out /= np.asarray(std, np.float32).reshape(1, c, 1, 1)
    return out


def augment(images: np.ndarray, kinds: Sequence[str], seed: int, epoch: int) -> np.ndarray:
    """``images`` uint8 (N, C, H, W) as epoch ``epoch`` trains on them: ``crop`` takes a
    random H×W window of the image zero-padded by 4 pixels a side, ``flip`` mirrors it left to
    right with probability 1/2. Example i's crop offset and flip are drawn from
    (seed, epoch, i) alone, so every framework, device layout and resumed run sees the same
    images."""
    if not kinds:
        return images
    n, c, h, w = images.shape
    # one stream per (seed, epoch, what): example i takes each stream's i-th draw
    def draws(what: int) -> np.random.Generator:
        return np.random.default_rng([seed, epoch, what])

    dy = draws(1).integers(0, 9, n) if "crop" in kinds else np.full(n, 4)
    dx = draws(2).integers(0, 9, n) if "crop" in kinds else np.full(n, 4)
    flip = draws(3).random(n) < 0.5 if "flip" in kinds else np.zeros(n, bool)
    out = np.empty_like(images)
    padded = np.zeros((c, h + 8, w + 8), images.dtype)
    for i in range(n):
        padded[:, 4 : 4 + h, 4 : 4 + w] = images[i]
        window = padded[:, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        out[i] = window[:, :, ::-1] if flip[i] else window
    return out


def epoch_order(n: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """The training batches of ``epoch``: (steps, batch_size) indices into the n examples.

    A function of (seed, epoch) alone, so every framework and every restart sees the same
    batches; the last partial batch is dropped (static shapes for XLA).
    """
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    steps = n // batch_size
    return perm[: steps * batch_size].reshape(steps, batch_size)
