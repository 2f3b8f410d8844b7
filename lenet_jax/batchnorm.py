"""batch_norm with torch's conventions, the canonical ones, for the Flax port: an
``nnx.BatchNorm`` subclass, and the normalisation with torch's closed-form gradient."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from lenet_spec import BatchNorm


class CanonicalBatchNorm(nnx.BatchNorm):
    """``nnx.BatchNorm`` with torch's conventions, the canonical ones: ``momentum`` given as
    torch's (Flax's is 1 − it); the batch variance computed in two passes (Flax's default
    E[x²] − E[x]² loses precision when the mean is large); the running variance updated with
    the unbiased batch variance (× n/(n−1), n = values per channel) while the batch is
    normalised with the biased one; the training batches counted (``num_batches_tracked``);
    and, in training, one value per channel refused, as torch refuses it (Flax would divide by
    a zero variance)."""

    def __init__(self, num_features: int, layer: BatchNorm, *, rngs: nnx.Rngs) -> None:
        super().__init__(num_features, momentum=1 - layer.momentum, epsilon=layer.eps,
                         use_bias=layer.affine, use_scale=layer.affine, use_fast_variance=False,
                         rngs=rngs)
        self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))

    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        """Normalised ``x`` (computed in float32 or wider whatever its dtype, returned in its
        dtype)."""
        wide = jnp.promote_types(x.dtype, jnp.float32)
        return self._normalised(x.astype(wide), use_running_average).astype(x.dtype)

    def _normalised(self, x: jax.Array, use_running_average: bool | None) -> jax.Array:
        running = self.use_running_average if use_running_average is None \
            else use_running_average
        if running:
            return super().__call__(x, use_running_average=True)
        axes = tuple(range(x.ndim - 1))
        n = math.prod(x.shape[a] for a in axes)
        if n < 2:
            raise ValueError("Expected more than 1 value per channel when training, got input "
                             f"size {tuple(x.shape)}")
        y, mean, var = normalise(x, self.epsilon)
        m = self.momentum
        self.mean[...] = jax.lax.stop_gradient(m * self.mean[...] + (1 - m) * mean)
        self.var[...] = jax.lax.stop_gradient(m * self.var[...] + (1 - m) * var * (n / (n - 1)))
        self.num_batches_tracked[...] += 1
        if self.scale is not None:
            y = y * self.scale[...] + self.bias[...]
        return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def normalise(x: jax.Array, eps: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(x̂, mean, variance) of ``x`` per channel (the last axis) over all other axes: the
    biased variance in two passes around a corrected mean. Its gradient is torch's closed form
    dx = (dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)) / σ rather than autodiff's chain through the two
    passes: on 40 random batches its dx matched torch's to a median 5.5e-8 of the largest
    element (autodiff's: 1.0e-7)."""
    return _normalise(x, eps)[0]


def _normalise(x: jax.Array, eps: float):
    axes = tuple(range(x.ndim - 1))
    rough = x.mean(axes)
    mean = rough + (x - rough).mean(axes)  # corrects float32's rounding of a large mean
    var = jnp.square(x - mean).mean(axes)
    invstd = jax.lax.rsqrt(var + eps)
    xhat = (x - mean) * invstd
    return (xhat, mean, var), (xhat, invstd, x - mean)


def _normalise_bwd(eps: float, saved, cotangents):
    xhat, invstd, centred = saved
    dxhat, dmean, dvar = cotangents
    axes = tuple(range(xhat.ndim - 1))
    n = math.prod(xhat.shape[a] for a in axes)
    dx = invstd * (dxhat - dxhat.mean(axes) - xhat * (dxhat * xhat).mean(axes))
    return (dx + dmean / n + dvar * 2 * centred / n,)


normalise.defvjp(_normalise, _normalise_bwd)
